//! What happens to a finished image besides being made: **copies** in other regions for disaster
//! recovery (CopyImage, encrypted, tagged like the image), **launch permissions** for other
//! accounts, and its id **published** in an SSM parameter per region, so that launch templates
//! (`resolve:ssm:`), CloudFormation and Terraform follow it.
//!
//! In a build these are the stages copy → share → publish, after the image (and its boot test)
//! and before the tag that makes the image the build's result: until then everything they made
//! is undone with the rest. `jbake copy IMAGE` runs the same stages for an image that exists.
//!
//! This module holds the options (checked offline: exit 2 before any AWS call), the checks that
//! need AWS but come before anything is made (is the key of each region usable, can the image be
//! shared at all: an image encrypted with the AWS managed `aws/ebs` key cannot), and the pure
//! decisions (a copy's tags, whether a parameter may be overwritten). The stages themselves are
//! in [`super::stages::copy`], [`super::stages::share`] and [`super::stages::publish`].

use std::cmp::Ordering;
use std::collections::BTreeMap;
use std::sync::LazyLock;
use std::time::Duration;

use regex::Regex;

use crate::aws::ec2::{ImageInfo, Tags};
use crate::aws::kms::{KeyInfo, Manager};
use crate::aws::params::Param;
use crate::aws::{self, Aws};
use crate::progress::Progress;

use super::ledger::Ledger;
use super::tags;

/// The AWS managed key of EBS, as `GetEbsDefaultKmsKeyId` names it when the account's default
/// was never changed.
pub const AWS_EBS_KEY: &str = "alias/aws/ebs";
/// The prefix of `--publish-ssm` without a value: `/jbake/<recipe>/latest`.
pub const DEFAULT_PREFIX: &str = "/jbake";
/// The default `--copy-timeout`: CopyImage across regions takes tens of minutes for a 16 GiB
/// volume (AWS gives no bound; the first copy of a snapshot to a region copies all its blocks).
pub const DEFAULT_COPY_TIMEOUT: Duration = Duration::from_secs(2 * 3600);
/// Added to `--copy-timeout` for a copy's `jbake:expires-at`: tagging and cleanup.
const COPY_MARGIN: Duration = Duration::from_secs(15 * 60);
/// EC2 allows 50 tags on a resource.
const MAX_TAGS: usize = 50;

/// What `--kms-key-id` accepts: a key id, a multi-Region key id, an alias, or the ARN of a key
/// or an alias (whose region is the one it is used in).
static KEY: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(
        r"^([0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}|mrk-[0-9a-f]{32}|alias/[A-Za-z0-9/_-]{1,250})$",
    )
    .expect("static regex")
});
static KEY_ARN: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(r"^arn:aws(-[a-z]+)*:kms:([a-z]{2}(-gov|-iso[a-z]?)?-[a-z]+-\d+):\d{12}:(key/[A-Za-z0-9-]+|alias/[A-Za-z0-9/_-]{1,250})$")
        .expect("static regex")
});
static ACCOUNT: LazyLock<Regex> = LazyLock::new(|| Regex::new(r"^\d{12}$").expect("static regex"));
static PREFIX: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(r"^(/[A-Za-z0-9_.-]+)+$").expect("static regex"));
static AMI: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(r"^ami-[0-9a-f]{8}([0-9a-f]{9})?$").expect("static regex"));

/// The KMS keys of `--kms-key-id`: one for every region, and per region.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KmsKeys {
    /// `--kms-key-id KEY` (an alias or a multi-Region key exists under one name everywhere).
    pub all: Option<String>,
    /// `--kms-key-id REGION=KEY`, and key ARNs (by their region).
    pub by_region: BTreeMap<String, String>,
}

impl KmsKeys {
    /// The key of `region`, if one was given.
    pub fn for_region(&self, region: &str) -> Option<&str> {
        self.by_region
            .get(region)
            .or(self.all.as_ref())
            .map(String::as_str)
    }

    /// Collects the `--kms-key-id` values ([`parse_kms_arg`]); one key per region.
    pub fn from_args(args: &[(Option<String>, String)]) -> Result<KmsKeys, Refusal> {
        let mut keys = KmsKeys::default();
        for (region, key) in args {
            let region = region
                .clone()
                .or_else(|| arn_region(key).map(str::to_string));
            match region {
                Some(r) => {
                    if let Some(other) = keys.by_region.insert(r.clone(), key.clone()) {
                        return Err(Refusal::KeyTwice {
                            region: r,
                            keys: format!("{other} and {key}"),
                        });
                    }
                }
                None => {
                    if let Some(other) = keys.all.replace(key.clone()) {
                        return Err(Refusal::KeyTwice {
                            region: "every region".into(),
                            keys: format!("{other} and {key}"),
                        });
                    }
                }
            }
        }
        Ok(keys)
    }
}

/// The region of a key ARN.
fn arn_region(key: &str) -> Option<&str> {
    KEY_ARN
        .captures(key)
        .and_then(|c| c.get(2))
        .map(|m| m.as_str())
}

