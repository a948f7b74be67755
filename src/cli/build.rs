//! `jbake build`, `jbake controller`, `jbake agent` and `jbake gc`.

use std::path::PathBuf;
use std::sync::atomic::AtomicU32;
use std::sync::Arc;
use std::time::Duration;

use clap::Args;

use super::{interrupted, parse_region, BastionArgs, Failure};
use crate::aws::{Aws, AwsOptions};
use crate::build::{self, BuildOptions, OnError, SshInterface, Undo};
use crate::gc;
use crate::progress::{Output, Progress};
use crate::recipe::{self, BaseImage, LoadOptions};
use crate::shipped::Extracted;

/// Where and as whom to call AWS (the standard chain: environment, profiles, SSO, instance role).
#[derive(Debug, Args)]
pub struct AwsArgs {
    /// The AWS region.
    #[arg(long, env = "AWS_REGION", value_parser = parse_region)]
    pub region: String,
    /// A named profile from ~/.aws/config.
    #[arg(long, env = "AWS_PROFILE")]
    pub profile: Option<String>,
    /// Send AWS calls here instead (LocalStack, a VPC endpoint, moto).
    #[arg(long, env = "AWS_ENDPOINT_URL", value_name = "URL")]
    pub endpoint_url: Option<String>,
}

impl AwsArgs {
    pub(crate) fn options(&self) -> AwsOptions {
        AwsOptions {
            region: self.region.clone(),
            profile: self.profile.clone(),
            endpoint_url: self.endpoint_url.clone(),
        }
    }
}

/// The build options shared by `build`, `controller` and `agent`.
#[derive(Debug, Args)]
pub struct BuildFlags {
    #[command(flatten)]
    pub aws: AwsArgs,
    /// Set a variable (repeatable); wins over --var-file and the recipe's defaults.
    #[arg(long = "var", value_name = "NAME=VALUE", value_parser = recipe::parse_var_arg)]
    pub vars: Vec<(String, String)>,
    /// A YAML file of variables (repeatable; later files win).
    #[arg(long = "var-file", value_name = "FILE")]
    pub var_files: Vec<PathBuf>,
    /// Start from this AMI instead of the recipe's base.
    #[arg(long, value_name = "AMI", value_parser = parse_ami, conflicts_with = "base_ssm_parameter")]
    pub base_ami: Option<String>,
    /// Start from the AMI in this SSM parameter instead of the recipe's base.
    #[arg(long, value_name = "PATH")]
    pub base_ssm_parameter: Option<String>,
    /// The build instance's type [default: the recipe's instance.type].
    #[arg(long, value_name = "TYPE", value_parser = parse_instance_type)]
    pub instance_type: Option<String>,
    /// Launch in this subnet [default: the default VPC's].
    #[arg(long, value_name = "SUBNET", value_parser = parse_subnet)]
    pub subnet_id: Option<String>,
    /// Give the build instance this instance profile (for steps that call AWS).
    #[arg(long, value_name = "NAME")]
    pub iam_instance_profile: Option<String>,
    /// Connect to the instance's public or private IP [default: public; private with --bastion].
    #[arg(long, value_enum)]
    pub ssh_interface: Option<SshInterface>,
    /// Connect to this host instead of the instance's IP (a tunnel, a test machine).
    #[arg(long, value_name = "HOST")]
    pub ssh_host: Option<String>,
    /// SSH port.
    #[arg(long, value_name = "PORT", default_value_t = 22)]
    pub ssh_port: u16,
    /// Allow SSH from this CIDR [default: this machine's public IP/32, or the VPC's CIDR with
    /// --ssh-interface private].
    #[arg(long, value_name = "CIDR", value_parser = parse_cidr)]
    pub ssh_cidr: Option<String>,
    /// Build even if an image with the same content hash exists.
    #[arg(long)]
    pub force: bool,
    /// On failure, remove every temporary resource (cleanup) or leave them for debugging (abort).
    #[arg(long, value_enum, default_value = "cleanup")]
    pub on_error: OnError,
    /// Append the build's record to this JSON file.
    #[arg(long, value_name = "FILE", default_value = "jbake-manifest.json")]
    pub manifest: PathBuf,
    /// The build instance shuts itself down (and terminates) after this long, whatever happens.
    #[arg(long, value_name = "DURATION", default_value = "2h", value_parser = recipe::parse_duration)]
    pub ttl: Duration,
    /// How long to keep trying to reach the instance over SSH.
    #[arg(long, value_name = "DURATION", default_value = "5m", value_parser = recipe::parse_duration)]
    pub connect_timeout: Duration,
    /// How long to wait for the image to become available.
    #[arg(long, value_name = "DURATION", default_value = "60m", value_parser = recipe::parse_duration)]
    pub image_timeout: Duration,
    #[command(flatten)]
    pub bastion: BastionArgs,
}

