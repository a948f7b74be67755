//! The one-instance roll (`--strategy replace`): the old Jenkins stops (and with it its hold on
//! the JENKINS_HOME lease), then the group replaces the instance. For groups that cannot run a
//! second instance (a fixed network interface or private IP address in the launch template),
//! and for the first roll from an image without the lease.

use std::time::Instant;

use crate::util::fmt_duration;

use super::error::{Error, Restored, Why};
use super::guard::{self, GroupExpect};
use super::steps::{self, stop, STOP_TIMEOUT};
use super::verify::{self, Expect};
use super::{Ctx, Rolled};

pub async fn run(ctx: &Ctx<'_>) -> Result<Rolled, Error> {
    let p = ctx.p;
    let plan = &p.plan;
    let group = &plan.group;
    let old = plan.instance_id.clone();
    let sizes = steps::original_sizes(ctx);

    let new_version = steps::new_version(ctx).await?;
    steps::suspend(ctx).await?;

    let drain_started = Instant::now();
    let drained = match steps::drain(ctx).await {
        Ok(d) => d,
        Err(why) => return Err(stop(ctx, why).await),
    };
    let drain_ms = drain_started.elapsed().as_millis();
    if let Err(why) = guard::group(
        ctx,
        &GroupExpect {
            version: new_version.to_string(),
            sizes,
        },
    )
    .await
    {
        return Err(stop(ctx, why).await);
    }
    let mut before = match steps::stop_old(ctx, drained).await {
        Ok(b) => b,
        Err(why) => return Err(stop(ctx, why).await),
    };
    if ctx.journal.get().old_stopping {
        match verify::stopped(
            &p.jenkins,
            p.identity_before.as_deref(),
            STOP_TIMEOUT,
            ctx.progress,
        )
        .await
        {
            Ok(down) => {
                ctx.progress.info(
                    "stopped",
                    "the old Jenkins no longer serves: the JENKINS_HOME lease is free",
                );
                // The downtime starts when it stopped serving, at the latest.
                before = Some(before.map_or(down, |b| b.min(down)));
            }
            Err(e) => {
                let why = Why::NotStopped {
                    after: STOP_TIMEOUT,
                    last: e,
                };
                return Err(stop(ctx, why).await);
            }
        }
    }

    ctx.journal.update(|j| j.old_terminated = true);
    ctx.progress.info(
        "replacing",
        &format!("terminating {old}: group {group} launches the new controller"),
    );
    if let Err(e) = ctx.aws.asg.terminate_keeping_capacity(&old).await {
        ctx.journal.update(|j| j.old_terminated = false);
        return Err(stop(ctx, e.into()).await);
    }

    let tgs = p.target_groups();
    let not = vec![old.clone()];
    let expect = Expect {
        group,
        ami: &plan.new.id,
        not: &not,
        instance: None,
        gone: &[],
        target_groups: &tgs,
        jenkins_version: p.expected_version.as_deref(),
        identity: p.identity_before.as_deref(),
    };
    match verify::serving(
        ctx.aws,
        &p.jenkins,
        &expect,
        ctx.opts.health_timeout,
        ctx.progress,
    )
    .await
    {
        Ok(s) => {
            ctx.journal.update(|j| j.verified = true);
            let restored = steps::put_back(ctx).await;
            if !restored.failed.is_empty() {
                return Err(Error::RolledBack {
                    new_ami: plan.new.id.clone(),
                    why: "the new controller serves, but finishing the roll failed".to_string(),
                    restored,
                });
            }
            Ok(Rolled {
                group: group.clone(),
                strategy: plan.strategy,
                old_instance: old,
                new_instance: s.instance_id,
                old_ami: plan.current.id.clone(),
                new_ami: plan.new.id.clone(),
                new_image_name: plan.new.name.clone(),
                launch_template: plan.template_id.clone(),
                launch_template_version: new_version,
                jenkins_version: s.jenkins_version,
                same_identity: p.identity_before.is_some(),
                drain_ms,
                downtime_ms: before.map(|b| s.first_good.duration_since(b).as_millis()),
                sizes,
            })
        }
        Err(why) => Err(rollback(ctx, &why).await),
    }
}

