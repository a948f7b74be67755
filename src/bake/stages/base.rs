//! Stage resolve-base: the base image, the content hash, whether an image of the same inputs
//! exists (then nothing is built), and the version this build plans.

use std::time::{Duration, SystemTime};

use crate::aws::ec2::{self, ImageInfo, Tags};
use crate::aws::{self, Aws};
use crate::recipe::{self, BaseImage, Builtins, Plan};

use super::super::{hash, load_for_hash, tags, version, BaseError, Built, Error};
use super::Bake;

/// What the rest of the build works from.
pub struct Resolved {
    pub base: ImageInfo,
    pub content_hash: String,
    /// The recipe rendered with the build id and the planned version.
    pub plan: Plan,
    /// `YYYY.MM.DD` of the planned version.
    pub day: String,
    /// N of the planned version.
    pub number: u32,
    /// When gc may consider the build over (start + TTL), RFC 3339.
    pub expires: String,
    /// The tags on everything the build makes (build id, recipe, times, planned version).
    pub common: Tags,
}

impl Resolved {
    pub fn version(&self) -> String {
        version::version(&self.day, self.number)
    }

    /// The common tags and `Name`.
    pub fn tags_named(&self, name: String) -> Tags {
        let mut t = self.common.clone();
        t.push(("Name".to_string(), name));
        t
    }
}

pub enum Resolution {
    Unchanged(Box<Built>),
    Build(Box<Resolved>),
}

pub async fn resolve(b: &mut Bake) -> Result<Resolution, Error> {
    let first = load_for_hash(&b.opts, None)?;
    let base_spec = b
        .opts
        .base_override
        .clone()
        .unwrap_or_else(|| first.base.image.clone());
    b.progress.info(
        "stage",
        &format!("resolving the base image ({})", describe_base(&base_spec)),
    );
    let base = resolve_base(&b.aws, &base_spec).await?;
    b.progress
        .info("stage", &format!("base image {} ({})", base.id, base.name));

    let hashed = load_for_hash(&b.opts, Some(base.id.clone()))?;
    let content_hash = hash::content_hash(&hashed, &base.id).map_err(|e| Error::HashInput {
        path: e.path,
        source: e.source,
    })?;
    if !b.opts.force {
        let same = b
            .aws
            .ec2
            .own_images_tagged(tags::CONTENT_HASH, &content_hash)
            .await?;
        let newest = same_image(&same, &hashed.name);
        let fresh = match (newest, b.opts.max_age) {
            (Some(img), Some(max)) => {
                let age = image_age(&img.creation_date, SystemTime::now());
                match age {
                    Some(age) if age > max => {
                        b.progress.info(
                            "outdated",
                            &format!(
                                "the inputs are unchanged, but {} ({}) is {} old, older than --max-age {}: building it again with the updates published since",
                                img.id,
                                img.name,
                                crate::util::fmt_duration(age),
                                crate::util::fmt_duration(max)
                            ),
                        );
                        None
                    }
                    _ => Some(img),
                }
            }
            (img, _) => img,
        };
        if let Some(img) = fresh {
            b.progress.info(
                "unchanged",
                &format!(
                    "unchanged: {} ({}) was built from the same inputs (content hash {}); nothing to do (--force rebuilds)",
                    img.id,
                    img.name,
                    content_hash.get(..12).unwrap_or_default()
                ),
            );
            let tested = img.tag(tags::TESTED).map(|t| t == "true");
            if tested.is_none() {
                b.progress.warn(&format!(
                    "{} has no boot test result (baked with --skip-test, or before boot tests): `jbake test {} --region {}` tests it; `jbake roll` wants --allow-untested for it",
                    img.id, img.id, b.aws.region
                ));
            }
            return Ok(Resolution::Unchanged(Box::new(Built {
                recipe: hashed.name.clone(),
                ami_id: img.id.clone(),
                name: img.name.clone(),
                version: img.tag(tags::VERSION).unwrap_or_default().to_string(),
                content_hash,
                base_ami: base.id.clone(),
                skipped_unchanged: true,
                build_id: b.build_id.clone(),
                distributed: Default::default(),
                tested,
            })));
        }
    }

    let day = version::day(SystemTime::now());
    let number = plan_number(&b.aws, &hashed.name, &day, &b.build_id).await?;
    let mut load = b.opts.load.clone();
    load.builtins = Builtins {
        region: Some(b.opts.aws.region.clone()),
        build_id: Some(b.build_id.clone()),
        version: Some(version::version(&day, number)),
        base_ami: Some(base.id.clone()),
    };
    let plan = recipe::load(&b.opts.recipe, &load)?;
    let expires = b
        .started_at
        .checked_add(b.opts.ttl)
        .map(|t| humantime::format_rfc3339_seconds(t).to_string())
        .ok_or(Error::Option {
            flag: "--ttl",
            value: recipe::format_duration(b.opts.ttl),
            why: "is too long",
        })?;
    let common: Tags = vec![
        (tags::BUILD_ID.into(), b.build_id.clone()),
        (tags::RECIPE.into(), plan.name.clone()),
        (tags::CREATED_AT.into(), b.started.clone()),
        (tags::EXPIRES_AT.into(), expires.clone()),
        (tags::VERSION.into(), version::version(&day, number)),
    ];
    Ok(Resolution::Build(Box::new(Resolved {
        base,
        content_hash,
        plan,
        day,
        number,
        expires,
        common,
    })))
}

