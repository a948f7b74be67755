//! The handover roll: the successor boots while the old controller still serves, and the
//! JENKINS_HOME lease passes from one to the other.

use crate::util::fmt_duration;

use super::error::{Error, Why};
use super::guard::{self, GroupExpect};
use super::steps::{self, stop};
use super::verify::{self, Expect};
use super::{Ctx, Rolled};

pub async fn run(ctx: &Ctx<'_>) -> Result<Rolled, Error> {
    let p = ctx.p;
    let plan = &p.plan;
    let group = &plan.group;
    let old = plan.instance_id.clone();
    let sizes = steps::original_sizes(ctx);
    let raised = crate::aws::asg::Sizes {
        min: sizes.min,
        max: sizes.max.max(2),
        desired: 2,
    };

    // 4. The new launch template version, the default, the group.
    let new_version = steps::new_version(ctx).await?;

    // 5. Nothing of the group's own may interfere; the old instance is never picked to scale in.
    steps::suspend(ctx).await?;
    let expect = GroupExpect {
        version: new_version.to_string(),
        sizes,
    };
    let g = match guard::group(ctx, &expect).await {
        Ok(g) => g,
        Err(why) => return Err(stop(ctx, why).await),
    };
    let protected = g.instances.iter().any(|i| i.id == old && i.protected);
    if !protected {
        ctx.journal.update(|j| j.protected_old = true);
        if let Err(e) = ctx.aws.asg.protect(group, &old, true).await {
            return Err(stop(ctx, e.into()).await);
        }
    }

    // 6. Two instances: the successor boots while the old controller serves.
    if let Err(why) = guard::group(ctx, &expect).await {
        return Err(stop(ctx, why).await);
    }
    ctx.journal.update(|j| j.sizes_was = Some(sizes));
    if let Err(e) = ctx
        .aws
        .asg
        .set_capacity(group, raised.max, raised.desired)
        .await
    {
        return Err(stop(ctx, e.into()).await);
    }
    ctx.progress.info(
        "successor",
        &format!(
            "group {group} is at {raised}: it launches the new controller from version {new_version} while {old} serves"
        ),
    );
    let tgs = p.target_groups();
    let journal = ctx.journal;
    let seen = move |id: &str| {
        let id = id.to_string();
        journal.update(move |j| j.successor = Some(id));
    };
    let successor = match verify::successor_ready(
        ctx.aws,
        group,
        &old,
        &plan.new.id,
        &tgs,
        ctx.opts.health_timeout,
        ctx.progress,
        ctx.opts.no_drain,
        &seen,
    )
    .await
    {
        Ok(s) => s,
        Err(e) => {
            let why = Why::Successor(format!("the new controller is not ready to take over: {e}"));
            return Err(stop(ctx, why).await);
        }
    };
    ctx.progress.info(
        "successor",
        &format!(
            "{successor} runs {} and its Jenkins waits for the JENKINS_HOME lease",
            plan.new.id
        ),
    );

    // 7. Drain, then stop the old Jenkins: the lease passes to the successor.
    let drain_started = std::time::Instant::now();
    let drained = match steps::drain(ctx).await {
        Ok(d) => d,
        Err(why) => return Err(stop(ctx, why).await),
    };
    let drain_ms = drain_started.elapsed().as_millis();
    let before = match steps::stop_old(ctx, drained).await {
        Ok(b) => b,
        Err(why) => return Err(stop(ctx, why).await),
    };

    // 8. Verify: the successor serves the same JENKINS_HOME, the old target is out.
    let not = vec![old.clone()];
    let expect_serving = Expect {
        group,
        ami: &plan.new.id,
        not: &not,
        instance: Some(&successor),
        gone: &not,
        target_groups: &tgs,
        jenkins_version: p.expected_version.as_deref(),
        identity: p.identity_before.as_deref(),
    };
    let served = match verify::serving(
        ctx.aws,
        &p.jenkins,
        &expect_serving,
        ctx.opts.health_timeout,
        ctx.progress,
    )
    .await
    {
        Ok(s) => s,
        Err(why) => {
            ctx.progress.warn(&format!(
                "verification failed: {why}; rolling back to {old} ({})",
                plan.current.id
            ));
            let restored = steps::put_back(ctx).await;
            return Err(Error::RolledBack {
                new_ami: plan.new.id.clone(),
                why,
                restored,
            });
        }
    };
    ctx.journal.update(|j| j.verified = true);
    let downtime_ms = before.map(|b| served.first_good.duration_since(b).as_millis());
    ctx.progress.info(
        "verified",
        &format!(
            "{} serves Jenkins {} with the same JENKINS_HOME{}",
            served.instance_id,
            served.jenkins_version,
            downtime_ms
                .map(|ms| format!(
                    " (downtime {})",
                    fmt_duration(std::time::Duration::from_millis(ms as u64))
                ))
                .unwrap_or_default()
        ),
    );

    // 9. The old instance goes, lowering the desired capacity; sizes and processes as before.
    if let Err(why) = guard::group(
        ctx,
        &GroupExpect {
            version: new_version.to_string(),
            sizes: raised,
        },
    )
    .await
    {
        ctx.progress.warn(&format!(
            "{why}; the new controller serves, so jbake finishes the roll"
        ));
    }
    ctx.progress.info(
        "finishing",
        &format!("terminating {old}, lowering the desired capacity of group {group}"),
    );
    let restored = steps::put_back(ctx).await;
    if !restored.failed.is_empty() {
        return Err(Error::RolledBack {
            new_ami: plan.new.id.clone(),
            why: "the new controller serves, but finishing the roll failed".to_string(),
            restored,
        });
    }
    let now = ctx.aws.asg.group(group).await?;
    let final_sizes = now.as_ref().map(|g| g.sizes()).unwrap_or(sizes);
    if final_sizes != sizes {
        ctx.progress.warn(&format!(
            "group {group} is at {final_sizes}, not {sizes} as before the roll: something else changed it"
        ));
    }
    Ok(Rolled {
        group: group.clone(),
        strategy: plan.strategy,
        old_instance: old,
        new_instance: served.instance_id,
        old_ami: plan.current.id.clone(),
        new_ami: plan.new.id.clone(),
        new_image_name: plan.new.name.clone(),
        launch_template: plan.template_id.clone(),
        launch_template_version: new_version,
        jenkins_version: served.jenkins_version,
        same_identity: p.identity_before.is_some(),
        drain_ms,
        downtime_ms,
        sizes: final_sizes,
    })
}
