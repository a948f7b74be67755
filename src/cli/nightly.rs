//! `jbake nightly`: flags in; the two bakes at once, then the roll; one summary line out.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use clap::Args;
use serde_json::json;

use super::build::{
    parse_cidr, parse_efs_id, parse_max_age, parse_subnet, parse_ttl, AwsArgs, DistributionArgs,
};
use super::roll::{roll_run, RollArgs, RollEnd as CliRollEnd};
use super::{BastionArgs, Failure};
use crate::aws::Aws;
use crate::bake::{self, BakeOptions, OnError, Outcome, SshInterface};
use crate::nightly::{
    roll_decision, BakeEnd, LockError, NightlyLock, RollDecision, RollEnd, Summary,
};
use crate::progress::{Output, Progress};
use crate::recipe::{self, LoadOptions};
use crate::roll::Strategy;
use crate::shipped::Extracted;

#[derive(Debug, Args)]
pub struct NightlyArgs {
    #[command(flatten)]
    pub aws: AwsArgs,
    /// The EFS file system that holds JENKINS_HOME (the controller image is baked for it).
    #[arg(long, value_name = "FS_ID", value_parser = parse_efs_id)]
    pub efs_id: String,
    /// Then roll the controller to its image (when the group does not run it yet, and only
    /// when both bakes succeeded).
    #[arg(long)]
    pub roll: bool,
    /// Bake an unchanged image again once it is older than this, so that the images get the
    /// distribution's security updates.
    #[arg(long, value_name = "DURATION", default_value = "7d", value_parser = parse_max_age)]
    pub max_age: Duration,
    /// Bake both images even if unchanged.
    #[arg(long)]
    pub force: bool,
    /// The lock that keeps two nightly runs apart [default: .jbake-nightly.lock beside the
    /// --manifest].
    #[arg(long, value_name = "FILE")]
    pub lock_file: Option<PathBuf>,
    /// The controller recipe [default: the built-in one].
    #[arg(long, value_name = "FILE")]
    pub controller_recipe: Option<PathBuf>,
    /// The agent recipe [default: the built-in one].
    #[arg(long, value_name = "FILE")]
    pub agent_recipe: Option<PathBuf>,
    /// A variable of the controller recipe (repeatable).
    #[arg(long = "controller-var", value_name = "NAME=VALUE", value_parser = recipe::parse_var_arg)]
    pub controller_vars: Vec<(String, String)>,
    /// A variable of the agent recipe (repeatable).
    #[arg(long = "agent-var", value_name = "NAME=VALUE", value_parser = recipe::parse_var_arg)]
    pub agent_vars: Vec<(String, String)>,
    /// A YAML file of the controller recipe's variables (repeatable).
    #[arg(long = "controller-var-file", value_name = "FILE")]
    pub controller_var_files: Vec<PathBuf>,
    /// A YAML file of the agent recipe's variables (repeatable).
    #[arg(long = "agent-var-file", value_name = "FILE")]
    pub agent_var_files: Vec<PathBuf>,
    /// Launch the build instances in this subnet [default: the default VPC's].
    #[arg(long, value_name = "SUBNET", value_parser = parse_subnet)]
    pub subnet_id: Option<String>,
    /// Give the build instances this instance profile.
    #[arg(long, value_name = "NAME")]
    pub iam_instance_profile: Option<String>,
    /// Connect to the instances' public or private IP [default: public; private with --bastion].
    #[arg(long, value_enum)]
    pub ssh_interface: Option<SshInterface>,
    /// Allow SSH from this CIDR [default: this machine's public IP/32, or the VPC's CIDR with
    /// --ssh-interface private].
    #[arg(long, value_name = "CIDR", value_parser = parse_cidr)]
    pub ssh_cidr: Option<String>,
    /// Connect to this host:port for the controller's build instance (a tunnel) instead of
    /// its IP.
    #[arg(long, value_name = "HOST:PORT", value_parser = parse_host_port)]
    pub controller_ssh_via: Option<(String, u16)>,
    /// Connect to this host:port for the agent's build instance (a tunnel) instead of its IP.
    #[arg(long, value_name = "HOST:PORT", value_parser = parse_host_port)]
    pub agent_ssh_via: Option<(String, u16)>,
    /// Append the builds' records to this JSON file.
    #[arg(long, value_name = "FILE", default_value = "jbake-manifest.json")]
    pub manifest: PathBuf,
    /// The build instances shut themselves down (and terminate) after this long.
    #[arg(long, value_name = "DURATION", default_value = "2h", value_parser = parse_ttl)]
    pub ttl: Duration,
    /// How long to keep trying to reach a build instance over SSH.
    #[arg(long, value_name = "DURATION", default_value = "5m", value_parser = recipe::parse_duration)]
    pub connect_timeout: Duration,
    /// How long to wait for an image to become available.
    #[arg(long, value_name = "DURATION", default_value = "60m", value_parser = recipe::parse_duration)]
    pub image_timeout: Duration,
    /// Copy both images to these regions (disaster recovery) once their boot tests passed; an
    /// unchanged image gets the copies it lacks.
    #[arg(long, value_name = "REGION[,REGION…]", value_delimiter = ',', value_parser = super::parse_region)]
    pub copy_to: Vec<String>,
    #[command(flatten)]
    pub distribution: DistributionArgs,
    #[command(flatten)]
    pub bastion: BastionArgs,
    /// The controller's Auto Scaling group [default: the one tagged jbake:role=controller].
    #[arg(long, value_name = "NAME")]
    pub asg: Option<String>,
    /// handover (default) or replace: see `jbake roll --help`.
    #[arg(long, value_enum, default_value_t = Strategy::Handover)]
    pub strategy: Strategy,
    /// Jenkins' root URL for the roll [default: the load balancer's DNS name].
    #[arg(long, value_name = "URL")]
    pub jenkins_url: Option<String>,
    /// An SSM SecureString parameter holding USER:API_TOKEN for the Jenkins API.
    #[arg(long, value_name = "SSM_PARAM")]
    pub jenkins_credentials: Option<String>,
    /// Send the Jenkins credentials to a plain http:// URL.
    #[arg(long)]
    pub allow_insecure_http: bool,
    /// How long the roll waits for running builds to finish.
    #[arg(long, value_name = "DURATION", default_value = "30m", value_parser = recipe::parse_duration)]
    pub drain_timeout: Duration,
    /// How long the new controller has to serve before the roll rolls back.
    #[arg(long, value_name = "DURATION", default_value = "15m", value_parser = recipe::parse_duration)]
    pub health_timeout: Duration,
    /// The drain does not wait for this build (a URL prefix; repeatable): the Jenkins build
    /// that runs this nightly [default: $BUILD_URL when jbake runs in a Jenkins build].
    #[arg(long, value_name = "URL")]
    pub ignore_build: Vec<String>,
}