/// The image that makes a build of `recipe` unnecessary, among those with its content hash:
/// available, complete, and not failed at its boot test (a failed image is no result: the build
/// makes a new one). Pure.
pub fn same_image<'a>(same_hash: &'a [ImageInfo], recipe: &str) -> Option<&'a ImageInfo> {
    same_hash
        .iter()
        .filter(|i| {
            ec2::image_available(&i.state)
                && i.tag(tags::RECIPE) == Some(recipe)
                && i.tag(tags::COMPLETE) != Some("false")
                && i.tag(tags::TESTED) != Some("false")
        })
        // The newest (the first of equals): --max-age judges its age.
        .min_by(|a, b| b.creation_date.cmp(&a.creation_date))
}

/// Numbers of `day` taken by this account's images of `recipe` and reserved by other builds of
/// it that are under way (the `jbake:version` tag of their key pairs).
pub async fn taken_numbers(
    aws: &Aws,
    recipe: &str,
    day: &str,
    build_id: &str,
) -> Result<Vec<u32>, aws::Error> {
    let prefix = version::image_name(recipe, day);
    let mut taken: Vec<u32> = aws
        .ec2
        .images_named(&format!("{prefix}-*"), &[])
        .await?
        .iter()
        .filter_map(|i| version::number_of_name(&i.name, recipe, day))
        .collect();
    for k in aws.ec2.key_pairs_tagged(tags::RECIPE, Some(recipe)).await? {
        if k.tag(tags::BUILD_ID) == Some(build_id) {
            continue;
        }
        if let Some(n) = k
            .tag(tags::VERSION)
            .and_then(|v| version::number_of_version(v, day))
        {
            taken.push(n);
        }
    }
    Ok(taken)
}

async fn plan_number(aws: &Aws, recipe: &str, day: &str, build_id: &str) -> Result<u32, Error> {
    let taken = taken_numbers(aws, recipe, day, build_id).await?;
    version::next(taken).ok_or_else(|| Error::NoFreeName {
        recipe: recipe.to_string(),
        day: day.to_string(),
        attempts: 0,
    })
}

fn describe_base(b: &BaseImage) -> String {
    match b {
        BaseImage::Ami(id) => id.clone(),
        BaseImage::SsmParameter(p) => format!("SSM parameter {p}"),
        BaseImage::Filter { name, owners, .. } => {
            format!("name {name} owned by {}", owners.join(","))
        }
    }
}