/// Whether `key` names the AWS managed EBS key by its alias.
pub fn is_aws_ebs_alias(key: &str) -> bool {
    key == AWS_EBS_KEY || key.ends_with(":alias/aws/ebs")
}

/// `--kms-key-id`: `KEY` or `REGION=KEY`.
pub fn parse_kms_arg(s: &str) -> Result<(Option<String>, String), String> {
    let (region, key) = match s.split_once('=') {
        Some((r, k)) => (Some(r), k),
        None => (None, s),
    };
    if let Some(r) = region {
        crate::cli::parse_region(r)?;
    }
    if !(KEY.is_match(key) || KEY_ARN.is_match(key)) {
        return Err(format!(
            "'{key}' is not a KMS key: a key id (1234abcd-12ab-34cd-56ef-1234567890ab), \
             alias/NAME, or a key or alias ARN; REGION=KEY gives one region its key"
        ));
    }
    if let (Some(r), Some(arn)) = (region, arn_region(key)) {
        if r != arn {
            return Err(format!("'{key}' is a key of {arn}, not of {r}"));
        }
    }
    Ok((region.map(str::to_string), key.to_string()))
}

/// `--share-with`: a 12-digit account id.
pub fn parse_account(s: &str) -> Result<String, String> {
    if ACCOUNT.is_match(s) {
        Ok(s.to_string())
    } else {
        Err(format!(
            "'{s}' is not an AWS account id (12 digits); jbake never makes an image public"
        ))
    }
}

/// `--publish-ssm PREFIX`: a parameter path, not under the reserved `/aws` and `/ssm`.
pub fn parse_prefix(s: &str) -> Result<String, String> {
    let lower = s.to_ascii_lowercase();
    if !PREFIX.is_match(s) {
        return Err(format!(
            "'{s}' is not an SSM parameter path: /WORD[/WORD…] of letters, digits, '_', '.', '-', \
             without a trailing '/' (jbake adds /<recipe>/latest)"
        ));
    }
    let first = lower.split('/').nth(1).unwrap_or_default();
    if first.starts_with("aws") || first.starts_with("ssm") {
        return Err(format!(
            "'{s}': parameter names under /aws and /ssm are reserved by AWS"
        ));
    }
    // SSM: at most 15 levels (the prefix's, the recipe and `latest`), 1011 characters.
    if s.matches('/').count() > 13 || s.len() > 900 {
        return Err(format!(
            "'{s}' is too deep or too long for an SSM parameter path"
        ));
    }
    Ok(s.to_string())
}

/// Everything about an image besides making it: `--copy-to`, `--kms-key-id`, `--share-with`,
/// `--publish-ssm`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Distribution {
    /// Regions that get a copy, as given (never the image's own).
    pub copy_to: Vec<String>,
    pub kms: KmsKeys,
    /// Accounts that may launch the image and its copies.
    pub share_with: Vec<String>,
    /// The prefix of the parameters the image id is published in.
    pub publish: Option<String>,
    /// How long a copy may take to become available.
    pub copy_timeout: Duration,
    /// Publish an image whose boot test did not pass (or never ran).
    pub allow_untested: bool,
}

impl Default for Distribution {
    fn default() -> Distribution {
        Distribution {
            copy_to: Vec::new(),
            kms: KmsKeys::default(),
            share_with: Vec::new(),
            publish: None,
            copy_timeout: DEFAULT_COPY_TIMEOUT,
            allow_untested: false,
        }
    }
}

/// Where the image being distributed comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    /// A build makes it: `--kms-key-id` for its own region encrypts its root volume.
    Build,
    /// It exists (`jbake copy IMAGE`): its encryption is what it is.
    Existing,
}

impl Distribution {
    /// Nothing to do besides making the image.
    pub fn is_empty(&self) -> bool {
        self.copy_to.is_empty() && self.share_with.is_empty() && self.publish.is_none()
    }

    /// How much longer than the image itself a build may take before it is done with it (its
    /// copies): added to the image's `jbake:expires-at`, so gc leaves it alone meanwhile.
    pub fn extra_time(&self) -> Duration {
        if self.copy_to.is_empty() {
            Duration::ZERO
        } else {
            self.copy_timeout.saturating_add(COPY_MARGIN)
        }
    }

    /// The tags a build's image gets at creation besides its own (where its copies go).
    pub fn image_tags(&self) -> Tags {
        if self.copy_to.is_empty() {
            Vec::new()
        } else {
            vec![(tags::COPY_REGIONS.to_string(), self.copy_to.join(","))]
        }
    }

    /// The parameter an image of `recipe` is published in.
    pub fn parameter(&self, recipe: &str) -> Option<String> {
        self.publish
            .as_ref()
            .map(|p| format!("{}/{recipe}/latest", p.trim_end_matches('/')))
    }