fn parse_host_port(s: &str) -> Result<(String, u16), String> {
    let bad = || format!("'{s}' is not HOST:PORT (like 127.0.0.1:2222)");
    let (host, port) = s.rsplit_once(':').ok_or_else(bad)?;
    let port: u16 = port.parse().map_err(|_| bad())?;
    if host.is_empty() || port == 0 {
        return Err(bad());
    }
    Ok((host.to_string(), port))
}

/// What differs between the two bakes.
struct Image<'a> {
    label: &'static str,
    recipe: PathBuf,
    vars: Vec<(String, String)>,
    var_files: Vec<PathBuf>,
    via: Option<&'a (String, u16)>,
}

/// The options of one of the two bakes.
fn bake_options(
    args: &NightlyArgs,
    image: Image<'_>,
    output: Output,
    quiet: bool,
) -> Result<BakeOptions, Failure> {
    let jump = args.bastion.jump(None)?;
    let ssh_interface = args.ssh_interface.unwrap_or(if jump.is_some() {
        SshInterface::Private
    } else {
        SshInterface::Public
    });
    Ok(BakeOptions {
        recipe: image.recipe,
        load: LoadOptions {
            var_files: image.var_files,
            vars: image.vars,
            builtins: Default::default(),
            image_vars: Vec::new(),
        },
        aws: args.aws.options(),
        base_override: None,
        instance_type: None,
        subnet_id: args.subnet_id.clone(),
        iam_instance_profile: args.iam_instance_profile.clone(),
        ssh_interface,
        ssh_host: image.via.map(|(h, _)| h.clone()),
        ssh_port: image.via.map(|(_, p)| *p).unwrap_or(22),
        ssh_cidr: args.ssh_cidr.clone(),
        jump,
        force: args.force,
        max_age: Some(args.max_age),
        on_error: OnError::Cleanup,
        manifest: args.manifest.clone(),
        ttl: args.ttl,
        connect_timeout: args.connect_timeout,
        image_timeout: args.image_timeout,
        // The night's images are boot-tested like any bake: roll takes only a tested one.
        skip_test: false,
        distribution: args.distribution.distribution(&args.copy_to)?,
        output,
        quiet,
        label: Some(image.label.to_string()),
    })
}

