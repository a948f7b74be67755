//! What can stop a roll, with the context a user needs: refusals before any change (exit 2),
//! and failures that say what state everything is in (exit 1).

use std::time::Duration;

use crate::aws;
use crate::util::fmt_duration;

use super::jenkins;
use super::lock;

/// Why a roll does not start: the group, the image or the flags name something unsuitable.
/// Nothing was changed (exit 2).
#[derive(Debug, thiserror::Error)]
pub enum Refusal {
    #[error("there is no Auto Scaling group named {name} in {region}: check --asg and --region (`jbake status --region {region}` lists the controller group)")]
    NoGroup { name: String, region: String },
    #[error("no Auto Scaling group in {region} is tagged {tag}={value}: pass --asg NAME, or tag the controller's group")]
    NoTaggedGroup {
        region: String,
        tag: &'static str,
        value: &'static str,
    },
    #[error("{} Auto Scaling groups in {region} are tagged {tag}={value} ({}): pass --asg NAME", names.len(), names.join(", "))]
    ManyTaggedGroups {
        region: String,
        tag: &'static str,
        value: &'static str,
        names: Vec<String>,
    },
    #[error("Auto Scaling group {group} launches from {launches_from}, not a launch template: jbake roll needs a launch template")]
    NotLaunchTemplate {
        group: String,
        launches_from: String,
    },
    #[error(
        "launch template {template_id} ({template_name}) of group {group} has no version {version}"
    )]
    NoVersion {
        template_id: String,
        template_name: String,
        group: String,
        version: String,
    },
    #[error("group {group} has desired capacity {desired} (max {max}): jbake roll replaces the single controller of a group of exactly 1")]
    Capacity {
        group: String,
        desired: i32,
        max: i32,
    },
    #[error("group {group} is behind no load balancer (target groups: {}): pass --jenkins-url", if target_groups.is_empty() { "none".to_string() } else { target_groups.join(", ") })]
    NoLoadBalancer {
        group: String,
        target_groups: Vec<String>,
    },
    #[error("AMI {id} does not exist in {region} (or this account cannot see it): check --ami and --region")]
    NoSuchAmi { id: String, region: String },
    #[error("no available image built by jbake from the {recipe} recipe in {region}: bake one with `jbake controller`, or pass --ami")]
    NoImage { recipe: String, region: String },
    #[error("no image of the {recipe} recipe in {region} passed its boot test{}", untested_hint(.untested, .region))]
    NoTestedImage {
        recipe: String,
        region: String,
        /// The newest image that was never tested (`id (name)`), if any.
        untested: Option<String>,
    },
    #[error("{ami} ({name}) failed its boot test ({tag}=false{}): an instance of it did not pass its checks, so it is never rolled out. Bake a new image (`jbake controller`), or test this one again if the failure was not the image's (`jbake test {ami}`)", at.as_deref().map(|t| format!(" at {t}")).unwrap_or_default())]
    FailedTest {
        ami: String,
        name: String,
        tag: &'static str,
        at: Option<String>,
    },
    #[error("{ami} ({name}) has no boot test result (no {tag} tag: baked with --skip-test, or before boot tests): test it with `jbake test {ami} --region {region}`, or pass --allow-untested to roll it out anyway")]
    Untested {
        ami: String,
        name: String,
        tag: &'static str,
        region: String,
    },
    #[error("{0}")]
    Image(#[from] ImageProblem),
    #[error("the new image {new_ami} was baked for {new}, but the running controller's image {running_ami} for {running}: the new controller would serve another JENKINS_HOME. Bake the image with the same --efs-id and efs_path, or pass --allow-efs-change for a deliberate move to another file system")]
    EfsDiffers {
        running_ami: String,
        running: Box<EfsRef>,
        new_ami: String,
        new: Box<EfsRef>,
    },
    #[error("cannot prove that {ami} ({which}) uses the same EFS: it has no {missing} tag (images baked by this jbake carry jbake:efs-id and jbake:efs-path). Check by hand which file system it mounts, then pass --allow-efs-change")]
    EfsUnknown {
        ami: String,
        which: &'static str,
        missing: &'static str,
    },
    #[error("{ami} ({name}), the {which} controller's image, has no JENKINS_HOME lease ({tag}=1 missing: baked before the lease existed): a handover would run two Jenkins on one JENKINS_HOME. Roll with --strategy replace (the old controller stops before the new one starts)")]
    NoLease {
        ami: String,
        name: String,
        which: &'static str,
        tag: &'static str,
    },
    #[error("{ami} ({name}) is a first-installation image ({tag}=true): it initialises an empty JENKINS_HOME, which a roll must never do (an empty home on a roll means the wrong file system). Roll to an image baked without --var jenkins_home_init=true")]
    HomeInit {
        ami: String,
        name: String,
        tag: &'static str,
    },
    #[error("launch template {template_id} version {version} cannot run two controllers side by side ({}): a handover needs a second instance. Roll with --strategy replace", blockers.join("; "))]
    HandoverBlocked {
        template_id: String,
        version: i64,
        blockers: Vec<String>,
    },
    #[error(
        "SSM parameter {param} must hold USER:API_TOKEN (a Jenkins user and one of its API tokens)"
    )]
    Credentials { param: String },
    #[error("--jenkins-url {url} is plain HTTP: the Jenkins credentials would cross the network unencrypted. Use https:// (the load balancer's HTTPS listener), or pass --allow-insecure-http if the path is private (e.g. an SSH tunnel to 127.0.0.1)")]
    InsecureHttp { url: String },
    #[error(transparent)]
    JenkinsUrl(jenkins::Error),
}

