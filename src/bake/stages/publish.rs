//! Stage publish: `--publish-ssm PREFIX` writes the image id to `PREFIX/<recipe>/latest` in its
//! region, and each copy's id to the same name in the copy's region (data type
//! `aws:ec2:image`), so launch templates (`resolve:ssm:`), CloudFormation and Terraform follow
//! the newest image. The last stage before the tag: only an image whose boot test passed is
//! published ([`may_publish`](super::super::distribute::may_publish)).
//!
//! Never an older image over a newer one, never over something that is not an image of the same
//! recipe ([`decide_publish`](super::super::distribute::decide_publish)). SSM has no conditional
//! write: a parameter written by someone else between jbake's read and its write shows as a gap
//! in the versions, and a newer image found there is put back. Each write is recorded in the
//! ledger first: if the build fails after it, what the parameter held is put back.

use std::time::Duration;

use crate::aws::{self, wait, Aws};

use super::super::distribute::{self, Ctx, Publish, Published, Source};
use super::super::ledger::{Entry, Resource};
use super::super::{tags, Error};
use super::copy::Copied;
use super::BootTest;

/// A parameter written (or found holding the image already).
#[derive(Debug, Clone)]
pub struct Publishing {
    pub published: Published,
    /// Its ledger entry; `None` when it held the image already.
    pub entry: Option<Entry>,
}

pub async fn publish(
    ctx: &Ctx<'_>,
    source: &Source,
    copies: &[Copied],
    boot_test: BootTest,
) -> Result<Vec<Publishing>, Error> {
    let recipe = source.image.tag(tags::RECIPE).unwrap_or_default();
    let Some(name) = ctx.dist.parameter(recipe) else {
        return Ok(Vec::new());
    };
    let refused = |region: &str, image: &str, why: String| -> Error {
        distribute::Error::PublishRefused {
            region: region.to_string(),
            parameter: name.clone(),
            image: image.to_string(),
            why,
        }
        .into()
    };
    // Asked only where something is to be written: a parameter that names the image already
    // (the nightly, unchanged) is neither refused nor warned about again.
    let gate = Gate {
        verdict: distribute::may_publish(
            boot_test,
            source.image.tag(tags::TESTED),
            ctx.dist.allow_untested,
        ),
        warned: std::sync::atomic::AtomicBool::new(false),
    };
    let version = source.image.tag(tags::VERSION).unwrap_or_default();
    ctx.progress.info(
        "stage",
        &format!(
            "publishing {} in SSM parameter {name} ({})",
            source.image.id,
            std::iter::once(source.region.as_str())
                .chain(copies.iter().map(|c| c.region.as_str()))
                .collect::<Vec<_>>()
                .join(", ")
        ),
    );
    let mut out = Vec::new();
    let mut targets: Vec<(String, String, Option<Aws>)> =
        vec![(source.region.clone(), source.image.id.clone(), None)];
    for c in copies {
        targets.push((
            c.region.clone(),
            c.id.clone(),
            Some(ctx.aws.in_region(&c.region).await),
        ));
    }
    for (region, image, there) in &targets {
        let aws = there.as_ref().unwrap_or(ctx.aws);
        let one = publish_one(ctx, aws, &name, image, recipe, version, &gate).await?;
        match one {
            Ok(p) => out.push(p),
            Err(why) => return Err(refused(region, image, why)),
        }
    }
    Ok(out)
}

/// Whether the image may be published (its boot test), said once.
struct Gate {
    verdict: Result<Option<String>, String>,
    warned: std::sync::atomic::AtomicBool,
}

impl Gate {
    fn check(&self, ctx: &Ctx<'_>) -> Result<(), String> {
        match &self.verdict {
            Ok(None) => Ok(()),
            Ok(Some(warning)) => {
                if !self.warned.swap(true, std::sync::atomic::Ordering::Relaxed) {
                    ctx.progress.warn(warning);
                }
                Ok(())
            }
            Err(why) => Err(why.clone()),
        }
    }
}

