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
pub use error::{Error, FileProblem};
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
    /// Values read back from an image's tags (`jbake test`, [`tag_variables`]): above the
    /// recipe's defaults, below `--var-file` and `--var`.
    pub image_vars: Vec<(String, String)>,
    /// `--var-file`s, lowest precedence first.
    pub var_files: Vec<PathBuf>,
    /// `--var k=v`s, lowest precedence first; they win over var files.
    pub vars: Vec<(String, String)>,
    pub builtins: Builtins,
}

/// Load a recipe: parse → includes → variables → validate → render.
pub fn load(path: &Path, opts: &LoadOptions) -> Result<Plan, Error> {
    let text = read_text(path)?;
    let root = yaml::parse(&text, path)?;
    let mut recipe = model::decode_recipe(&root)?;
    let body = std::mem::take(&mut recipe.body);
    let expanded = include::expand(path, body)?;
    let resolved = vars::resolve(&recipe, opts)?;
    let secret_values: Vec<String> = resolved
        .list
        .iter()
        .filter(|v| v.secret && !v.value.is_empty())
        .map(|v| v.value.clone())
        .collect();
    // From here on any error may be printed: the final error line masks what is registered.
    crate::util::register_secrets(&secret_values);
    let renderer = render::Renderer::new(&resolved.context, &resolved.unset, &secret_values, path);
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
    let mut facts = Vec::with_capacity(recipe.facts.len());
    for (key, script) in &recipe.facts {
        facts.push(Fact {
            key: key.clone(),
            script: renderer.render_shell(script)?,
            origin: script.origin.clone(),
        });
    }
    let mut validate = Vec::with_capacity(expanded.validate.len());
    for (i, raw) in expanded.validate.iter().enumerate() {
        validate.push(renderer.step(raw, i + 1)?);
    }
    let mut test = Vec::with_capacity(expanded.test.len());
    for (i, raw) in expanded.test.iter().enumerate() {
        test.push(renderer.step(raw, i + 1)?);
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
        facts,
        steps,
        validate,
        test,
    })
}

/// The recipe's `name:` (parsed, not rendered: no variables needed).
pub fn name_of(path: &Path) -> Result<String, Error> {
    let text = read_text(path)?;
    let root = yaml::parse(&text, path)?;
    Ok(model::decode_recipe(&root)?.name)
}

/// The recipe's image tags whose value is exactly one of its variables, like
/// `jbake:efs-id: "{{ efs_id }}"`: `(tag key, variable)`. An image's tags give those variables
/// back (what `jbake test` of an existing image renders its checks with).
pub fn tag_variables(path: &Path) -> Result<Vec<(String, String)>, Error> {
    let text = read_text(path)?;
    let root = yaml::parse(&text, path)?;
    let recipe = model::decode_recipe(&root)?;
    Ok(recipe
        .tags
        .iter()
        .filter_map(|(key, template)| {
            let inner = template
                .value
                .trim()
                .strip_prefix("{{")?
                .strip_suffix("}}")?
                .trim();
            recipe
                .vars
                .iter()
                .any(|d| d.name == inner)
                .then(|| (key.clone(), inner.to_string()))
        })
        .collect())
}

/// The most jbake reads from one recipe, include, var file or template: recipes are small text
/// files, and a larger one is a mistake (or an attack on the machine that validates it).
pub const MAX_FILE_BYTES: u64 = 8 * 1024 * 1024;

/// Reads a regular file of at most [`MAX_FILE_BYTES`] as bytes: a folder, a device or a FIFO
/// is refused before it is opened for reading (a device could never end, a FIFO could block).
pub(crate) fn read_file(path: &Path) -> Result<Vec<u8>, Error> {
    use std::io::Read;
    let io = |source| Error::Io {
        path: path.to_path_buf(),
        source,
    };
    let problem = |problem| Error::File {
        path: path.to_path_buf(),
        problem,
    };
    let meta = std::fs::metadata(path).map_err(io)?;
    if meta.is_dir() {
        return Err(problem(FileProblem::Directory));
    }
    if !meta.is_file() {
        return Err(problem(FileProblem::NotRegular));
    }
    let too_large = |size| {
        problem(FileProblem::TooLarge {
            size,
            limit: MAX_FILE_BYTES,
        })
    };
    if meta.len() > MAX_FILE_BYTES {
        return Err(too_large(meta.len()));
    }
    let file = std::fs::File::open(path).map_err(io)?;
    // The file may have grown since: never read more than the limit.
    let mut bytes = Vec::new();
    file.take(MAX_FILE_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(io)?;
    if bytes.len() as u64 > MAX_FILE_BYTES {
        return Err(too_large(bytes.len() as u64));
    }
    Ok(bytes)
}

/// [`read_file`] as UTF-8 text.
pub(crate) fn read_text(path: &Path) -> Result<String, Error> {
    String::from_utf8(read_file(path)?).map_err(|e| Error::File {
        path: path.to_path_buf(),
        problem: FileProblem::NotUtf8 {
            offset: e.utf8_error().valid_up_to(),
        },
    })
}
