//! `format_plan`: the human-readable plan `jbake validate` prints. Secret values are masked
//! everywhere, including inside rendered commands and file contents.

use std::fmt::Write;

use super::plan::{Action, BaseImage, FileAttrs, Plan, Step, VarSource};
use super::values::format_duration;

pub fn format_plan(plan: &Plan) -> String {
    let mut o = String::new();
    let _ = writeln!(
        o,
        "recipe {} (schema version {})",
        plan.name, plan.schema_version
    );
    if let Some(d) = &plan.description {
        let _ = writeln!(o, "  {d}");
    }
    let _ = writeln!(o, "  file: {}", plan.file.display());
    let _ = writeln!(o);
    let image = match &plan.base.image {
        BaseImage::SsmParameter(p) => format!("AMI from SSM parameter {p}"),
        BaseImage::Ami(a) => format!("AMI {a}"),
        BaseImage::Filter {
            name,
            owners,
            most_recent,
        } => format!(
            "AMI named {name:?}{}{}",
            if owners.is_empty() {
                String::new()
            } else {
                format!(" owned by {}", owners.join(", "))
            },
            if *most_recent { ", most recent" } else { "" }
        ),
    };
    let _ = writeln!(o, "base:     {image}, ssh user {}", plan.base.ssh_user);
    let _ = writeln!(
        o,
        "instance: {}, {} GB root volume",
        plan.instance.instance_type, plan.instance.volume_gb
    );
    let _ = writeln!(o);
    let _ = writeln!(o, "variables:");
    let width = plan.vars.iter().map(|v| v.name.len()).max().unwrap_or(0);
    for v in &plan.vars {
        let (value, source) = match &v.source {
            VarSource::Default => (quote(v.display_value(), v.secret), "default".to_string()),
            VarSource::File(f) => (
                quote(v.display_value(), v.secret),
                format!("from {}", f.display()),
            ),
            VarSource::Image => (
                quote(v.display_value(), v.secret),
                "from the image's tags".to_string(),
            ),
            VarSource::CommandLine => {
                (quote(v.display_value(), v.secret), "from --var".to_string())
            }
            VarSource::Builtin => (quote(v.display_value(), v.secret), "built-in".to_string()),
            VarSource::Placeholder => (v.value.clone(), "known at build time".to_string()),
            VarSource::Unset => ("(no value)".to_string(), "optional, not set".to_string()),
        };
        let _ = writeln!(o, "  {:<width$} = {value} ({source})", v.name);
    }
    if !plan.tags.is_empty() {
        let _ = writeln!(o);
        let _ = writeln!(o, "image tags:");
        let width = plan.tags.iter().map(|(k, _)| k.len()).max().unwrap_or(0);
        for (k, v) in &plan.tags {
            let _ = writeln!(o, "  {k:<width$} = {v:?}");
        }
    }
    if !plan.facts.is_empty() {
        let _ = writeln!(o);
        let _ = writeln!(
            o,
            "image facts (tags read on the machine after the checks):"
        );
        for f in &plan.facts {
            let _ = writeln!(o, "  {} ({}):", f.key, f.origin);
            for line in mask(&f.script, &plan.secrets()).trim_end().lines() {
                let _ = writeln!(o, "    | {line}");
            }
        }
    }
    let secrets = plan.secrets();
    for (title, steps) in [("steps", &plan.steps), ("validate", &plan.validate)] {
        let _ = writeln!(o);
        if steps.is_empty() {
            let _ = writeln!(o, "{title}: none");
            continue;
        }
        let _ = writeln!(o, "{title}:");
        for s in steps {
            let _ = write!(o, "{}", mask(&step(s), &secrets));
        }
    }
    // Only recipes that have one: the boot test's checks (on a fresh instance of the image).
    if !plan.test.is_empty() {
        let _ = writeln!(o);
        let _ = writeln!(o, "test (on an instance booted from the image):");
        for s in &plan.test {
            let _ = write!(o, "{}", mask(&step(s), &secrets));
        }
    }
    o
}

fn quote(v: &str, secret: bool) -> String {
    if secret {
        v.to_string()
    } else {
        format!("{v:?}")
    }
}

fn mask(s: &str, secrets: &[String]) -> String {
    let mut out = s.to_string();
    for secret in secrets {
        out = out.replace(secret.as_str(), "<secret>");
    }
    out
}

fn step(s: &Step) -> String {
    let mut o = String::new();
    let _ = writeln!(
        o,
        "  {}. {} [{}]  ({}:{})",
        s.number,
        s.name,
        s.action.kind(),
        s.origin.file.display(),
        s.origin.line
    );
    let field = |o: &mut String, k: &str, v: &str| {
        if v.contains('\n') {
            let _ = writeln!(o, "       {k}:");
            for line in v.trim_end_matches('\n').lines() {
                let _ = writeln!(o, "         | {line}");
            }
        } else {
            let _ = writeln!(o, "       {k}: {v}");
        }
    };
    match &s.action {
        Action::Run { script } => field(&mut o, "run", script),
        Action::Line {
            path,
            line,
            regexp,
            attrs,
        } => {
            field(&mut o, "path", path);
            field(&mut o, "line", line);
            if let Some(r) = regexp {
                field(&mut o, "replace lines matching", r);
            }
            attrs_line(&mut o, attrs);
        }
        Action::Upload {
            src,
            dest,
            rendered,
            attrs,
        } => {
            field(&mut o, "src", &src.display().to_string());
            field(&mut o, "dest", dest);
            if let Some(r) = rendered {
                field(&mut o, "rendered template", &String::from_utf8_lossy(r));
            }
            attrs_line(&mut o, attrs);
        }
        Action::File {
            path,
            content,
            attrs,
        } => {
            field(&mut o, "path", path);
            field(&mut o, "content", content);
            attrs_line(&mut o, attrs);
        }
        Action::Reboot { timeout } => field(
            &mut o,
            "wait for it to come back",
            &format!("up to {}", format_duration(*timeout)),
        ),
    }
    if let Some(u) = &s.user {
        field(&mut o, "as user", u);
    }
    for (k, v) in &s.env {
        field(&mut o, &format!("env {k}"), v);
    }
    if s.retries > 0 {
        field(
            &mut o,
            "retries",
            &format!("{} (delay {})", s.retries, format_duration(s.delay)),
        );
    }
    if let Some(t) = s.timeout {
        field(&mut o, "timeout", &format_duration(t));
    }
    if let Some((expr, value)) = &s.when {
        let verdict = if *value {
            "true: runs"
        } else {
            "false: skipped"
        };
        field(&mut o, "when", &format!("{expr}  ({verdict})"));
    }
    if let Some(c) = &s.creates {
        field(&mut o, "creates", &format!("{c}  (skipped if it exists)"));
    }
    o
}

fn attrs_line(o: &mut String, a: &FileAttrs) {
    let mut parts = Vec::new();
    if let Some(m) = a.mode {
        parts.push(format!("mode {m:04o}"));
    }
    if let Some(u) = &a.owner {
        parts.push(format!("owner {u}"));
    }
    if let Some(g) = &a.group {
        parts.push(format!("group {g}"));
    }
    if !parts.is_empty() {
        let _ = writeln!(o, "       {}", parts.join(", "));
    }
}
