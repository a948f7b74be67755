//! `jbake build`, `jbake controller`, `jbake agent` and `jbake gc`: flags in, the bake's report
//! out (the bake itself, its cleanup and gc live in `crate::bake`).

use std::path::PathBuf;
use std::time::Duration;

use clap::Args;

use super::{parse_region, BastionArgs, Failure};
use crate::aws::{Aws, AwsOptions};
use crate::bake::distribute::{self, Distribution, KmsKeys};
use crate::bake::{self, gc, BakeOptions, OnError, Outcome, SshInterface};
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
    /// Build again when the image of the same inputs is older than this (e.g. 7d), so that it
    /// gets the distribution's security updates published since [default: never].
    #[arg(long, value_name = "DURATION", value_parser = parse_max_age)]
    pub max_age: Option<Duration>,
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
    #[arg(long, value_name = "DURATION", default_value = "2h", value_parser = parse_ttl)]
    pub ttl: Duration,
    /// How long to keep trying to reach the instance over SSH.
    #[arg(long, value_name = "DURATION", default_value = "5m", value_parser = recipe::parse_duration)]
    pub connect_timeout: Duration,
    /// How long to wait for the image to become available.
    #[arg(long, value_name = "DURATION", default_value = "60m", value_parser = recipe::parse_duration)]
    pub image_timeout: Duration,
    /// Do not boot-test the image (an instance of it, checked over SSH): it gets no
    /// jbake:tested tag, and `jbake roll` wants --allow-untested for it.
    #[arg(long)]
    pub skip_test: bool,
    #[command(flatten)]
    pub bastion: BastionArgs,
    /// Copy the image to these regions (disaster recovery): encrypted, with its name and tags,
    /// on the copies' snapshots too; the manifest lists every region's image.
    #[arg(long, value_name = "REGION[,REGION…]", value_delimiter = ',', value_parser = parse_region)]
    pub copy_to: Vec<String>,
    #[command(flatten)]
    pub distribution: DistributionArgs,
}

/// What happens to the image besides being made (shared by build, controller, agent and copy).
#[derive(Debug, Args)]
pub struct DistributionArgs {
    /// The KMS key to encrypt with: KEY (an alias or multi-Region key) for every region,
    /// REGION=KEY (repeatable) for one, a key ARN for its region [default: each region's
    /// default EBS key].
    #[arg(long = "kms-key-id", value_name = "[REGION=]KEY", value_parser = distribute::parse_kms_arg)]
    pub kms_key_id: Vec<(Option<String>, String)>,
    /// Let these accounts launch the image and its copies (launch permissions). An image
    /// encrypted with the AWS managed aws/ebs key cannot be shared: refused before anything is
    /// made.
    #[arg(long, value_name = "ACCOUNT[,ACCOUNT…]", value_delimiter = ',', value_parser = distribute::parse_account)]
    pub share_with: Vec<String>,
    /// Publish each region's image id in the SSM parameter PREFIX/<recipe>/latest (data type
    /// aws:ec2:image, for resolve:ssm: in launch templates) once its boot test passed; an older
    /// image never replaces a newer one.
    #[arg(long, value_name = "PREFIX", num_args = 0..=1, default_missing_value = distribute::DEFAULT_PREFIX, value_parser = distribute::parse_prefix)]
    pub publish_ssm: Option<String>,
    /// How long a copy may take to become available (CopyImage across regions takes tens of
    /// minutes).
    #[arg(long, value_name = "DURATION", default_value = "2h", value_parser = recipe::parse_duration)]
    pub copy_timeout: Duration,
    /// Publish an image that is not tested (jbake:tested is not true).
    #[arg(long, requires = "publish_ssm")]
    pub allow_untested: bool,
}

impl DistributionArgs {
    /// The distribution to `copy_to` (checked against the image's region later, by the bake).
    pub(crate) fn distribution(&self, copy_to: &[String]) -> Result<Distribution, Failure> {
        let kms = KmsKeys::from_args(&self.kms_key_id).map_err(|e| Failure::Input(e.into()))?;
        Ok(Distribution {
            copy_to: copy_to.to_vec(),
            kms,
            share_with: self.share_with.clone(),
            publish: self.publish_ssm.clone(),
            copy_timeout: self.copy_timeout,
            allow_untested: self.allow_untested,
        })
    }
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
    #[arg(long, value_name = "ID", value_parser = parse_build_id)]
    pub build_id: Option<String>,
    /// Also look in these regions (where builds copied their images) [default: the regions
    /// the images of --region name in their jbake:copy-regions tag].
    #[arg(long, value_name = "REGION[,REGION…]", value_delimiter = ',', value_parser = parse_region)]
    pub regions: Vec<String>,
}

