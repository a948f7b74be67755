//! Step 7 (and the rollback's check): the group's new instance is in service, EC2 says it runs
//! the expected AMI, its own target is healthy in every target group, and Jenkins answers
//! `/login` through the load balancer.

use std::time::{Duration, Instant};

use crate::aws::wait::{self, Poll};
use crate::aws::Aws;
use crate::progress::Progress;
use crate::util::fmt_duration;

use super::jenkins::Jenkins;

/// What must be true of the group.
pub struct Expect<'a> {
    pub group: &'a str,
    pub ami: &'a str,
    /// Instances that do not count (the one just replaced).
    pub not: &'a [String],
    pub target_groups: &'a [(String, String)],
    /// Jenkins' version (`X-Jenkins`) to expect, if known.
    pub jenkins_version: Option<&'a str>,
}

#[derive(Debug, Clone)]
pub struct Serving {
    pub instance_id: String,
    pub jenkins_version: String,
    /// When Jenkins first answered through the load balancer.
    pub first_good: Instant,
}

/// Polls until everything in `expect` holds, or `deadline`. Err: what did not hold.
pub async fn serving(
    aws: &Aws,
    jenkins: &Jenkins,
    expect: &Expect<'_>,
    deadline: Duration,
    progress: &Progress,
) -> Result<Serving, String> {
    let t0 = Instant::now();
    let r = wait::until(
        deadline,
        Duration::from_secs(2),
        |s| progress.info("verifying", &format!("verifying: {s}")),
        || check(aws, jenkins, expect),
    )
    .await;
    match r {
        Ok(Ok(s)) => Ok(s),
        Ok(Err(fatal)) => Err(fatal),
        Err(last) => Err(format!(
            "not serving after {}: {last}",
            fmt_duration(t0.elapsed().max(deadline))
        )),
    }
}

async fn check(aws: &Aws, jenkins: &Jenkins, e: &Expect<'_>) -> Result<Poll<Serving>, String> {
    let pending = |s: String| Ok(Poll::Pending(s));
    let group = match aws.asg.group(e.group).await {
        Ok(Some(g)) => g,
        Ok(None) => return Err(format!("group {} no longer exists", e.group)),
        Err(err) => return pending(err.to_string()),
    };
    let candidates: Vec<_> = group
        .instances
        .iter()
        .filter(|i| !e.not.contains(&i.id) && !i.lifecycle.starts_with("Terminat"))
        .collect();
    let Some(inst) = candidates
        .iter()
        .find(|i| i.lifecycle == "InService")
        .or(candidates.first())
    else {
        return pending(format!(
            "group {} has not launched a replacement yet",
            e.group
        ));
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
        return Err(format!(
            "the group launched {} from {}, not {}",
            i.id, i.image_id, e.ami
        ));
    }
    for (arn, name) in e.target_groups {
        let health = match aws.elb.target_health(arn).await {
            Ok(h) => h,
            Err(err) => return pending(err.to_string()),
        };
        // Only the new instance's own target counts: a terminated one's can still say healthy.
        match health.iter().find(|t| t.id == i.id) {
            None => return pending(format!("{} is not registered in target group {name}", i.id)),
            Some(t) if t.state != "healthy" => {
                return pending(format!(
                    "target {} in {name} is {}{}",
                    i.id,
                    t.state,
                    t.reason
                        .as_deref()
                        .map(|r| format!(" ({r})"))
                        .unwrap_or_default()
                ))
            }
            Some(_) => {}
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
