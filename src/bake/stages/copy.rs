//! Stage copy: the image in every `--copy-to` region (CopyImage, encrypted with the region's
//! `--kms-key-id` or its default EBS key), all regions at once. A copy has the image's name, and
//! its tags on the copy and its snapshots from their creation (jbake writes them: EC2 copies
//! none), `jbake:complete=false` until the tag stage, `jbake:copy-of` and
//! `jbake:source-region`.
//!
//! Each copy is recorded in the ledger before CopyImage is called (by its name and region), and
//! CopyImage carries a client token: a retry whose first answer was lost gets the same copy, not
//! a second one. A copy that fails, or a run interrupted while EC2 copies (tens of minutes across
//! regions), is undone like the image: deregistered (which stops a pending copy) and its
//! snapshots deleted, in its region. A finished copy of the same image that exists already (a
//! rerun, an unchanged build) is used as it is.

use std::time::{Instant, SystemTime};

use futures_util::future::try_join_all;

use crate::aws::ec2::{self, CopyImage, Tags};
use crate::aws::wait;
use crate::aws::{self, Aws};

use super::super::distribute::{self, Ctx, Source};
use super::super::ledger::{Entry, Resource};
use super::super::{tags, Error};
use super::settle;

/// A copy in one region.
#[derive(Debug, Clone)]
pub struct Copied {
    pub region: String,
    pub id: String,
    /// Its ledger entry; `None` for a finished copy that existed already (never undone).
    pub entry: Option<Entry>,
}

/// Copies `source` to every `--copy-to` region, all at once; the first failure stops the others
/// (what they made is undone by the cleanup).
pub async fn copy(ctx: &Ctx<'_>, source: &Source) -> Result<Vec<Copied>, Error> {
    if ctx.dist.copy_to.is_empty() {
        return Ok(Vec::new());
    }
    let expires = SystemTime::now()
        .checked_add(ctx.dist.extra_time())
        .map(|t| humantime::format_rfc3339_seconds(t).to_string())
        .unwrap_or_else(|| ctx.started.to_string());
    let (image_tags, snapshot_tags) = distribute::copy_tags(
        &source.image,
        &source.region,
        ctx.run_id,
        ctx.started,
        &expires,
    )?;
    ctx.progress.info(
        "stage",
        &format!(
            "copying {} to {} (CopyImage: tens of minutes across regions)",
            source.image.id,
            ctx.dist.copy_to.join(", ")
        ),
    );
    let t = Instant::now();
    let copies = try_join_all(ctx.dist.copy_to.iter().map(|region| {
        let req = CopyImage {
            source_id: source.image.id.clone(),
            source_region: source.region.clone(),
            name: source.image.name.clone(),
            description: format!(
                "copy of {} ({}) by jbake {}",
                source.image.id,
                source.region,
                env!("CARGO_PKG_VERSION")
            ),
            kms_key_id: ctx.dist.kms.for_region(region).map(str::to_string),
            // The same token on every try: EC2 copies once, however often the call is
            // repeated (at most 64 characters: 6 + 22 + 1 + 21).
            client_token: format!("jbake-{}-{}", ctx.run_id, source.image.id),
            image_tags: image_tags.clone(),
            snapshot_tags: snapshot_tags.clone(),
        };
        copy_one(ctx, source, region, req)
    }))
    .await?;
    ctx.progress.info(
        "copied",
        &format!(
            "copied {} to {} in {}",
            source.image.id,
            copies
                .iter()
                .map(|c| format!("{} ({})", c.id, c.region))
                .collect::<Vec<_>>()
                .join(", "),
            crate::util::fmt_duration(t.elapsed())
        ),
    );
    Ok(copies)
}

/// What the region has under the copy's name.
enum Named {
    /// This run's copy (an answer that was lost).
    Ours(String),
    /// A finished copy of the same image (another run's).
    Finished(String),
    Other(String),
    Nothing,
}

async fn named(aws: &Aws, name: &str, source_id: &str, run_id: &str) -> Result<Named, aws::Error> {
    let found = aws.ec2.images_named(name, &[]).await?;
    let Some(i) = found.first() else {
        return Ok(Named::Nothing);
    };
    let copy_of = i.tag(tags::COPY_OF) == Some(source_id);
    Ok(if copy_of && i.tag(tags::BUILD_ID) == Some(run_id) {
        Named::Ours(i.id.clone())
    } else if copy_of && i.tag(tags::COMPLETE) == Some("true") && ec2::image_available(&i.state) {
        Named::Finished(i.id.clone())
    } else {
        Named::Other(format!(
            "{} ({})",
            i.id,
            match (copy_of, i.tag(tags::BUILD_ID)) {
                (true, Some(b)) => format!("a copy of the same image by run {b}, not finished"),
                (_, Some(b)) => format!("an image of build {b}"),
                (_, None) => "not jbake's".to_string(),
            }
        ))
    })
}