fn matches(re: &str, s: &str) -> bool {
    regex::Regex::new(re)
        .map(|r| r.is_match(s))
        .unwrap_or(false)
}

fn parse_build_id(s: &str) -> Result<String, String> {
    if gc::is_build_id(s) {
        Ok(s.to_string())
    } else {
        Err(format!(
            "'{s}' is not a jbake build id (YYYYMMDD-HHMMSS-xxxxxx, as `jbake build` prints it)"
        ))
    }
}

pub(crate) fn parse_ttl(s: &str) -> Result<Duration, String> {
    let d = recipe::parse_duration(s)?;
    if d < Duration::from_secs(60) || d > bake::MAX_TTL {
        return Err(format!(
            "\"{s}\" is out of range: the build instance's watchdog takes 1m to 7 days (168h)"
        ));
    }
    Ok(d)
}

pub(crate) fn parse_max_age(s: &str) -> Result<Duration, String> {
    let d = recipe::parse_duration(s)?;
    if d < Duration::from_secs(3600) {
        return Err(format!(
            "--max-age {s} is under an hour: every run would rebuild (use --force for that)"
        ));
    }
    Ok(d)
}

pub(crate) fn parse_efs_id(s: &str) -> Result<String, String> {
    if matches("^fs-[0-9a-f]{8}([0-9a-f]{9})?$", s) {
        Ok(s.to_string())
    } else {
        Err(format!("'{s}' is not an EFS file system id (fs- and 8 or 17 hex digits, e.g. fs-0123456789abcdef0)"))
    }
}

pub(crate) fn parse_ami(s: &str) -> Result<String, String> {
    if matches("^ami-[0-9a-f]{8}([0-9a-f]{9})?$", s) {
        Ok(s.to_string())
    } else {
        Err(format!(
            "'{s}' is not an AMI id (ami- and 8 or 17 hex digits)"
        ))
    }
}

pub(crate) fn parse_subnet(s: &str) -> Result<String, String> {
    if matches("^subnet-[0-9a-f]{8}([0-9a-f]{9})?$", s) {
        Ok(s.to_string())
    } else {
        Err(format!(
            "'{s}' is not a subnet id (subnet- and 8 or 17 hex digits)"
        ))
    }
}

pub(crate) fn parse_instance_type(s: &str) -> Result<String, String> {
    if matches(r"^[a-z][a-z0-9-]*\.[a-z0-9]+$", s) {
        Ok(s.to_string())
    } else {
        Err(format!("'{s}' is not an instance type (like t3.small)"))
    }
}

