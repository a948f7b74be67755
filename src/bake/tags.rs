//! The tag keys jbake puts on what it makes. `gc` and `roll` find jbake's resources by them, so
//! they never change meaning.
//!
//! On everything a build makes (key pair, security group, instance and its volume, image,
//! snapshots): [`BUILD_ID`], [`RECIPE`], [`CREATED_AT`], [`EXPIRES_AT`], `Name`. The key pair,
//! security group and instance also carry [`VERSION`]: the version the build plans, which is how
//! a concurrent build of the same recipe sees that number as taken. On the image and its
//! snapshots also [`VERSION`], [`CONTENT_HASH`], [`BASE_AMI`], [`JBAKE_VERSION`] and the recipe's
//! own `tags:`; on the image [`COMPLETE`].

pub const BUILD_ID: &str = "jbake:build-id";
pub const RECIPE: &str = "jbake:recipe";
/// When gc may consider the build over. A build moves it later while it waits for its image.
pub const EXPIRES_AT: &str = "jbake:expires-at";
pub const CREATED_AT: &str = "jbake:created-at";
pub const VERSION: &str = "jbake:version";
pub const CONTENT_HASH: &str = "jbake:content-hash";
pub const BASE_AMI: &str = "jbake:base-ami";
pub const JBAKE_VERSION: &str = "jbake:jbake-version";
/// "false" from CreateImage until the image is available, IMDSv2-only and tagged: gc removes a
/// "false" image whose build is over.
pub const COMPLETE: &str = "jbake:complete";
