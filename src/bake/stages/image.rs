//! Stages image and tag: the build's result.

use std::time::{Duration, Instant, SystemTime};

use crate::aws::ec2::Tags;
use crate::aws::wait;
use crate::aws::{self, Aws};

use super::super::ledger::{Entry, Resource};
use super::super::{tags, version, Built, Error};
use super::base::{taken_numbers, Resolved};
use super::machine::Launched;
use super::{settle, Bake};

/// How many names CreateImage tries before giving up (each taken by another build meanwhile).
const NAME_ATTEMPTS: u32 = 10;
/// Added to `--image-timeout` for the image's `jbake:expires-at`: tagging and cleanup.
const IMAGE_MARGIN: Duration = Duration::from_secs(15 * 60);

/// The image, available and IMDSv2-only, not yet marked complete.
pub struct Imaged {
    pub id: String,
    pub name: String,
    pub version: String,
    pub entry: Entry,
}

/// `identity`: tags on the image only (the build's one-time identities, for the boot test).
pub async fn image(
    b: &mut Bake,
    r: &Resolved,
    launched: &Launched,
    identity: &Tags,
) -> Result<Imaged, Error> {
    // While EC2 makes the image (minutes, up to --image-timeout), gc must not take the build
    // for over: the image says until when it is being made. gc goes by the latest expires-at
    // of a build's resources.
    let expires = SystemTime::now()
        .checked_add(b.opts.image_timeout)
        .and_then(|t| t.checked_add(IMAGE_MARGIN))
        // The stages after the image (its copies) before it is marked complete.
        .and_then(|t| t.checked_add(b.opts.distribution.extra_time()))
        .map(|t| humantime::format_rfc3339_seconds(t).to_string())
        .filter(|t| *t > r.expires)
        .unwrap_or_else(|| r.expires.clone());
    let mut number = r.number;
    let planned = r.version();
    let mut attempts = 0;
    let (id, entry, name, version) = loop {
        attempts += 1;
        if attempts > NAME_ATTEMPTS {
            return Err(Error::NoFreeName {
                recipe: r.plan.name.clone(),
                day: r.day.clone(),
                attempts: NAME_ATTEMPTS,
            });
        }
        let version = version::version(&r.day, number);
        let name = version::image_name(&r.plan.name, &version);
        let (mut image_tags, snapshot_tags) = image_tags(r, &b.facts, &name, &version, &expires);
        image_tags.extend(identity.iter().cloned());
        image_tags.extend(b.opts.distribution.image_tags());
        let description = format!(
            "{} {version} by jbake {} from {} ({})",
            r.plan.name,
            env!("CARGO_PKG_VERSION"),
            r.base.id,
            r.plan.description.clone().unwrap_or_default()
        );
        b.progress.info("stage", &format!("creating image {name}"));
        // Recorded first: if the answer is lost, the undo finds the image by its name.
        let entry = b.ledger.record(Resource::Image {
            name: name.clone(),
            id: None,
        });
        let made = b
            .aws
            .ec2
            .create_image(
                &launched.id,
                &name,
                &description,
                &image_tags,
                &snapshot_tags,
            )
            .await;
        match made {
            Ok(id) => break (id, entry, name, version),
            Err(e) if e.is_code("InvalidAMIName.Duplicate") => {
                match named(b, &name).await? {
                    // The first answer was lost and the SDK tried again: this build made it.
                    Owner::This(id) => break (id, entry, name, version),
                    Owner::Other(other) => {
                        b.ledger.never_made(entry);
                        let taken =
                            taken_numbers(&b.aws, &r.plan.name, &r.day, &b.build_id).await?;
                        number = version::next(taken.into_iter().chain([number])).ok_or(
                            Error::NoFreeName {
                                recipe: r.plan.name.clone(),
                                day: r.day.clone(),
                                attempts,
                            },
                        )?;
                        b.progress.warn(&format!(
                            "image name {name} was taken meanwhile (by {other}, another build of the recipe): this image becomes version {}{}",
                            version::version(&r.day, number),
                            if planned == version { format!(" (the recipe's {{{{ version }}}} rendered {planned})") } else { String::new() }
                        ));
                    }
                }
            }
            Err(e) if e.refused() => {
                b.ledger.never_made(entry);
                return Err(e.into());
            }
            Err(e) => {
                // Maybe made (the answer was lost): adopt it if EC2 shows it already; if not,
                // the ledger still finds it by name when it undoes.
                if let Ok(Some(img)) = own_image_named(&b.aws, &name, &b.build_id).await {
                    break (img, entry, name, version);
                }
                return Err(e.into());
            }
        }
    };
    b.ledger.update(entry, |res| {
        *res = Resource::Image {
            name: name.clone(),
            id: Some(id.clone()),
        }
    });
    let created = Instant::now();
    super::image_ready(
        &b.aws,
        &b.progress,
        &b.ledger,
        entry,
        &id,
        created,
        &format!("image {id}"),
        b.opts.image_timeout,
    )
    .await?
    .map_err(|state| Error::ImageFailed {
        id: id.clone(),
        state,
    })?;
    Ok(Imaged {
        id,
        name,
        version,
        entry,
    })
}

