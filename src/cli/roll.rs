//! `jbake roll` and `jbake status`.

use std::io::{BufRead, IsTerminal, Write};
use std::time::Duration;

use clap::Args;
use serde_json::json;

use super::build::AwsArgs;
use super::{interrupted, Failure};
use crate::aws::{Aws, AwsOptions};
use crate::progress::{Output, Progress};
use crate::recipe;
use crate::roll::{self, lock, Ctx, Journal, Prepare, RollOptions, Strategy};
use crate::util::fmt_duration;

#[derive(Debug, Args)]
pub struct RollArgs {
    #[command(flatten)]
    pub aws: AwsArgs,
    /// The controller's Auto Scaling group [default: the one tagged jbake:role=controller].
    #[arg(long, value_name = "NAME")]
    pub asg: Option<String>,
    /// Roll out this AMI [default: the newest image jbake built from --recipe that passed its
    /// boot test].
    #[arg(long, value_name = "AMI", value_parser = parse_ami)]
    pub ami: Option<String>,
    /// The recipe whose images are controller images (the jbake:recipe tag).
    #[arg(long, value_name = "NAME", default_value = roll::CONTROLLER_RECIPE)]
    pub recipe: String,
    /// handover: the new controller boots while the old one serves and takes over its
    /// JENKINS_HOME lease (downtime: Jenkins' start); replace: one instance at a time, for
    /// groups that cannot run a second instance (downtime: boot + start).
    #[arg(long, value_enum, default_value_t = Strategy::Handover)]
    pub strategy: Strategy,
    /// Roll to an image baked for another EFS file system or path (jbake:efs-id/-path tags),
    /// or one whose EFS cannot be proven: a deliberate move of JENKINS_HOME.
    #[arg(long)]
    pub allow_efs_change: bool,
    /// Roll out an image that has no boot test result (baked with --skip-test, or before boot
    /// tests). An image that failed its boot test is never rolled out.
    #[arg(long)]
    pub allow_untested: bool,
    /// Make the new launch template version from the template's newest version instead of the
    /// one the group uses: to roll out a change made to the template since (by Terraform: a new
    /// version it did not make the group's).
    #[arg(long)]
    pub from_latest: bool,
    /// Take over the group's roll lock left by a roll that was killed (says whose it was).
    #[arg(long)]
    pub take_over_lock: bool,
    /// Send the Jenkins credentials to a plain http:// URL (e.g. through an SSH tunnel).
    #[arg(long)]
    pub allow_insecure_http: bool,
    /// Jenkins' root URL [default: the load balancer's DNS name, HTTPS if it listens on 443].
    #[arg(long, value_name = "URL")]
    pub jenkins_url: Option<String>,
    /// An SSM SecureString parameter holding USER:API_TOKEN for the Jenkins API.
    #[arg(long, value_name = "SSM_PARAM")]
    pub jenkins_credentials: Option<String>,
    /// The Jenkins version (X-Jenkins) the new controller must report [default: the image's
    /// jbake:jenkins-version tag, if any].
    #[arg(long, value_name = "VERSION")]
    pub jenkins_version: Option<String>,
    /// How long to wait for running builds to finish.
    #[arg(long, value_name = "DURATION", default_value = "30m", value_parser = recipe::parse_duration)]
    pub drain_timeout: Duration,
    /// Replace without draining Jenkins: for a controller whose Jenkins does not answer (builds
    /// still running on it are lost).
    #[arg(long)]
    pub no_drain: bool,
    /// How long the new controller has to serve before jbake rolls back.
    #[arg(long, value_name = "DURATION", default_value = "15m", value_parser = recipe::parse_duration)]
    pub health_timeout: Duration,
    /// Do not wait for this build in the drain (a URL prefix; repeatable): the Jenkins build
    /// that runs this roll, e.g. `--ignore-build "$BUILD_URL"` in a Jenkinsfile.
    #[arg(long, value_name = "URL")]
    pub ignore_build: Vec<String>,
    /// Show the plan and stop: no change is made.
    #[arg(long)]
    pub dry_run: bool,
    /// Do not ask for confirmation (required when standard input is not a terminal).
    #[arg(long, short = 'y')]
    pub yes: bool,
}