/// The new controller does not serve: the group goes back to the old version and replaces the
/// new instance; the old AMI must serve the same JENKINS_HOME again.
async fn rollback(ctx: &Ctx<'_>, why: &str) -> Error {
    let p = ctx.p;
    let plan = &p.plan;
    let d = &p.discovered;
    let group = &plan.group;
    ctx.journal.update(|j| j.rolling_back = true);
    ctx.progress.warn(&format!(
        "verification failed: {why}; rolling back to launch template version {} ({})",
        plan.from_version, plan.current.id
    ));
    let mut r = Restored::default();
    let steps = async {
        ctx.aws
            .lt
            .set_default_version(&d.template.id, d.default_version)
            .await?;
        ctx.journal.update(|j| j.default_was = None);
        let back = ctx
            .journal
            .get()
            .group_was
            .unwrap_or_else(|| plan.from_version.to_string());
        ctx.aws
            .asg
            .set_template_version(group, &d.template.id, &back)
            .await?;
        ctx.journal.update(|j| j.group_was = None);
        let bad: Vec<String> = ctx
            .aws
            .asg
            .group(group)
            .await?
            .map(|g| {
                g.instances
                    .into_iter()
                    .filter(|i| i.id != plan.instance_id && !i.lifecycle.starts_with("Terminat"))
                    .map(|i| i.id)
                    .collect()
            })
            .unwrap_or_default();
        for id in &bad {
            ctx.progress.info(
                "rollback",
                &format!("terminating {id}: the group launches the old controller again"),
            );
            ctx.aws.asg.terminate_keeping_capacity(id).await?;
        }
        Ok::<_, crate::aws::Error>(bad)
    };
    let bad = match steps.await {
        Ok(b) => {
            r.done.push(format!(
                "group {group} is back on launch template {} version {} and replaced {}",
                plan.template_id,
                plan.from_version,
                if b.is_empty() {
                    "nothing".to_string()
                } else {
                    b.join(", ")
                }
            ));
            b
        }
        Err(e) => {
            r.failed.push(e.to_string());
            Vec::new()
        }
    };
    let mut not = bad;
    not.push(plan.instance_id.clone());
    let tgs = p.target_groups();
    let expect = Expect {
        group,
        ami: &plan.current.id,
        not: &not,
        instance: None,
        gone: &[],
        target_groups: &tgs,
        jenkins_version: p.jenkins_before.as_deref(),
        identity: p.identity_before.as_deref(),
    };
    match verify::serving(
        ctx.aws,
        &p.jenkins,
        &expect,
        ctx.opts.health_timeout,
        ctx.progress,
    )
    .await
    {
        Ok(s) => r.done.push(format!(
            "{} runs {} again (Jenkins {}, the same JENKINS_HOME)",
            s.instance_id, plan.current.id, s.jenkins_version
        )),
        Err(e) => r.failed.push(format!(
            "the rollback to {} did not verify either: {e}",
            plan.current.id
        )),
    }
    let suspended = ctx.journal.get().suspended;
    if !suspended.is_empty() {
        match ctx.aws.asg.resume(group, &suspended).await {
            Ok(()) => {
                ctx.journal.update(|j| j.suspended.clear());
                r.done.push(format!("resumed {}", suspended.join(", ")));
            }
            Err(e) => r.failed.push(e.to_string()),
        }
    }
    r.state = if r.failed.is_empty() {
        format!(
            "Rolled back: group {group} is on launch template {} version {} again and runs {} (within {})",
            plan.template_id,
            plan.from_version,
            plan.current.id,
            fmt_duration(ctx.opts.health_timeout)
        )
    } else {
        format!(
            "Group {group} points at launch template {} version {}; check `jbake status --region {} --asg {group}`",
            plan.template_id, plan.from_version, ctx.aws.region
        )
    };
    Error::RolledBack {
        new_ami: plan.new.id.clone(),
        why: why.to_string(),
        restored: r,
    }
}
