//! The steps both strategies share, each recorded in the journal the moment it is made, and
//! [`put_back`]: the one way back from any phase.

use std::time::{Duration, Instant};

use crate::aws::asg::Sizes;
use crate::util::fmt_duration;

use super::error::{Error, Restored, Why};
use super::guard::{self, GroupExpect};
use super::verify::{self, Expect};
use super::{Ctx, Strategy};

/// How long a stopped Jenkins may take to stop answering through the load balancer.
pub const STOP_TIMEOUT: Duration = Duration::from_secs(300);

/// Stops the roll: puts back what it changed and says what happened.
pub async fn stop(ctx: &Ctx<'_>, why: Why) -> Error {
    ctx.progress
        .warn(&format!("{why}; putting everything back"));
    let restored = put_back(ctx).await;
    Error::Stopped { why, restored }
}

/// The sizes the group has before the roll changes them.
pub fn original_sizes(ctx: &Ctx<'_>) -> Sizes {
    ctx.p.discovered.group.sizes()
}

/// Step 4: the new launch template version (EC2's copy, read back and compared), the default,
/// the group. Ok: the new version number.
pub async fn new_version(ctx: &Ctx<'_>) -> Result<i64, Error> {
    let d = &ctx.p.discovered;
    let plan = &ctx.p.plan;
    let template = &d.template.id;
    let expect_group = GroupExpect {
        version: d.template.version.clone(),
        sizes: original_sizes(ctx),
    };
    // Read again right before the first write: a change made while the plan was shown (or the
    // confirmation prompt waited) stops the roll here, with nothing changed.
    if let Err(why) = guard::template(ctx, d.default_version, d.latest_version).await {
        return Err(stop(ctx, why).await);
    }
    if let Err(why) = guard::group(ctx, &expect_group).await {
        return Err(stop(ctx, why).await);
    }
    let description = format!(
        "jbake roll to {} version {} from {}",
        plan.new.id,
        plan.new.version.as_deref().unwrap_or("unknown"),
        plan.current.id
    );
    let new_version = ctx
        .aws
        .lt
        .create_version_with_image(&d.source, &plan.new.id, &description)
        .await?;
    ctx.journal.update(|j| j.new_version = Some(new_version));
    ctx.progress.info(
        "template",
        &format!(
            "created launch template {template} version {new_version} from version {} (EC2's copy, ImageId {})",
            d.source.number, plan.new.id
        ),
    );
    let copy_problem = |problem: String| Why::Copy {
        template_id: template.clone(),
        version: new_version,
        problem,
    };
    let written = match ctx.aws.lt.version(template, &new_version.to_string()).await {
        Ok(Some(w)) => w,
        Ok(None) => return Err(stop(ctx, copy_problem("cannot be read back".into())).await),
        Err(e) => return Err(stop(ctx, copy_problem(format!("cannot be read back: {e}"))).await),
    };
    let diff = crate::aws::launch_template::differences(&d.source.data, &written.data);
    if !diff.is_empty() || written.image_id.as_deref() != Some(plan.new.id.as_str()) {
        let what = if diff.is_empty() {
            format!(
                "holds ImageId {}, not {}",
                written.image_id.as_deref().unwrap_or("none"),
                plan.new.id
            )
        } else {
            format!(
                "does not hold version {}'s data (it differs in {})",
                d.source.number,
                diff.join(", ")
            )
        };
        return Err(stop(ctx, copy_problem(what)).await);
    }
    if let Err(why) = guard::template(ctx, d.default_version, new_version).await {
        return Err(stop(ctx, why).await);
    }
    ctx.journal
        .update(|j| j.default_was = Some(d.default_version));
    if let Err(e) = ctx.aws.lt.set_default_version(template, new_version).await {
        return Err(stop(ctx, e.into()).await);
    }
    if let Err(why) = guard::group(ctx, &expect_group).await {
        return Err(stop(ctx, why).await);
    }
    ctx.journal.update(|j| {
        let latest = d.template.version == "$Latest";
        j.group_named_latest = latest;
        j.group_was = Some(if latest {
            d.current.number.to_string()
        } else {
            d.template.version.clone()
        })
    });
    if let Err(e) = ctx
        .aws
        .asg
        .set_template_version(&d.group.name, template, &new_version.to_string())
        .await
    {
        return Err(stop(ctx, e.into()).await);
    }
    ctx.progress.info(
        "template",
        &format!(
            "version {new_version} is the default; group {} now launches from version {new_version}",
            d.group.name
        ),
    );
    Ok(new_version)
}

