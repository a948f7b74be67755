//! `jbake copy IMAGE`: copies, launch permissions and published parameters for an image that
//! exists (the bake's copy, share and publish stages; `crate::bake::existing`).

use clap::Args;

use super::build::{AwsArgs, DistributionArgs};
use super::{parse_region, Failure};
use crate::aws::Aws;
use crate::bake::existing::{self, CopyOptions, Outcome};
use crate::bake::{self, OnError};
use crate::progress::Output;

#[derive(Debug, Args)]
pub struct CopyArgs {
    /// The image (a finished jbake image of --region).
    #[arg(value_name = "IMAGE", value_parser = super::build::parse_ami)]
    pub image: String,
    #[command(flatten)]
    pub aws: AwsArgs,
    /// Copy it to these regions: encrypted, with its name and tags (on the copies' snapshots
    /// too); a finished copy that exists already is used as it is.
    #[arg(long, value_name = "REGION[,REGION…]", value_delimiter = ',', value_parser = parse_region)]
    pub to: Vec<String>,
    #[command(flatten)]
    pub distribution: DistributionArgs,
    /// On failure, remove the half-made copies (cleanup) or leave them for debugging (abort).
    #[arg(long, value_enum, default_value = "cleanup")]
    pub on_error: OnError,
}

pub async fn copy_cmd(args: CopyArgs, output: Output, quiet: bool) -> Result<(), Failure> {
    let distribution = args.distribution.distribution(&args.to)?;
    if distribution.is_empty() {
        return Err(Failure::Input(anyhow::anyhow!(
            "nothing to do: give --to REGION[,…], --share-with ACCOUNT[,…] or --publish-ssm"
        )));
    }
    let opts = CopyOptions {
        aws: args.aws.options(),
        image: args.image.clone(),
        distribution,
        on_error: args.on_error,
        output,
        quiet,
    };
    // Offline first: bad input is exit 2 before any AWS call.
    opts.distribution
        .check(&opts.aws.region, bake::distribute::Origin::Existing)
        .map_err(|e| Failure::Input(e.into()))?;
    let interrupt = super::signal_interrupt();
    let aws = Aws::new(&opts.aws).await;
    let region = opts.aws.region.clone();
    let regions = bake::cleanup::regions_flag(&opts.distribution.copy_to);
    let report = existing::copy_image(opts, aws, interrupt).await;
    let run = &report.run_id;
    let gc_hint = format!("`jbake gc --region {region}{regions} --build-id {run}` removes them");
    let left = report.left.sentence(&gc_hint);
    match report.outcome {
        Outcome::Done(d) => match left {
            None => Ok(()),
            Some(left) => Err(Failure::Runtime(anyhow::anyhow!(
                "copied {} ({} regions), but {left}",
                args.image,
                d.regions.len()
            ))),
        },
        Outcome::Rejected(e) | Outcome::Failed(e @ bake::Error::Refused(_)) => {
            Err(Failure::Input(e.into()))
        }
        Outcome::Failed(e) => Err(Failure::Runtime(match left {
            None => anyhow::anyhow!("copy run {run} failed: {e}"),
            Some(left) => anyhow::anyhow!("copy run {run} failed: {e}\n{left}"),
        })),
        Outcome::Panicked(what) => Err(Failure::Runtime(anyhow::anyhow!(
            "copy run {run} stopped on an internal error (a bug in jbake: {what}); {}",
            left.unwrap_or_else(|| "what it made was removed".to_string())
        ))),
        Outcome::Interrupted(why) => Err(Failure::Interrupted(format!(
            "{why} (copy run {run}); {}",
            left.unwrap_or_else(|| "what it made was removed".to_string())
        ))),
    }
}
