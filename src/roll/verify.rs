//! What a roll waits for, each as a poll of AWS's and Jenkins' own views:
//! - [`successor_ready`]: the group's new instance runs the new AMI and its Jenkins waits for the
//!   JENKINS_HOME lease (its health check answers 503: `unhealthy`, `Target.ResponseCodeMismatch`).
//! - [`stopped`]: the old Jenkins no longer serves through the load balancer.
//! - [`serving`]: an instance of the group runs the expected AMI (EC2's view), its own target is
//!   healthy in every target group (and the instances that must be gone are not), and `/login`
//!   through the load balancer answers with the expected version and the SAME instance identity
//!   as before the roll (the same JENKINS_HOME).

use std::time::{Duration, Instant};

use crate::aws::elb::TargetHealth;
use crate::aws::wait::{self, Poll};
use crate::aws::Aws;
use crate::progress::Progress;
use crate::util::fmt_duration;

use super::jenkins::Jenkins;

/// A target group: `(arn, name)`.
pub type TargetGroup = (String, String);

/// What must be true of the group.
pub struct Expect<'a> {
    pub group: &'a str,
    pub ami: &'a str,
    /// Instances that do not count (the one replaced, a rolled-back successor).
    pub not: &'a [String],
    /// The instance that must serve, when known (the successor of a handover, the old
    /// controller after a rollback).
    pub instance: Option<&'a str>,
    /// Instances whose targets must no longer be healthy (the load balancer must not route to
    /// them any more).
    pub gone: &'a [String],
    pub target_groups: &'a [TargetGroup],
    /// Jenkins' version (`X-Jenkins`) to expect, if known.
    pub jenkins_version: Option<&'a str>,
    /// The instance identity (`X-Instance-Identity`) to expect: the JENKINS_HOME before the roll.
    pub identity: Option<&'a str>,
}

#[derive(Debug, Clone)]
pub struct Serving {
    pub instance_id: String,
    pub jenkins_version: String,
    /// When Jenkins first answered through the load balancer.
    pub first_good: Instant,
}

/// A failure that waiting longer cannot fix.
#[derive(Debug, Clone)]
pub struct Fatal(pub String);

fn describe(t: &TargetHealth) -> String {
    format!(
        "{}{}",
        t.state,
        t.reason
            .as_deref()
            .map(|r| format!(" ({r})"))
            .unwrap_or_default()
    )
}

/// Polls `check` until ready or `deadline`; Err: what did not hold (the last state, or a fatal
/// finding).
async fn poll<T, F, Fut>(
    deadline: Duration,
    progress: &Progress,
    label: &str,
    check: F,
) -> Result<T, String>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<Poll<T>, Fatal>>,
{
    let t0 = Instant::now();
    let r = wait::until(
        deadline,
        Duration::from_secs(2),
        |s| progress.info(label, &format!("{label}: {s}")),
        check,
    )
    .await;
    match r {
        Ok(Ok(s)) => Ok(s),
        Ok(Err(Fatal(fatal))) => Err(fatal),
        Err(last) => Err(format!(
            "not after {}: {last}",
            fmt_duration(t0.elapsed().max(deadline))
        )),
    }
}

/// Polls until everything in `expect` holds, or `deadline`. Err: what did not hold.
pub async fn serving(
    aws: &Aws,
    jenkins: &Jenkins,
    expect: &Expect<'_>,
    deadline: Duration,
    progress: &Progress,
) -> Result<Serving, String> {
    poll(deadline, progress, "verifying", || {
        check(aws, jenkins, expect)
    })
    .await
}

async fn targets(
    aws: &Aws,
    tgs: &[TargetGroup],
) -> Result<Vec<(String, Vec<TargetHealth>)>, String> {
    let mut out = Vec::new();
    for (arn, name) in tgs {
        out.push((
            name.clone(),
            aws.elb
                .target_health(arn)
                .await
                .map_err(|e| e.to_string())?,
        ));
    }
    Ok(out)
}

