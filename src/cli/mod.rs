//! The command line: arguments (clap) and what each command does. Errors are classified here
//! into exit codes: 1 runtime failure, 2 bad input (always before any connection), 130 interrupted.

mod build;
mod copy;
mod keys;
mod meta;
mod nightly;
mod prune;
mod roll;
mod test;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use clap::{Args, Parser, Subcommand};

use crate::exec::Executor;
use crate::progress::{Output, Progress};
use crate::recipe::{self, Builtins, LoadOptions, Plan, VarSource};
use crate::ssh::{ConnectOptions, HostKeyPolicy, Jump, Target};

/// Bake Jenkins machine images: YAML recipes run over SSH, fast, with errors you can act on.
#[derive(Debug, Parser)]
#[command(name = "jbake", version, about, max_term_width = 100)]
pub struct Cli {
    /// How progress is reported: text (spinners on a terminal, timestamped lines otherwise) or
    /// json (one object per event on stdout).
    #[arg(
        long,
        global = true,
        value_enum,
        default_value = "text",
        env = "JBAKE_OUTPUT"
    )]
    pub output: Output,
    /// Print only warnings, failures and the result (for cron).
    #[arg(long, short, global = true, env = "JBAKE_QUIET")]
    pub quiet: bool,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Check a recipe offline and print the plan it renders to. Makes no network call.
    Validate(ValidateArgs),
    /// Run a recipe (steps, then validate) on an existing machine over SSH.
    Apply(ApplyArgs),
    /// Bake an AMI from a recipe: temporary instance, steps over SSH, snapshot, cleanup.
    Build(build::BuildArgs),
    /// Bake the Jenkins controller image (recipes/controller.yaml) for an EFS file system.
    Controller(build::ControllerArgs),
    /// Bake the Jenkins agent image (recipes/agent.yaml).
    Agent(build::AgentArgs),
    /// Copy an image to other regions, share it with other accounts, publish its id in SSM.
    Copy(copy::CopyArgs),
    /// Remove what finished or killed builds left behind (found by their jbake tags).
    Gc(build::GcArgs),
    /// Boot-test an existing image again: an instance of it, checked over SSH; tags the verdict.
    Test(test::TestArgs),
    /// Upgrade the Jenkins controller to a new image: drain, replace, verify, roll back on failure.
    Roll(roll::RollArgs),
    /// Show the controller's group, instances, launch template versions and target health.
    Status(roll::StatusArgs),
    /// The unattended night: bake the controller and agent images at once (each skipped when
    /// unchanged), and with --roll roll the controller to its image. For cron and timers.
    Nightly(nightly::NightlyArgs),
    /// The controller→agents SSH key pair in SSM: init, rotate without downtime, finish, show.
    Keys(keys::KeysArgs),
    /// Remove old images jbake made (and their snapshots): never one in use, never the newest N.
    Prune(prune::PruneArgs),
    /// The recipes built into jbake: list them, or write them out to customise.
    #[command(subcommand)]
    Recipes(meta::RecipesCommand),
    /// Print a shell completion script (bash, zsh, fish, elvish, powershell).
    Completions(meta::CompletionsArgs),
    /// Print jbake's man page, or write one page per command into a folder.
    Man(meta::ManArgs),
}

#[derive(Debug, Args)]
pub struct RecipeArgs {
    /// The recipe file (YAML).
    pub recipe: PathBuf,
    /// Set a variable (repeatable); wins over --var-file and the recipe's defaults.
    #[arg(long = "var", value_name = "NAME=VALUE", value_parser = recipe::parse_var_arg)]
    pub vars: Vec<(String, String)>,
    /// A YAML file of variables (repeatable; later files win).
    #[arg(long = "var-file", value_name = "FILE")]
    pub var_files: Vec<PathBuf>,
    /// The AWS region, available to templates as {{ region }}.
    #[arg(long, env = "AWS_REGION", value_parser = parse_region)]
    pub region: Option<String>,
}

#[derive(Debug, Args)]
pub struct ValidateArgs {
    #[command(flatten)]
    pub recipe: RecipeArgs,
}