    /// The offline checks: exit 2 before any AWS call.
    pub fn check(&self, home: &str, origin: Origin) -> Result<(), Refusal> {
        let mut seen: Vec<&str> = Vec::new();
        for r in &self.copy_to {
            if r == home {
                return Err(Refusal::CopyToHome { region: r.clone() });
            }
            if seen.contains(&r.as_str()) {
                return Err(Refusal::RegionTwice { region: r.clone() });
            }
            seen.push(r);
        }
        for (region, key) in &self.kms.by_region {
            if region == home {
                if origin == Origin::Existing {
                    return Err(Refusal::KeyForSource {
                        region: region.clone(),
                        key: key.clone(),
                    });
                }
            } else if !self.copy_to.contains(region) {
                return Err(Refusal::KeyForNoRegion {
                    region: region.clone(),
                    key: key.clone(),
                    home: home.to_string(),
                });
            }
        }
        if self.kms.all.is_some() && self.copy_to.is_empty() && origin == Origin::Existing {
            return Err(Refusal::KeyForSource {
                region: home.to_string(),
                key: self.kms.all.clone().unwrap_or_default(),
            });
        }
        let mut accounts: Vec<&str> = Vec::new();
        for a in &self.share_with {
            if accounts.contains(&a.as_str()) {
                return Err(Refusal::AccountTwice { account: a.clone() });
            }
            accounts.push(a);
        }
        if !self.share_with.is_empty() {
            // The AWS managed key, named: refused without asking KMS.
            for region in self.regions(home, origin) {
                if let Some(key) = self.kms.for_region(&region).filter(|k| is_aws_ebs_alias(k)) {
                    return Err(Refusal::AwsManagedKey {
                        region,
                        key: key.to_string(),
                        accounts: self.share_with.join(", "),
                    });
                }
            }
        }
        Ok(())
    }

    /// The regions whose encryption key matters: the copies', and the build's own when it
    /// makes the image.
    fn regions(&self, home: &str, origin: Origin) -> Vec<String> {
        let mut r = Vec::new();
        if origin == Origin::Build {
            r.push(home.to_string());
        }
        r.extend(self.copy_to.iter().cloned());
        r
    }
}

/// Bad options, or options this account cannot honour: exit 2, before anything is made.
#[derive(Debug, thiserror::Error)]
pub enum Refusal {
    #[error(
        "--copy-to {region}: that is the image's own region (--region); name the other regions"
    )]
    CopyToHome { region: String },
    #[error("--copy-to names {region} twice")]
    RegionTwice { region: String },
    #[error("--share-with names {account} twice")]
    AccountTwice { account: String },
    #[error("--kms-key-id: two keys for {region} ({keys})")]
    KeyTwice { region: String, keys: String },
    #[error(
        "--kms-key-id {region}={key}: {region} is neither --region ({home}) nor a --copy-to region"
    )]
    KeyForNoRegion {
        region: String,
        key: String,
        home: String,
    },
    #[error(
        "--kms-key-id {key} for {region}: the image there exists already, encrypted as it is; \
         a key only applies to the copies (--kms-key-id REGION=KEY per --copy-to region)"
    )]
    KeyForSource { region: String, key: String },
    #[error(
        "cannot share with {accounts}: the image in {region} would be encrypted with the AWS \
         managed key aws/ebs ({key}), whose key policy cannot let another account use it; pass \
         --kms-key-id {region}=<a customer managed key> (its key policy lets those accounts \
         decrypt), or set one as the account's default EBS key in {region}"
    )]
    AwsManagedKey {
        region: String,
        key: String,
        accounts: String,
    },
    #[error("--kms-key-id {key}: KMS has no such key in {region}")]
    NoSuchKey { region: String, key: String },
    #[error("the KMS key {key} in {region} is {state}: EBS cannot encrypt with it")]
    KeyNotUsable {
        region: String,
        key: String,
        state: String,
    },
    #[error("image {id} does not exist in {region}")]
    NoImage { id: String, region: String },
    #[error("image {id} ({name}) in {region} is not a finished jbake image: {why}")]
    NotJbakes {
        id: String,
        name: String,
        region: String,
        why: String,
    },
    #[error(
        "image {id} has {count} tags; a copy needs {} more and EC2 allows {MAX_TAGS}",
        COPY_TAG_COUNT
    )]
    TooManyTags { id: String, count: usize },
}

/// What a copy adds to the source's tags (build id, created/expires, copy-of, source region).
const COPY_TAG_COUNT: usize = 5;

/// What went wrong while distributing an image (exit 1: the build fails, what it made is
/// removed).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("the copy {id} of {source_id} in {region} is {state}: EC2 could not make it")]
    CopyFailed {
        region: String,
        id: String,
        source_id: String,
        state: String,
    },
    #[error(
        "cannot copy {source_id} to {region}: the name {name} is taken there by {other} \
         (deregister it, or it is another jbake's copy still being made)"
    )]
    NameTaken {
        region: String,
        name: String,
        source_id: String,
        other: String,
    },
    #[error("not publishing {image} in {parameter} ({region}): {why}")]
    PublishRefused {
        region: String,
        parameter: String,
        image: String,
        why: String,
    },
    #[error(
        "SSM did not accept {image} as version {version} of {parameter} in {region} within {}s \
         (the aws:ec2:image data type checks the image asynchronously): it holds {holds}",
        aws::wait::PROPAGATION.as_secs()
    )]
    PublishNotConfirmed {
        region: String,
        parameter: String,
        image: String,
        version: i64,
        holds: String,
    },
}