#[derive(Debug, Args)]
pub struct BuildArgs {
    /// The recipe file (YAML).
    pub recipe: PathBuf,
    #[command(flatten)]
    pub flags: BuildFlags,
}

#[derive(Debug, Args)]
pub struct ControllerArgs {
    /// The EFS file system that holds JENKINS_HOME (fs-xxxxxxxx or fs-xxxxxxxxxxxxxxxxx).
    #[arg(long, value_name = "FS_ID", value_parser = parse_efs_id)]
    pub efs_id: String,
    /// The controller recipe [default: the built-in recipes/controller.yaml; `jbake recipes
    /// export DIR` writes it out to customise].
    #[arg(long, value_name = "FILE")]
    pub recipe: Option<PathBuf>,
    #[command(flatten)]
    pub flags: BuildFlags,
}

#[derive(Debug, Args)]
pub struct AgentArgs {
    /// The agent recipe [default: the built-in recipes/agent.yaml; `jbake recipes export DIR`
    /// writes it out to customise].
    #[arg(long, value_name = "FILE")]
    pub recipe: Option<PathBuf>,
    #[command(flatten)]
    pub flags: BuildFlags,
}

#[derive(Debug, Args)]
pub struct GcArgs {
    #[command(flatten)]
    pub aws: AwsArgs,
    /// Only list what would be removed.
    #[arg(long)]
    pub dry_run: bool,
    /// Also remove what builds started longer ago than this left (default: only expired builds).
    #[arg(long, value_name = "DURATION", value_parser = recipe::parse_duration)]
    pub older_than: Option<Duration>,
    /// Remove what this build left, whatever its age.
    #[arg(long, value_name = "ID")]
    pub build_id: Option<String>,
}

fn matches(re: &str, s: &str) -> bool {
    regex::Regex::new(re)
        .map(|r| r.is_match(s))
        .unwrap_or(false)
}

fn parse_efs_id(s: &str) -> Result<String, String> {
    if matches("^fs-[0-9a-f]{8}([0-9a-f]{9})?$", s) {
        Ok(s.to_string())
    } else {
        Err(format!("'{s}' is not an EFS file system id (fs- and 8 or 17 hex digits, e.g. fs-0123456789abcdef0)"))
    }
}

fn parse_ami(s: &str) -> Result<String, String> {
    if matches("^ami-[0-9a-f]{8}([0-9a-f]{9})?$", s) {
        Ok(s.to_string())
    } else {
        Err(format!(
            "'{s}' is not an AMI id (ami- and 8 or 17 hex digits)"
        ))
    }
}

fn parse_subnet(s: &str) -> Result<String, String> {
    if matches("^subnet-[0-9a-f]{8}([0-9a-f]{9})?$", s) {
        Ok(s.to_string())
    } else {
        Err(format!(
            "'{s}' is not a subnet id (subnet- and 8 or 17 hex digits)"
        ))
    }
}

fn parse_instance_type(s: &str) -> Result<String, String> {
    if matches(r"^[a-z][a-z0-9-]*\.[a-z0-9]+$", s) {
        Ok(s.to_string())
    } else {
        Err(format!("'{s}' is not an instance type (like t3.small)"))
    }
}

