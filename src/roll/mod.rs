//! `jbake roll`: the immutable upgrade of the Jenkins controller.
//!
//! discover → choose the AMI → plan (`--dry-run` stops) → new launch template version (all of
//! the old data, another ImageId), default, group on that explicit version → drain Jenkins
//! (quiet-down, wait for running builds) → terminate the instance keeping the capacity → verify
//! (EC2's ImageId, the new target's health, `/login`) → on failure roll back.
//!
//! Why this order: a group of exactly one controller cannot run two controllers on one
//! `JENKINS_HOME`, so the old one goes first, and only once no build runs (queued builds are
//! persisted and survive). Every change before the termination is recorded in a [`Journal`], so
//! a drain timeout or Ctrl-C puts the group back as it was; after it, the journal says what state
//! the group is in.

pub mod discover;
pub mod jenkins;
pub mod plan;
pub mod status;
pub mod verify;

use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::aws::{self, Aws, AwsOptions};
use crate::progress::Progress;
use crate::util::fmt_duration;

use discover::Discovered;
use jenkins::Jenkins;
use plan::{ImageSummary, Plan};

/// The recipe whose images are controller images.
pub const CONTROLLER_RECIPE: &str = "jenkins-controller";
/// An image tag naming the Jenkins version inside (checked against `X-Jenkins` when present).
pub const JENKINS_VERSION_TAG: &str = "jbake:jenkins-version";

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The group, AMI or flags named something unsuitable; nothing was changed (exit 2).
    #[error("{0}")]
    Input(String),
    #[error(transparent)]
    Aws(#[from] aws::Error),
    #[error(transparent)]
    Jenkins(#[from] jenkins::Error),
    /// The roll failed; the text says what failed and what state everything is in.
    #[error("{0}")]
    Failed(String),
}

#[derive(Debug, Clone)]
pub struct RollOptions {
    pub aws: AwsOptions,
    pub asg: Option<String>,
    pub ami: Option<String>,
    pub recipe: String,
    pub jenkins_url: Option<String>,
    pub jenkins_credentials: Option<String>,
    pub jenkins_version: Option<String>,
    pub drain_timeout: Duration,
    /// Skip the drain (Jenkins does not answer; running builds are lost).
    pub no_drain: bool,
    pub health_timeout: Duration,
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
    /// Why Jenkins could not be reached before the roll (no connection, TLS refused).
    pub jenkins_unreachable: Option<String>,
    pub expected_version: Option<String>,
}

impl Prepared {
    /// Why the roll must not start, though the plan could be made: Jenkins cannot be reached,
    /// so it cannot be drained (unless `--no-drain`).
    pub fn refusal(&self, opts: &RollOptions) -> Option<String> {
        let why = self.jenkins_unreachable.as_ref()?;
        (!opts.no_drain).then(|| {
            format!(
                "{why}; Jenkins cannot be drained, so nothing was changed: fix --jenkins-url (or what stands between), or pass --no-drain to replace a controller whose Jenkins is down (builds still running on it would be lost)"
            )
        })
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
    pub old_instance: String,
    pub new_instance: String,
    pub old_ami: String,
    pub new_ami: String,
    pub new_image_name: String,
    pub launch_template: String,
    pub launch_template_version: i64,
    pub jenkins_version: String,
    pub drain_ms: u128,
    /// Last good `/login` before the termination → first good one after (None: Jenkins did
    /// not answer before).
    pub downtime_ms: Option<u128>,
}

/// Where a roll is, for the interrupt handler and the drain timeout.
#[derive(Debug, Clone, Default)]
pub struct JournalState {
    /// `(group, template_id, version to put back)`: the version as the group named it, except
    /// `$Latest`, which now means the new version: then the number it meant.
    pub group_was: Option<(String, String, String)>,
    /// `(template_id, default version)` before jbake changed it.
    pub default_was: Option<(String, i64)>,
    pub new_version: Option<i64>,
    /// The group named `$Latest` before the roll.
    pub group_named_latest: bool,
    pub quiet_down: bool,
    /// Set just before the old instance is terminated.
    pub replaced: Option<Replaced>,
    pub rolling_back: bool,
}

#[derive(Debug, Clone)]
pub struct Replaced {
    pub group: String,
    pub old_instance: String,
    pub old_ami: String,
    pub new_ami: String,
    pub template_id: String,
    pub from_version: i64,
    pub new_version: i64,
}

#[derive(Default)]
pub struct Journal(Mutex<JournalState>);

impl Journal {
    pub fn get(&self) -> JournalState {
        self.0.lock().map(|g| g.clone()).unwrap_or_default()
    }
    fn update(&self, f: impl FnOnce(&mut JournalState)) {
        if let Ok(mut g) = self.0.lock() {
            f(&mut g)
        }
    }
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
        _ => Err(Error::Input(format!(
            "SSM parameter {param} must hold USER:API_TOKEN (a Jenkins user and one of its API tokens)"
        ))),
    }
}

/// Steps 1–3: everything is read, nothing is changed.
pub async fn prepare(opts: &RollOptions, aws: &Aws, progress: &Progress) -> Result<Prepare, Error> {
    let d = discover::discover(aws, opts.asg.as_deref()).await?;
    progress.info(
        "discovered",
        &format!(
            "group {} (min {} max {} desired {}), launch template {} ({}) version {} (group says {}), {} instance(s)",
            d.group.name,
            d.group.min,
            d.group.max,
            d.group.desired,
            d.template.id,
            d.template.name,
            d.current.number,
            d.template.version,
            d.group.instances.len()
        ),
    );
    if d.group.desired != 1 || d.group.max < 1 {
        return Err(Error::Input(format!(
            "group {} has desired capacity {} (max {}): jbake roll replaces the single controller of a group of exactly 1",
            d.group.name, d.group.desired, d.group.max
        )));
    }
    let running = d.running().cloned().ok_or_else(|| {
        Error::Failed(format!(
            "group {} has no running in-service instance ({}): check it with `jbake status --region {} --asg {}` before rolling",
            d.group.name,
            if d.group.instances.is_empty() {
                "no instances".to_string()
            } else {
                d.group
                    .instances
                    .iter()
                    .map(|i| format!("{} {}", i.id, i.lifecycle))
                    .collect::<Vec<_>>()
                    .join(", ")
            },
            aws.region,
            d.group.name
        ))
    })?;
    let new = plan::choose(aws, opts.ami.as_deref(), &opts.recipe).await?;
    let current = match aws.ec2.image(&running.image_id).await? {
        Some(i) => ImageSummary::of(&i),
        None => ImageSummary::unknown(&running.image_id),
    };
    if new.id == running.image_id {
        return Ok(Prepare::UpToDate {
            group: d.group.name.clone(),
            image: ImageSummary::of(&new),
        });
    }
    let url = match &opts.jenkins_url {
        Some(u) => u.clone(),
        None => match d.load_balancers.first() {
            Some(lb) => lb.url(),
            None => {
                return Err(Error::Input(format!(
                    "group {} is behind no load balancer (target groups: {}): pass --jenkins-url",
                    d.group.name,
                    if d.target_groups.is_empty() {
                        "none".to_string()
                    } else {
                        d.target_groups
                            .iter()
                            .map(|t| t.name.clone())
                            .collect::<Vec<_>>()
                            .join(", ")
                    }
                )))
            }
        },
    };
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
    let jenkins = Jenkins::new(&url, creds.as_deref()).map_err(|e| Error::Input(e.to_string()))?;
    let mut jenkins_unreachable = None;
    let jenkins_before = match jenkins.login().await {
        Ok(l) if l.is_up() => l.version,
        Ok(l) => {
            progress.warn(&format!(
                "Jenkins at {url} answers /login with HTTP {} before the roll",
                l.status
            ));
            None
        }
        Err(e) => {
            progress.warn(&e.to_string());
            if e.not_sent() {
                jenkins_unreachable = Some(e.to_string());
            }
            None
        }
    };
    let expected_version = opts
        .jenkins_version
        .clone()
        .or_else(|| new.tag(JENKINS_VERSION_TAG).map(str::to_string));
    let plan = Plan::new(
        &d,
        &running.id,
        current,
        ImageSummary::of(&new),
        &url,
        (!opts.no_drain)
            .then(|| fmt_duration(opts.drain_timeout))
            .as_deref(),
        &fmt_duration(opts.health_timeout),
    );
    Ok(Prepare::Ready(Box::new(Prepared {
        discovered: d,
        plan,
        jenkins,
        secrets,
        jenkins_before,
        jenkins_unreachable,
        expected_version,
    })))
}

/// Puts back what was changed before the termination: quiet-down, the group's launch template
/// version, the template's default. Returns what could not be put back.
pub async fn restore_before_replace(
    aws: &Aws,
    jenkins: &Jenkins,
    journal: &Journal,
    progress: &Progress,
) -> Vec<String> {
    let j = journal.get();
    let mut failed = Vec::new();
    if j.quiet_down {
        match jenkins.cancel_quiet_down().await {
            Ok(()) => {
                progress.info("restored", "cancelled Jenkins' quiet-down");
                journal.update(|j| j.quiet_down = false);
            }
            Err(e) => failed.push(format!("cancel quiet-down: {e}")),
        }
    }
    if let Some((group, template, version)) = &j.group_was {
        match aws.asg.set_template_version(group, template, version).await {
            Ok(()) => {
                let pinned = if j.group_named_latest {
                    " (it named $Latest, which is now the unused new version: it names the version $Latest meant before explicitly)"
                } else {
                    ""
                };
                progress.info(
                    "restored",
                    &format!(
                        "group {group} is back on launch template {template} version {version}{pinned}"
                    ),
                );
                journal.update(|j| j.group_was = None);
            }
            Err(e) => failed.push(e.to_string()),
        }
    }
    if let Some((template, version)) = &j.default_was {
        match aws.lt.set_default_version(template, *version).await {
            Ok(()) => {
                progress.info(
                    "restored",
                    &format!("launch template {template}'s default version is {version} again"),
                );
                journal.update(|j| j.default_was = None);
            }
            Err(e) => failed.push(e.to_string()),
        }
    }
    failed
}

/// What the group's state is after the termination, and how to go on or back (for Ctrl-C).
pub fn state_after_replace(r: &Replaced, rolling_back: bool, region: &str) -> String {
    let rollback = format!(
        "jbake roll --region {region} --asg {} --ami {} --yes",
        r.group, r.old_ami
    );
    if rolling_back {
        format!(
            "the roll had failed and was rolling back: {} was terminated; group {} was being pointed back at launch template {} version {} ({}). \
             Check with `jbake status --region {region} --asg {}`; if it does not serve {} within a few minutes, run `{rollback}`",
            r.old_instance, r.group, r.template_id, r.from_version, r.old_ami, r.group, r.old_ami
        )
    } else {
        format!(
            "{} was terminated; group {} points at launch template {} version {} ({}) and launches (or has launched) the new controller from it. \
             To see where it is: `jbake status --region {region} --asg {}`. To go on: nothing to do, the group converges by itself (check Jenkins, then it is done). \
             To roll back to {}: `{rollback}`",
            r.old_instance, r.group, r.template_id, r.new_version, r.new_ami, r.group, r.old_ami
        )
    }
}

/// Steps 4–8 (the caller already showed the plan and had it confirmed).
pub async fn execute(
    opts: &RollOptions,
    aws: &Aws,
    p: &Prepared,
    journal: &Journal,
    progress: &Progress,
) -> Result<Rolled, Error> {
    let d = &p.discovered;
    let plan = &p.plan;
    let template = &d.template.id;

    // 4. The new launch template version: a full copy, checked, then default and the group.
    let description = format!(
        "jbake roll to {} version {} from {}",
        plan.new.id,
        plan.new.version.as_deref().unwrap_or("unknown"),
        plan.current.id
    );
    let new_version = aws
        .lt
        .create_version_with_image(&d.current, &plan.new.id, &description)
        .await?;
    journal.update(|j| j.new_version = Some(new_version));
    progress.info(
        "template",
        &format!(
            "created launch template {template} version {new_version} (version {}'s data, ImageId {})",
            d.current.number, plan.new.id
        ),
    );
    let written = aws.lt.version(template, &new_version.to_string()).await?;
    let written = written.ok_or_else(|| {
        Error::Failed(format!(
            "launch template {template} version {new_version} was created but cannot be read back; nothing else was changed"
        ))
    })?;
    let diff = aws::launch_template::differences(&d.current.data, &written.data);
    if !diff.is_empty() || written.image_id.as_deref() != Some(plan.new.id.as_str()) {
        return Err(Error::Failed(format!(
            "launch template {template} version {new_version} does not hold the same data as version {} with ImageId {} (differs in: {}); \
             the group was not changed and still uses version {}",
            d.current.number,
            plan.new.id,
            if diff.is_empty() { "ImageId".to_string() } else { diff.join(", ") },
            d.template.version
        )));
    }
    journal.update(|j| j.default_was = Some((template.clone(), d.default_version)));
    if let Err(e) = aws.lt.set_default_version(template, new_version).await {
        let failed = restore_before_replace(aws, &p.jenkins, journal, progress).await;
        return Err(Error::Failed(format!(
            "{e}; {}",
            left_as_it_was(&failed, new_version)
        )));
    }
    journal.update(|j| {
        let latest = d.template.version == "$Latest";
        j.group_named_latest = latest;
        j.group_was = Some((
            d.group.name.clone(),
            template.clone(),
            if latest {
                d.current.number.to_string()
            } else {
                d.template.version.clone()
            },
        ))
    });
    if let Err(e) = aws
        .asg
        .set_template_version(&d.group.name, template, &new_version.to_string())
        .await
    {
        let failed = restore_before_replace(aws, &p.jenkins, journal, progress).await;
        return Err(Error::Failed(format!(
            "{e}; {}",
            left_as_it_was(&failed, new_version)
        )));
    }
    progress.info(
        "template",
        &format!(
            "version {new_version} is the default; group {} now launches from version {new_version}",
            d.group.name
        ),
    );

    // 5. Drain.
    let drain_started = Instant::now();
    let drained = drain(opts, p, journal, progress).await;
    let before = match drained {
        Ok(before) => before,
        Err(why) => {
            let failed = restore_before_replace(aws, &p.jenkins, journal, progress).await;
            return Err(Error::Failed(format!(
                "{why}; {}",
                left_as_it_was(&failed, new_version)
            )));
        }
    };
    let drain_ms = drain_started.elapsed().as_millis();

    // 6. Replace.
    let old = plan.instance_id.clone();
    let replaced = Replaced {
        group: d.group.name.clone(),
        old_instance: old.clone(),
        old_ami: plan.current.id.clone(),
        new_ami: plan.new.id.clone(),
        template_id: template.clone(),
        from_version: d.current.number,
        new_version,
    };
    journal.update(|j| j.replaced = Some(replaced.clone()));
    progress.info(
        "replacing",
        &format!(
            "terminating {old}: group {} launches the new controller",
            d.group.name
        ),
    );
    if let Err(e) = aws.asg.terminate_keeping_capacity(&old).await {
        // Not terminated: nothing was replaced, put everything back.
        journal.update(|j| j.replaced = None);
        let failed = restore_before_replace(aws, &p.jenkins, journal, progress).await;
        return Err(Error::Failed(format!(
            "{e}; {}",
            left_as_it_was(&failed, new_version)
        )));
    }
    journal.update(|j| j.quiet_down = false);

    // 7. Verify.
    let tgs: Vec<(String, String)> = d
        .target_groups
        .iter()
        .map(|t| (t.arn.clone(), t.name.clone()))
        .collect();
    let not = vec![old.clone()];
    let expect = verify::Expect {
        group: &d.group.name,
        ami: &plan.new.id,
        not: &not,
        target_groups: &tgs,
        jenkins_version: p.expected_version.as_deref(),
    };
    match verify::serving(aws, &p.jenkins, &expect, opts.health_timeout, progress).await {
        Ok(s) => Ok(Rolled {
            group: d.group.name.clone(),
            old_instance: old,
            new_instance: s.instance_id,
            old_ami: plan.current.id.clone(),
            new_ami: plan.new.id.clone(),
            new_image_name: plan.new.name.clone(),
            launch_template: template.clone(),
            launch_template_version: new_version,
            jenkins_version: s.jenkins_version,
            drain_ms,
            downtime_ms: before.map(|b| s.first_good.duration_since(b).as_millis()),
        }),
        // 8. Roll back.
        Err(why) => Err(rollback(opts, aws, p, journal, progress, &replaced, &why).await),
    }
}

fn left_as_it_was(failed: &[String], new_version: i64) -> String {
    if failed.is_empty() {
        format!(
            "nothing was replaced: Jenkins is not left in quiet-down, and the group and the template's default are as they were (launch template version {new_version} stays, unused)"
        )
    } else {
        format!(
            "nothing was replaced, but these could not be put back: {}",
            failed.join("; ")
        )
    }
}

/// Quiet-down, then wait until no build runs. Ok: when Jenkins last answered `/login` before
/// the termination (None if it did not).
async fn drain(
    opts: &RollOptions,
    p: &Prepared,
    journal: &Journal,
    progress: &Progress,
) -> Result<Option<Instant>, String> {
    let j = &p.jenkins;
    if opts.no_drain {
        progress.warn(&format!(
            "--no-drain: Jenkins at {} is not put in quiet-down; builds still running on it are lost",
            j.url()
        ));
        let login = j.login().await.ok().filter(|l| l.is_up());
        return Ok(login.map(|_| Instant::now()));
    }
    // Recorded before the request: a quiet-down whose answer was lost must still be cancelled.
    journal.update(|s| s.quiet_down = true);
    if let Err(e) = j.quiet_down().await {
        if e.not_sent() {
            journal.update(|s| s.quiet_down = false);
        }
        return Err(format!("cannot put Jenkins in quiet-down: {e}"));
    }
    progress.info(
        "draining",
        &format!(
            "Jenkins at {} is in quiet-down: no new build starts; waiting up to {} for running builds",
            j.url(),
            fmt_duration(opts.drain_timeout)
        ),
    );
    let t0 = Instant::now();
    let mut interval = Duration::from_millis(500);
    let mut last = String::new();
    loop {
        let busy = j
            .busy()
            .await
            .map_err(|e| format!("cannot tell whether builds are running: {e}"))?;
        if busy.count == 0 {
            // The last good answer before the termination, then one more look at the executors.
            let login = j.login().await.ok().filter(|l| l.is_up());
            let at = Instant::now();
            let again = j
                .busy()
                .await
                .map_err(|e| format!("cannot tell whether builds are running: {e}"))?;
            if again.count == 0 {
                if login.is_none() {
                    progress.warn("Jenkins did not answer /login before the replacement: the downtime cannot be measured");
                }
                progress.info(
                    "drained",
                    &format!("no build runs (waited {})", fmt_duration(t0.elapsed())),
                );
                return Ok(login.map(|_| at));
            }
            continue;
        }
        let state = format!(
            "{} build(s) running{}",
            busy.count,
            if busy.running.is_empty() {
                String::new()
            } else {
                format!(": {}", busy.running.join(", "))
            }
        );
        if state != last {
            progress.info("draining", &format!("waiting: {state}"));
            last = state.clone();
        }
        if t0.elapsed() >= opts.drain_timeout {
            return Err(format!(
                "the drain timed out after {}: {state} (raise --drain-timeout, or wait for them and run jbake roll again)",
                fmt_duration(opts.drain_timeout)
            ));
        }
        tokio::time::sleep(interval.min(opts.drain_timeout.saturating_sub(t0.elapsed()))).await;
        interval = (interval * 2).min(Duration::from_secs(10));
    }
}

async fn rollback(
    opts: &RollOptions,
    aws: &Aws,
    p: &Prepared,
    journal: &Journal,
    progress: &Progress,
    r: &Replaced,
    why: &str,
) -> Error {
    journal.update(|j| j.rolling_back = true);
    progress.warn(&format!(
        "verification failed: {why}; rolling back to launch template version {} ({})",
        r.from_version, r.old_ami
    ));
    let d = &p.discovered;
    let steps = async {
        aws.lt
            .set_default_version(&r.template_id, d.default_version)
            .await?;
        aws.asg
            .set_template_version(&r.group, &r.template_id, &r.from_version.to_string())
            .await?;
        let bad: Vec<String> = aws
            .asg
            .group(&r.group)
            .await?
            .map(|g| {
                g.instances
                    .into_iter()
                    .filter(|i| i.id != r.old_instance && !i.lifecycle.starts_with("Terminat"))
                    .map(|i| i.id)
                    .collect()
            })
            .unwrap_or_default();
        for id in &bad {
            progress.info(
                "rollback",
                &format!("terminating {id}: the group launches the old controller again"),
            );
            aws.asg.terminate_keeping_capacity(id).await?;
        }
        Ok::<_, aws::Error>(bad)
    };
    let bad = match steps.await {
        Ok(b) => b,
        Err(e) => {
            return Error::Failed(format!(
                "the roll failed ({why}) and so did the rollback: {e}. {}",
                state_after_replace(r, true, &aws.region)
            ))
        }
    };
    let mut not = bad;
    not.push(r.old_instance.clone());
    let tgs: Vec<(String, String)> = d
        .target_groups
        .iter()
        .map(|t| (t.arn.clone(), t.name.clone()))
        .collect();
    let expect = verify::Expect {
        group: &r.group,
        ami: &r.old_ami,
        not: &not,
        target_groups: &tgs,
        jenkins_version: p.jenkins_before.as_deref(),
    };
    match verify::serving(aws, &p.jenkins, &expect, opts.health_timeout, progress).await {
        Ok(s) => Error::Failed(format!(
            "the roll to {} failed: {why}. Rolled back: group {} is on launch template {} version {} again and {} runs {} (Jenkins {} answers)",
            r.new_ami, r.group, r.template_id, r.from_version, s.instance_id, r.old_ami, s.jenkins_version
        )),
        Err(e) => Error::Failed(format!(
            "the roll to {} failed: {why}. The rollback to {} did not verify either: {e}. Group {} points at launch template {} version {}; check `jbake status --region {} --asg {}`",
            r.new_ami, r.old_ami, r.group, r.template_id, r.from_version, aws.region, r.group
        )),
    }
}
