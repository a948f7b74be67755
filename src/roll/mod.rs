//! `jbake roll`: the immutable upgrade of the Jenkins controller.
//!
//! discover → choose the AMI → refuse what cannot be made safe (another EFS, an image without
//! the JENKINS_HOME lease, a group not of 1, …) → plan (`--dry-run` stops) → lock the group →
//! then one of two strategies:
//!
//! - **handover** (the default): new launch template version → suspend the group's processes
//!   that would interfere, protect the old instance from scale-in → raise the group to 2: the
//!   successor boots while the old controller still serves, and its Jenkins waits for the
//!   JENKINS_HOME lease → drain the old Jenkins → stop it (`/safeExit`): the lease passes to the
//!   successor, whose Jenkins starts → verify (EC2's AMI, its target healthy, `/login` through the
//!   load balancer with the SAME instance identity) → terminate the old instance lowering the
//!   desired capacity → sizes and processes as they were. The downtime is Jenkins' own start
//!   plus the load balancer's health checks, not the instance's boot.
//! - **replace**: drain, stop the old Jenkins and wait until it no longer serves, then terminate
//!   it keeping the capacity: the group launches the new controller (downtime: boot + start).
//!
//! Every change is recorded in a [`Journal`] the moment it is made, and before each write the
//! group and the template are read again ([`guard`]): a change made by someone else since
//! discovery stops the roll instead of being silently undone. Every way out (success, failure,
//! drain timeout, Ctrl-C in any phase) leaves the group at its original sizes with its processes
//! resumed; see [`steps::put_back`].

pub mod checks;
pub mod discover;
pub mod error;
mod guard;
mod handover;
pub mod jenkins;
pub mod journal;
pub mod lock;
pub mod plan;
mod replace;
pub mod status;
mod steps;
pub mod verify;

use std::time::{Duration, Instant};

use crate::aws::{self, Aws, AwsOptions};
use crate::progress::Progress;
use crate::util::fmt_duration;

use discover::Discovered;
pub use error::{Error, Refusal, Restored};
use jenkins::Jenkins;
pub use journal::Journal;
use plan::{ImageSummary, Plan, PlanInput};

/// The recipe whose images are controller images.
pub const CONTROLLER_RECIPE: &str = "jenkins-controller";
/// An image tag naming the Jenkins version inside (checked against `X-Jenkins` when present).
pub const JENKINS_VERSION_TAG: &str = "jbake:jenkins-version";

/// The group processes a roll suspends while it runs (and resumes, whatever happens):
/// `HealthCheck` and `ReplaceUnhealthy` would replace a successor whose target is unhealthy
/// while it waits for the lease; `AZRebalance` could terminate an instance to balance zones
/// while the group has two; `AlarmNotification` and `ScheduledActions` could change the desired
/// capacity under the roll; `InstanceRefresh` would replace instances by itself. `Launch`,
/// `Terminate` and `AddToLoadBalancer` stay: the roll needs them.
pub const SUSPENDED: [&str; 6] = [
    "AZRebalance",
    "AlarmNotification",
    "HealthCheck",
    "InstanceRefresh",
    "ReplaceUnhealthy",
    "ScheduledActions",
];

/// How the old controller gives way to the new one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Strategy {
    /// The successor boots while the old controller serves; the JENKINS_HOME lease passes from
    /// one to the other (downtime: Jenkins' start).
    Handover,
    /// One instance at a time: the old controller stops, then the group replaces it (for groups
    /// that cannot run a second instance: a fixed network interface or private IP).
    Replace,
}

impl std::fmt::Display for Strategy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Strategy::Handover => "handover",
            Strategy::Replace => "replace",
        })
    }
}

#[derive(Debug, Clone)]
pub struct RollOptions {
    pub aws: AwsOptions,
    pub asg: Option<String>,
    pub ami: Option<String>,
    pub recipe: String,
    pub strategy: Strategy,
    pub jenkins_url: Option<String>,
    pub jenkins_credentials: Option<String>,
    pub jenkins_version: Option<String>,
    pub drain_timeout: Duration,
    /// Skip the drain (Jenkins does not answer; running builds are lost).
    pub no_drain: bool,
    pub health_timeout: Duration,
    /// Roll to an image baked for another EFS (or one whose EFS cannot be proven).
    pub allow_efs_change: bool,
    /// Send the Jenkins credentials over plain HTTP.
    pub allow_insecure_http: bool,
    /// Roll to an image without a boot test result (never to one that failed it).
    pub allow_untested: bool,
    /// Make the new version from the template's newest version, not the group's.
    pub from_latest: bool,
    /// Builds the drain does not wait for (URL prefixes): the build that runs this roll.
    pub ignore_builds: Vec<String>,
}