#[derive(Debug, Args)]
pub struct StatusArgs {
    #[command(flatten)]
    pub aws: AwsArgs,
    /// The controller's Auto Scaling group [default: the one tagged jbake:role=controller].
    #[arg(long, value_name = "NAME")]
    pub asg: Option<String>,
}

fn parse_ami(s: &str) -> Result<String, String> {
    let ok = regex::Regex::new("^ami-[0-9a-f]{8}([0-9a-f]{9})?$")
        .map(|r| r.is_match(s))
        .unwrap_or(false);
    if ok {
        Ok(s.to_string())
    } else {
        Err(format!(
            "'{s}' is not an AMI id (ami- and 8 or 17 hex digits)"
        ))
    }
}

fn aws_options(a: &AwsArgs) -> AwsOptions {
    AwsOptions {
        region: a.region.clone(),
        profile: a.profile.clone(),
        endpoint_url: a.endpoint_url.clone(),
    }
}

fn failure(e: roll::Error) -> Failure {
    if e.is_refusal() {
        Failure::Input(anyhow::anyhow!(e))
    } else {
        Failure::Runtime(anyhow::anyhow!(e))
    }
}

/// Asks on the terminal. Err: no terminal to ask on.
async fn confirm(question: &str) -> Result<bool, Failure> {
    if !std::io::stdin().is_terminal() {
        return Err(Failure::Input(anyhow::anyhow!(
            "standard input is not a terminal, so jbake cannot ask for confirmation: pass --yes (nothing was changed)"
        )));
    }
    let question = question.to_string();
    let answer = tokio::task::spawn_blocking(move || {
        eprint!("{question} [y/N] ");
        let _ = std::io::stderr().flush();
        let mut line = String::new();
        std::io::stdin().lock().read_line(&mut line).map(|_| line)
    })
    .await
    .map_err(|e| Failure::Runtime(anyhow::anyhow!("cannot read the answer: {e}")))?
    .map_err(|e| Failure::Runtime(anyhow::anyhow!("cannot read the answer: {e}")))?;
    Ok(matches!(answer.trim().to_lowercase().as_str(), "y" | "yes"))
}

/// How a roll ended without an error.
pub(crate) enum RollEnd {
    /// The group already runs the image: nothing was changed (nothing printed yet).
    UpToDate {
        group: String,
        image: roll::plan::ImageSummary,
    },
    /// Rolled (its result was printed), or `--dry-run` (the plan was printed).
    Done,
}

pub async fn roll_cmd(args: RollArgs, output: Output, quiet: bool) -> Result<(), Failure> {
    if let RollEnd::UpToDate { group, image } = roll_run(args, output, quiet).await? {
        Progress::new(output, quiet, Vec::new()).finished(
            "roll_finished",
            &format!("already up to date: group {group} runs {}", image.label()),
            json!({"status": "up_to_date", "group": group, "image": image}),
        );
    }
    Ok(())
}