fn parse_cidr(s: &str) -> Result<String, String> {
    let ok = s.split_once('/').is_some_and(|(ip, len)| {
        ip.parse::<std::net::Ipv4Addr>().is_ok() && len.parse::<u8>().is_ok_and(|l| l <= 32)
    });
    if ok {
        Ok(s.to_string())
    } else {
        Err(format!("'{s}' is not an IPv4 CIDR (like 203.0.113.7/32)"))
    }
}

fn options(
    recipe: PathBuf,
    flags: &BuildFlags,
    extra_vars: Vec<(String, String)>,
) -> Result<BuildOptions, Failure> {
    let mut vars = extra_vars;
    vars.extend(flags.vars.iter().cloned());
    let jump = flags.bastion.jump(None)?;
    let ssh_interface = flags.ssh_interface.unwrap_or(if jump.is_some() {
        SshInterface::Private
    } else {
        SshInterface::Public
    });
    Ok(BuildOptions {
        recipe,
        load: LoadOptions {
            var_files: flags.var_files.clone(),
            vars,
            builtins: Default::default(),
        },
        aws: flags.aws.options(),
        base_override: match (&flags.base_ami, &flags.base_ssm_parameter) {
            (Some(a), _) => Some(BaseImage::Ami(a.clone())),
            (None, Some(p)) => Some(BaseImage::SsmParameter(p.clone())),
            _ => None,
        },
        instance_type: flags.instance_type.clone(),
        subnet_id: flags.subnet_id.clone(),
        iam_instance_profile: flags.iam_instance_profile.clone(),
        ssh_interface,
        jump,
        ssh_host: flags.ssh_host.clone(),
        ssh_port: flags.ssh_port,
        ssh_cidr: flags.ssh_cidr.clone(),
        force: flags.force,
        on_error: flags.on_error,
        manifest: flags.manifest.clone(),
        ttl: flags.ttl,
        connect_timeout: flags.connect_timeout,
        image_timeout: flags.image_timeout,
    })
}

pub async fn build_cmd(args: BuildArgs, output: Output, quiet: bool) -> Result<(), Failure> {
    bake(
        options(args.recipe, &args.flags, Vec::new())?,
        output,
        quiet,
    )
    .await
}

pub async fn controller_cmd(
    args: ControllerArgs,
    output: Output,
    quiet: bool,
) -> Result<(), Failure> {
    let efs = vec![("efs_id".to_string(), args.efs_id.clone())];
    let (recipe, shipped) = recipe_or_shipped(args.recipe, "controller")?;
    let r = bake(options(recipe, &args.flags, efs)?, output, quiet).await;
    shown_as_built_in(r, shipped.as_ref())
}

pub async fn agent_cmd(args: AgentArgs, output: Output, quiet: bool) -> Result<(), Failure> {
    let (recipe, shipped) = recipe_or_shipped(args.recipe, "agent")?;
    let r = bake(options(recipe, &args.flags, Vec::new())?, output, quiet).await;
    shown_as_built_in(r, shipped.as_ref())
}

/// `--recipe FILE`, or the built-in recipe `name` extracted for this command.
fn recipe_or_shipped(
    given: Option<PathBuf>,
    name: &str,
) -> Result<(PathBuf, Option<Extracted>), Failure> {
    if let Some(path) = given {
        return Ok((path, None));
    }
    let shipped = Extracted::new().map_err(|e| Failure::Runtime(e.into()))?;
    let path = shipped
        .recipe(name)
        .map_err(|e| Failure::Runtime(e.into()))?;
    Ok((path, Some(shipped)))
}

/// Errors about a built-in recipe name it `<built-in>/recipes/…`, not the temporary folder.
fn shown_as_built_in(r: Result<(), Failure>, shipped: Option<&Extracted>) -> Result<(), Failure> {
    match shipped {
        Some(x) => r.map_err(|f| f.map_text(|t| x.display(t))),
        None => r,
    }
}