/// The key that encrypts the image in one region, once checked.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct RegionKey {
    pub region: String,
    /// The key: given, or the region's default EBS key (`None`: not looked up, no need).
    pub key: Option<KeyInfo>,
}

/// The checks that need AWS but come before anything is made (exit 2 when they refuse): each
/// region's key exists and is enabled; when sharing, no region's image would be encrypted with
/// the AWS managed `aws/ebs` key. `source_snapshots`: the snapshots of an existing image (`jbake
/// copy`), whose keys decide whether it can be shared. Returns the keys, for what the accounts
/// shared with need.
pub async fn check_keys(
    aws: &Aws,
    dist: &Distribution,
    origin: Origin,
    source_snapshots: &[String],
    progress: &Progress,
) -> Result<Vec<RegionKey>, super::Error> {
    let sharing = !dist.share_with.is_empty();
    let mut out = Vec::new();
    let home = aws.region.clone();
    let mut regions: Vec<(String, Option<Aws>)> = Vec::new();
    if origin == Origin::Build || sharing {
        regions.push((home.clone(), None));
    }
    for r in &dist.copy_to {
        regions.push((r.clone(), Some(aws.in_region(r).await)));
    }
    for (region, regional) in &regions {
        let client = regional.as_ref().unwrap_or(aws);
        let given = if region == &home && origin == Origin::Existing {
            None
        } else {
            dist.kms.for_region(region).map(str::to_string)
        };
        let key = match (&given, origin, region == &home) {
            (Some(k), _, _) => {
                let found = client.kms.describe(k).await?.ok_or(Refusal::NoSuchKey {
                    region: region.clone(),
                    key: k.clone(),
                })?;
                if !found.usable() {
                    return Err(Refusal::KeyNotUsable {
                        region: region.clone(),
                        key: k.clone(),
                        state: found.state,
                    }
                    .into());
                }
                Some(found)
            }
            // An existing image's own encryption: its snapshots' key.
            (None, Origin::Existing, true) => {
                let keys = client.ec2.snapshot_keys(source_snapshots).await?;
                let mut found = None;
                for arn in keys.iter().filter_map(|k| k.kms_key_id.clone()) {
                    found = client.kms.describe(&arn).await?;
                    if found.as_ref().is_some_and(|k| k.manager == Manager::Aws) {
                        break;
                    }
                }
                found
            }
            (None, _, _) if sharing => {
                let default = client.ec2.ebs_default_kms_key_id().await?;
                progress.info(
                    "keys",
                    &format!("the default EBS key in {region} is {default}"),
                );
                if is_aws_ebs_alias(&default) {
                    Some(KeyInfo {
                        arn: default.clone(),
                        manager: Manager::Aws,
                        state: "Enabled".into(),
                    })
                } else {
                    client.kms.describe(&default).await?
                }
            }
            (None, _, _) => None,
        };
        if sharing {
            if let Some(k) = key.as_ref().filter(|k| k.manager == Manager::Aws) {
                return Err(Refusal::AwsManagedKey {
                    region: region.clone(),
                    key: k.arn.clone(),
                    accounts: dist.share_with.join(", "),
                }
                .into());
            }
        }
        out.push(RegionKey {
            region: region.clone(),
            key,
        });
    }
    Ok(out)
}

/// What another account needs on each customer managed key to launch the shared image: KMS
/// key policy statements (or grants) for these operations (AWS: "Share an AMI with specific AWS
/// accounts", encrypted snapshots).
pub const GRANTEE_OPERATIONS: [&str; 5] = [
    "kms:DescribeKey",
    "kms:CreateGrant",
    "kms:Decrypt",
    "kms:ReEncryptFrom",
    "kms:GenerateDataKeyWithoutPlaintext",
];

/// The sentence that says which keys the accounts shared with need, and for what (none for an
/// unencrypted image).
pub fn grants_needed(accounts: &[String], keys: &[RegionKey]) -> Option<String> {
    let arns: Vec<String> = keys
        .iter()
        .filter_map(|k| {
            k.key
                .as_ref()
                .map(|key| format!("{} ({})", key.arn, k.region))
        })
        .collect();
    if accounts.is_empty() || arns.is_empty() {
        return None;
    }
    Some(format!(
        "accounts {} can launch the image only if each key's policy (or a grant) lets them use it: \
         {} on {}",
        accounts.join(", "),
        GRANTEE_OPERATIONS.join(", "),
        arns.join(", ")
    ))
}

