//! `jbake test AMI`: the boot test of an existing image (the test itself lives in
//! `crate::bake::retest`).

use std::path::PathBuf;
use std::time::Duration;

use clap::Args;
use serde_json::json;

use super::build::{parse_ami, parse_cidr, parse_instance_type, parse_subnet, parse_ttl, AwsArgs};
use super::{BastionArgs, Failure};
use crate::aws::Aws;
use crate::bake::retest::{self, Refusal, TestOutcome};
use crate::bake::{self, BakeOptions, OnError, SshInterface};
use crate::progress::{Output, Progress};
use crate::recipe::{self, LoadOptions};
use crate::shipped::{self, Extracted};

#[derive(Debug, Args)]
pub struct TestArgs {
    /// The image to boot-test: an AMI jbake baked.
    #[arg(value_name = "AMI", value_parser = parse_ami)]
    pub ami: String,
    #[command(flatten)]
    pub aws: AwsArgs,
    /// The recipe the image was baked from [default: the built-in recipe its jbake:recipe tag
    /// names].
    #[arg(long, value_name = "FILE")]
    pub recipe: Option<PathBuf>,
    /// Set a variable (repeatable); wins over --var-file, the image's tags and the recipe's
    /// defaults.
    #[arg(long = "var", value_name = "NAME=VALUE", value_parser = recipe::parse_var_arg)]
    pub vars: Vec<(String, String)>,
    /// A YAML file of variables (repeatable; later files win; they win over the image's tags).
    #[arg(long = "var-file", value_name = "FILE")]
    pub var_files: Vec<PathBuf>,
    /// The test instance's type [default: the recipe's instance.type].
    #[arg(long, value_name = "TYPE", value_parser = parse_instance_type)]
    pub instance_type: Option<String>,
    /// Launch in this subnet [default: the default VPC's].
    #[arg(long, value_name = "SUBNET", value_parser = parse_subnet)]
    pub subnet_id: Option<String>,
    /// Connect to the instance's public or private IP [default: public; private with --bastion].
    #[arg(long, value_enum)]
    pub ssh_interface: Option<SshInterface>,
    /// SSH port.
    #[arg(long, value_name = "PORT", default_value_t = 22)]
    pub ssh_port: u16,
    /// Allow SSH from this CIDR [default: this machine's public IP/32, or the VPC's CIDR with
    /// --ssh-interface private].
    #[arg(long, value_name = "CIDR", value_parser = parse_cidr)]
    pub ssh_cidr: Option<String>,
    /// On failure, remove the test instance and the rest (cleanup) or leave them for
    /// debugging (abort).
    #[arg(long, value_enum, default_value = "cleanup")]
    pub on_error: OnError,
    /// The test instance shuts itself down (and terminates) after this long, whatever happens.
    #[arg(long, value_name = "DURATION", default_value = "2h", value_parser = parse_ttl)]
    pub ttl: Duration,
    /// How long to keep trying to reach the test instance over SSH.
    #[arg(long, value_name = "DURATION", default_value = "5m", value_parser = recipe::parse_duration)]
    pub connect_timeout: Duration,
    #[command(flatten)]
    pub bastion: BastionArgs,
}

fn input(e: impl Into<anyhow::Error>) -> Failure {
    Failure::Input(e.into())
}

/// The built-in recipe whose `name:` is `name`.
fn shipped_recipe(name: &str, ami: &str) -> Result<(PathBuf, Extracted), Failure> {
    let x = Extracted::new().map_err(|e| Failure::Runtime(e.into()))?;
    for (stem, _) in shipped::recipes() {
        let path = x.recipe(stem).map_err(|e| Failure::Runtime(e.into()))?;
        if recipe::name_of(&path).is_ok_and(|n| n == name) {
            return Ok((path, x));
        }
    }
    Err(Failure::Input(anyhow::anyhow!(
        "{ami} was baked from the {name} recipe, which is not built into jbake: pass --recipe FILE (the recipe it was baked from)"
    )))
}

