//! The bake: what `jbake build` (and `controller`, `agent`) does on EC2 — Packer's amazon-ebs
//! builder, done safer. Named stages over a typed build state ([`Stage`], in [`stages`]):
//!
//! resolve base → key pair → security group → launch → connect → provision → hygiene → stop →
//! image → tag → record
//!
//! Every resource is recorded in the build's [`Ledger`] the moment it exists (before the call
//! that makes it, by its name or the build's tag, then by its id), and undone in reverse on any
//! exit — success, failure, an interruption, a panic — by [`cleanup`], after the stages' task has
//! ended. Everything is tagged `jbake:build-id` and `jbake:expires-at`, so what a SIGKILLed jbake
//! leaves is found by `jbake gc` ([`gc`]), and the instance itself shuts down (and terminates)
//! at its TTL.
//!
//! EC2 on a real account is eventually consistent, slow and lossy, and this module is written
//! for that: a resource EC2 denies knowing right after it was made is "not visible yet" for up
//! to [`PROPAGATION`](crate::aws::wait::PROPAGATION); creates whose answer was lost are adopted
//! (RunInstances by its client token, the security group and image by their names, the key
//! pair by its name); waits poll states with backoff; throttling is the SDK's retry.
//!
//! Concurrency: [`bake`] can run several times at once in one process (its interruption comes
//! in as an [`Interrupt`] the caller passes), and several `jbake build` of one recipe can run at
//! once: each gets its own version number (planned at the start and reserved by the
//! `jbake:version` tag on its resources, confirmed at CreateImage, where a name taken meanwhile
//! moves it to the next free number). Both finish; if their inputs were the same, both images
//! carry the same content hash and the next run's skip-unchanged finds either.

pub mod boot_checks;
pub mod cleanup;
pub mod cloud_init;
pub mod distribute;
mod error;
pub mod existing;
pub mod gc;
pub mod hash;
pub mod interrupt;
pub mod ledger;
pub mod public_ip;
pub mod retest;
pub mod stages;
pub mod tags;
pub mod version;

use std::path::PathBuf;
use std::time::Duration;

use rand::Rng;

use crate::aws::{self, Aws};
use crate::manifest;
use crate::progress::{Output, Progress};
use crate::recipe::{self, BaseImage, Builtins, LoadOptions, Plan};
use crate::ssh::Jump;

pub use cleanup::Leftovers;
pub use error::{BaseError, Error, PublicIpError};
pub use interrupt::{Interrupt, Interrupter};
pub use ledger::{Ledger, Resource};
pub use stages::Stage;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum SshInterface {
    Public,
    Private,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum OnError {
    /// Remove every temporary resource (the default).
    Cleanup,
    /// Leave them for debugging, and print what was left and the `jbake gc` command.
    Abort,
}

/// The longest `--ttl`: a build instance alive for a week is a leak, not a build.
pub const MAX_TTL: Duration = Duration::from_secs(7 * 24 * 3600);

/// Everything one bake needs.
#[derive(Debug, Clone)]
pub struct BakeOptions {
    pub recipe: PathBuf,
    pub load: LoadOptions,
    pub aws: aws::AwsOptions,
    pub base_override: Option<BaseImage>,
    pub instance_type: Option<String>,
    pub subnet_id: Option<String>,
    pub iam_instance_profile: Option<String>,
    pub ssh_interface: SshInterface,
    pub ssh_host: Option<String>,
    pub ssh_port: u16,
    pub ssh_cidr: Option<String>,
    /// Reach the instance through this jump host.
    pub jump: Option<Jump>,
    pub force: bool,
    /// An image of the same inputs older than this does not count as unchanged: it is built
    /// again, with the distribution's updates of the day (`--max-age`).
    pub max_age: Option<Duration>,
    pub on_error: OnError,
    pub manifest: PathBuf,
    /// The instance's watchdog: it shuts itself down (and terminates) after this long.
    pub ttl: Duration,
    pub connect_timeout: Duration,
    pub image_timeout: Duration,
    /// No boot test: the image gets no `jbake:tested` tag (`jbake roll` wants
    /// `--allow-untested` for it).
    pub skip_test: bool,
    pub output: Output,
    pub quiet: bool,
    /// Copies, launch permissions, published parameters (`--copy-to`, `--share-with`,
    /// `--publish-ssm`).
    pub distribution: distribute::Distribution,
    /// Several bakes at once (`jbake nightly`): this one's name in its progress lines.
    pub label: Option<String>,
}

impl BakeOptions {
    fn progress(&self, secrets: Vec<String>) -> Progress {
        match &self.label {
            Some(l) => Progress::labelled(self.output, self.quiet, secrets, l),
            None => Progress::new(self.output, self.quiet, secrets),
        }
    }
}

/// The outcome of a build.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Built {
    pub recipe: String,
    pub ami_id: String,
    pub name: String,
    pub version: String,
    pub content_hash: String,
    pub base_ami: String,
    pub skipped_unchanged: bool,
    pub build_id: String,
    /// Every region's image id, who may launch it, where it is published.
    #[serde(flatten)]
    pub distributed: distribute::Distributed,
    /// The boot test's verdict on the image (`jbake:tested`); `None`: not tested.
    pub tested: Option<bool>,
}

/// How a bake ended.
#[derive(Debug)]
pub enum Outcome {
    /// The image (or the unchanged one).
    Built(Built),
    /// Refused before any AWS call: bad recipe, variables, options or manifest.
    Rejected(Error),
    Failed(Error),
    /// Interrupted (the interrupt's reason, e.g. "(SIGTERM)").
    Interrupted(String),
    /// The stages' task panicked (a bug in jbake); the message. The cleanup still ran.
    Panicked(String),
}