pub(crate) fn parse_cidr(s: &str) -> Result<String, String> {
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
    output: Output,
    quiet: bool,
) -> Result<BakeOptions, Failure> {
    let mut vars = extra_vars;
    vars.extend(flags.vars.iter().cloned());
    let jump = flags.bastion.jump(None)?;
    let ssh_interface = flags.ssh_interface.unwrap_or(if jump.is_some() {
        SshInterface::Private
    } else {
        SshInterface::Public
    });
    Ok(BakeOptions {
        recipe,
        load: LoadOptions {
            image_vars: Vec::new(),
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
        max_age: flags.max_age,
        on_error: flags.on_error,
        manifest: flags.manifest.clone(),
        ttl: flags.ttl,
        connect_timeout: flags.connect_timeout,
        image_timeout: flags.image_timeout,
        skip_test: flags.skip_test,
        output,
        quiet,
        distribution: flags.distribution.distribution(&flags.copy_to)?,
        label: None,
    })
}

pub async fn build_cmd(args: BuildArgs, output: Output, quiet: bool) -> Result<(), Failure> {
    bake(options(
        args.recipe,
        &args.flags,
        Vec::new(),
        output,
        quiet,
    )?)
    .await
}

pub async fn controller_cmd(
    args: ControllerArgs,
    output: Output,
    quiet: bool,
) -> Result<(), Failure> {
    let efs = vec![("efs_id".to_string(), args.efs_id.clone())];
    let (recipe, shipped) = recipe_or_shipped(args.recipe, "controller")?;
    let r = bake(options(recipe, &args.flags, efs, output, quiet)?).await;
    shown_as_built_in(r, shipped.as_ref())
}

pub async fn agent_cmd(args: AgentArgs, output: Output, quiet: bool) -> Result<(), Failure> {
    let (recipe, shipped) = recipe_or_shipped(args.recipe, "agent")?;
    let r = bake(options(recipe, &args.flags, Vec::new(), output, quiet)?).await;
    shown_as_built_in(r, shipped.as_ref())
}

/// `--recipe FILE`, or the built-in recipe `name` extracted for this command.
pub(crate) fn recipe_or_shipped(
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

/// Runs a bake (its cleanup included) and says how it ended.
async fn bake(opts: BakeOptions) -> Result<(), Failure> {
    // Offline first: bad input is exit 2 before any AWS call.
    bake::preflight(&opts).map_err(|e| Failure::Input(e.into()))?;
    // From here on SIGINT, SIGTERM and SIGHUP stop the build and clean up.
    let interrupt = super::signal_interrupt();
    let aws = Aws::new(&opts.aws).await;
    let region = opts.aws.region.clone();
    let regions = bake::cleanup::regions_flag(&opts.distribution.copy_to);
    let report = bake::bake(opts, aws, interrupt).await;
    let build_id = &report.build_id;
    let gc_hint =
        format!("`jbake gc --region {region}{regions} --build-id {build_id}` removes them");
    let left = report.left.sentence(&gc_hint);
    match report.outcome {
        // The image is good and recorded, but a leak must not pass as success: the nightly cron
        // alerts on the exit status, not on a warning in its log.
        Outcome::Built(built) => match left {
            None => Ok(()),
            Some(left) => Err(Failure::Runtime(anyhow::anyhow!(
                "built {} ({}), but {left}",
                built.ami_id,
                built.name
            ))),
        },
        Outcome::Rejected(e)
        | Outcome::Failed(e @ bake::Error::Recipe(_))
        | Outcome::Failed(e @ bake::Error::Refused(_)) => Err(Failure::Input(e.into())),
        Outcome::Failed(e) => Err(Failure::Runtime(match left {
            None => anyhow::anyhow!("build {build_id} failed: {e}"),
            Some(left) => anyhow::anyhow!("build {build_id} failed: {e}\n{left}"),
        })),
        Outcome::Panicked(what) => Err(Failure::Runtime(anyhow::anyhow!(
            "build {build_id} stopped on an internal error (a bug in jbake: {what}); {}",
            left.unwrap_or_else(|| "its temporary resources were removed".to_string())
        ))),
        Outcome::Interrupted(why) => Err(Failure::Interrupted(format!(
            "{why} (build {build_id}); {}",
            left.unwrap_or_else(|| "its temporary resources were removed".to_string())
        ))),
    }
}

pub async fn gc_cmd(args: GcArgs, output: Output, quiet: bool) -> Result<(), Failure> {
    let aws = Aws::new(&args.aws.options()).await;
    let progress = Progress::new(output, quiet, Vec::new());
    let sel = gc::Selector {
        older_than: args.older_than,
        build_id: args.build_id.clone(),
    };
    // The other regions: as given, and where this region's images say their copies went.
    let mut regions: Vec<String> = Vec::new();
    for r in &args.regions {
        if *r != aws.region && !regions.contains(r) {
            regions.push(r.clone());
        }
    }
    let named = gc::copy_regions(&aws)
        .await
        .map_err(|e| Failure::Runtime(e.into()))?;
    let added: Vec<String> = named
        .into_iter()
        .filter(|r| *r != aws.region && !regions.contains(r))
        .collect();
    if !added.is_empty() {
        progress.info(
            "gc",
            &format!(
                "also looking in {} (where images of {} were copied: {})",
                added.join(", "),
                aws.region,
                bake::tags::COPY_REGIONS
            ),
        );
        regions.extend(added);
    }
    let many = !regions.is_empty();
    let mut clients = vec![aws];
    for r in &regions {
        let home = &clients[0];
        let there = home.in_region(r).await;
        clients.push(there);
    }
    let (mut total, mut failed) = (0usize, 0usize);
    for there in &clients {
        let found = gc::find(there, &sel, gc::Busy::Spare)
            .await
            .map_err(|e| Failure::Runtime(e.into()))?;
        let at = if many {
            format!(" in {}", there.region)
        } else {
            String::new()
        };
        for s in &found.skipped {
            progress.warn(&format!("left {}{at}: {}", s.what, s.why));
        }
        total += found.remove.len();
        if args.dry_run {
            for (r, _) in &found.remove {
                progress.info("gc", &format!("would remove {r}{at}"));
            }
            continue;
        }
        failed += gc::remove(there, &found, &progress).await.len();
    }
    if total == 0 {
        progress.info("gc", "nothing to remove");
        return Ok(());
    }
    if args.dry_run {
        return Ok(());
    }
    if failed == 0 {
        progress.info("gc", &format!("removed {total} resources"));
        Ok(())
    } else {
        Err(Failure::Runtime(anyhow::anyhow!(
            "{failed} of {total} resources could not be removed"
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
        assert!(parse_build_id("20261129-031055-46429b").is_ok());
        assert!(parse_build_id("../x").is_err());
        assert!(parse_ttl("2h").is_ok());
        assert!(parse_ttl("30s").is_err());
        assert!(parse_ttl("169h").is_err());
        assert!(parse_ttl("99999999999999999999h").is_err());
    }
}
