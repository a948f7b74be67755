//! The tag keys jbake puts on what it makes. `gc` and `roll` find jbake's resources by them, so
//! they never change meaning.
//!
//! On everything a build makes (key pair, security group, instance and its volume, image,
//! snapshots): [`BUILD_ID`], [`RECIPE`], [`CREATED_AT`], [`EXPIRES_AT`], `Name`. The key pair,
//! security group and instance also carry [`VERSION`]: the version the build plans, which is how
//! a concurrent build of the same recipe sees that number as taken. On the image and its
//! snapshots also [`VERSION`], [`CONTENT_HASH`], [`BASE_AMI`], [`JBAKE_VERSION`] and the recipe's
//! own `tags:`; on the image [`COMPLETE`], the build's one-time identities it must not carry
//! ([`BUILD_HOST_KEY`], [`BUILD_KEY`], [`BUILD_MACHINE_ID`], set at creation) and, once the boot
//! test has a verdict, [`TESTED`] and [`TESTED_AT`].

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

/// On a copy of an image in another region (`--copy-to`, `jbake copy`) and its snapshots: the
/// id of the image it is a copy of. With [`SOURCE_REGION`], what makes a copy recognisable in
/// its own region (gc and prune there need nothing else).
pub const COPY_OF: &str = "jbake:copy-of";
/// On a copy and its snapshots: the region of the image it is a copy of.
pub const SOURCE_REGION: &str = "jbake:source-region";
/// On a build's image (from its creation) when it is copied: the regions of its copies,
/// comma-separated, so that `jbake gc --region R` also looks there for a half-made copy.
pub const COPY_REGIONS: &str = "jbake:copy-regions";
/// The boot test's verdict on the image: `true` (it passed: rollable), `false` (it failed: never
/// rolled, `jbake prune` removes it). No tag: not tested (`--skip-test`, or baked before boot
/// tests), rolled only with `--allow-untested`.
pub const TESTED: &str = "jbake:tested";
/// When the verdict was given (RFC 3339).
pub const TESTED_AT: &str = "jbake:tested-at";
/// The SHA-256 fingerprint of the build instance's one-time host key (public: every SSH client
/// sees it): no instance of the image may serve it.
pub const BUILD_HOST_KEY: &str = "jbake:build-host-key";
/// The SHA-256 fingerprint of the build's one-time login key: no instance of the image may
/// accept it.
pub const BUILD_KEY: &str = "jbake:build-key";
/// `sha256:` and the SHA-256 of the build instance's machine id (not the id itself: systemd
/// asks to keep it private): no instance of the image may have it.
pub const BUILD_MACHINE_ID: &str = "jbake:build-machine-id";