async fn check(aws: &Aws, jenkins: &Jenkins, e: &Expect<'_>) -> Result<Poll<Serving>, Fatal> {
    let pending = |s: String| Ok(Poll::Pending(s));
    let group = match aws.asg.group(e.group).await {
        Ok(Some(g)) => g,
        Ok(None) => return Err(Fatal(format!("group {} no longer exists", e.group))),
        Err(err) => return pending(err.to_string()),
    };
    let candidates: Vec<_> = group
        .instances
        .iter()
        .filter(|i| {
            !e.not.contains(&i.id)
                && !i.lifecycle.starts_with("Terminat")
                && e.instance.is_none_or(|want| want == i.id)
        })
        .collect();
    let Some(inst) = candidates
        .iter()
        .find(|i| i.lifecycle == "InService")
        .or(candidates.first())
    else {
        return pending(match e.instance {
            Some(id) => format!("{id} is no longer in group {}", e.group),
            None => format!("group {} has not launched a replacement yet", e.group),
        });
    };
    if inst.lifecycle != "InService" {
        return pending(format!("{} is {}", inst.id, inst.lifecycle));
    }
    let ec2 = match aws.instances.describe(std::slice::from_ref(&inst.id)).await {
        Ok(v) => v,
        Err(err) => return pending(err.to_string()),
    };
    let Some(i) = ec2.first() else {
        return pending(format!("EC2 does not show {} yet", inst.id));
    };
    if i.image_id != e.ami {
        return Err(Fatal(format!(
            "the group launched {} from {}, not {}",
            i.id, i.image_id, e.ami
        )));
    }
    let health = match targets(aws, e.target_groups).await {
        Ok(h) => h,
        Err(err) => return pending(err),
    };
    for (name, targets) in &health {
        // Only the instance's own target counts: a terminated one's can still say healthy.
        match targets.iter().find(|t| t.id == i.id) {
            None => return pending(format!("{} is not registered in target group {name}", i.id)),
            Some(t) if t.state != "healthy" => {
                return pending(format!("target {} in {name} is {}", i.id, describe(t)))
            }
            Some(_) => {}
        }
        for gone in e.gone {
            if let Some(t) = targets
                .iter()
                .find(|t| &t.id == gone && t.state == "healthy")
            {
                return pending(format!(
                    "the load balancer still counts {} healthy in {name} (it may still route to it)",
                    t.id
                ));
            }
        }
    }
    if i.state != "running" {
        return pending(format!("{} is {}", i.id, i.state));
    }
    let login = match jenkins.login().await {
        Ok(l) => l,
        Err(err) => return pending(err.to_string()),
    };
    if !login.is_up() {
        return pending(format!(
            "{}/login answers HTTP {}{}",
            jenkins.url(),
            login.status,
            if login.version.is_none() {
                " without an X-Jenkins header"
            } else {
                ""
            }
        ));
    }
    if let Some(want) = e.identity {
        match login.identity.as_deref() {
            Some(got) if got == want => {}
            Some(got) => {
                return Err(Fatal(format!(
                    "Jenkins at {} answers with another instance identity (X-Instance-Identity {}, before the roll {}): it serves another JENKINS_HOME (another EFS, or an empty one)",
                    jenkins.url(),
                    short(got),
                    short(want)
                )))
            }
            None => {
                return pending(format!(
                    "Jenkins at {} answers /login without an X-Instance-Identity header",
                    jenkins.url()
                ))
            }
        }
    }
    let version = login.version.unwrap_or_default();
    if let Some(want) = e.jenkins_version {
        if version != want {
            return pending(format!(
                "Jenkins at {} is version {version}, expected {want}",
                jenkins.url()
            ));
        }
    }
    Ok(Poll::Ready(Serving {
        instance_id: i.id.clone(),
        jenkins_version: version,
        first_good: Instant::now(),
    }))
}