/// Runs a build and, whatever happens, its cleanup.
async fn bake(opts: BuildOptions, output: Output, quiet: bool) -> Result<(), Failure> {
    // Offline first: a bad recipe or variable is exit 2 before any AWS call.
    let plan = build::load_for_hash(&opts, None).map_err(|e| Failure::Input(e.into()))?;
    let aws = Aws::new(&opts.aws).await;
    let undo = Undo::default();
    let build_id = build::build_id();
    let mut progress = Progress::new(output, quiet, plan.secrets());
    progress.info(
        "build",
        &format!("build {build_id} of {} in {}", plan.name, opts.aws.region),
    );
    let broker = Arc::new(AtomicU32::new(0));
    let outcome = tokio::select! {
        r = build::run(&opts, &aws, &undo, &build_id, &mut progress, broker) => Some(r),
        what = interrupted() => {
            progress.abandon_step();
            progress.warn(&format!("interrupted {what}: stopping the build and removing what it made"));
            None
        }
    };
    let failed = !matches!(outcome, Some(Ok(_)));
    let gc_hint = format!(
        "`jbake gc --region {} --build-id {build_id}` removes them",
        opts.aws.region
    );
    let left = if failed && opts.on_error == OnError::Abort {
        let left = undo.remaining();
        let mut text = String::from("--on-error abort: these were left for debugging:");
        for r in &left {
            text.push_str(&format!("\n  {r}"));
        }
        text.push_str(&format!(
            "\nremove them with: jbake gc --region {} --build-id {build_id}",
            opts.aws.region
        ));
        progress.warn(&text);
        if left.is_empty() {
            Leftovers::default()
        } else {
            Leftovers {
                kept: left.iter().map(|r| r.to_string()).collect(),
                ..Leftovers::default()
            }
        }
    } else {
        cleanup(&aws, &undo, &build_id, &progress).await
    };
    match outcome {
        Some(Ok(built)) => {
            progress.result(&built);
            // The image is good and recorded, but a leak must not pass as success: the nightly
            // cron alerts on the exit status, not on a warning in its log.
            match left.sentence(&gc_hint) {
                None => Ok(()),
                Some(left) => Err(Failure::Runtime(anyhow::anyhow!(
                    "built {} ({}), but {left}",
                    built.ami_id,
                    built.name
                ))),
            }
        }
        Some(Err(e)) => Err(match e {
            build::Error::Recipe(e) => Failure::Input(e.into()),
            other => Failure::Runtime(match left.sentence(&gc_hint) {
                None => anyhow::anyhow!("build {build_id} failed: {other}"),
                Some(left) => anyhow::anyhow!("build {build_id} failed: {other}\n{left}"),
            }),
        }),
        None => Err(Failure::Interrupted(format!(
            "(build {build_id}); {}",
            left.sentence(&gc_hint)
                .unwrap_or_else(|| "its temporary resources were removed".to_string())
        ))),
    }
}

/// What a build's cleanup did not remove, for its last line.
#[derive(Debug, Default)]
struct Leftovers {
    /// Left on purpose (`--on-error abort`).
    kept: Vec<String>,
    /// Could not be removed (each once, with the last error).
    failed: Vec<String>,
    /// Why the sweep by tag could not look for what the build made but could not record.
    unchecked: Option<String>,
}

impl Leftovers {
    /// `None` when everything was removed and checked; else what is left and what to do.
    fn sentence(&self, gc_hint: &str) -> Option<String> {
        if !self.kept.is_empty() {
            Some(format!(
                "left for debugging (--on-error abort): {}; {gc_hint}",
                self.kept.join(", ")
            ))
        } else if !self.failed.is_empty() {
            Some(format!(
                "its cleanup failed, these are left: {}; {gc_hint}",
                self.failed.join("; ")
            ))
        } else {
            self.unchecked.as_ref().map(|why| {
                format!(
                    "what it recorded was removed, but it could not check for leftovers ({why}); \
                     {}",
                    gc_hint.replace(" removes them", " finds and removes any")
                )
            })
        }
    }
}