/// A copy's tags and its snapshots' (the same without `jbake:complete`): the source's, with
/// whose the copy is (`run_id`: the build, or `jbake copy`'s run), when it was made and until
/// when gc leaves it, and what it is a copy of. `aws:` keys are EC2's, not copied.
pub fn copy_tags(
    source: &ImageInfo,
    source_region: &str,
    run_id: &str,
    started: &str,
    expires: &str,
) -> Result<(Tags, Tags), Refusal> {
    let replaced = [
        tags::BUILD_ID,
        tags::CREATED_AT,
        tags::EXPIRES_AT,
        tags::COMPLETE,
        tags::COPY_OF,
        tags::SOURCE_REGION,
        tags::COPY_REGIONS,
    ];
    let mut t: Tags = source
        .tags
        .iter()
        .filter(|(k, _)| !k.starts_with("aws:") && !replaced.contains(&k.as_str()))
        .cloned()
        .collect();
    if t.len() + COPY_TAG_COUNT + 1 > MAX_TAGS {
        return Err(Refusal::TooManyTags {
            id: source.id.clone(),
            count: source.tags.len(),
        });
    }
    t.extend([
        (tags::BUILD_ID.to_string(), run_id.to_string()),
        (tags::CREATED_AT.to_string(), started.to_string()),
        (tags::EXPIRES_AT.to_string(), expires.to_string()),
        (tags::COPY_OF.to_string(), source.id.clone()),
        (tags::SOURCE_REGION.to_string(), source_region.to_string()),
    ]);
    let snapshot = t.clone();
    t.push((tags::COMPLETE.to_string(), "false".to_string()));
    Ok((t, snapshot))
}

/// Why an existing image cannot be distributed: it must be a finished jbake image.
pub fn check_source(image: &ImageInfo, region: &str) -> Result<(), Refusal> {
    let refuse = |why: String| Refusal::NotJbakes {
        id: image.id.clone(),
        name: image.name.clone(),
        region: region.to_string(),
        why,
    };
    let (Some(recipe), Some(_)) = (image.tag(tags::RECIPE), image.tag(tags::BUILD_ID)) else {
        return Err(refuse(format!(
            "it has no {} and {} tags",
            tags::RECIPE,
            tags::BUILD_ID
        )));
    };
    if image.tag(tags::COMPLETE) != Some("true") {
        return Err(refuse(format!(
            "{} is not true (a build still making it, or one that failed)",
            tags::COMPLETE
        )));
    }
    let version = image.tag(tags::VERSION).unwrap_or_default();
    if version.is_empty() || image.name != format!("{recipe}-{version}") {
        return Err(refuse(format!(
            "its name is not {recipe}-<{}> as jbake names its images",
            tags::VERSION
        )));
    }
    if !crate::aws::ec2::image_available(&image.state) {
        return Err(refuse(format!("it is {}", image.state)));
    }
    Ok(())
}

/// `YYYY.MM.DD-N` ordered (the date, then N as a number); `None` for anything else.
pub fn compare_versions(a: &str, b: &str) -> Option<Ordering> {
    fn key(v: &str) -> Option<(&str, u64)> {
        let (day, n) = v.rsplit_once('-')?;
        let ok = day.len() == 10
            && day.bytes().enumerate().all(|(i, c)| {
                if i == 4 || i == 7 {
                    c == b'.'
                } else {
                    c.is_ascii_digit()
                }
            });
        if !ok {
            return None;
        }
        Some((day, n.parse().ok()?))
    }
    Some(key(a)?.cmp(&key(b)?))
}

/// What publishing does to one parameter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Publish {
    /// It holds this image already.
    Already,
    /// Write it; `previous` is what it held (put back if the build fails after).
    Write {
        previous: Option<String>,
        note: Option<String>,
    },
    /// Leave it: why.
    Refuse(String),
}

/// Whether `ours` (an image of `recipe`, version `version`) may replace what the parameter
/// holds (`current`, and `held`: that image, if EC2 still has it). Never an older image over
/// a newer one, never over something that is not an image of the same recipe.
pub fn decide_publish(
    current: Option<&Param>,
    held: Option<&ImageInfo>,
    ours: &str,
    recipe: &str,
    version: &str,
) -> Publish {
    let Some(current) = current else {
        return Publish::Write {
            previous: None,
            note: None,
        };
    };
    if current.value == ours {
        return Publish::Already;
    }
    if !AMI.is_match(&current.value) {
        return Publish::Refuse(format!(
            "it holds '{}', not an image id: delete it or choose another --publish-ssm prefix",
            current.value
        ));
    }
    let Some(held) = held else {
        // Nothing to put back should the build fail: SSM would refuse an image that is gone.
        return Publish::Write {
            previous: None,
            note: Some(format!(
                "it named {}, which no longer exists",
                current.value
            )),
        };
    };
    match held.tag(tags::RECIPE) {
        Some(r) if r == recipe => {}
        Some(r) => return Publish::Refuse(format!("it names {}, an image of recipe {r}", held.id)),
        None => {
            return Publish::Refuse(format!(
                "it names {} ({}), which jbake did not make",
                held.id, held.name
            ))
        }
    }
    let theirs = held.tag(tags::VERSION).unwrap_or_default();
    match compare_versions(theirs, version) {
        Some(Ordering::Greater) => Publish::Refuse(format!(
            "it names {} of version {theirs}, newer than {version}: an older image never \
             replaces a newer one (a rollback goes through `jbake roll --image`)",
            held.id
        )),
        Some(_) => Publish::Write {
            previous: Some(current.value.clone()),
            note: None,
        },
        None => Publish::Refuse(format!(
            "it names {}, whose {} '{theirs}' is not a jbake version",
            held.id,
            tags::VERSION
        )),
    }
}