/// A recipe: the given file, or the built-in one from the tree extracted for this run.
fn recipe_path(
    given: &Option<PathBuf>,
    name: &str,
    shipped: &mut Option<Extracted>,
) -> Result<PathBuf, Failure> {
    if let Some(p) = given {
        return Ok(p.clone());
    }
    if shipped.is_none() {
        *shipped = Some(Extracted::new().map_err(|e| Failure::Runtime(e.into()))?);
    }
    match shipped {
        Some(x) => x.recipe(name).map_err(|e| Failure::Runtime(e.into())),
        None => Err(Failure::Runtime(anyhow::anyhow!(
            "the built-in recipes could not be extracted"
        ))),
    }
}

/// Where the lock is by default: beside the manifest (the nightly's working state).
fn default_lock(manifest: &Path) -> PathBuf {
    let dir = manifest
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    dir.join(".jbake-nightly.lock")
}

/// How one bake ended, and the error to report if it failed (with what its cleanup left).
fn bake_end(name: &str, region: &str, report: bake::Report) -> (BakeEnd, Option<String>) {
    let id = &report.build_id;
    let hint = format!("`jbake gc --region {region} --build-id {id}` removes them");
    let left = report.left.sentence(&hint);
    match report.outcome {
        Outcome::Built(b) => {
            let end = if b.skipped_unchanged {
                BakeEnd::Unchanged {
                    ami: b.ami_id.clone(),
                    name: b.name.clone(),
                }
            } else {
                BakeEnd::Built {
                    ami: b.ami_id.clone(),
                    name: b.name.clone(),
                }
            };
            let err = left.map(|l| {
                format!(
                    "the {name} image {} ({}) was built, but {l}",
                    b.ami_id, b.name
                )
            });
            (end, err)
        }
        Outcome::Rejected(e) | Outcome::Failed(e) => {
            let mut text = format!("the {name} bake {id} failed: {e}");
            if let Some(l) = left {
                text.push('\n');
                text.push_str(&l);
            }
            (
                BakeEnd::Failed {
                    error: text.clone(),
                },
                Some(text),
            )
        }
        Outcome::Panicked(what) => {
            let text = format!(
                "the {name} bake {id} stopped on an internal error (a bug in jbake: {what}); {}",
                left.unwrap_or_else(|| "its temporary resources were removed".to_string())
            );
            (
                BakeEnd::Failed {
                    error: text.clone(),
                },
                Some(text),
            )
        }
        Outcome::Interrupted(why) => {
            let text = format!(
                "the {name} bake {id} was interrupted {why}; {}",
                left.unwrap_or_else(|| "its temporary resources were removed".to_string())
            );
            (BakeEnd::Interrupted { why }, Some(text))
        }
    }
}