/// What one bake did: its id, how it ended, and what its cleanup left.
#[derive(Debug)]
pub struct Report {
    pub build_id: String,
    pub outcome: Outcome,
    pub left: Leftovers,
}

/// A fresh build id: `YYYYMMDD-HHMMSS-xxxxxx`.
pub fn build_id() -> String {
    let t = humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string();
    let stamp: String = t.chars().filter(|c| c.is_ascii_digit()).take(14).collect();
    format!(
        "{}-{}-{:06x}",
        stamp.get(..8).unwrap_or_default(),
        stamp.get(8..).unwrap_or_default(),
        rand::thread_rng().gen::<u32>() & 0xff_ffff
    )
}

/// Loads the recipe for the content hash: `build_id` and `version` stay placeholders.
pub fn load_for_hash(opts: &BakeOptions, base_ami: Option<String>) -> Result<Plan, recipe::Error> {
    let mut load = opts.load.clone();
    load.builtins = Builtins {
        region: Some(opts.aws.region.clone()),
        build_id: None,
        version: None,
        base_ami,
    };
    recipe::load(&opts.recipe, &load)
}

/// Everything that can be checked without AWS: the recipe and variables, the options, the
/// manifest (readable, a jbake manifest, its folder writable), the public IP endpoint. Returns
/// the recipe as written (for its name and secrets).
pub fn preflight(opts: &BakeOptions) -> Result<Plan, Error> {
    let plan = load_for_hash(opts, None)?;
    if opts.ttl < Duration::from_secs(60) || opts.ttl > MAX_TTL {
        return Err(Error::Option {
            flag: "--ttl",
            value: recipe::format_duration(opts.ttl),
            why: "the build instance's watchdog needs 1m to 7 days (it shuts the instance down after it)",
        });
    }
    manifest::check(&opts.manifest)?;
    if opts.ssh_cidr.is_none() && opts.ssh_interface == SshInterface::Public {
        public_ip::url()?;
    }
    opts.distribution
        .check(&opts.aws.region, distribute::Origin::Build)?;
    Ok(plan)
}

/// One bake, its cleanup included: checks offline ([`preflight`]), then runs the stages as a
/// task of its own and, however that task ends (done, failed, `interrupt`, panicked), undoes
/// what the ledger holds (or leaves it with `--on-error abort`), and sweeps the build's tag.
/// Progress goes where `opts.output` says. Safe to run several at once.
pub async fn bake(opts: BakeOptions, aws: Aws, interrupt: Interrupt) -> Report {
    let build_id = build_id();
    let plan = match preflight(&opts) {
        Ok(p) => p,
        Err(e) => {
            return Report {
                build_id,
                outcome: Outcome::Rejected(e),
                left: Leftovers::default(),
            }
        }
    };
    let progress = opts.progress(plan.secrets());
    progress.info(
        "build",
        &format!("build {build_id} of {} in {}", plan.name, opts.aws.region),
    );
    // Before anything is made: the KMS keys of the regions the image goes to, and whether it
    // can be shared at all (a refusal is bad input: exit 2).
    let keys = if opts.distribution.is_empty() && opts.distribution.kms == Default::default() {
        Vec::new()
    } else {
        match distribute::check_keys(
            &aws,
            &opts.distribution,
            distribute::Origin::Build,
            &[],
            &progress,
        )
        .await
        {
            Ok(keys) => keys,
            Err(e) => {
                let outcome = match e {
                    e @ Error::Refused(_) => Outcome::Rejected(e),
                    e => Outcome::Failed(e),
                };
                return Report {
                    build_id,
                    outcome,
                    left: Leftovers::default(),
                };
            }
        }
    };
    let ledger = Ledger::new(&build_id);
    let mut state = stages::Bake::new(
        opts.clone(),
        aws.clone(),
        ledger.clone(),
        build_id.clone(),
        progress,
        interrupt.clone(),
    );
    state.keys = keys;
    let task = tokio::spawn(stages::run(state));
    let (progress, outcome) = match task.await {
        Ok((progress, Ok(built))) => (progress, Outcome::Built(built)),
        Ok((progress, Err(stages::Stop::Failed(e)))) => (progress, Outcome::Failed(e)),
        Ok((progress, Err(stages::Stop::Interrupted(why)))) => {
            (progress, Outcome::Interrupted(why))
        }
        Err(e) => {
            let progress = opts.progress(plan.secrets());
            let what = panic_message(e);
            progress.warn(&format!(
                "the build stopped on an internal error ({what}); removing what it made"
            ));
            (progress, Outcome::Panicked(what))
        }
    };
    let failed = !matches!(outcome, Outcome::Built(_));
    let left = if failed && opts.on_error == OnError::Abort {
        cleanup::abandon(&ledger, &opts.aws.region, &progress)
    } else {
        // Interruptions from now on only make the cleanup say what it is still removing.
        let seen = interrupt.count();
        cleanup::run(&aws, &ledger, &progress, interrupt, seen).await
    };
    if let Outcome::Built(built) = &outcome {
        progress.result(built);
    }
    Report {
        build_id,
        outcome,
        left,
    }
}

pub(crate) fn panic_message(e: tokio::task::JoinError) -> String {
    if !e.is_panic() {
        return e.to_string();
    }
    let payload = e.into_panic();
    if let Some(s) = payload.downcast_ref::<&str>() {
        s.to_string()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "a panic".to_string()
    }
}