/// A short fingerprint of an identity for messages (the keys' base64 all start alike):
/// `sha256:` and the first 12 hex digits of the SHA-256 of the header's value.
pub fn short(identity: &str) -> String {
    use sha2::Digest;
    let hash = sha2::Sha256::digest(identity.trim().as_bytes());
    let hex: String = hash.iter().take(6).map(|b| format!("{b:02x}")).collect();
    format!("sha256:{hex}")
}

/// The target health reason of an instance whose Jenkins waits for the JENKINS_HOME lease: its
/// health check answers 503 ("waiting for the lease").
pub const WAITING_REASON: &str = "Target.ResponseCodeMismatch";

/// What the successor's readiness poll saw.
pub enum Readiness {
    /// Its Jenkins waits for the lease in every target group.
    Waiting,
    /// Not yet (booting, registering, health checks in progress).
    NotYet(String),
    /// It serves Jenkins while the old controller still runs: no lease between them.
    Serving(String),
}

/// Classifies the successor's target health in every target group (pure, unit-tested).
pub fn readiness(instance: &str, health: &[(String, Vec<TargetHealth>)]) -> Readiness {
    let mut not_yet = Vec::new();
    for (name, targets) in health {
        match targets.iter().find(|t| t.id == instance) {
            None => not_yet.push(format!(
                "{instance} is not registered in target group {name}"
            )),
            Some(t) if t.state == "healthy" => {
                return Readiness::Serving(format!(
                    "target {instance} in {name} is healthy while the old controller still serves"
                ))
            }
            Some(t) if t.state == "unhealthy" && t.reason.as_deref() == Some(WAITING_REASON) => {}
            Some(t) => not_yet.push(format!("target {instance} in {name} is {}", describe(t))),
        }
    }
    if not_yet.is_empty() {
        Readiness::Waiting
    } else {
        Readiness::NotYet(not_yet.join("; "))
    }
}

/// Waits until the group runs a second instance from `ami` whose Jenkins waits for the lease
/// (`old_down`: the old Jenkins does not run, so the successor may serve at once). `seen` is
/// called with its id as soon as the group shows it (for the journal). Ok: its id.
#[allow(clippy::too_many_arguments)]
pub async fn successor_ready(
    aws: &Aws,
    group: &str,
    old: &str,
    ami: &str,
    tgs: &[TargetGroup],
    deadline: Duration,
    progress: &Progress,
    old_down: bool,
    seen: &(dyn Fn(&str) + Sync),
) -> Result<String, String> {
    poll(deadline, progress, "successor", || async move {
        let g = match aws.asg.group(group).await {
            Ok(Some(g)) => g,
            Ok(None) => return Err(Fatal(format!("group {group} no longer exists"))),
            Err(e) => return Ok(Poll::Pending(e.to_string())),
        };
        let Some(new) = g
            .instances
            .iter()
            .find(|i| i.id != old && !i.lifecycle.starts_with("Terminat"))
        else {
            return Ok(Poll::Pending(format!(
                "group {group} has not launched the new controller yet"
            )));
        };
        seen(&new.id);
        if new.lifecycle != "InService" {
            return Ok(Poll::Pending(format!("{} is {}", new.id, new.lifecycle)));
        }
        let ec2 = match aws.instances.describe(std::slice::from_ref(&new.id)).await {
            Ok(v) => v,
            Err(e) => return Ok(Poll::Pending(e.to_string())),
        };
        let Some(i) = ec2.first() else {
            return Ok(Poll::Pending(format!("EC2 does not show {} yet", new.id)));
        };
        if i.image_id != ami {
            return Err(Fatal(format!(
                "the group launched {} from {}, not {ami}",
                i.id, i.image_id
            )));
        }
        if i.state != "running" {
            return Ok(Poll::Pending(format!("{} is {}", i.id, i.state)));
        }
        if tgs.is_empty() {
            // Nothing tells whether its Jenkins waits: running is all that can be seen.
            return Ok(Poll::Ready(i.id.clone()));
        }
        let health = match targets(aws, tgs).await {
            Ok(h) => h,
            Err(e) => return Ok(Poll::Pending(e)),
        };
        match readiness(&i.id, &health) {
            Readiness::Waiting => Ok(Poll::Ready(i.id.clone())),
            Readiness::NotYet(s) => Ok(Poll::Pending(s)),
            // The old Jenkins is down (--no-drain): the successor took the free lease.
            Readiness::Serving(_) if old_down => Ok(Poll::Ready(i.id.clone())),
            Readiness::Serving(s) => Err(Fatal(format!(
                "{s}: two Jenkins serve at once, so the new image does not wait for the JENKINS_HOME lease, or it mounts another file system"
            ))),
        }
    })
    .await
}