#[derive(Debug, Args)]
pub struct ApplyArgs {
    #[command(flatten)]
    pub recipe: RecipeArgs,
    /// The machine: USER@HOST[:PORT].
    #[arg(long, value_parser = Target::parse)]
    pub target: Target,
    /// The private key to log in with (OpenSSH format, unencrypted).
    #[arg(long, short = 'i', value_name = "KEYFILE", env = "JBAKE_IDENTITY")]
    pub identity: PathBuf,
    #[command(flatten)]
    pub host_key: HostKeyArgs,
    /// How long to keep trying to connect (a machine that is still booting).
    #[arg(long, value_name = "DURATION", default_value = "30s", value_parser = recipe::parse_duration)]
    pub connect_timeout: Duration,
    #[command(flatten)]
    pub bastion: BastionArgs,
}

/// A jump host between jbake and the machine (`ssh -J`).
#[derive(Debug, Args)]
pub struct BastionArgs {
    /// Connect through this jump host: USER@HOST[:PORT]. The machine's own host key is still
    /// verified end to end.
    #[arg(long, value_name = "USER@HOST[:PORT]", value_parser = Target::parse)]
    pub bastion: Option<Target>,
    /// The private key for the jump host [default: the machine's --identity, when there is one].
    #[arg(long, value_name = "KEYFILE", requires = "bastion")]
    pub bastion_identity: Option<PathBuf>,
    /// Pin the jump host's host key: 'ssh-ed25519 AAAA…'.
    #[arg(
        long,
        value_name = "KEY",
        requires = "bastion",
        conflicts_with = "bastion_known_hosts"
    )]
    pub bastion_host_key: Option<String>,
    /// Verify the jump host's key with this known_hosts file [default: ~/.ssh/known_hosts].
    #[arg(long, value_name = "FILE", requires = "bastion")]
    pub bastion_known_hosts: Option<PathBuf>,
}

impl BastionArgs {
    /// The jump host, checked offline (key file readable, host key given or known_hosts there).
    pub fn jump(&self, default_identity: Option<&Path>) -> Result<Option<Jump>, Failure> {
        let Some(target) = &self.bastion else {
            return Ok(None);
        };
        let identity = match (&self.bastion_identity, default_identity) {
            (Some(p), _) => p.clone(),
            (None, Some(p)) => p.to_path_buf(),
            (None, None) => {
                return Err(Failure::Input(anyhow::anyhow!(
                    "--bastion needs --bastion-identity KEYFILE (the key the jump host accepts)"
                )))
            }
        };
        if let Err(e) = std::fs::metadata(&identity) {
            return Err(Failure::Input(anyhow::anyhow!(
                "--bastion-identity {}: {e}",
                identity.display()
            )));
        }
        let host_key = host_key_policy(&HostKeyArgs {
            host_key: self.bastion_host_key.clone(),
            known_hosts: self.bastion_known_hosts.clone(),
            insecure_ignore_host_key: false,
        })
        .map_err(|f| match f {
            Failure::Input(e) => Failure::Input(anyhow::anyhow!("jump host: {e}")),
            other => other,
        })?;
        Ok(Some(Jump {
            target: target.clone(),
            identity: crate::ssh::Identity::File(identity),
            host_key,
        }))
    }
}

#[derive(Debug, Args)]
#[group(required = false, multiple = false)]
pub struct HostKeyArgs {
    /// Pin the server's host key: 'ssh-ed25519 AAAA…' (type and base64, as in a .pub file).
    #[arg(long, value_name = "KEY")]
    pub host_key: Option<String>,
    /// Verify the host key with this OpenSSH known_hosts file [default: ~/.ssh/known_hosts].
    #[arg(long, value_name = "FILE")]
    pub known_hosts: Option<PathBuf>,
    /// Accept any host key. Anyone between you and the machine can then impersonate it.
    #[arg(long)]
    pub insecure_ignore_host_key: bool,
}