/// Undoes what the build recorded, then sweeps by tag for anything it made but could not record
/// (an API call cut off by Ctrl-C). A second Ctrl-C only says what is still being removed.
/// Returns what is left.
async fn cleanup(aws: &Aws, undo: &Undo, build_id: &str, progress: &Progress) -> Leftovers {
    let work = async {
        let mut failed = undo.run(aws, progress).await;
        let sel = gc::Selector {
            older_than: None,
            build_id: Some(build_id.to_string()),
        };
        let mut unchecked = None;
        match gc::find(aws, &sel).await {
            Ok(found) => failed.extend(gc::remove(aws, &found, progress).await),
            Err(e) => {
                progress.warn(&format!(
                    "could not check for leftovers of build {build_id}: {e}"
                ));
                unchecked = Some(e.to_string());
            }
        }
        (failed, unchecked)
    };
    let nag = async {
        loop {
            let what = interrupted().await;
            let left: Vec<String> = undo.remaining().iter().map(|r| r.to_string()).collect();
            eprintln!(
                "{what} again: still removing {}; jbake exits when it is done (kill -9 leaves them to `jbake gc`)",
                if left.is_empty() { "the last resources".to_string() } else { left.join(", ") }
            );
        }
    };
    let (failed, unchecked) = tokio::select! {
        f = work => f,
        _ = nag => (Vec::new(), None),
    };
    // A resource the undo stack failed on is found again by the sweep: name it once, with the
    // last error.
    let mut left: Vec<(String, String)> = Vec::new();
    for (r, e) in &failed {
        let name = r.to_string();
        match left.iter_mut().find(|(n, _)| *n == name) {
            Some(entry) => entry.1 = e.to_string(),
            None => left.push((name, e.to_string())),
        }
    }
    if !left.is_empty() {
        let list: Vec<String> = left.iter().map(|(r, e)| format!("{r} ({e})")).collect();
        progress.warn(&format!(
            "cleanup could not remove: {}; they are tagged jbake:build-id={build_id}: `jbake gc --region {} --build-id {build_id}` removes them",
            list.join("; "),
            aws.region
        ));
    }
    Leftovers {
        kept: Vec::new(),
        failed: left.into_iter().map(|(r, _)| r).collect(),
        unchecked,
    }
}

pub async fn gc_cmd(args: GcArgs, output: Output, quiet: bool) -> Result<(), Failure> {
    let aws = Aws::new(&args.aws.options()).await;
    let progress = Progress::new(output, quiet, Vec::new());
    let sel = gc::Selector {
        older_than: args.older_than,
        build_id: args.build_id.clone(),
    };
    let found = gc::find(&aws, &sel)
        .await
        .map_err(|e| Failure::Runtime(e.into()))?;
    if found.is_empty() {
        progress.info("gc", "nothing to remove");
        return Ok(());
    }
    if args.dry_run {
        for r in &found {
            progress.info("gc", &format!("would remove {r}"));
        }
        return Ok(());
    }
    let failed = gc::remove(&aws, &found, &progress).await;
    if failed.is_empty() {
        progress.info("gc", &format!("removed {} resources", found.len()));
        Ok(())
    } else {
        Err(Failure::Runtime(anyhow::anyhow!(
            "{} of {} resources could not be removed",
            failed.len(),
            found.len()
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids() {
        assert!(parse_efs_id("fs-0123456789abcdef0").is_ok());
        assert!(parse_efs_id("fs-01234567").is_ok());
        assert!(parse_efs_id("fs-0123").is_err());
        assert!(parse_efs_id("fs-0123456789ABCDEF0").is_err());
        assert!(parse_ami("ami-0123456789abcdef0").is_ok());
        assert!(parse_ami("ami-xyz").is_err());
        assert!(parse_cidr("10.0.0.0/8").is_ok());
        assert!(parse_cidr("10.0.0.0/33").is_err());
        assert!(parse_cidr("10.0.0.0").is_err());
        assert!(parse_instance_type("t3.small").is_ok());
        assert!(parse_instance_type("small").is_err());
    }
}
