//! `include:` expansion. Included steps come before the including file's own steps, in the
//! listed order; include paths are relative to the including file and must stay inside the
//! top-level recipe's folder (after `..` and symlinks); cycles are errors.

use std::path::{Component, Path, PathBuf};

use super::error::Error;
use super::model::{self, RawStep, StepFile};
use super::yaml;

pub(crate) struct Expanded {
    pub steps: Vec<RawStep>,
    pub validate: Vec<RawStep>,
    pub test: Vec<RawStep>,
}

struct Ctx {
    root: PathBuf,
    canonical_root: PathBuf,
    /// (canonical, as displayed) of the files being expanded, outermost first.
    stack: Vec<(PathBuf, PathBuf)>,
}

pub(crate) fn expand(top: &Path, body: StepFile) -> Result<Expanded, Error> {
    let root = normalize(top.parent().unwrap_or(Path::new("")));
    let dir = if root.as_os_str().is_empty() {
        Path::new(".")
    } else {
        root.as_path()
    };
    let canonical_root = dir.canonicalize().map_err(|source| Error::Io {
        path: dir.to_path_buf(),
        source,
    })?;
    let canonical_top = top.canonicalize().map_err(|source| Error::Io {
        path: top.to_path_buf(),
        source,
    })?;
    let mut ctx = Ctx {
        root,
        canonical_root,
        stack: vec![(canonical_top, normalize(top))],
    };
    expand_file(top, body, &mut ctx)
}

fn expand_file(file: &Path, body: StepFile, ctx: &mut Ctx) -> Result<Expanded, Error> {
    let mut out = Expanded {
        steps: Vec::new(),
        validate: Vec::new(),
        test: Vec::new(),
    };
    let dir = file.parent().unwrap_or(Path::new(""));
    for inc in &body.includes {
        let rel = Path::new(&inc.value);
        if rel.is_absolute() {
            return Err(inc.err(format!(
                "'{}' is absolute; include paths are relative to the including file",
                inc.value
            )));
        }
        let joined = normalize(&dir.join(rel));
        let escape = || {
            inc.err(format!(
                "'{}' is outside the recipe's folder {}; includes must stay inside it",
                inc.value,
                shown_dir(&ctx.root)
            ))
        };
        match joined.strip_prefix(&ctx.root) {
            Ok(rest) if !matches!(rest.components().next(), Some(Component::ParentDir)) => {}
            _ => return Err(escape()),
        }
        let canonical = match joined.canonicalize() {
            Ok(c) => c,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(inc.err(format!(
                    "include '{}' not found: {} does not exist",
                    inc.value,
                    joined.display()
                )))
            }
            Err(source) => {
                return Err(Error::Io {
                    path: joined,
                    source,
                })
            }
        };
        if !canonical.starts_with(&ctx.canonical_root) {
            return Err(escape());
        }
        if let Some(pos) = ctx.stack.iter().position(|(c, _)| *c == canonical) {
            let mut chain: Vec<String> = ctx.stack[pos..]
                .iter()
                .map(|(_, d)| relative(d, &ctx.root))
                .collect();
            chain.push(relative(&joined, &ctx.root));
            return Err(inc.err(format!("include cycle: {}", chain.join(" → "))));
        }
        let text = super::read_text(&joined)?;
        let node = yaml::parse(&text, &joined)?;
        let included = model::decode_included(&node)?;
        ctx.stack.push((canonical, joined.clone()));
        let sub = expand_file(&joined, included, ctx)?;
        ctx.stack.pop();
        out.steps.extend(sub.steps);
        out.validate.extend(sub.validate);
        out.test.extend(sub.test);
    }
    out.steps.extend(body.steps);
    out.validate.extend(body.validate);
    out.test.extend(body.test);
    Ok(out)
}

fn shown_dir(root: &Path) -> String {
    if root.as_os_str().is_empty() {
        ".".into()
    } else {
        root.display().to_string()
    }
}

fn relative(p: &Path, root: &Path) -> String {
    p.strip_prefix(root).unwrap_or(p).display().to_string()
}

/// Remove `.` and resolve `..` lexically (leading `..` are kept).
pub(crate) fn normalize(p: &Path) -> PathBuf {
    let mut out: Vec<Component<'_>> = Vec::new();
    for c in p.components() {
        match c {
            Component::CurDir => {}
            Component::ParentDir => match out.last() {
                Some(Component::Normal(_)) => {
                    out.pop();
                }
                Some(Component::RootDir) | Some(Component::Prefix(_)) => {}
                _ => out.push(c),
            },
            _ => out.push(c),
        }
    }
    out.iter().collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalizes() {
        assert_eq!(normalize(Path::new("a/./b/../c")), PathBuf::from("a/c"));
        assert_eq!(
            normalize(Path::new("../a/../../b")),
            PathBuf::from("../../b")
        );
        assert_eq!(normalize(Path::new("/a/../../b")), PathBuf::from("/b"));
    }
}