/// How a command failed, which decides the exit code.
#[derive(Debug)]
pub enum Failure {
    /// Bad recipe, flags or variables: exit 2, detected before any connection.
    Input(anyhow::Error),
    /// Connection or step failure: exit 1.
    Runtime(anyhow::Error),
    /// SIGINT/SIGTERM/SIGHUP: exit 130.
    Interrupted(String),
    /// Another run holds the lock (`jbake nightly`): exit 75, nothing was done.
    Locked(anyhow::Error),
}

impl Failure {
    pub fn exit_code(&self) -> u8 {
        match self {
            Failure::Input(_) => 2,
            Failure::Runtime(_) => 1,
            Failure::Interrupted(_) => 130,
            Failure::Locked(_) => crate::nightly::EXIT_LOCKED,
        }
    }
}

impl Failure {
    /// The same failure with its message rewritten (e.g. a temporary path named as what it is).
    pub fn map_text(self, f: impl Fn(&str) -> String) -> Failure {
        match self {
            Failure::Input(e) => Failure::Input(anyhow::anyhow!(f(&format!("{e:#}")))),
            Failure::Runtime(e) => Failure::Runtime(anyhow::anyhow!(f(&format!("{e:#}")))),
            Failure::Interrupted(what) => Failure::Interrupted(f(&what)),
            Failure::Locked(e) => Failure::Locked(anyhow::anyhow!(f(&format!("{e:#}")))),
        }
    }
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Failure::Input(e) | Failure::Runtime(e) | Failure::Locked(e) => write!(f, "{e:#}"),
            Failure::Interrupted(what) => write!(f, "interrupted {what}"),
        }
    }
}

pub(crate) fn parse_region(s: &str) -> Result<String, String> {
    let ok = regex::Regex::new(r"^[a-z]{2}(-gov|-iso[a-z]?)?-[a-z]+-\d+$")
        .map(|re| re.is_match(s))
        .unwrap_or(false);
    if ok {
        Ok(s.to_string())
    } else {
        Err(format!(
            "'{s}' is not an AWS region name (like us-east-1 or eu-west-3)"
        ))
    }
}

pub async fn run(cli: Cli) -> Result<(), Failure> {
    match cli.command {
        Command::Validate(args) => validate(args, cli.output),
        Command::Apply(args) => apply(args, cli.output, cli.quiet).await,
        Command::Build(args) => build::build_cmd(args, cli.output, cli.quiet).await,
        Command::Controller(args) => build::controller_cmd(args, cli.output, cli.quiet).await,
        Command::Agent(args) => build::agent_cmd(args, cli.output, cli.quiet).await,
        Command::Copy(args) => copy::copy_cmd(args, cli.output, cli.quiet).await,
        Command::Gc(args) => build::gc_cmd(args, cli.output, cli.quiet).await,
        Command::Test(args) => test::test_cmd(args, cli.output, cli.quiet).await,
        Command::Roll(args) => roll::roll_cmd(args, cli.output, cli.quiet).await,
        Command::Status(args) => roll::status_cmd(args, cli.output, cli.quiet).await,
        Command::Nightly(args) => nightly::nightly_cmd(args, cli.output, cli.quiet).await,
        Command::Keys(args) => keys::keys_cmd(args, cli.output, cli.quiet).await,
        Command::Prune(args) => prune::prune_cmd(args, cli.output, cli.quiet).await,
        Command::Recipes(cmd) => meta::recipes_cmd(cmd, cli.output),
        Command::Completions(args) => meta::completions_cmd(args),
        Command::Man(args) => meta::man_cmd(args),
    }
}

fn load(args: &RecipeArgs, builtins: Builtins) -> Result<Plan, Failure> {
    let opts = LoadOptions {
        image_vars: Vec::new(),
        var_files: args.var_files.clone(),
        vars: args.vars.clone(),
        builtins,
    };
    recipe::load(&args.recipe, &opts).map_err(|e| Failure::Input(e.into()))
}