/// A whole roll: lock, plan, confirmation, execution.
pub(crate) async fn roll_run(
    args: RollArgs,
    output: Output,
    quiet: bool,
) -> Result<RollEnd, Failure> {
    let opts = RollOptions {
        aws: aws_options(&args.aws),
        asg: args.asg.clone(),
        ami: args.ami.clone(),
        recipe: args.recipe.clone(),
        strategy: args.strategy,
        jenkins_url: args.jenkins_url.clone(),
        jenkins_credentials: args.jenkins_credentials.clone(),
        jenkins_version: args.jenkins_version.clone(),
        drain_timeout: args.drain_timeout,
        no_drain: args.no_drain,
        health_timeout: args.health_timeout,
        allow_efs_change: args.allow_efs_change,
        allow_insecure_http: args.allow_insecure_http,
        allow_untested: args.allow_untested,
        from_latest: args.from_latest,
        ignore_builds: args.ignore_build.clone(),
    };
    // Credentials for a plain-HTTP URL given on the command line: refused before any AWS call.
    if let (Some(url), Some(_)) = (&opts.jenkins_url, &opts.jenkins_credentials) {
        if roll::is_plain_http(url) && !opts.allow_insecure_http {
            return Err(failure(
                roll::Refusal::InsecureHttp { url: url.clone() }.into(),
            ));
        }
    }
    if !args.dry_run && !args.yes && !std::io::stdin().is_terminal() {
        return Err(Failure::Input(anyhow::anyhow!(
            "standard input is not a terminal, so jbake cannot ask for confirmation: pass --yes (nothing was changed)"
        )));
    }
    let aws = Aws::new(&opts.aws).await;
    let progress = Progress::new(output, quiet, Vec::new());
    let mut opts = opts;
    let group = tokio::select! {
        r = roll::discover::find_group(&aws, opts.asg.as_deref()) => r.map_err(failure)?.name,
        what = interrupted() => {
            return Err(Failure::Interrupted(format!("{what} before any change: nothing was changed")));
        }
    };
    opts.asg = Some(group.clone());
    // One roll per group. A lock held by another roll refuses this one at once, naming it
    // (read-only: a refusal below changes nothing); the lock itself is taken after the plan.
    let holder = tokio::select! {
        r = lock::holder(&aws, &group) => r.map_err(|e| failure(e.into()))?,
        what = interrupted() => {
            return Err(Failure::Interrupted(format!("{what} before any change: nothing was changed")));
        }
    };
    if let Some(h) = holder {
        if args.dry_run {
            progress.warn(&format!(
                "group {group} is locked by a roll: {}",
                h.map(|h| h.to_string()).unwrap_or_else(|v| v)
            ));
        } else if !args.take_over_lock {
            return Err(failure(lock::refusal(&group, h).into()));
        }
    }
    let prepared = tokio::select! {
        r = roll::prepare(&opts, &aws, &progress) => r.map_err(failure)?,
        what = interrupted() => {
            return Err(Failure::Interrupted(format!("{what} before any change: nothing was changed")));
        }
    };
    let p = match prepared {
        Prepare::UpToDate { group, image } => {
            return Ok(RollEnd::UpToDate { group, image });
        }
        Prepare::Ready(p) => p,
    };
    let progress = Progress::new(output, quiet, p.secrets.clone());
    if progress.is_json() {
        progress.finished("plan", "", json!(p.plan));
    } else if !quiet || args.dry_run || !args.yes {
        // Quiet and unattended (cron): the result line says what was done; the plan is for
        // whoever reads along, confirms, or asked for --dry-run.
        let mut text = p.plan.text();
        if let Some(v) = &p.jenkins_before {
            text.push_str(&format!("  Jenkins {v} answers at {}\n", p.jenkins.url()));
        }
        crate::progress::out_line(text.trim_end());
    }
    if args.dry_run {
        progress.info("dry_run", "--dry-run: nothing was changed");
        return Ok(RollEnd::Done);
    }
    if let Some(e) = p.refusal(&opts) {
        return Err(failure(e));
    }
    let doing = format!(
        "roll group {group} to {} ({})",
        p.plan.new.id, p.plan.strategy
    );
    let held = tokio::select! {
        r = lock::acquire(&aws, &group, &doing, args.take_over_lock, &progress) => {
            r.map_err(|e| failure(e.into()))?
        }
        what = interrupted() => {
            return Err(Failure::Interrupted(format!("{what} before any change: nothing was changed")));
        }
    };
    progress.info(
        "locked",
        &format!("holding the roll lock of group {group} ({})", held.param),
    );
    let result = locked(&args, &opts, &aws, &p, &progress).await;
    if let Err(e) = lock::release(&aws, &held).await {
        progress.warn(&format!("the roll lock was not released: {e}"));
    }
    result.map(|()| RollEnd::Done)
}

