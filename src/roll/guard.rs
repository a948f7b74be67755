//! Before each write, the group and the launch template are read again: a change made by
//! someone else since discovery (while the confirmation prompt waited, or during the roll)
//! stops the roll instead of being silently undone by jbake writing back what it read.

use crate::aws::asg::{GroupInfo, Sizes};

use super::error::Why;
use super::Ctx;

fn changed(what: impl Into<String>, was: impl ToString, now: impl ToString) -> Why {
    Why::Changed {
        what: what.into(),
        was: was.to_string(),
        now: now.to_string(),
    }
}

/// The launch template: the version the roll copies still holds the data read at discovery,
/// and the default and latest versions are the ones expected.
pub async fn template(ctx: &Ctx<'_>, default: i64, latest: i64) -> Result<(), Why> {
    let d = &ctx.p.discovered;
    let id = &d.template.id;
    let lt = &ctx.aws.lt;
    let current = lt.version(id, &d.current.number.to_string()).await?;
    let Some(current) = current else {
        return Err(changed(
            format!("launch template {id} version {}", d.current.number),
            "there",
            "deleted",
        ));
    };
    let diff = crate::aws::launch_template::differences(&d.current.data, &current.data);
    if !diff.is_empty() || current.image_id != d.current.image_id {
        return Err(changed(
            format!("launch template {id} version {}", d.current.number),
            "as read",
            format!("different in {}", {
                let mut f = diff;
                if current.image_id != d.current.image_id {
                    f.insert(0, "ImageId".to_string());
                }
                f.join(", ")
            }),
        ));
    }
    let now_default = lt
        .version(id, "$Default")
        .await?
        .map(|v| v.number)
        .unwrap_or(0);
    if now_default != default {
        return Err(changed(
            format!("the default version of launch template {id}"),
            default,
            now_default,
        ));
    }
    let now_latest = lt
        .version(id, "$Latest")
        .await?
        .map(|v| v.number)
        .unwrap_or(0);
    if now_latest != latest {
        return Err(changed(
            format!("the latest version of launch template {id}"),
            latest,
            now_latest,
        ));
    }
    Ok(())
}

/// What the group must look like before the next write.
pub struct GroupExpect {
    /// The launch template version the group names.
    pub version: String,
    pub sizes: Sizes,
}

/// The processes suspended now: those at discovery and those this roll suspended.
fn suspended(ctx: &Ctx<'_>) -> Vec<String> {
    let mut s = ctx.p.discovered.group.suspended.clone();
    for p in ctx.journal.get().suspended {
        if !s.contains(&p) {
            s.push(p);
        }
    }
    s.sort();
    s
}

/// The group: same launch template and version, same sizes, same suspended processes. Ok: the
/// group as read.
pub async fn group(ctx: &Ctx<'_>, expect: &GroupExpect) -> Result<GroupInfo, Why> {
    let d = &ctx.p.discovered;
    let name = &d.group.name;
    let g = ctx
        .aws
        .asg
        .group(name)
        .await?
        .ok_or_else(|| changed(format!("Auto Scaling group {name}"), "there", "deleted"))?;
    match &g.template {
        Some(t) if t.id == d.template.id && t.version == expect.version => {}
        Some(t) => {
            return Err(changed(
                format!("the launch template of group {name}"),
                format!("{} version {}", d.template.id, expect.version),
                format!("{} version {}", t.id, t.version),
            ))
        }
        None => {
            return Err(changed(
                format!("the launch template of group {name}"),
                &d.template.id,
                "none",
            ))
        }
    }
    if g.sizes() != expect.sizes {
        return Err(changed(
            format!("the sizes of group {name}"),
            expect.sizes,
            g.sizes(),
        ));
    }
    let want = suspended(ctx);
    if g.suspended != want {
        let show = |v: &[String]| {
            if v.is_empty() {
                "none".to_string()
            } else {
                v.join(", ")
            }
        };
        return Err(changed(
            format!("the suspended processes of group {name}"),
            show(&want),
            show(&g.suspended),
        ));
    }
    Ok(g)
}

/// The version the group names now, as far as this roll knows.
pub fn group_version(ctx: &Ctx<'_>) -> String {
    let j = ctx.journal.get();
    match (j.group_was.is_some(), j.new_version) {
        (true, Some(v)) => v.to_string(),
        _ => ctx.p.discovered.template.version.clone(),
    }
}