/// Suspends the processes of the plan (recorded before the call: a lost answer must still be
/// resumed).
pub async fn suspend(ctx: &Ctx<'_>) -> Result<(), Error> {
    let plan = &ctx.p.plan;
    if plan.suspend.is_empty() {
        return Ok(());
    }
    let expect = GroupExpect {
        version: guard::group_version(ctx),
        sizes: original_sizes(ctx),
    };
    if let Err(why) = guard::group(ctx, &expect).await {
        return Err(stop(ctx, why).await);
    }
    ctx.journal.update(|j| j.suspended = plan.suspend.clone());
    if let Err(e) = ctx.aws.asg.suspend(&plan.group, &plan.suspend).await {
        return Err(stop(ctx, e.into()).await);
    }
    ctx.progress.info(
        "suspended",
        &format!(
            "suspended {} of group {} for the roll",
            plan.suspend.join(", "),
            plan.group
        ),
    );
    Ok(())
}

/// Quiet-down, then wait until no build runs. Ok: when Jenkins last answered `/login` (None
/// if it did not).
pub async fn drain(ctx: &Ctx<'_>) -> Result<Option<Instant>, Why> {
    let j = &ctx.p.jenkins;
    let opts = ctx.opts;
    if opts.no_drain {
        ctx.progress.warn(&format!(
            "--no-drain: Jenkins at {} is not put in quiet-down; builds still running on it are lost",
            j.url()
        ));
        let login = j.login().await.ok().filter(|l| l.is_up());
        return Ok(login.map(|_| Instant::now()));
    }
    // Recorded before the request: a quiet-down whose answer was lost must still be cancelled.
    ctx.journal.update(|s| s.quiet_down = true);
    if let Err(e) = j.quiet_down().await {
        if e.not_sent() {
            ctx.journal.update(|s| s.quiet_down = false);
        }
        return Err(Why::QuietDown(e));
    }
    ctx.progress.info(
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
            .map_err(Why::Busy)?
            .ignoring(&opts.ignore_builds);
        if busy.count == 0 {
            // The last good answer, then one more look at the executors.
            let login = j.login().await.ok().filter(|l| l.is_up());
            let at = Instant::now();
            let again = j
                .busy()
                .await
                .map_err(Why::Busy)?
                .ignoring(&opts.ignore_builds);
            if again.count == 0 {
                if login.is_none() {
                    ctx.progress.warn(
                        "Jenkins did not answer /login after the drain: the downtime cannot be measured",
                    );
                }
                ctx.progress.info(
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
            ctx.progress.info("draining", &format!("waiting: {state}"));
            last = state.clone();
        }
        if t0.elapsed() >= opts.drain_timeout {
            return Err(Why::DrainTimeout {
                after: opts.drain_timeout,
                busy: state,
            });
        }
        tokio::time::sleep(interval.min(opts.drain_timeout.saturating_sub(t0.elapsed()))).await;
        interval = (interval * 2).min(Duration::from_secs(10));
    }
}

/// Tells the old Jenkins to stop (`/safeExit`: it saves its queue and exits, releasing the
/// JENKINS_HOME lease; with `--no-drain`, `/exit` if it answers at all). Ok: the last good
/// `/login` before (None: Jenkins did not answer).
pub async fn stop_old(ctx: &Ctx<'_>, drained: Option<Instant>) -> Result<Option<Instant>, Why> {
    let j = &ctx.p.jenkins;
    let before = match j.login().await {
        Ok(l) if l.is_up() => Some(Instant::now()),
        _ => drained,
    };
    if ctx.opts.no_drain && before.is_none() {
        // Jenkins does not answer: there is nothing to stop.
        return Ok(None);
    }
    ctx.journal.update(|s| s.old_stopping = true);
    // `/safeExit` waits for every running build; the builds the drain was told to ignore (the
    // Jenkins build running this roll) would keep it waiting for ever, so then the drain has
    // already made sure nothing else runs, and `/exit` stops it at once (a pipeline build is
    // saved and resumes on the new controller).
    let sent = if ctx.opts.no_drain || !ctx.opts.ignore_builds.is_empty() {
        j.exit().await
    } else {
        j.safe_exit().await
    };
    if let Err(e) = sent {
        if e.not_sent() {
            ctx.journal.update(|s| s.old_stopping = false);
            return Err(Why::Successor(format!("cannot stop the old Jenkins: {e}")));
        }
        // Sent, but the answer was lost (Jenkins may close the connection as it exits): what
        // it does next is seen through the load balancer.
        ctx.progress.warn(&format!(
            "no clean answer to the stop ({e}); watching whether Jenkins stops"
        ));
    }
    ctx.journal.update(|s| s.quiet_down = false);
    ctx.progress.info(
        "stopping",
        &format!(
            "the old Jenkins at {} is stopping (POST /safeExit): it releases the JENKINS_HOME lease",
            j.url()
        ),
    );
    Ok(before)
}

/// The group's instances other than `old` that are not terminating.
async fn others(ctx: &Ctx<'_>, old: &str) -> Result<Vec<String>, String> {
    let g = ctx
        .aws
        .asg
        .group(&ctx.p.plan.group)
        .await
        .map_err(|e| e.to_string())?
        .ok_or_else(|| format!("group {} no longer exists", ctx.p.plan.group))?;
    Ok(g.instances
        .into_iter()
        .filter(|i| i.id != old && !i.lifecycle.starts_with("Terminat"))
        .map(|i| i.id)
        .collect())
}

/// The handover's way back once the old Jenkins was told to stop: stop the successor's
/// Jenkins if the load balancer routes to it (it holds the lease), remove the successor, and
/// wait until the old controller serves the same JENKINS_HOME again (its lease wrapper takes
/// the home back once it is free).
async fn bring_back_old(ctx: &Ctx<'_>, r: &mut Restored) {
    let p = ctx.p;
    let old = p.plan.instance_id.clone();
    ctx.journal.update(|j| j.rolling_back = true);
    let successors = match others(ctx, &old).await {
        Ok(s) => s,
        Err(e) => {
            r.failed.push(format!("finding the new instance: {e}"));
            ctx.journal.get().successor.into_iter().collect()
        }
    };
    let tgs = p.target_groups();
    // Stop the successor's Jenkins when the load balancer surely routes to it: its target is
    // healthy, the old one's is not, and it answers with the same identity (it holds this
    // home's lease). Otherwise its termination stops it.
    let mut routed = !successors.is_empty() && !tgs.is_empty();
    for (arn, _) in &tgs {
        match ctx.aws.elb.target_health(arn).await {
            Ok(h) => {
                let healthy = |id: &str| h.iter().any(|t| t.id == id && t.state == "healthy");
                routed &= successors.iter().any(|s| healthy(s)) && !healthy(&old);
            }
            Err(_) => routed = false,
        }
    }
    if routed {
        if let Ok(l) = p.jenkins.login().await {
            if l.is_up() && l.identity.is_some() && l.identity == p.identity_before {
                match p.jenkins.safe_exit().await {
                    Ok(()) => done(ctx, r, "stopped the new controller's Jenkins (POST /safeExit): it releases the JENKINS_HOME lease".to_string()),
                    Err(e) => ctx.progress.warn(&format!(
                        "could not stop the new Jenkins ({e}); its instance's termination stops it"
                    )),
                }
            }
        }
    }
    for id in &successors {
        ctx.progress.info(
            "rollback",
            &format!("terminating the new controller {id}, lowering the desired capacity"),
        );
        match ctx.aws.asg.terminate_decrementing(id).await {
            Ok(()) => done(ctx, r, format!("terminated the new controller {id}")),
            Err(e) => r.failed.push(e.to_string()),
        }
    }
    ctx.progress.info(
        "rollback",
        &format!(
            "waiting until {old} serves the JENKINS_HOME again (its Jenkins takes the lease back)"
        ),
    );
    let not: Vec<String> = Vec::new();
    let expect = Expect {
        group: &p.plan.group,
        ami: &p.plan.current.id,
        not: &not,
        instance: Some(&old),
        gone: &successors,
        target_groups: &tgs,
        jenkins_version: p.jenkins_before.as_deref(),
        identity: p.identity_before.as_deref(),
    };
    match verify::serving(ctx.aws, &p.jenkins, &expect, ctx.opts.health_timeout, ctx.progress).await {
        Ok(s) => done(ctx, r, format!(
            "{} serves again (Jenkins {}, the same JENKINS_HOME)",
            s.instance_id, s.jenkins_version
        )),
        Err(e) => r.failed.push(format!(
            "{old} does not serve again: {e} (check `journalctl -u jenkins` on it: its Jenkins takes the lease back once no other controller holds it)"
        )),
    }
}

/// Records (and shows) one thing put back.
fn done(ctx: &Ctx<'_>, r: &mut Restored, what: String) {
    ctx.progress.info("restored", &what);
    r.done.push(what);
}

/// Puts back what the journal says this roll changed, from any phase. A handover whose new
/// controller was verified is finished instead (the old instance removed). Whatever happens:
/// the group's sizes and processes as they were.
pub async fn put_back(ctx: &Ctx<'_>) -> Restored {
    let mut restored = Restored::default();
    let r = &mut restored;
    let p = ctx.p;
    let group = &p.plan.group;
    let old = p.plan.instance_id.clone();
    let j = ctx.journal.get();
    let mut keep_new_version = false;
    match ctx.opts.strategy {
        Strategy::Handover => {
            if j.verified && !j.old_terminated {
                // A termination already sent (its answer cut off by Ctrl-C) may have happened.
                let gone = match ctx.aws.asg.group(group).await {
                    Ok(Some(g)) => !g
                        .instances
                        .iter()
                        .any(|i| i.id == old && !i.lifecycle.starts_with("Terminat")),
                    _ => false,
                };
                let result = if gone {
                    Ok(())
                } else {
                    ctx.aws.asg.terminate_decrementing(&old).await
                };
                match result {
                    Ok(()) => {
                        ctx.journal.update(|j| j.old_terminated = true);
                        done(
                            ctx,
                            r,
                            format!(
                                "the new controller was verified: terminated the old one, {old}"
                            ),
                        );
                    }
                    Err(e) => r.failed.push(e.to_string()),
                }
            }
            let j = ctx.journal.get();
            keep_new_version = j.old_terminated;
            if !j.old_terminated {
                if j.old_stopping {
                    bring_back_old(ctx, r).await;
                } else {
                    if j.quiet_down {
                        cancel_quiet_down(ctx, r).await;
                    }
                    match others(ctx, &old).await {
                        Ok(ids) => {
                            for id in ids {
                                match ctx.aws.asg.terminate_decrementing(&id).await {
                                    Ok(()) => done(ctx, r, format!(
                                        "terminated the new controller {id} (the old one kept serving)"
                                    )),
                                    Err(e) => r.failed.push(e.to_string()),
                                }
                            }
                        }
                        Err(e) => r.failed.push(format!("finding the new instance: {e}")),
                    }
                }
            }
            if let Some(was) = j.sizes_was {
                // Also scales in a launch still in flight: the old instance is protected.
                match ctx.aws.asg.set_capacity(group, was.max, was.desired).await {
                    Ok(()) => {
                        done(ctx, r, format!("group {group} is at {was} again"));
                        if !ctx.journal.get().old_terminated {
                            converge(ctx, &old, was.desired, r).await;
                        }
                    }
                    Err(e) => r.failed.push(e.to_string()),
                }
            }
            if j.protected_old && !ctx.journal.get().old_terminated {
                match ctx.aws.asg.protect(group, &old, false).await {
                    Ok(()) => r
                        .done
                        .push(format!("{old} is no longer protected from scale-in")),
                    Err(e) => r.failed.push(e.to_string()),
                }
            }
        }
        Strategy::Replace => {
            if j.old_terminated {
                keep_new_version = !j.rolling_back;
            } else if j.old_stopping {
                // The old Jenkins was told to stop: replacing it is the way on (and back).
                match ctx.aws.asg.terminate_keeping_capacity(&old).await {
                    Ok(()) => {
                        ctx.journal.update(|j| j.old_terminated = true);
                        keep_new_version = true;
                        done(ctx, r, format!(
                            "the old Jenkins was stopping: terminated {old}, the group launches the new controller"
                        ));
                    }
                    Err(e) => r.failed.push(e.to_string()),
                }
            } else if j.quiet_down {
                cancel_quiet_down(ctx, r).await;
            }
        }
    }
    if !j.suspended.is_empty() {
        match ctx.aws.asg.resume(group, &j.suspended).await {
            Ok(()) => {
                ctx.journal.update(|j| j.suspended.clear());
                done(ctx, r, format!("resumed {}", j.suspended.join(", ")));
            }
            Err(e) => r.failed.push(e.to_string()),
        }
    }
    if !keep_new_version {
        restore_template(ctx, r).await;
    }
    r.state = state_sentence(ctx, keep_new_version, r);
    restored
}

/// After the sizes were put back: an instance whose launch was under way when the roll was
/// interrupted can show up in the group only now. The group removes what exceeds its desired
/// capacity by itself; jbake checks for a while and removes such an instance itself (keeping
/// the capacity: it is above the desired one), never the one that serves.
async fn converge(ctx: &Ctx<'_>, keep: &str, desired: i32, r: &mut Restored) {
    let group = &ctx.p.plan.group;
    let t0 = Instant::now();
    loop {
        let Ok(Some(g)) = ctx.aws.asg.group(group).await else {
            return;
        };
        let live: Vec<String> = g
            .instances
            .iter()
            .filter(|i| !i.lifecycle.starts_with("Terminat"))
            .map(|i| i.id.clone())
            .collect();
        let extra: Vec<&String> = live.iter().filter(|i| i.as_str() != keep).collect();
        if i32::try_from(live.len()).unwrap_or(i32::MAX) <= desired || extra.is_empty() {
            if t0.elapsed() >= Duration::from_secs(3) {
                return;
            }
        } else {
            for id in extra {
                match ctx.aws.asg.terminate_keeping_capacity(id).await {
                    Ok(()) => done(
                        ctx,
                        r,
                        format!("terminated {id}, launched as the roll was interrupted"),
                    ),
                    Err(e) => r.failed.push(e.to_string()),
                }
            }
            return;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

async fn cancel_quiet_down(ctx: &Ctx<'_>, r: &mut Restored) {
    match ctx.p.jenkins.cancel_quiet_down().await {
        Ok(()) => {
            ctx.journal.update(|j| j.quiet_down = false);
            done(ctx, r, "cancelled Jenkins' quiet-down".to_string());
        }
        Err(e) => r.failed.push(format!("cancel quiet-down: {e}")),
    }
}

/// The group's launch template version and the template's default, as they were.
async fn restore_template(ctx: &Ctx<'_>, r: &mut Restored) {
    let d = &ctx.p.discovered;
    let j = ctx.journal.get();
    if let Some(version) = &j.group_was {
        match ctx
            .aws
            .asg
            .set_template_version(&d.group.name, &d.template.id, version)
            .await
        {
            Ok(()) => {
                ctx.journal.update(|j| j.group_was = None);
                done(
                    ctx,
                    r,
                    format!(
                        "group {} is back on launch template {} version {version}{}",
                        d.group.name,
                        d.template.id,
                        if j.group_named_latest {
                            " (it named $Latest, which is now the unused new version: it names the version $Latest meant before explicitly)"
                        } else {
                            ""
                        }
                    ),
                );
            }
            Err(e) => r.failed.push(e.to_string()),
        }
    }
    if let Some(version) = j.default_was {
        match ctx
            .aws
            .lt
            .set_default_version(&d.template.id, version)
            .await
        {
            Ok(()) => {
                ctx.journal.update(|j| j.default_was = None);
                done(
                    ctx,
                    r,
                    format!(
                        "launch template {}'s default version is {version} again",
                        d.template.id
                    ),
                );
            }
            Err(e) => r.failed.push(e.to_string()),
        }
    }
}

fn state_sentence(ctx: &Ctx<'_>, forward: bool, r: &Restored) -> String {
    let p = ctx.p;
    let j = ctx.journal.get();
    let region = &ctx.aws.region;
    let group = &p.plan.group;
    let status = format!("`jbake status --region {region} --asg {group}`");
    let unused = j
        .new_version
        .map(|v| format!(" (launch template version {v} stays, unused)"))
        .unwrap_or_default();
    let fine = r.failed.is_empty();
    match (ctx.opts.strategy, forward) {
        (Strategy::Handover, true) => format!(
            "the new controller serves and {} was removed; group {group} is at {}{}",
            p.plan.instance_id,
            original_sizes(ctx),
            if fine {
                String::new()
            } else {
                format!("; check it with {status}")
            }
        ),
        (Strategy::Handover, false) if j.old_stopping => format!(
            "rolled back: {} serves the JENKINS_HOME again, the new instance was removed, group {group} is at {} with its processes resumed and its launch template as before{unused}{}",
            p.plan.instance_id,
            original_sizes(ctx),
            if fine { String::new() } else { format!(". Check with {status}") }
        ),
        (Strategy::Handover, false) => format!(
            "nothing was replaced: {} kept serving, Jenkins is not left in quiet-down, group {group} is at {} with its processes resumed and its launch template as before{unused}",
            p.plan.instance_id,
            original_sizes(ctx)
        ),
        (Strategy::Replace, true) => format!(
            "{} was terminated; group {group} points at launch template {} version {} ({}) and launches (or has launched) the new controller from it. To see where it is: {status}. To roll back to {}: `jbake roll --region {region} --asg {group} --ami {} --strategy replace --yes`",
            p.plan.instance_id,
            p.plan.template_id,
            j.new_version.unwrap_or(p.plan.new_version),
            p.plan.new.id,
            p.plan.current.id,
            p.plan.current.id
        ),
        (Strategy::Replace, false) => format!(
            "nothing was replaced: Jenkins is not left in quiet-down, and group {group} and the template's default are as they were{unused}"
        ),
    }
}