/// Everything found before any change.
pub struct Prepared {
    pub discovered: Discovered,
    pub plan: Plan,
    pub jenkins: Jenkins,
    /// The credentials (masked in all output).
    pub secrets: Vec<String>,
    /// Jenkins' version before the roll (from `/login`), if it answered.
    pub jenkins_before: Option<String>,
    /// Jenkins' instance identity before the roll (`X-Instance-Identity`), if it answered.
    pub identity_before: Option<String>,
    /// Why Jenkins could not be reached before the roll (no connection, TLS refused).
    pub jenkins_unreachable: Option<String>,
    pub expected_version: Option<String>,
}

impl Prepared {
    /// Why the roll must not start, though the plan could be made: Jenkins cannot be reached,
    /// so it cannot be drained (unless `--no-drain`).
    pub fn refusal(&self, opts: &RollOptions) -> Option<Error> {
        let why = self.jenkins_unreachable.as_ref()?;
        (!opts.no_drain).then(|| Error::CannotDrain { why: why.clone() })
    }

    fn target_groups(&self) -> Vec<verify::TargetGroup> {
        self.discovered
            .target_groups
            .iter()
            .map(|t| (t.arn.clone(), t.name.clone()))
            .collect()
    }
}

pub enum Prepare {
    UpToDate { group: String, image: ImageSummary },
    Ready(Box<Prepared>),
}

/// The result of a successful roll.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Rolled {
    pub group: String,
    pub strategy: Strategy,
    pub old_instance: String,
    pub new_instance: String,
    pub old_ami: String,
    pub new_ami: String,
    pub new_image_name: String,
    pub launch_template: String,
    pub launch_template_version: i64,
    pub jenkins_version: String,
    /// The JENKINS_HOME identity was checked equal before and after.
    pub same_identity: bool,
    pub drain_ms: u128,
    /// Last good `/login` before the old Jenkins stopped → first good one after (None: Jenkins
    /// did not answer before).
    pub downtime_ms: Option<u128>,
    /// The group's sizes after the roll (as before it).
    pub sizes: aws::asg::Sizes,
}

/// What a step function gets: the options, the clients, what was found, the journal.
pub struct Ctx<'a> {
    pub opts: &'a RollOptions,
    pub aws: &'a Aws,
    pub p: &'a Prepared,
    pub journal: &'a Journal,
    pub progress: &'a Progress,
}

/// Reads `user:token` from an SSM SecureString parameter.
async fn credentials(aws: &Aws, param: &str) -> Result<String, Error> {
    let out = aws
        .ssm
        .get_parameter()
        .name(param)
        .with_decryption(true)
        .send()
        .await
        .map_err(|e| {
            aws::Error::new(
                format!("reading the Jenkins credentials from SSM parameter {param}"),
                &aws.region,
                e.into_service_error(),
            )
            .action("ssm:GetParameter")
        })?;
    let value = out
        .parameter()
        .and_then(|p| p.value())
        .unwrap_or_default()
        .trim()
        .to_string();
    match value.split_once(':') {
        Some((user, token)) if !user.is_empty() && !token.is_empty() => Ok(value),
        _ => Err(Refusal::Credentials {
            param: param.to_string(),
        }
        .into()),
    }
}

/// Whether `url` is plain HTTP.
pub fn is_plain_http(url: &str) -> bool {
    url.get(..7)
        .is_some_and(|p| p.eq_ignore_ascii_case("http://"))
}