fn validate(args: ValidateArgs, output: Output) -> Result<(), Failure> {
    let plan = load(
        &args.recipe,
        Builtins {
            region: args.recipe.region.clone(),
            build_id: None,
            version: None,
            base_ami: None,
        },
    )?;
    match output {
        Output::Json => {
            // Rendered commands and file contents may hold secret values: masked before the
            // plan is serialised (escaped, they could no longer be found), and after.
            let secrets = plan.secrets();
            let print = || {
                let mut value = serde_json::to_value(&plan)?;
                crate::util::mask_json(&mut value, &secrets);
                serde_json::to_string_pretty(&value)
            };
            let v = print()
                .map_err(|e| Failure::Runtime(anyhow::anyhow!("cannot print the plan: {e}")))?;
            println!("{}", crate::util::mask(&v, &secrets));
        }
        Output::Text => print!("{}", recipe::format_plan(&plan)),
    }
    Ok(())
}

fn today() -> String {
    let now = humantime::format_rfc3339_seconds(SystemTime::now()).to_string();
    now.get(..10).unwrap_or("1970-01-01").replace('-', ".")
}

fn host_key_policy(args: &HostKeyArgs) -> Result<HostKeyPolicy, Failure> {
    if let Some(pin) = &args.host_key {
        return HostKeyPolicy::parse_pinned(pin)
            .map_err(|e| Failure::Input(anyhow::anyhow!("--host-key: {e}")));
    }
    if args.insecure_ignore_host_key {
        return Ok(HostKeyPolicy::Insecure);
    }
    let path = match &args.known_hosts {
        Some(p) => p.clone(),
        None => std::env::var_os("HOME")
            .map(|h| Path::new(&h).join(".ssh/known_hosts"))
            .ok_or_else(|| {
                Failure::Input(anyhow::anyhow!(
                    "no host key to check against: pass --host-key, --known-hosts, or \
                     --insecure-ignore-host-key"
                ))
            })?,
    };
    if !path.is_file() {
        return Err(Failure::Input(anyhow::anyhow!(
            "known_hosts file {} does not exist: pass --known-hosts FILE or pin the key with \
             --host-key 'ssh-ed25519 AAAA…'",
            path.display()
        )));
    }
    Ok(HostKeyPolicy::KnownHosts(path))
}

/// A recipe that uses a built-in `apply` cannot know (no cloud) is bad input, not a command to
/// run with a placeholder in it.
fn refuse_placeholders(plan: &Plan) -> Result<(), Failure> {
    let rendered = format!("{:?}{:?}", plan.steps, plan.validate);
    for var in plan
        .vars
        .iter()
        .filter(|v| v.source == VarSource::Placeholder)
    {
        if rendered.contains(&var.value) {
            let hint = match var.name.as_str() {
                "region" => "pass --region",
                _ => "it is only known during `jbake build`",
            };
            return Err(Failure::Input(anyhow::anyhow!(
                "{}: the recipe uses {{{{ {} }}}}, which `jbake apply` does not know: {hint}",
                plan.file.display(),
                var.name
            )));
        }
    }
    Ok(())
}