async fn copy_one(
    ctx: &Ctx<'_>,
    source: &Source,
    region: &str,
    req: CopyImage,
) -> Result<Copied, Error> {
    let aws = ctx.aws.in_region(region).await;
    // A finished copy of this image there already: nothing to copy.
    let done = aws
        .ec2
        .own_images_tagged(tags::COPY_OF, &source.image.id)
        .await?
        .into_iter()
        .find(|i| i.tag(tags::COMPLETE) == Some("true") && ec2::image_available(&i.state));
    if let Some(done) = done {
        ctx.progress.info(
            "copy",
            &format!(
                "{} has a finished copy in {region} already: {}",
                source.image.id, done.id
            ),
        );
        return Ok(Copied {
            region: region.to_string(),
            id: done.id,
            entry: None,
        });
    }
    // Recorded first: if the answer is lost, the undo finds the copy by its name and tag.
    let entry = ctx.ledger.record(Resource::Copy {
        region: region.to_string(),
        name: req.name.clone(),
        id: None,
    });
    let created = Instant::now();
    let id = match aws.ec2.copy_image(&req).await {
        Ok(id) => id,
        Err(e) if e.is_code("InvalidAMIName.Duplicate") => {
            match named(&aws, &req.name, &source.image.id, ctx.run_id).await? {
                Named::Ours(id) => id,
                Named::Finished(id) => {
                    ctx.ledger.never_made(entry);
                    return Ok(Copied {
                        region: region.to_string(),
                        id,
                        entry: None,
                    });
                }
                Named::Other(other) => {
                    ctx.ledger.never_made(entry);
                    return Err(distribute::Error::NameTaken {
                        region: region.to_string(),
                        name: req.name.clone(),
                        source_id: source.image.id.clone(),
                        other,
                    }
                    .into());
                }
                Named::Nothing => return Err(e.into()),
            }
        }
        Err(e) if e.refused() => {
            ctx.ledger.never_made(entry);
            return Err(e.into());
        }
        Err(e) => {
            // Maybe made (the answer was lost after the SDK's retries): adopt it if EC2 shows
            // it; if not, the ledger still finds it by name when it undoes.
            if let Ok(Named::Ours(id)) = named(&aws, &req.name, &source.image.id, ctx.run_id).await
            {
                id
            } else {
                return Err(e.into());
            }
        }
    };
    ctx.ledger.update(entry, |r| {
        *r = Resource::Copy {
            region: region.to_string(),
            name: req.name.clone(),
            id: Some(id.clone()),
        }
    });
    super::image_ready(
        &aws,
        ctx.progress,
        ctx.ledger,
        entry,
        &id,
        created,
        &format!("copy {id} in {region}"),
        ctx.dist.copy_timeout,
    )
    .await?
    .map_err(|state| distribute::Error::CopyFailed {
        region: region.to_string(),
        id: id.clone(),
        source_id: source.image.id.clone(),
        state,
    })?;
    Ok(Copied {
        region: region.to_string(),
        id,
        entry: Some(entry),
    })
}

/// Marks the new copies complete (`jbake:complete=true`), each in its region: part of the tag
/// stage, before the image itself. `also`: what else the tag stage writes on the image (the
/// boot test's verdict, when it is written there), written on the copies with it.
pub async fn complete(ctx: &Ctx<'_>, copies: &[Copied], also: &Tags) -> Result<(), Error> {
    let mut complete = vec![(tags::COMPLETE.to_string(), "true".to_string())];
    complete.extend(also.iter().cloned());
    for c in copies.iter().filter(|c| c.entry.is_some()) {
        let aws = ctx.aws.in_region(&c.region).await;
        let (client, id, tag) = (&aws, std::slice::from_ref(&c.id), &complete);
        settle(
            ctx.progress,
            &format!("copy {} in {} to take its tag", c.id, c.region),
            || async {
                match client.ec2.create_tags(id, tag).await {
                    Ok(()) => Ok(wait::Poll::Ready(())),
                    Err(e) if e.is_not_found() => Ok(wait::Poll::Pending("not visible yet".into())),
                    Err(e) => Err(e),
                }
            },
        )
        .await?;
    }
    Ok(())
}

/// The copies are the build's result with the image: never undone from here on.
pub fn keep(ctx: &Ctx<'_>, copies: &[Copied]) {
    for e in copies.iter().filter_map(|c| c.entry) {
        ctx.ledger.keep(e);
    }
}