/// One region: read, decide, write, check nobody wrote in between, read back. `Ok(Err(why))`:
/// refused.
async fn publish_one(
    ctx: &Ctx<'_>,
    aws: &Aws,
    name: &str,
    image: &str,
    recipe: &str,
    version: &str,
    gate: &Gate,
) -> Result<Result<Publishing, String>, Error> {
    let region = aws.region.as_str();
    let current = aws.params.get(name).await?;
    let held = match &current {
        Some(p) if p.value.starts_with("ami-") && p.value != image => {
            aws.ec2.image(&p.value).await?
        }
        _ => None,
    };
    let previous =
        match distribute::decide_publish(current.as_ref(), held.as_ref(), image, recipe, version) {
            Publish::Already => {
                ctx.progress.info(
                    "published",
                    &format!("{name} in {region} names {image} already"),
                );
                return Ok(Ok(Publishing {
                    published: Published {
                        region: region.to_string(),
                        parameter: name.to_string(),
                        image: image.to_string(),
                        version: current.map(|p| p.version).unwrap_or_default(),
                    },
                    entry: None,
                }));
            }
            Publish::Refuse(why) => return Ok(Err(why)),
            Publish::Write { previous, note } => {
                if let Err(why) = gate.check(ctx) {
                    return Ok(Err(why));
                }
                if let Some(note) = note {
                    ctx.progress
                        .info("publish", &format!("{name} in {region}: {note}"));
                }
                previous
            }
        };
    // Recorded first: if the build fails after the write (or the answer is lost), what the
    // parameter held is put back.
    let entry = ctx.ledger.record(Resource::Parameter {
        region: region.to_string(),
        name: name.to_string(),
        previous,
        value: image.to_string(),
    });
    let description = format!(
        "{recipe} {version}: the newest image jbake published ({image}, run {})",
        ctx.run_id
    );
    let written = match aws.params.put_image(name, image, &description).await {
        Ok(v) => v,
        Err(e) if e.refused() => {
            ctx.ledger.never_made(entry);
            return Err(e.into());
        }
        Err(e) => return Err(e.into()),
    };
    // Another writer between the read and the write leaves a gap in the versions: if it wrote
    // a newer image, that one stays.
    let read = current.as_ref().map(|p| p.version).unwrap_or(0);
    let mut v = read.saturating_add(1);
    while v < written {
        let theirs = aws.params.get(&format!("{name}:{v}")).await?;
        v = v.saturating_add(1);
        let Some(theirs) = theirs else { continue };
        let their_image = aws.ec2.image(&theirs.value).await?;
        let newer = their_image
            .as_ref()
            .and_then(|i| i.tag(tags::VERSION))
            .and_then(|tv| distribute::compare_versions(tv, version))
            == Some(std::cmp::Ordering::Greater);
        if newer {
            aws.params
                .put_image(
                    name,
                    &theirs.value,
                    &format!("put back by jbake run {}", ctx.run_id),
                )
                .await?;
            ctx.ledger.never_made(entry);
            return Ok(Err(format!(
                "{} (newer) was published in it meanwhile, and stays",
                theirs.value
            )));
        }
    }
    // The aws:ec2:image data type is checked asynchronously: the version counts once it shows.
    let confirmed = wait::until(
        wait::PROPAGATION,
        Duration::from_secs(5),
        |_| {},
        || async {
            Ok::<_, aws::Error>(match aws.params.get(name).await? {
                Some(p) if p.version >= written => wait::Poll::Ready(p),
                Some(p) => wait::Poll::Pending(format!("version {} ({})", p.version, p.value)),
                None => wait::Poll::Pending("nothing".to_string()),
            })
        },
    )
    .await;
    match confirmed {
        Ok(r) => {
            r?;
        }
        Err(holds) => {
            return Err(distribute::Error::PublishNotConfirmed {
                region: region.to_string(),
                parameter: name.to_string(),
                image: image.to_string(),
                version: written,
                holds,
            }
            .into())
        }
    }
    ctx.ledger.seen(entry);
    ctx.progress.info(
        "published",
        &format!("published {image} in {name} ({region}), version {written}"),
    );
    Ok(Ok(Publishing {
        published: Published {
            region: region.to_string(),
            parameter: name.to_string(),
            image: image.to_string(),
            version: written,
        },
        entry: Some(entry),
    }))
}

/// The parameters are the build's result with the image: never put back from here on.
pub fn keep(ctx: &Ctx<'_>, published: &[Publishing]) {
    for e in published.iter().filter_map(|p| p.entry) {
        ctx.ledger.keep(e);
    }
}
