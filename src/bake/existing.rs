//! `jbake copy IMAGE`: the distribution stages (copy → share → publish → tag) for an image that
//! exists, with what makes a bake safe: a ledger of what it makes, undone on any exit (failure,
//! SIGINT/SIGTERM/SIGHUP, a panic), the run's tag swept in every region it copied to, and what
//! could not be removed named with the `jbake gc` command that removes it.
//!
//! The image must be a finished jbake image (`jbake:complete=true`, named after its tags). Its
//! copies carry this run's id as `jbake:build-id` (whose they are), and `jbake:copy-of` and
//! `jbake:source-region` (what they are); publishing needs the image's `jbake:tested=true` (or
//! `--allow-untested`).

use std::time::SystemTime;

use crate::aws::{Aws, AwsOptions};
use crate::progress::{Output, Progress};

use super::cleanup::{self, Leftovers};
use super::distribute::{self, Ctx, Distributed, Distribution, Origin, Source};
use super::interrupt::Interrupt;
use super::ledger::Ledger;
use super::stages::{copy, publish, share, BootTest};
use super::{build_id, Error, OnError};

/// What `jbake copy` needs.
#[derive(Debug, Clone)]
pub struct CopyOptions {
    pub aws: AwsOptions,
    /// The image, in `aws.region`.
    pub image: String,
    pub distribution: Distribution,
    pub on_error: OnError,
    pub output: Output,
    pub quiet: bool,
}

/// How a `jbake copy` ended.
#[derive(Debug)]
pub enum Outcome {
    Done(Distributed),
    /// Refused before anything was made (exit 2).
    Rejected(Error),
    Failed(Error),
    Interrupted(String),
    Panicked(String),
}

/// What one `jbake copy` did.
#[derive(Debug)]
pub struct Report {
    pub run_id: String,
    pub outcome: Outcome,
    pub left: Leftovers,
}

/// One `jbake copy`, its cleanup included.
pub async fn copy_image(opts: CopyOptions, aws: Aws, interrupt: Interrupt) -> Report {
    let run_id = build_id();
    let rejected = |e: Error| Report {
        run_id: run_id.clone(),
        outcome: match e {
            e @ Error::Refused(_) => Outcome::Rejected(e),
            e => Outcome::Failed(e),
        },
        left: Leftovers::default(),
    };
    if let Err(e) = opts.distribution.check(&aws.region, Origin::Existing) {
        return rejected(e.into());
    }
    let progress = Progress::new(opts.output, opts.quiet, Vec::new());
    progress.info(
        "copy",
        &format!("copy {run_id} of {} in {}", opts.image, aws.region),
    );
    let image = match aws.ec2.image(&opts.image).await {
        Ok(Some(i)) => i,
        Ok(None) => {
            return rejected(
                distribute::Refusal::NoImage {
                    id: opts.image.clone(),
                    region: aws.region.clone(),
                }
                .into(),
            )
        }
        Err(e) => return rejected(e.into()),
    };
    if let Err(e) = distribute::check_source(&image, &aws.region) {
        return rejected(e.into());
    }
    let keys = match distribute::check_keys(
        &aws,
        &opts.distribution,
        Origin::Existing,
        &image.snapshots,
        &progress,
    )
    .await
    {
        Ok(k) => k,
        Err(e) => return rejected(e),
    };
    let source = Source {
        region: aws.region.clone(),
        image,
    };
    let ledger = Ledger::new(&run_id);
    let started = humantime::format_rfc3339_seconds(SystemTime::now()).to_string();
    let task = tokio::spawn(run(
        aws.clone(),
        ledger.clone(),
        progress,
        run_id.clone(),
        started,
        opts.distribution.clone(),
        source,
        keys,
        interrupt.clone(),
    ));
    let (progress, outcome) = match task.await {
        Ok((p, Ok(d))) => (p, Outcome::Done(d)),
        Ok((p, Err(Stop::Failed(e)))) => (p, Outcome::Failed(e)),
        Ok((p, Err(Stop::Interrupted(why)))) => (p, Outcome::Interrupted(why)),
        Err(e) => {
            let p = Progress::new(opts.output, opts.quiet, Vec::new());
            let what = super::panic_message(e);
            p.warn(&format!(
                "the copy stopped on an internal error ({what}); removing what it made"
            ));
            (p, Outcome::Panicked(what))
        }
    };
    let failed = !matches!(outcome, Outcome::Done(_));
    let left = if failed && opts.on_error == OnError::Abort {
        cleanup::abandon(&ledger, &aws.region, &progress)
    } else {
        let seen = interrupt.count();
        cleanup::run(&aws, &ledger, &progress, interrupt, seen).await
    };
    if let Outcome::Done(d) = &outcome {
        // The image's own region first, then its copies'.
        let mut regions = vec![format!("{} ({})", opts.image, aws.region)];
        regions.extend(
            d.regions
                .iter()
                .filter(|(r, _)| **r != aws.region)
                .map(|(r, id)| format!("{id} ({r})")),
        );
        let mut text = format!("copied {}: {}", opts.image, regions.join(", "));
        if !d.shared_with.is_empty() {
            text.push_str(&format!("; shared with {}", d.shared_with.join(", ")));
        }
        for p in &d.published {
            text.push_str(&format!(
                "; {} ({}) version {}",
                p.parameter, p.region, p.version
            ));
        }
        progress.finished(
            "copy_finished",
            &text,
            serde_json::to_value(d).unwrap_or_default(),
        );
    }
    Report {
        run_id,
        outcome,
        left,
    }
}

enum Stop {
    Failed(Error),
    Interrupted(String),
}

#[allow(clippy::too_many_arguments)]
async fn run(
    aws: Aws,
    ledger: Ledger,
    progress: Progress,
    run_id: String,
    started: String,
    dist: Distribution,
    source: Source,
    keys: Vec<distribute::RegionKey>,
    mut interrupt: Interrupt,
) -> (Progress, Result<Distributed, Stop>) {
    let seen = interrupt.count();
    let ctx = Ctx {
        aws: &aws,
        ledger: &ledger,
        progress: &progress,
        run_id: &run_id,
        started: &started,
        dist: &dist,
    };
    let work = async {
        let copies = copy::copy(&ctx, &source).await?;
        share::share(&ctx, &source, &copies, &keys).await?;
        // An image that exists is published only if its tag says its boot test passed.
        let published = publish::publish(&ctx, &source, &copies, BootTest::Pending).await?;
        copy::complete(&ctx, &copies, &Vec::new()).await?;
        copy::keep(&ctx, &copies);
        publish::keep(&ctx, &published);
        let mut regions = std::collections::BTreeMap::new();
        regions.insert(source.region.clone(), source.image.id.clone());
        regions.extend(copies.iter().map(|c| (c.region.clone(), c.id.clone())));
        Ok::<_, Error>(Distributed {
            regions,
            shared_with: dist.share_with.clone(),
            published: published.into_iter().map(|p| p.published).collect(),
        })
    };
    let result = tokio::select! {
        r = work => r.map_err(Stop::Failed),
        why = interrupt.after(seen) => {
            progress.warn(&format!("interrupted {why}: stopping the copy and removing what it made"));
            Err(Stop::Interrupted(why))
        }
    };
    (progress, result)
}