/// Whether an image may be published, from its boot test: the build's stage ([`BootTest`]) or
/// the image's `jbake:tested` tag. `Ok(Some(warning))`: yes, but say this.
///
/// [`BootTest`]: super::stages::BootTest
pub fn may_publish(
    build: super::stages::BootTest,
    tested_tag: Option<&str>,
    allow_untested: bool,
) -> Result<Option<String>, String> {
    use super::stages::BootTest;
    match tested_tag {
        Some("true") => return Ok(None),
        Some(other) => {
            return Err(format!(
                "its boot test failed ({}={other}): it is never published",
                tags::TESTED
            ))
        }
        None => {}
    }
    match build {
        BootTest::Passed => Ok(None),
        BootTest::Pending if allow_untested => Ok(Some(format!(
            "the image is not tested ({} is not true): published anyway (--allow-untested)",
            tags::TESTED
        ))),
        BootTest::Pending => Err(format!(
            "it is not tested ({} is not true): test it first, or pass --allow-untested",
            tags::TESTED
        )),
    }
}

/// Where an image went besides its own region: the build's (and `jbake copy`'s) result.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Distributed {
    /// Every region's image id, the image's own region included.
    #[serde(default)]
    pub regions: BTreeMap<String, String>,
    /// Accounts that may launch the image and its copies.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub shared_with: Vec<String>,
    /// The parameters that name the image (or its copy), per region.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub published: Vec<Published>,
}

/// One published parameter.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Published {
    pub region: String,
    pub parameter: String,
    pub image: String,
    /// The parameter's version that holds it.
    pub version: i64,
}

/// The image being distributed, as EC2 shows it (its tags: the boot test's included).
#[derive(Debug, Clone)]
pub struct Source {
    pub region: String,
    pub image: ImageInfo,
}

/// What the distribution stages share: in a build, borrowed from its state; in `jbake copy`,
/// its own.
pub struct Ctx<'a> {
    /// The clients of the image's own region.
    pub aws: &'a Aws,
    pub ledger: &'a Ledger,
    pub progress: &'a Progress,
    /// Whose copies these are: the build's id, or the `jbake copy` run's.
    pub run_id: &'a str,
    /// When the run started (RFC 3339).
    pub started: &'a str,
    pub dist: &'a Distribution,
}

#[cfg(test)]
mod tests {
    use super::super::stages::BootTest;
    use super::*;

    fn image(id: &str, recipe: Option<&str>, version: &str) -> ImageInfo {
        let mut tags: Tags = vec![
            (tags::VERSION.into(), version.into()),
            (tags::BUILD_ID.into(), "20261130-010203-abcdef".into()),
            (tags::COMPLETE.into(), "true".into()),
            (tags::EXPIRES_AT.into(), "2026-11-30T03:00:00Z".into()),
            ("aws:ec2launchtemplate:id".into(), "lt-1".into()),
            ("Name".into(), format!("r-{version}")),
        ];
        if let Some(r) = recipe {
            tags.push((tags::RECIPE.into(), r.into()));
        }
        ImageInfo {
            id: id.into(),
            name: format!("{}-{version}", recipe.unwrap_or("x")),
            state: "available".into(),
            creation_date: String::new(),
            root_device: None,
            snapshots: vec!["snap-1".into()],
            tags,
        }
    }

    #[test]
    fn kms_keys_by_region_and_for_all() {
        assert_eq!(
            parse_kms_arg("alias/jbake"),
            Ok((None, "alias/jbake".to_string()))
        );
        assert_eq!(
            parse_kms_arg("eu-west-1=mrk-0123456789abcdef0123456789abcdef"),
            Ok((
                Some("eu-west-1".into()),
                "mrk-0123456789abcdef0123456789abcdef".into()
            ))
        );
        let arn = "arn:aws:kms:us-west-2:111122223333:key/1234abcd-12ab-34cd-56ef-1234567890ab";
        assert_eq!(parse_kms_arg(arn), Ok((None, arn.to_string())));
        assert!(parse_kms_arg(&format!("eu-west-1={arn}"))
            .unwrap_err()
            .contains("a key of us-west-2, not of eu-west-1"));
        for bad in [
            "",
            "alias/",
            "key",
            "mars=alias/x",
            "alias/a b",
            "arn:aws:kms:us-west-2:1:key/x",
        ] {
            assert!(parse_kms_arg(bad).is_err(), "{bad}");
        }
        let keys = KmsKeys::from_args(&[
            (None, "alias/all".into()),
            (None, arn.into()),
            (Some("eu-west-1".into()), "alias/eu".into()),
        ])
        .expect("keys");
        assert_eq!(keys.for_region("us-west-2"), Some(arn));
        assert_eq!(keys.for_region("eu-west-1"), Some("alias/eu"));
        assert_eq!(keys.for_region("ap-south-1"), Some("alias/all"));
        assert!(matches!(
            KmsKeys::from_args(&[(None, "alias/a".into()), (None, "alias/b".into())]),
            Err(Refusal::KeyTwice { .. })
        ));
        assert!(is_aws_ebs_alias("alias/aws/ebs"));
        assert!(is_aws_ebs_alias(
            "arn:aws:kms:us-east-1:111122223333:alias/aws/ebs"
        ));
        assert!(!is_aws_ebs_alias("alias/aws/ebs-not"));
    }

