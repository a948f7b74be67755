//! Variable resolution: recipe defaults < an image's tags (`jbake test`) < `--var-file` (in
//! order) < `--var` (in order), plus the built-ins. Then the required and pattern checks.

use std::collections::BTreeMap;

use super::error::{did_you_mean, Error};
use super::model::{RawRecipe, VarDecl};
use super::plan::{Origin, ResolvedVar, VarSource};
use super::yaml;
use super::{Builtins, LoadOptions};

/// The built-in variables and what to do instead of setting them.
pub(crate) const BUILTINS: &[(&str, &str, &str)] = &[
    (
        "base_ami",
        "the id of the base AMI the build starts from",
        "it is resolved from base:; use --base-ami to pin it",
    ),
    (
        "build_id",
        "the id of this build",
        "jbake chooses it for each build",
    ),
    (
        "recipe_name",
        "the recipe's name",
        "it is the recipe's `name:`",
    ),
    ("region", "the AWS region of the build", "use --region"),
    (
        "ssh_user",
        "the user jbake logs in as",
        "set base.ssh_user in the recipe",
    ),
    (
        "version",
        "the version of the image being built",
        "jbake chooses it for each build",
    ),
];

/// If `name` is a built-in, what to do instead of setting it.
pub(crate) fn builtin_hint(name: &str) -> Option<&'static str> {
    BUILTINS
        .iter()
        .find(|(n, _, _)| *n == name)
        .map(|(_, _, h)| *h)
}

/// The resolved variables: the plan's list and the template context.
pub(crate) struct Resolved {
    pub list: Vec<ResolvedVar>,
    /// Every variable with a value (built-ins and placeholders included).
    pub context: BTreeMap<String, String>,
    /// Declared variables without a value (optional, no default, not given).
    pub unset: Vec<String>,
}

struct Candidate {
    value: String,
    source: VarSource,
    /// Where the value was written, when it comes from a file.
    origin: Option<Origin>,
}