fn untested_hint(untested: &Option<String>, region: &str) -> String {
    match untested {
        Some(i) => format!(
            ": the newest untested one is {i}; test it with `jbake test {} --region {region}`, or pass --allow-untested",
            i.split_whitespace().next().unwrap_or_default()
        ),
        None => ": bake one with `jbake controller` (it is tested as it is baked)".to_string(),
    }
}

/// Why an image is not a controller image jbake can roll out.
#[derive(Debug, thiserror::Error)]
pub enum ImageProblem {
    #[error("{id} ({name}) was not built by jbake (it has no {tag} tag): jbake roll only rolls out images built from the {recipe} recipe")]
    NotJbake {
        id: String,
        name: String,
        tag: &'static str,
        recipe: String,
    },
    #[error("{id} ({name}) was built from the {found} recipe, not {recipe}: it is not a controller image")]
    OtherRecipe {
        id: String,
        name: String,
        found: String,
        recipe: String,
    },
    #[error("{id} ({name}) is {state}, not available")]
    NotAvailable {
        id: String,
        name: String,
        state: String,
    },
    #[error("{id} ({name}) is an unfinished build ({tag}=false)")]
    Unfinished {
        id: String,
        name: String,
        tag: &'static str,
    },
}

/// The EFS an image was baked for (its `jbake:efs-id` and `jbake:efs-path` tags).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct EfsRef {
    pub id: String,
    pub path: String,
}

impl std::fmt::Display for EfsRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "EFS {}:{}", self.id, self.path)
    }
}

/// What was put back after a roll stopped (and what could not be): part of every failure.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct Restored {
    /// What jbake put back, in order.
    pub done: Vec<String>,
    /// What it could not put back (with why).
    pub failed: Vec<String>,
    /// Where the group is now, in a sentence.
    pub state: String,
}

impl std::fmt::Display for Restored {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.state)?;
        if !self.failed.is_empty() {
            write!(
                f,
                "; these could not be put back: {}",
                self.failed.join("; ")
            )?;
        }
        Ok(())
    }
}

/// Why a started roll stopped before the new controller served.
#[derive(Debug, thiserror::Error)]
pub enum Why {
    #[error("the drain timed out after {}: {busy} (raise --drain-timeout, or wait for them and run jbake roll again)", fmt_duration(*after))]
    DrainTimeout { after: Duration, busy: String },
    #[error("cannot put Jenkins in quiet-down: {0}")]
    QuietDown(jenkins::Error),
    #[error("cannot tell whether builds are running: {0}")]
    Busy(jenkins::Error),
    #[error("launch template {template_id} version {version} was created but {problem}")]
    Copy {
        template_id: String,
        version: i64,
        problem: String,
    },
    #[error("{what} changed while jbake worked (it was {was}, it is now {now}): someone or something else is changing it")]
    Changed {
        what: String,
        was: String,
        now: String,
    },
    #[error("the new controller did not get ready to take over within {}: {last}", fmt_duration(*after))]
    SuccessorNotReady { after: Duration, last: String },
    #[error("{0}")]
    Successor(String),
    #[error("{0}")]
    Aws(#[from] aws::Error),
    #[error("the old Jenkins did not stop within {}: {last}", fmt_duration(*after))]
    NotStopped { after: Duration, last: String },
}

/// A roll that failed or stopped, with what state everything is in.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Nothing was changed (exit 2).
    #[error(transparent)]
    Refused(#[from] Refusal),
    #[error(transparent)]
    Aws(#[from] aws::Error),
    #[error(transparent)]
    Jenkins(#[from] jenkins::Error),
    #[error(transparent)]
    Lock(#[from] lock::Error),
    #[error("group {group} has no running in-service instance ({instances}): check it with `jbake status --region {region} --asg {group}` before rolling")]
    NoController {
        group: String,
        instances: String,
        region: String,
    },
    #[error("{why}; Jenkins cannot be drained, so nothing was changed: fix --jenkins-url (or what stands between), or pass --no-drain to replace a controller whose Jenkins is down (builds still running on it would be lost)")]
    CannotDrain { why: String },
    /// Stopped before the old controller was replaced; everything of the roll was put back.
    #[error("{why}; {restored}")]
    Stopped { why: Why, restored: Restored },
    /// The new controller did not serve; the old one was brought back (or the text says why not).
    #[error("the roll to {new_ami} failed: {why}. {restored}")]
    RolledBack {
        new_ami: String,
        why: String,
        restored: Restored,
    },
}

impl Error {
    /// Whether nothing was changed because the input was unsuitable (exit 2).
    pub fn is_refusal(&self) -> bool {
        matches!(self, Error::Refused(_))
    }
}