    #[test]
    fn accounts_and_prefixes() {
        assert!(parse_account("111122223333").is_ok());
        for bad in ["all", "1111222233334", "11112222333", "1111-2222-3333"] {
            assert!(parse_account(bad).is_err(), "{bad}");
        }
        assert_eq!(parse_prefix("/jbake"), Ok("/jbake".to_string()));
        assert!(parse_prefix("/org/images.v2").is_ok());
        for bad in ["jbake", "/jbake/", "/", "/aws/x", "/SSM", "/a b", "//x"] {
            assert!(parse_prefix(bad).is_err(), "{bad}");
        }
        let d = Distribution {
            publish: Some("/jbake".into()),
            ..Distribution::default()
        };
        assert_eq!(
            d.parameter("jenkins-controller").as_deref(),
            Some("/jbake/jenkins-controller/latest"),
            "the name the Terraform controller module reads"
        );
    }

    #[test]
    fn offline_checks() {
        let ok = Distribution {
            copy_to: vec!["us-west-2".into(), "eu-west-1".into()],
            kms: KmsKeys {
                all: None,
                by_region: [("us-west-2".to_string(), "alias/dr".to_string())].into(),
            },
            share_with: vec!["111122223333".into()],
            ..Distribution::default()
        };
        assert!(ok.check("us-east-1", Origin::Build).is_ok());
        assert!(ok.check("us-east-1", Origin::Existing).is_ok());
        assert!(matches!(
            ok.check("us-west-2", Origin::Build),
            Err(Refusal::CopyToHome { .. })
        ));
        let mut twice = ok.clone();
        twice.copy_to.push("eu-west-1".into());
        assert!(matches!(
            twice.check("us-east-1", Origin::Build),
            Err(Refusal::RegionTwice { .. })
        ));
        let mut stray = ok.clone();
        stray
            .kms
            .by_region
            .insert("ap-south-1".into(), "alias/x".into());
        assert!(stray
            .check("us-east-1", Origin::Build)
            .unwrap_err()
            .to_string()
            .contains("ap-south-1 is neither --region (us-east-1) nor a --copy-to region"));
        let mut home_key = ok.clone();
        home_key
            .kms
            .by_region
            .insert("us-east-1".into(), "alias/x".into());
        assert!(home_key.check("us-east-1", Origin::Build).is_ok());
        assert!(matches!(
            home_key.check("us-east-1", Origin::Existing),
            Err(Refusal::KeyForSource { .. })
        ));
        let mut ebs = ok.clone();
        ebs.kms.all = Some("alias/aws/ebs".into());
        let e = ebs
            .check("us-east-1", Origin::Build)
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("cannot share with 111122223333: the image in us-east-1 would be encrypted with the AWS managed key aws/ebs"),
            "{e}"
        );
        ebs.share_with.clear();
        assert!(
            ebs.check("us-east-1", Origin::Build).is_ok(),
            "not shared: fine"
        );
        let mut dup = ok.clone();
        dup.share_with.push("111122223333".into());
        assert!(matches!(
            dup.check("us-east-1", Origin::Build),
            Err(Refusal::AccountTwice { .. })
        ));
        assert_eq!(ok.extra_time(), DEFAULT_COPY_TIMEOUT + COPY_MARGIN);
        assert_eq!(Distribution::default().extra_time(), Duration::ZERO);
        assert_eq!(
            ok.image_tags(),
            vec![(
                tags::COPY_REGIONS.to_string(),
                "us-west-2,eu-west-1".to_string()
            )]
        );
    }

    #[test]
    fn a_copy_is_tagged_like_its_source_and_says_what_it_is() {
        let src = image("ami-0123456789abcdef0", Some("r"), "2026.11.30-2");
        let (img, snap) = copy_tags(
            &src,
            "us-east-1",
            "20261130-020000-123456",
            "2026-11-30T02:00:00Z",
            "2026-11-30T04:15:00Z",
        )
        .expect("tags");
        let get = |t: &Tags, k: &str| {
            t.iter()
                .filter(|(key, _)| key == k)
                .map(|(_, v)| v.clone())
                .collect::<Vec<_>>()
        };
        assert_eq!(get(&img, tags::BUILD_ID), ["20261130-020000-123456"]);
        assert_eq!(get(&img, tags::COMPLETE), ["false"]);
        assert_eq!(get(&img, tags::EXPIRES_AT), ["2026-11-30T04:15:00Z"]);
        assert_eq!(get(&img, tags::COPY_OF), ["ami-0123456789abcdef0"]);
        assert_eq!(get(&img, tags::SOURCE_REGION), ["us-east-1"]);
        assert_eq!(get(&img, tags::VERSION), ["2026.11.30-2"]);
        assert_eq!(get(&img, "Name"), ["r-2026.11.30-2"]);
        assert!(get(&img, "aws:ec2launchtemplate:id").is_empty());
        assert!(get(&snap, tags::COMPLETE).is_empty());
        assert_eq!(snap.len() + 1, img.len());
        let mut full = src.clone();
        for n in 0..45 {
            full.tags.push((format!("k{n}"), "v".into()));
        }
        assert!(matches!(
            copy_tags(&full, "us-east-1", "b", "t", "t"),
            Err(Refusal::TooManyTags { .. })
        ));
    }

    #[test]
    fn only_finished_jbake_images_are_distributed() {
        let good = image("ami-1", Some("r"), "2026.11.30-1");
        assert!(check_source(&good, "us-east-1").is_ok());
        let mut half = good.clone();
        half.tags.retain(|(k, _)| k != tags::COMPLETE);
        assert!(check_source(&half, "us-east-1")
            .unwrap_err()
            .to_string()
            .contains("jbake:complete is not true"));
        let foreign = image("ami-2", None, "2026.11.30-1");
        assert!(check_source(&foreign, "us-east-1").is_err());
        let mut renamed = good.clone();
        renamed.name = "golden".into();
        assert!(check_source(&renamed, "us-east-1").is_err());
    }

    #[test]
    fn versions_are_ordered_by_day_then_number() {
        assert_eq!(
            compare_versions("2026.11.30-10", "2026.11.30-9"),
            Some(Ordering::Greater)
        );
        assert_eq!(
            compare_versions("2026.11.29-10", "2026.11.30-1"),
            Some(Ordering::Less)
        );
        assert_eq!(
            compare_versions("2026.11.30-1", "2026.11.30-1"),
            Some(Ordering::Equal)
        );
        assert_eq!(compare_versions("latest", "2026.11.30-1"), None);
        assert_eq!(compare_versions("2026.11.3-1", "2026.11.30-1"), None);
    }

    #[test]
    fn an_older_image_never_replaces_a_newer_one() {
        let p = |v: &str| Param {
            value: v.into(),
            version: 3,
        };
        let ours = "ami-0000000000000000b";
        let decide = |current: Option<&Param>, held: Option<&ImageInfo>| {
            decide_publish(current, held, ours, "r", "2026.11.30-2")
        };
        assert_eq!(
            decide(None, None),
            Publish::Write {
                previous: None,
                note: None
            }
        );
        assert_eq!(decide(Some(&p(ours)), None), Publish::Already);
        let old = image("ami-0000000000000000a", Some("r"), "2026.11.30-1");
        assert_eq!(
            decide(Some(&p(&old.id)), Some(&old)),
            Publish::Write {
                previous: Some(old.id.clone()),
                note: None
            }
        );
        let newer = image("ami-0000000000000000c", Some("r"), "2026.12.01-1");
        match decide(Some(&p(&newer.id)), Some(&newer)) {
            Publish::Refuse(why) => assert!(why.contains("newer than 2026.11.30-2"), "{why}"),
            other => panic!("{other:?}"),
        }
        let other_recipe = image("ami-0000000000000000d", Some("agent"), "2026.11.01-1");
        assert!(matches!(
            decide(Some(&p(&other_recipe.id)), Some(&other_recipe)),
            Publish::Refuse(_)
        ));
        let foreign = image("ami-0000000000000000e", None, "2026.11.01-1");
        assert!(matches!(
            decide(Some(&p(&foreign.id)), Some(&foreign)),
            Publish::Refuse(_)
        ));
        assert!(matches!(
            decide(Some(&p("not-an-ami")), None),
            Publish::Refuse(_)
        ));
        match decide(Some(&p("ami-0000000000000000f")), None) {
            Publish::Write {
                previous: None,
                note: Some(n),
            } => assert!(n.contains("no longer exists"), "{n}"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn only_a_tested_image_is_published() {
        assert_eq!(
            may_publish(BootTest::Pending, Some("true"), false),
            Ok(None)
        );
        assert!(may_publish(BootTest::Passed, Some("false"), true).is_err());
        assert_eq!(may_publish(BootTest::Passed, None, false), Ok(None));
        assert!(may_publish(BootTest::Pending, None, false)
            .unwrap_err()
            .contains("--allow-untested"));
        assert!(matches!(
            may_publish(BootTest::Pending, None, true),
            Ok(Some(_))
        ));
    }

    #[test]
    fn the_grants_the_other_accounts_need() {
        let key = |region: &str, arn: Option<&str>| RegionKey {
            region: region.into(),
            key: arn.map(|a| KeyInfo {
                arn: a.into(),
                manager: Manager::Customer,
                state: "Enabled".into(),
            }),
        };
        assert_eq!(
            grants_needed(&["111122223333".into()], &[key("us-east-1", None)]),
            None
        );
        let s = grants_needed(
            &["111122223333".into()],
            &[
                key("us-east-1", Some("arn:k1")),
                key("us-west-2", Some("arn:k2")),
            ],
        )
        .expect("a sentence");
        assert!(
            s.contains("kms:CreateGrant")
                && s.contains("arn:k1 (us-east-1)")
                && s.contains("arn:k2 (us-west-2)"),
            "{s}"
        );
    }
}