/// Finds the base image: it must exist and be available.
pub async fn resolve_base(aws: &Aws, spec: &BaseImage) -> Result<ImageInfo, Error> {
    let id = match spec {
        BaseImage::Ami(id) => id.clone(),
        BaseImage::SsmParameter(p) => {
            let out = aws.ssm.get_parameter().name(p).send().await.map_err(|e| {
                aws::Error::new(
                    format!("reading SSM parameter {p}"),
                    &aws.region,
                    e.into_service_error(),
                )
                .action("ssm:GetParameter")
            })?;
            out.parameter()
                .and_then(|p| p.value())
                .map(str::to_string)
                .ok_or_else(|| BaseError::EmptyParameter(p.clone()))?
        }
        BaseImage::Filter {
            name,
            owners,
            most_recent,
        } => {
            let mut found = aws.ec2.images_named(name, owners).await?;
            found.retain(|i| ec2::image_available(&i.state));
            found.sort_by(|a, b| b.creation_date.cmp(&a.creation_date));
            match found.as_slice() {
                [] => {
                    return Err(BaseError::NoMatch {
                        name: name.clone(),
                        owners: owners.join(","),
                    }
                    .into())
                }
                [one] => one.id.clone(),
                [newest, ..] if *most_recent => newest.id.clone(),
                many => {
                    let list: Vec<String> = many
                        .iter()
                        .take(5)
                        .map(|i| format!("{} ({})", i.id, i.name))
                        .collect();
                    return Err(BaseError::Ambiguous {
                        count: many.len(),
                        name: name.clone(),
                        list: list.join(", "),
                    }
                    .into());
                }
            }
        }
    };
    let image = aws
        .ec2
        .image(&id)
        .await?
        .ok_or_else(|| BaseError::Missing {
            id: id.clone(),
            region: aws.region.clone(),
        })?;
    if !ec2::image_available(&image.state) {
        return Err(BaseError::NotAvailable {
            id,
            state: image.state,
        }
        .into());
    }
    Ok(image)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn image(id: &str, tags: &[(&str, &str)]) -> ImageInfo {
        ImageInfo {
            id: id.into(),
            name: format!("r-{id}"),
            state: "available".into(),
            creation_date: String::new(),
            root_device: None,
            snapshots: vec![],
            tags: tags
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        }
    }

    #[test]
    fn an_image_that_failed_its_boot_test_is_never_the_unchanged_result() {
        let failed = image(
            "ami-f",
            &[
                (tags::RECIPE, "r"),
                (tags::COMPLETE, "true"),
                (tags::TESTED, "false"),
            ],
        );
        let half = image("ami-h", &[(tags::RECIPE, "r"), (tags::COMPLETE, "false")]);
        let other = image("ami-o", &[(tags::RECIPE, "o"), (tags::COMPLETE, "true")]);
        let untested = image("ami-u", &[(tags::RECIPE, "r"), (tags::COMPLETE, "true")]);
        let tested = image(
            "ami-t",
            &[
                (tags::RECIPE, "r"),
                (tags::COMPLETE, "true"),
                (tags::TESTED, "true"),
            ],
        );
        assert!(same_image(&[failed.clone(), half.clone(), other.clone()], "r").is_none());
        let all = [failed, half, other, untested, tested];
        assert_eq!(same_image(&all, "r").map(|i| i.id.as_str()), Some("ami-u"));
    }
}

/// How old an image is, from its EC2 creation date (`2026-11-30T10:00:00.000Z`); None when the
/// date cannot be read (then it counts as fresh: an unreadable date never forces a rebuild).
fn image_age(created: &str, now: SystemTime) -> Option<Duration> {
    let t = humantime::parse_rfc3339_weak(created.trim_end_matches('Z').split('.').next()?).ok()?;
    now.duration_since(t).ok()
}

#[cfg(test)]
mod age_tests {
    use super::*;

    #[test]
    fn image_age_reads_ec2_dates() {
        let now = humantime::parse_rfc3339("2026-11-30T12:00:00Z").unwrap();
        assert_eq!(
            image_age("2026-11-23T12:00:00.000Z", now),
            Some(Duration::from_secs(7 * 24 * 3600))
        );
        assert_eq!(
            image_age("2026-11-30T11:59:00Z", now),
            Some(Duration::from_secs(60))
        );
        assert_eq!(image_age("yesterday", now), None);
        // From the future (clock skew): not old.
        assert_eq!(image_age("2026-12-01T00:00:00.000Z", now), None);
    }
}