/// Waits until Jenkins no longer serves the identity `identity` through the load balancer (the
/// old controller stopped). Ok: when it was first seen down.
pub async fn stopped(
    jenkins: &Jenkins,
    identity: Option<&str>,
    deadline: Duration,
    progress: &Progress,
) -> Result<Instant, String> {
    poll(deadline, progress, "stopping", || async move {
        match jenkins.login().await {
            Ok(l) if l.is_up() && (identity.is_none() || l.identity.as_deref() == identity) => {
                Ok(Poll::Pending(format!(
                    "Jenkins {} still answers at {}",
                    l.version.unwrap_or_default(),
                    jenkins.url()
                )))
            }
            _ => Ok(Poll::Ready(Instant::now())),
        }
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(id: &str, state: &str, reason: Option<&str>) -> TargetHealth {
        TargetHealth {
            id: id.into(),
            port: Some(8080),
            state: state.into(),
            reason: reason.map(str::to_string),
            description: None,
        }
    }

    #[test]
    fn the_successor_is_ready_when_it_waits_for_the_lease_everywhere() {
        let waiting = t("i-new", "unhealthy", Some(WAITING_REASON));
        let old = t("i-old", "healthy", None);
        let h = vec![("tg".to_string(), vec![old.clone(), waiting.clone()])];
        assert!(matches!(readiness("i-new", &h), Readiness::Waiting));
        let booting = vec![(
            "tg".to_string(),
            vec![
                old.clone(),
                t("i-new", "initial", Some("Elb.InitialHealthChecking")),
            ],
        )];
        match readiness("i-new", &booting) {
            Readiness::NotYet(s) => {
                assert!(s.contains("initial (Elb.InitialHealthChecking)"), "{s}")
            }
            _ => panic!("not ready while initial"),
        }
        // Refused connection: Jenkins (or the waiting answer) is not up yet.
        let refused = vec![(
            "tg".to_string(),
            vec![t("i-new", "unhealthy", Some("Target.FailedHealthChecks"))],
        )];
        assert!(matches!(readiness("i-new", &refused), Readiness::NotYet(_)));
        let two = vec![
            ("a".to_string(), vec![waiting.clone()]),
            ("b".to_string(), vec![t("i-new", "healthy", None)]),
        ];
        assert!(matches!(readiness("i-new", &two), Readiness::Serving(_)));
        let missing = vec![
            ("a".to_string(), vec![waiting]),
            ("b".to_string(), vec![old]),
        ];
        match readiness("i-new", &missing) {
            Readiness::NotYet(s) => assert!(s.contains("not registered in target group b"), "{s}"),
            _ => panic!("must be registered everywhere"),
        }
    }

    #[test]
    fn identities_are_told_apart_by_a_fingerprint() {
        let a = short("MIIBIjANBgkqhkiG9w0BAQEFAAOCAQ8AMIIBCgKCAQEAxyz");
        let b = short("MIIBIjANBgkqhkiG9w0BAQEFAAOCAQ8AMIIBCgKCAQEAxy0");
        assert_ne!(a, b);
        assert!(a.starts_with("sha256:") && a.len() == 19, "{a}");
    }
}