async fn apply(args: ApplyArgs, output: Output, quiet: bool) -> Result<(), Failure> {
    // Everything that can be wrong with the input is found before connecting.
    let build_id = format!(
        "apply-{}",
        SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0)
    );
    let plan = load(
        &args.recipe,
        Builtins {
            region: args.recipe.region.clone(),
            build_id: Some(build_id),
            version: Some(today()),
            base_ami: None,
        },
    )?;
    refuse_placeholders(&plan)?;
    let host_key = host_key_policy(&args.host_key)?;
    if let Err(e) = std::fs::metadata(&args.identity) {
        return Err(Failure::Input(anyhow::anyhow!(
            "--identity {}: {e}",
            args.identity.display()
        )));
    }
    let connect = ConnectOptions {
        target: args.target.clone(),
        identity: crate::ssh::Identity::File(args.identity.clone()),
        host_key,
        deadline: args.connect_timeout,
        keepalive: Duration::from_secs(15),
        jump: args.bastion.jump(Some(&args.identity))?,
    };
    let mut progress = Progress::new(output, quiet, plan.secrets());
    let label = args.target.to_string();
    let broker_pid = Arc::new(AtomicU32::new(0));
    let stop_with = connect.clone();
    let work = async {
        let mut ex = Executor::connect(
            connect,
            label,
            plan.secrets(),
            &mut progress,
            broker_pid.clone(),
        )
        .await
        .map_err(|e| Failure::Runtime(e.into()))?;
        let result = ex.run_plan(&plan).await;
        ex.close().await;
        Ok::<_, Failure>(result)
    };
    let result = tokio::select! {
        r = work => r?,
        what = interrupted() => {
            // The connection is gone with `work`; stop the step still running on the machine.
            let pid = broker_pid.load(Ordering::SeqCst);
            if pid != 0 {
                crate::progress::err_line(&format!("interrupted {what}: stopping the running step on {}", stop_with.target));
                stop_remote_step(stop_with, pid).await;
            }
            return Err(Failure::Interrupted(what));
        }
    };
    let progress = Progress::new(output, quiet, plan.secrets());
    match result {
        Ok(report) => {
            progress.summary(&report.rows, report.elapsed, true);
            Ok(())
        }
        Err((e, report)) => {
            progress.summary(&report.rows, report.elapsed, false);
            Err(Failure::Runtime(e.into()))
        }
    }
}

/// Connects again (briefly) and stops what the interrupted run's root shell was running.
async fn stop_remote_step(mut connect: ConnectOptions, broker_pid: u32) {
    connect.deadline = Duration::from_secs(10);
    let stop = async {
        let session = crate::ssh::Session::connect(&connect).await?;
        crate::ssh::stop_remote(&session, broker_pid).await?;
        session.close().await;
        Ok::<_, crate::ssh::Error>(())
    };
    match tokio::time::timeout(Duration::from_secs(15), stop).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => {
            crate::progress::err_line(&format!("warning: could not stop the remote step: {e}"))
        }
        Err(_) => crate::progress::err_line(
            "warning: could not stop the remote step: no answer within 15s",
        ),
    }
}

/// Resolves on SIGINT, SIGTERM or SIGHUP (a closed terminal or SSH session), saying which.
pub(crate) async fn interrupted() -> String {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        if let (Ok(mut term), Ok(mut hup)) = (
            signal(SignalKind::terminate()),
            signal(SignalKind::hangup()),
        ) {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => return "(SIGINT)".to_string(),
                _ = term.recv() => return "(SIGTERM)".to_string(),
                _ = hup.recv() => return "(SIGHUP)".to_string(),
            }
        }
    }
    let _ = tokio::signal::ctrl_c().await;
    "(SIGINT)".to_string()
}

/// SIGINT, SIGTERM and SIGHUP, from now on, as an [`Interrupt`](crate::bake::Interrupt) for
/// the bakes: every signal is passed on (the first stops them, the next ones make their cleanup
/// say what it is still removing).
pub(crate) fn signal_interrupt() -> crate::bake::Interrupt {
    let (tx, rx) = crate::bake::interrupt::channel();
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let signals = (
            signal(SignalKind::interrupt()),
            signal(SignalKind::terminate()),
            signal(SignalKind::hangup()),
        );
        if let (Ok(mut int), Ok(mut term), Ok(mut hup)) = signals {
            tokio::spawn(async move {
                loop {
                    let why = tokio::select! {
                        _ = int.recv() => "(SIGINT)",
                        _ = term.recv() => "(SIGTERM)",
                        _ = hup.recv() => "(SIGHUP)",
                    };
                    tx.interrupt(why);
                }
            });
            return rx;
        }
    }
    tokio::spawn(async move {
        while tokio::signal::ctrl_c().await.is_ok() {
            tx.interrupt("(SIGINT)");
        }
    });
    rx
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn regions() {
        for ok in ["us-east-1", "eu-west-3", "us-gov-west-1", "ap-southeast-2"] {
            assert!(parse_region(ok).is_ok(), "{ok}");
        }
        for bad in ["us-east", "US-EAST-1", "useast1", "", "us-east-1a"] {
            assert!(parse_region(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn cli_is_consistent() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }
}
