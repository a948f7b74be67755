//! `jbake prune`: prints what stays and why, removes the rest (unless `--dry-run`).

use clap::Args;

use super::build::AwsArgs;
use super::{parse_region, Failure};
use crate::aws::Aws;
use crate::progress::{Output, Progress};
use crate::prune;

#[derive(Debug, Args)]
pub struct PruneArgs {
    #[command(flatten)]
    pub aws: AwsArgs,
    /// Keep this many of the newest images of each recipe (images in use are kept anyway).
    #[arg(long, value_name = "N", default_value_t = 3)]
    pub keep: usize,
    /// Only the images of this recipe (its `name:`, e.g. jenkins-controller).
    #[arg(long, value_name = "NAME")]
    pub recipe: Option<String>,
    /// Only say what would be removed, and why the rest stays.
    #[arg(long)]
    pub dry_run: bool,
    /// Also prune these regions, each by the same rules on its own images (the copies there:
    /// `--copy-to`, `jbake copy`), each image with its snapshots.
    #[arg(long, value_name = "REGION[,REGION…]", value_delimiter = ',', value_parser = parse_region)]
    pub regions: Vec<String>,
}

pub async fn prune_cmd(args: PruneArgs, output: Output, quiet: bool) -> Result<(), Failure> {
    let home = Aws::new(&args.aws.options()).await;
    let progress = Progress::new(output, quiet, Vec::new());
    let mut regions: Vec<String> = Vec::new();
    for r in &args.regions {
        if *r != home.region && !regions.contains(r) {
            regions.push(r.clone());
        }
    }
    let mut clients = vec![home];
    for r in &regions {
        let there = clients[0].in_region(r).await;
        clients.push(there);
    }
    // Every region is pruned (and reported) even when one fails: the first error is the exit.
    let mut first_error = None;
    for aws in &clients {
        let mut report =
            match prune::plan(aws, args.recipe.as_deref(), args.keep, args.dry_run).await {
                Ok(r) => r,
                Err(e) => {
                    progress.warn(&format!("cannot prune {}: {e}", aws.region));
                    first_error.get_or_insert(e);
                    continue;
                }
            };
        for w in &report.warnings {
            progress.warn(w);
        }
        let result = if args.dry_run {
            Ok(())
        } else {
            let at = aws.region.clone();
            prune::execute(aws, &mut report, |s| {
                progress.info("prune", &format!("{s} in {at}"))
            })
            .await
        };
        print(&report, output, quiet);
        if let Err(e) = result {
            first_error.get_or_insert(e);
        }
    }
    match first_error {
        None => Ok(()),
        Some(e) => Err(Failure::Runtime(e.into())),
    }
}

fn print(r: &prune::Report, output: Output, quiet: bool) {
    if output == Output::Json {
        if let Ok(text) = serde_json::to_string(r) {
            println!("{text}");
        }
        return;
    }
    let verb = if r.dry_run { "would prune" } else { "pruned" };
    let mut gone = 0;
    for d in &r.decisions {
        let i = &d.image;
        if d.prune() {
            gone += 1;
            let snaps = if i.snapshots.is_empty() {
                String::new()
            } else {
                format!(" and snapshot(s) {}", i.snapshots.join(", "))
            };
            let failed = if i.failed_test {
                " (it failed its boot test)"
            } else {
                ""
            };
            println!(
                "{verb} {} {} (created {}){snaps}{failed}",
                i.id, i.name, i.created
            );
        } else if !quiet {
            let why: Vec<String> = d.keep.iter().map(|k| k.to_string()).collect();
            println!("keep   {} {}: {}", i.id, i.name, why.join("; "));
        }
    }
    if !quiet {
        for s in &r.skipped {
            println!("skip   {} {}: {}", s.id, s.name, s.why);
        }
    }
    let kept = r.decisions.len() - gone;
    if gone > 0 || !quiet {
        println!(
            "{verb} {gone} image(s) of {} jbake image(s) in {}; kept {kept} (the newest {} of each recipe that did not fail their boot test, and those in use)",
            r.decisions.len(),
            r.region,
            r.keep
        );
    }
}
