//! Recipes: parse → includes → variables → validate → render. The output is a [`Plan`].
//!
//! Files: [`yaml`](self) is a spanned YAML tree, `model` decodes it into a typed recipe,
//! `include` expands includes, `vars` resolves variables, `render` renders templates (and
//! documents the built-in variables), `display` prints a plan.

mod display;
mod error;
mod include;
mod model;
pub mod plan;
mod render;
mod shell;
mod values;
mod vars;
mod yaml;

#[cfg(test)]
mod tests;

use std::path::{Path, PathBuf};

pub use display::format_plan;
pub use error::Error;
pub use plan::*;
pub use values::{format_duration, parse_duration, parse_var_arg};

/// Values jbake knows about a build. `None` means "only known in the cloud": the variable
/// renders as a placeholder such as `<<base_ami>>` ([`VarSource::Placeholder`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Builtins {
    pub region: Option<String>,
    pub build_id: Option<String>,
    pub version: Option<String>,
    pub base_ami: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LoadOptions {
    /// `--var-file`s, lowest precedence first.
    pub var_files: Vec<PathBuf>,
    /// `--var k=v`s, lowest precedence first; they win over var files.
    pub vars: Vec<(String, String)>,
    pub builtins: Builtins,
}

/// Load a recipe: parse → includes → variables → validate → render.
pub fn load(path: &Path, opts: &LoadOptions) -> Result<Plan, Error> {
    let text = std::fs::read_to_string(path).map_err(|source| Error::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let root = yaml::parse(&text, path)?;
    let mut recipe = model::decode_recipe(&root)?;
    let body = std::mem::take(&mut recipe.body);
    let expanded = include::expand(path, body)?;
    let resolved = vars::resolve(&recipe, opts)?;
    let renderer = render::Renderer::new(&resolved.context, &resolved.unset, path);
    let mut steps = Vec::with_capacity(expanded.steps.len());
    for (i, raw) in expanded.steps.iter().enumerate() {
        steps.push(renderer.step(raw, i + 1)?);
    }
    let mut tags = Vec::with_capacity(recipe.tags.len());
    for (key, template) in &recipe.tags {
        let value = renderer.render(template)?;
        if value.chars().count() > 256 {
            return Err(template.err(format!(
                "the tag value is {} characters long; EC2 allows at most 256",
                value.chars().count()
            )));
        }
        if resolved
            .list
            .iter()
            .any(|v| v.secret && !v.value.is_empty() && value.contains(&v.value))
        {
            return Err(template.err(
                "a tag value may not contain a secret variable: tags are readable by anyone who can describe the image",
            ));
        }
        tags.push((key.clone(), value));
    }
    tags.sort();
    let mut validate = Vec::with_capacity(expanded.validate.len());
    for (i, raw) in expanded.validate.iter().enumerate() {
        validate.push(renderer.step(raw, i + 1)?);
    }
    Ok(Plan {
        schema_version: model::SCHEMA_VERSION,
        name: recipe.name,
        description: recipe.description,
        file: path.to_path_buf(),
        base: recipe.base,
        instance: recipe.instance,
        vars: resolved.list,
        tags,
        steps,
        validate,
    })
}