pub async fn nightly_cmd(args: NightlyArgs, output: Output, quiet: bool) -> Result<(), Failure> {
    let t0 = Instant::now();
    let region = args.aws.region.clone();
    // Offline first: bad input is exit 2 before the lock and before any AWS call.
    let mut shipped = None;
    let c_recipe = recipe_path(&args.controller_recipe, "controller", &mut shipped)?;
    let a_recipe = recipe_path(&args.agent_recipe, "agent", &mut shipped)?;
    let shown = |f: Failure| match &shipped {
        Some(x) => f.map_text(|t| x.display(t)),
        None => f,
    };
    let mut c_vars = vec![("efs_id".to_string(), args.efs_id.clone())];
    c_vars.extend(args.controller_vars.iter().cloned());
    let c_opts = bake_options(
        &args,
        Image {
            label: "controller",
            recipe: c_recipe,
            vars: c_vars,
            var_files: args.controller_var_files.clone(),
            via: args.controller_ssh_via.as_ref(),
        },
        output,
        quiet,
    )?;
    let a_opts = bake_options(
        &args,
        Image {
            label: "agent",
            recipe: a_recipe,
            vars: args.agent_vars.clone(),
            var_files: args.agent_var_files.clone(),
            via: args.agent_ssh_via.as_ref(),
        },
        output,
        quiet,
    )?;
    for opts in [&c_opts, &a_opts] {
        bake::preflight(opts).map_err(|e| shown(Failure::Input(e.into())))?;
    }
    if args.roll {
        if let (Some(url), Some(_)) = (&args.jenkins_url, &args.jenkins_credentials) {
            if crate::roll::is_plain_http(url) && !args.allow_insecure_http {
                return Err(Failure::Input(
                    crate::roll::Error::from(crate::roll::Refusal::InsecureHttp {
                        url: url.clone(),
                    })
                    .into(),
                ));
            }
        }
    }
    let progress = Progress::new(output, quiet, Vec::new());

    // One night at a time.
    let lock_path = args
        .lock_file
        .clone()
        .unwrap_or_else(|| default_lock(&args.manifest));
    let (lock, crashed) = match NightlyLock::acquire(&lock_path) {
        Ok(l) => l,
        Err(e @ LockError::Held { .. }) => return Err(Failure::Locked(e.into())),
        Err(e) => return Err(Failure::Input(e.into())),
    };
    if let Some(prev) = crashed {
        progress.warn(&format!(
            "the previous jbake nightly ({prev}) did not finish: it was killed or crashed. What its bakes left (if anything) is tagged and removed by `jbake gc --region {region}` once their TTL has passed; a roll it left half-done is put back by `jbake roll --take-over-lock` or shown by `jbake status --region {region}`"
        ));
    }

    // The two bakes at once: the night takes as long as the slower one.
    let interrupt = super::signal_interrupt();
    let aws = Aws::new(&args.aws.options()).await;
    let (c_report, a_report) = tokio::join!(
        bake::bake(c_opts, aws.clone(), interrupt.clone()),
        bake::bake(a_opts, aws.clone(), interrupt.clone()),
    );
    let mut errors = Vec::new();
    let (controller, e) = bake_end("controller", &region, c_report);
    errors.extend(e.map(|t| shown_text(&shipped, &t)));
    let (agent, e) = bake_end("agent", &region, a_report);
    errors.extend(e.map(|t| shown_text(&shipped, &t)));
    let interrupted_before_roll = interrupt.count() > 0;

    // The roll.
    let roll = match roll_decision(&controller, &agent, args.roll) {
        RollDecision::NotAsked => RollEnd::NotAsked,
        RollDecision::Held { because } => {
            if args.roll {
                progress.warn(&format!("not rolling the controller: {because}"));
            }
            RollEnd::Held { because }
        }
        RollDecision::Roll { .. } if interrupted_before_roll => RollEnd::Held {
            because: "the night was interrupted".to_string(),
        },
        RollDecision::Roll { ami } => {
            let mut ignore = args.ignore_build.clone();
            if ignore.is_empty() {
                // In a Jenkins build: the drain must not wait for the build running this.
                if let Ok(url) = std::env::var("BUILD_URL") {
                    if !url.is_empty() {
                        progress.info(
                            "roll",
                            &format!("running in the Jenkins build {url}: the drain does not wait for it"),
                        );
                        ignore.push(url);
                    }
                }
            }
            let roll_args = RollArgs {
                aws: AwsArgs {
                    region: args.aws.region.clone(),
                    profile: args.aws.profile.clone(),
                    endpoint_url: args.aws.endpoint_url.clone(),
                },
                asg: args.asg.clone(),
                ami: Some(ami.clone()),
                recipe: crate::roll::CONTROLLER_RECIPE.to_string(),
                strategy: args.strategy,
                allow_efs_change: false,
                allow_untested: false,
                from_latest: false,
                take_over_lock: false,
                allow_insecure_http: args.allow_insecure_http,
                jenkins_url: args.jenkins_url.clone(),
                jenkins_credentials: args.jenkins_credentials.clone(),
                jenkins_version: None,
                drain_timeout: args.drain_timeout,
                no_drain: false,
                health_timeout: args.health_timeout,
                ignore_build: ignore,
                dry_run: false,
                yes: true,
            };
            match roll_run(roll_args, output, quiet).await {
                Ok(CliRollEnd::UpToDate { group, .. }) => RollEnd::UpToDate { group },
                Ok(CliRollEnd::Done) => RollEnd::Rolled { ami },
                Err(Failure::Interrupted(why)) => {
                    errors.push(format!("the roll was interrupted {why}"));
                    RollEnd::Interrupted { why }
                }
                Err(f) => {
                    let text = format!("the roll failed: {f}");
                    errors.push(text.clone());
                    RollEnd::Failed {
                        error: f.to_string(),
                    }
                }
            }
        }
    };

    let summary = Summary {
        region: region.clone(),
        controller,
        agent,
        roll,
        elapsed_ms: t0.elapsed().as_millis(),
    };
    let interrupted = summary.interrupted() || interrupt.count() > 0;
    if let Err(e) = lock.finish() {
        progress.warn(&e.to_string());
    }
    // A quiet night with nothing to do prints nothing (cron mails only what it prints).
    if !(quiet && summary.is_noop() && errors.is_empty()) {
        progress.finished("nightly_finished", &summary.line(), json!(summary));
    }
    if errors.is_empty() {
        return Ok(());
    }
    let text = errors.join("\n");
    if interrupted {
        Err(Failure::Interrupted(format!("(jbake nightly): {text}")))
    } else {
        Err(Failure::Runtime(anyhow::anyhow!(text)))
    }
}

fn shown_text(shipped: &Option<Extracted>, t: &str) -> String {
    match shipped {
        Some(x) => x.display(t),
        None => t.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_ports_and_default_lock() {
        assert_eq!(
            parse_host_port("169.254.1.2:22"),
            Ok(("169.254.1.2".to_string(), 22))
        );
        assert!(parse_host_port("host").is_err());
        assert!(parse_host_port(":22").is_err());
        assert!(parse_host_port("h:0").is_err());
        assert!(parse_host_port("h:99999").is_err());
        assert_eq!(
            default_lock(Path::new("jbake-manifest.json")),
            PathBuf::from("./.jbake-nightly.lock")
        );
        assert_eq!(
            default_lock(Path::new("/var/lib/jbake/m.json")),
            PathBuf::from("/var/lib/jbake/.jbake-nightly.lock")
        );
    }
}