/// Steps 1–3: everything is read, nothing is changed.
pub async fn prepare(opts: &RollOptions, aws: &Aws, progress: &Progress) -> Result<Prepare, Error> {
    let mut d = discover::discover(aws, opts.asg.as_deref()).await?;
    if let Some(note) = plan::Drift::of(&d).and_then(|x| plan::drift_note(&x, opts.from_latest)) {
        progress.warn(&note);
    }
    if opts.from_latest {
        if let Some(n) = &d.newer {
            d.source = n.clone();
        }
    }
    progress.info(
        "discovered",
        &format!(
            "group {} ({}), launch template {} ({}) version {} (group says {}), {} instance(s){}",
            d.group.name,
            d.group.sizes(),
            d.template.id,
            d.template.name,
            d.current.number,
            d.template.version,
            d.group.instances.len(),
            if d.group.suspended.is_empty() {
                String::new()
            } else {
                format!(", suspended: {}", d.group.suspended.join(", "))
            }
        ),
    );
    if d.group.desired != 1 || d.group.max < 1 {
        return Err(Refusal::Capacity {
            group: d.group.name.clone(),
            desired: d.group.desired,
            max: d.group.max,
        }
        .into());
    }
    let running = d.running().cloned().ok_or_else(|| Error::NoController {
        group: d.group.name.clone(),
        instances: if d.group.instances.is_empty() {
            "no instances".to_string()
        } else {
            d.group
                .instances
                .iter()
                .map(|i| format!("{} {}", i.id, i.lifecycle))
                .collect::<Vec<_>>()
                .join(", ")
        },
        region: aws.region.clone(),
    })?;
    let new = plan::choose(aws, opts.ami.as_deref(), &opts.recipe, opts.allow_untested).await?;
    let running_image = aws.ec2.image(&running.image_id).await?;
    let current = match &running_image {
        Some(i) => ImageSummary::of(i),
        None => ImageSummary::unknown(&running.image_id),
    };
    if new.id == running.image_id {
        return Ok(Prepare::UpToDate {
            group: d.group.name.clone(),
            image: ImageSummary::of(&new),
        });
    }
    checks::tested(&new, opts.allow_untested, &aws.region)?;
    checks::images(
        opts.strategy,
        opts.allow_efs_change,
        running_image.as_ref(),
        &running.image_id,
        &new,
    )?;
    if opts.strategy == Strategy::Handover {
        let blockers = aws::launch_template::handover_blockers(&d.source.data);
        if !blockers.is_empty() {
            return Err(Refusal::HandoverBlocked {
                template_id: d.template.id.clone(),
                version: d.source.number,
                blockers,
            }
            .into());
        }
    }
    let url = match &opts.jenkins_url {
        Some(u) => u.clone(),
        None => match d.load_balancers.first() {
            Some(lb) => lb.url(),
            None => {
                return Err(Refusal::NoLoadBalancer {
                    group: d.group.name.clone(),
                    target_groups: d.target_groups.iter().map(|t| t.name.clone()).collect(),
                }
                .into())
            }
        },
    };
    if opts.jenkins_credentials.is_some() && is_plain_http(&url) && !opts.allow_insecure_http {
        return Err(Refusal::InsecureHttp { url }.into());
    }
    let creds = match &opts.jenkins_credentials {
        Some(p) => Some(credentials(aws, p).await?),
        None => None,
    };
    let secrets: Vec<String> = creds
        .iter()
        .flat_map(|c| {
            let token = c.split_once(':').map(|(_, t)| t.to_string());
            [Some(c.clone()), token].into_iter().flatten()
        })
        .collect();
    let jenkins = Jenkins::new(&url, creds.as_deref()).map_err(Refusal::JenkinsUrl)?;
    if jenkins.is_plain_http() && creds.is_some() {
        progress.warn(&format!(
            "--allow-insecure-http: the Jenkins credentials go to {url} unencrypted"
        ));
    }
    let mut jenkins_unreachable = None;
    let (jenkins_before, identity_before) = match jenkins.login().await {
        Ok(l) if l.is_up() => {
            if l.identity.is_none() {
                progress.warn(&format!(
                    "Jenkins at {url} sends no X-Instance-Identity header: the roll cannot prove that the new controller serves the same JENKINS_HOME"
                ));
            }
            (l.version, l.identity)
        }
        Ok(l) => {
            progress.warn(&format!(
                "Jenkins at {url} answers /login with HTTP {} before the roll",
                l.status
            ));
            (None, None)
        }
        Err(e) => {
            progress.warn(&e.to_string());
            if e.not_sent() {
                jenkins_unreachable = Some(e.to_string());
            }
            (None, None)
        }
    };
    let expected_version = opts
        .jenkins_version
        .clone()
        .or_else(|| new.tag(JENKINS_VERSION_TAG).map(str::to_string));
    let drain = fmt_duration(opts.drain_timeout);
    let plan = Plan::new(
        &d,
        PlanInput {
            strategy: opts.strategy,
            instance_id: &running.id,
            current,
            new: ImageSummary::of(&new),
            jenkins_url: &url,
            drain_timeout: (!opts.no_drain).then_some(drain.as_str()),
            health_timeout: &fmt_duration(opts.health_timeout),
            jenkins_version: expected_version.as_deref(),
        },
    );
    Ok(Prepare::Ready(Box::new(Prepared {
        discovered: d,
        plan,
        jenkins,
        secrets,
        jenkins_before,
        identity_before,
        jenkins_unreachable,
        expected_version,
    })))
}

/// Steps 4–8 (the caller showed the plan, had it confirmed and holds the group's lock).
pub async fn execute(ctx: &Ctx<'_>) -> Result<Rolled, Error> {
    let t0 = Instant::now();
    let r = match ctx.opts.strategy {
        Strategy::Handover => handover::run(ctx).await,
        Strategy::Replace => replace::run(ctx).await,
    };
    if let Ok(r) = &r {
        ctx.progress.info(
            "rolled",
            &format!(
                "group {} is at {} again, processes resumed ({} in all)",
                r.group,
                r.sizes,
                fmt_duration(t0.elapsed())
            ),
        );
    }
    r
}

/// After Ctrl-C (or SIGTERM) in any phase: puts the group back as the journal says (or, once
/// the new controller was verified, finishes), and says where everything is.
pub async fn interrupted(ctx: &Ctx<'_>, what: &str) -> Restored {
    ctx.progress.warn(&format!(
        "interrupted {what}: putting group {} back as it was",
        ctx.p.plan.group
    ));
    steps::put_back(ctx).await
}