/// The part of the roll that runs under the group's lock.
async fn locked(
    args: &RollArgs,
    opts: &RollOptions,
    aws: &Aws,
    p: &roll::Prepared,
    progress: &Progress,
) -> Result<(), Failure> {
    if !args.yes {
        let question = format!("roll group {} to {}?", p.plan.group, p.plan.new.id);
        let answer = tokio::select! {
            a = confirm(&question) => a?,
            what = interrupted() => {
                return Err(Failure::Interrupted(format!("{what} before any change: nothing was changed")));
            }
        };
        if !answer {
            return Err(Failure::Runtime(anyhow::anyhow!(
                "not confirmed: nothing was changed"
            )));
        }
    }
    let journal = Journal::default();
    let ctx = Ctx {
        opts,
        aws,
        p,
        journal: &journal,
        progress,
    };
    let result = tokio::select! {
        r = roll::execute(&ctx) => r,
        what = interrupted() => {
            // Putting back may take a while (a rollback waits for the old controller): a second
            // signal stops that and says where things are.
            let restored = tokio::select! {
                r = roll::interrupted(&ctx, &what) => r,
                again = interrupted() => {
                    let now = match tokio::time::timeout(Duration::from_secs(15), group_now(aws, &p.plan.group)).await {
                        Ok(Some(text)) => format!(" Right now: {text}."),
                        _ => String::new(),
                    };
                    return Err(Failure::Interrupted(format!(
                        "{what}, then again {again} while putting group {} back: stopped there (journal: {:?}).{now} Check with `jbake status --region {} --asg {}`",
                        p.plan.group, journal.get(), aws.region, p.plan.group
                    )));
                }
            };
            let now = match tokio::time::timeout(Duration::from_secs(15), group_now(aws, &p.plan.group)).await {
                Ok(Some(text)) => format!(" Right now: {text}."),
                _ => String::new(),
            };
            return Err(Failure::Interrupted(format!("{what}: {restored}.{now}")));
        }
    };
    match result {
        Ok(r) => {
            let downtime = r
                .downtime_ms
                .map(|ms| fmt_duration(Duration::from_millis(ms as u64)))
                .unwrap_or_else(|| "unknown (Jenkins did not answer before)".into());
            progress.finished(
                "roll_finished",
                &format!(
                    "rolled group {} to {} ({}, {}): {} → {}, launch template {} version {}, Jenkins {}{}; drained in {}, downtime {downtime}",
                    r.group,
                    r.new_ami,
                    r.new_image_name,
                    r.strategy,
                    r.old_instance,
                    r.new_instance,
                    r.launch_template,
                    r.launch_template_version,
                    r.jenkins_version,
                    if r.same_identity {
                        ", same JENKINS_HOME"
                    } else {
                        ""
                    },
                    fmt_duration(Duration::from_millis(r.drain_ms as u64)),
                ),
                json!({"status": "rolled", "roll": r}),
            );
            Ok(())
        }
        Err(e) => Err(failure(e)),
    }
}

/// The group's instances as EC2 sees them, in a line (None: cannot tell).
async fn group_now(aws: &Aws, group: &str) -> Option<String> {
    let g = aws.asg.group(group).await.ok()??;
    let ids: Vec<String> = g.instances.iter().map(|i| i.id.clone()).collect();
    let ec2 = aws.instances.describe(&ids).await.ok()?;
    if g.instances.is_empty() {
        return Some(format!("group {group} has no instance yet"));
    }
    let list: Vec<String> = g
        .instances
        .iter()
        .map(|i| {
            let e = ec2.iter().find(|e| e.id == i.id);
            format!(
                "{} {} ({}, {})",
                i.id,
                i.lifecycle,
                e.map(|e| e.state.as_str()).unwrap_or("unknown"),
                e.map(|e| e.image_id.as_str()).unwrap_or("unknown AMI")
            )
        })
        .collect();
    Some(format!("group {group} has {}", list.join(", ")))
}

pub async fn status_cmd(args: StatusArgs, output: Output, quiet: bool) -> Result<(), Failure> {
    let aws = Aws::new(&aws_options(&args.aws)).await;
    let progress = Progress::new(output, quiet, Vec::new());
    let s = roll::status::status(&aws, args.asg.as_deref())
        .await
        .map_err(failure)?;
    if progress.is_json() {
        progress.finished("status", "", json!(s));
    } else {
        print!("{}", s.text());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ami_ids() {
        assert!(parse_ami("ami-0123456789abcdef0").is_ok());
        assert!(parse_ami("ami-12345678").is_ok());
        assert!(parse_ami("ami-xyz").is_err());
    }
}