pub async fn test_cmd(args: TestArgs, output: Output, quiet: bool) -> Result<(), Failure> {
    // Offline first: flags, the jump host, the recipe file.
    let jump = args.bastion.jump(None)?;
    if let Some(path) = &args.recipe {
        recipe::tag_variables(path).map_err(input)?;
    }
    let aws_opts = args.aws.options();
    let aws = Aws::new(&aws_opts).await;
    // Which image, which recipe, which variables: read before anything is made (a Ctrl-C here
    // stops jbake at once: nothing to remove).
    let image = aws
        .ec2
        .image(&args.ami)
        .await
        .map_err(|e| Failure::Runtime(e.into()))?
        .ok_or_else(|| {
            input(Refusal::NoSuchImage {
                id: args.ami.clone(),
                region: aws_opts.region.clone(),
            })
        })?;
    let baked_from = retest::check_image(&image).map_err(input)?.to_string();
    let (path, shipped) = match &args.recipe {
        Some(p) => (p.clone(), None),
        None => {
            let (p, x) = shipped_recipe(&baked_from, &args.ami)?;
            (p, Some(x))
        }
    };
    let shown = |f: Failure| match &shipped {
        Some(x) => f.map_text(|t| x.display(t)),
        None => f,
    };
    let tag_vars = recipe::tag_variables(&path).map_err(|e| shown(input(e)))?;
    let ssh_interface = args.ssh_interface.unwrap_or(if jump.is_some() {
        SshInterface::Private
    } else {
        SshInterface::Public
    });
    let opts = BakeOptions {
        recipe: path,
        load: LoadOptions {
            image_vars: retest::image_vars(&tag_vars, &image),
            var_files: args.var_files.clone(),
            vars: args.vars.clone(),
            builtins: Default::default(),
        },
        aws: aws_opts.clone(),
        base_override: None,
        instance_type: args.instance_type.clone(),
        subnet_id: args.subnet_id.clone(),
        iam_instance_profile: None,
        ssh_interface,
        ssh_host: None,
        ssh_port: args.ssh_port,
        ssh_cidr: args.ssh_cidr.clone(),
        jump,
        force: false,
        on_error: args.on_error,
        manifest: PathBuf::new(),
        ttl: args.ttl,
        connect_timeout: args.connect_timeout,
        image_timeout: Duration::from_secs(3600),
        skip_test: false,
        distribution: Default::default(),
        max_age: None,
        output,
        quiet,
        label: None,
    };
    if let Err(e) = retest::preflight(&opts, &image) {
        return Err(shown(input(e)));
    }
    // From here on SIGINT, SIGTERM and SIGHUP stop the test and clean up.
    let interrupt = super::signal_interrupt();
    let region = aws_opts.region.clone();
    let report = retest::test_image(opts, image, aws, interrupt).await;
    let run_id = &report.run_id;
    let gc_hint = format!("`jbake gc --region {region} --build-id {run_id}` removes them");
    let left = report.left.sentence(&gc_hint);
    let r = match report.outcome {
        TestOutcome::Passed(t) => {
            let progress = Progress::new(output, quiet, Vec::new());
            progress.finished(
                "test_result",
                &format!(
                    "passed {} {}: its boot test passed at {} (jbake:tested=true)",
                    t.ami_id, t.name, t.tested_at
                ),
                json!(t),
            );
            match left {
                None => Ok(()),
                Some(left) => Err(Failure::Runtime(anyhow::anyhow!(
                    "{} passed its boot test, but {left}",
                    t.ami_id
                ))),
            }
        }
        TestOutcome::Rejected(e) | TestOutcome::Failed(e @ bake::Error::Recipe(_)) => Err(input(e)),
        TestOutcome::Failed(e) => Err(Failure::Runtime(match left {
            None => anyhow::anyhow!("test {run_id} failed: {e}"),
            Some(left) => anyhow::anyhow!("test {run_id} failed: {e}\n{left}"),
        })),
        TestOutcome::Panicked(what) => Err(Failure::Runtime(anyhow::anyhow!(
            "test {run_id} stopped on an internal error (a bug in jbake: {what}); {}",
            left.unwrap_or_else(|| "its temporary resources were removed".to_string())
        ))),
        TestOutcome::Interrupted(why) => Err(Failure::Interrupted(format!(
            "{why} (test {run_id}); {}",
            left.unwrap_or_else(|| "its temporary resources were removed".to_string())
        ))),
    };
    r.map_err(shown)
}