/// The image's tags and its snapshots' (the same, without `jbake:complete`).
fn image_tags(
    r: &Resolved,
    facts: &[(String, String)],
    name: &str,
    version: &str,
    expires: &str,
) -> (Tags, Tags) {
    let mut t: Tags = r
        .common
        .iter()
        .filter(|(k, _)| k != tags::EXPIRES_AT && k != tags::VERSION)
        .cloned()
        .collect();
    t.extend([
        ("Name".to_string(), name.to_string()),
        (tags::EXPIRES_AT.to_string(), expires.to_string()),
        (tags::VERSION.to_string(), version.to_string()),
        (tags::CONTENT_HASH.to_string(), r.content_hash.clone()),
        (tags::BASE_AMI.to_string(), r.base.id.clone()),
        (
            tags::JBAKE_VERSION.to_string(),
            env!("CARGO_PKG_VERSION").to_string(),
        ),
    ]);
    // The recipe's own tags (`tags:`, e.g. the controller's jbake:efs-id); jbake's keys are
    // refused at validate, so they cannot override the ones above.
    t.extend(r.plan.tags.iter().cloned());
    // What the machine said about itself (`facts:`, e.g. what it was patched to).
    t.extend(facts.iter().cloned());
    let snapshot = t.clone();
    t.push((tags::COMPLETE.to_string(), "false".to_string()));
    (t, snapshot)
}

enum Owner {
    This(String),
    /// Another build's image (its id and build id).
    Other(String),
}

/// Whose image is called `name` (EC2 says it exists: wait until it shows it).
async fn named(b: &Bake, name: &str) -> Result<Owner, Error> {
    let aws = &b.aws;
    let build_id = b.build_id.as_str();
    settle(&b.progress, &format!("image {name}"), || async {
        let found = aws.ec2.images_named(name, &[]).await?;
        Ok(match found.first() {
            Some(i) if i.tag(tags::BUILD_ID) == Some(build_id) => {
                wait::Poll::Ready(Owner::This(i.id.clone()))
            }
            Some(i) => wait::Poll::Ready(Owner::Other(format!(
                "{} of build {}",
                i.id,
                i.tag(tags::BUILD_ID).unwrap_or("(not jbake's)")
            ))),
            None => wait::Poll::Pending("not visible yet".into()),
        })
    })
    .await
}

async fn own_image_named(
    aws: &Aws,
    name: &str,
    build_id: &str,
) -> Result<Option<String>, aws::Error> {
    Ok(aws
        .ec2
        .images_named(name, &[])
        .await?
        .into_iter()
        .find(|i| i.tag(tags::BUILD_ID) == Some(build_id))
        .map(|i| i.id))
}

/// Marks the image complete: from here it is the build's result. The only tag jbake writes after
/// creation (the build policy allows no other: everything else is tagged at creation).
/// `tested`: the boot test's verdict (`None`: not tested, `--skip-test`).
pub async fn tag(
    b: &mut Bake,
    r: &Resolved,
    imaged: &Imaged,
    tested: Option<bool>,
) -> Result<Built, Error> {
    b.aws
        .ec2
        .create_tags(
            std::slice::from_ref(&imaged.id),
            &vec![(tags::COMPLETE.to_string(), "true".to_string())],
        )
        .await?;
    b.ledger.keep(imaged.entry);
    Ok(Built {
        recipe: r.plan.name.clone(),
        ami_id: imaged.id.clone(),
        name: imaged.name.clone(),
        version: imaged.version.clone(),
        content_hash: r.content_hash.clone(),
        base_ami: r.base.id.clone(),
        skipped_unchanged: false,
        build_id: b.build_id.clone(),
        distributed: Default::default(),
        tested,
    })
}