pub(crate) fn resolve(recipe: &RawRecipe, opts: &LoadOptions) -> Result<Resolved, Error> {
    let mut values: BTreeMap<&str, Candidate> = BTreeMap::new();
    for d in &recipe.vars {
        if let Some(def) = &d.default {
            values.insert(
                &d.name,
                Candidate {
                    value: def.value.clone(),
                    source: VarSource::Default,
                    origin: Some(def.origin.clone()),
                },
            );
        }
    }
    let declared = |name: &str| recipe.vars.iter().find(|d| d.name == name);
    for (name, value) in &opts.image_vars {
        if let Some(d) = declared(name) {
            values.insert(
                &d.name,
                Candidate {
                    value: value.clone(),
                    source: VarSource::Image,
                    origin: None,
                },
            );
        }
    }
    let unknown = |name: &str, from: &str| {
        let names: Vec<&str> = recipe.vars.iter().map(|d| d.name.as_str()).collect();
        if let Some(hint) = builtin_hint(name) {
            format!("'{name}' is a built-in variable and cannot be set ({hint})")
        } else if names.is_empty() {
            format!("unknown variable '{name}'{from}; the recipe declares no variables")
        } else {
            format!(
                "unknown variable '{name}'{from}{}; the recipe declares: {}",
                did_you_mean(name, names.iter().copied()),
                names.join(", ")
            )
        }
    };

    for file in &opts.var_files {
        let text = super::read_text(file)?;
        let root = yaml::parse(&text, file)?;
        if root.value == yaml::Value::Null {
            continue;
        }
        let m = root.map("", &[])?;
        for (name, key, v) in &m.entries {
            let Some(d) = declared(name) else {
                return Err(key.err("", unknown(name, "")));
            };
            let value = v.scalar_string(name)?;
            values.insert(
                &d.name,
                Candidate {
                    value,
                    source: VarSource::File(file.clone()),
                    origin: Some(v.origin()),
                },
            );
        }
    }
    for (name, value) in &opts.vars {
        let Some(d) = declared(name) else {
            return Err(Error::invalid(
                &recipe.vars_origin,
                "",
                unknown(name, &format!(" in --var {name}=…")),
            ));
        };
        values.insert(
            &d.name,
            Candidate {
                value: value.clone(),
                source: VarSource::CommandLine,
                origin: None,
            },
        );
    }

    for d in &recipe.vars {
        if d.required && !values.contains_key(d.name.as_str()) {
            let desc = d
                .description
                .as_deref()
                .map(|s| format!(" ({s})"))
                .unwrap_or_default();
            return Err(Error::invalid(
                &d.origin,
                "",
                format!(
                    "missing required variable '{}'{desc}: pass --var {}=… or put it in a --var-file",
                    d.name, d.name
                ),
            ));
        }
    }
    for d in &recipe.vars {
        if let (Some((re, pat)), Some(c)) = (&d.pattern, values.get(d.name.as_str())) {
            if !re.is_match(&c.value) {
                return Err(pattern_error(d, pat, c));
            }
        }
    }

    let mut list = Vec::new();
    let mut context = BTreeMap::new();
    let mut unset = Vec::new();
    for d in &recipe.vars {
        match values.remove(d.name.as_str()) {
            Some(c) => {
                context.insert(d.name.clone(), c.value.clone());
                list.push(ResolvedVar {
                    name: d.name.clone(),
                    value: c.value,
                    secret: d.secret,
                    source: c.source,
                    description: d.description.clone(),
                });
            }
            None => {
                unset.push(d.name.clone());
                list.push(ResolvedVar {
                    name: d.name.clone(),
                    value: String::new(),
                    secret: d.secret,
                    source: VarSource::Unset,
                    description: d.description.clone(),
                });
            }
        }
    }
    for (name, value, source, desc) in builtins(&opts.builtins, &recipe.name, &recipe.base.ssh_user)
    {
        context.insert(name.to_string(), value.clone());
        list.push(ResolvedVar {
            name: name.to_string(),
            value,
            secret: false,
            source,
            description: Some(desc.to_string()),
        });
    }
    list.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(Resolved {
        list,
        context,
        unset,
    })
}

fn pattern_error(d: &VarDecl, pat: &super::model::Spanned, c: &Candidate) -> Error {
    let shown = if d.secret {
        "<secret>".to_string()
    } else {
        format!("{:?}", c.value)
    };
    let from = match (&c.source, &c.origin) {
        (VarSource::CommandLine, _) => "--var".to_string(),
        (VarSource::Default, _) => "its default".to_string(),
        (VarSource::Image, _) => "the image's tags".to_string(),
        (_, Some(o)) => o.to_string(),
        _ => "a --var-file".to_string(),
    };
    Error::invalid(
        &pat.origin,
        &pat.field,
        format!(
            "variable '{}' = {shown} (from {from}) does not match {}",
            d.name, pat.value
        ),
    )
}

/// The placeholder for a built-in only known in the cloud.
pub(crate) fn placeholder(name: &str) -> String {
    format!("<<{name}>>")
}

fn builtins(
    b: &Builtins,
    recipe_name: &str,
    ssh_user: &str,
) -> Vec<(&'static str, String, VarSource, &'static str)> {
    let desc = |n: &str| {
        BUILTINS
            .iter()
            .find(|(x, _, _)| *x == n)
            .map(|(_, d, _)| *d)
            .unwrap_or("")
    };
    let opt = |name: &'static str, v: &Option<String>| match v {
        Some(v) => (name, v.clone(), VarSource::Builtin, desc(name)),
        None => (name, placeholder(name), VarSource::Placeholder, desc(name)),
    };
    vec![
        opt("base_ami", &b.base_ami),
        opt("build_id", &b.build_id),
        (
            "recipe_name",
            recipe_name.to_string(),
            VarSource::Builtin,
            desc("recipe_name"),
        ),
        opt("region", &b.region),
        (
            "ssh_user",
            ssh_user.to_string(),
            VarSource::Builtin,
            desc("ssh_user"),
        ),
        opt("version", &b.version),
    ]
}
