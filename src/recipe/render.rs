//! Rendering: every string in a step is a minijinja template, rendered in strict mode.
//!
//! # Variables available in templates
//!
//! The recipe's own `vars:`, plus these built-ins (a recipe may not redefine them, and `--var`
//! or a `--var-file` may not set them):
//!
//! | name          | value                                                                 |
//! |---------------|-----------------------------------------------------------------------|
//! | `region`      | the AWS region of the build (`--region`)                              |
//! | `build_id`    | the id of this build                                                  |
//! | `version`     | the version of the image being built                                  |
//! | `base_ami`    | the id of the base AMI the build starts from                          |
//! | `recipe_name` | the recipe's `name:`                                                  |
//! | `ssh_user`    | `base.ssh_user`                                                       |
//!
//! When `region`, `build_id`, `version` or `base_ami` is not known yet (e.g. `jbake validate`
//! without a build), it renders as a clearly marked placeholder such as `<<base_ami>>`.
//!
//! Rules: an undefined variable is an error, never an empty string (declare `default: ""` to allow
//! an empty value); `trim_blocks` is on and a trailing newline is kept (so uploaded templates end
//! the way the file does).
//!
//! # Quoting
//!
//! In a `run:` script every `{{ expression }}` is quoted for the POSIX shell (an auto-escape
//! named `sh`): `{{ home }}` renders `/var/lib/jenkins` as it is and `a b;c` as `'a b;c'`,
//! one word whatever the value holds. A list is quoted item by item, so
//! `{{ packages | split }}` gives one word per package. Where a quoted value would not be one
//! plain word (inside quotes, backquotes, a comment, a here-document) the template is refused
//! ([`super::shell`]). `{{ x | safe }}` opts out: the value is inserted as it is.
//!
//! Everywhere else (`file:` content, `line:`, uploaded templates, names, paths, tags) values are
//! data and are not quoted; an uploaded template that is a shell script quotes with the `sh`
//! filter (`home={{ jenkins_home | sh }}`, also called `shell_quote`). `regex_escape` makes a
//! value match itself literally in a `regexp:`.
//!
//! All variable values are strings (`default: false` becomes `"false"`). A `when:` whose result
//! is a string is read as a boolean the way Ansible users expect: `true/yes/on/1` and
//! `false/no/off/0/""` (any case), anything else is an error; so `when: install_tools` works with
//! `--var install_tools=false`. Comparisons (`when: java_version == "21"`) work as usual.

use std::collections::BTreeMap;
use std::path::{Component, Path, PathBuf};

use minijinja::value::{Value, ValueKind};
use minijinja::{AutoEscape, Environment, Output, State, UndefinedBehavior};

use super::error::{did_you_mean, Error};
use super::include::normalize;
use super::model::{one_line, RawAction, RawAttrs, RawStep, Spanned};
use super::plan::{Action, FileAttrs, Origin, Step};
use super::shell::check_placement;
use super::values::check_user;
use crate::util::shell_quote;

/// The template name of `run:` scripts: they are auto-escaped for the shell.
const RUN_TEMPLATE: &str = "run:";
/// The auto-escape of `run:` scripts.
const SH: AutoEscape = AutoEscape::Custom("sh");

/// minijinja's global functions: not variables.
const GLOBALS: &[&str] = &[
    "range",
    "dict",
    "namespace",
    "debug",
    "lipsum",
    "cycler",
    "joiner",
];

pub(crate) struct Renderer<'a> {
    env: Environment<'static>,
    context: &'a BTreeMap<String, String>,
    unset: &'a [String],
    /// Secret values in all their forms: never quoted in an error.
    secrets: Vec<String>,
    /// The top-level recipe's folder (upload sources are also looked up there).
    top_dir: PathBuf,
}

/// Where a template's text came from, for errors.
enum Place<'s> {
    /// A YAML value: errors point at the value; the template's own line is added if > 1.
    Value(&'s Spanned),
    /// A file uploaded with `template: true`: errors point into the file.
    File { path: &'s Path, field: &'s str },
}

impl Place<'_> {
    fn err(&self, line: usize, column: usize, message: String) -> Error {
        match self {
            Place::Value(s) => {
                let suffix = if line > 1 {
                    format!(" (line {line} of the value)")
                } else {
                    String::new()
                };
                Error::invalid(&s.origin, &s.field, format!("{message}{suffix}"))
            }
            Place::File { path, field } => Error::invalid(
                &Origin {
                    file: path.to_path_buf(),
                    line,
                    column,
                },
                &format!("{field} (template)"),
                message,
            ),
        }
    }
}

impl<'a> Renderer<'a> {
    pub fn new(
        context: &'a BTreeMap<String, String>,
        unset: &'a [String],
        secret_values: &[String],
        top_file: &Path,
    ) -> Self {
        let mut env = Environment::new();
        env.set_undefined_behavior(UndefinedBehavior::Strict);
        env.set_auto_escape_callback(|name| {
            if name == RUN_TEMPLATE {
                SH
            } else {
                AutoEscape::None
            }
        });
        env.set_formatter(format_value);
        env.add_filter("sh", sh_filter);
        env.add_filter("shell_quote", sh_filter);
        env.add_filter("regex_escape", |v: String| regex::escape(&v));
        env.set_keep_trailing_newline(true);
        env.set_trim_blocks(true);
        Renderer {
            env,
            context,
            unset,
            secrets: crate::util::secret_forms(secret_values),
            top_dir: top_file.parent().unwrap_or(Path::new("")).to_path_buf(),
        }
    }

    fn undefined_message(&self, name: &str) -> String {
        if self.unset.iter().any(|u| u == name) {
            format!(
                "variable '{name}' has no value: pass --var {name}=… or give it a default (`default: \"\"` allows empty)"
            )
        } else {
            format!(
                "undefined variable '{name}'{}",
                did_you_mean(name, self.context.keys().map(String::as_str))
            )
        }
    }

    /// The first variable the template uses that has no value, with its line and column.
    fn first_undefined(
        &self,
        source: &str,
        names: impl IntoIterator<Item = String>,
    ) -> Option<(String, usize, usize)> {
        let mut missing: Vec<(usize, String)> = names
            .into_iter()
            .filter(|n| !self.context.contains_key(n) && !GLOBALS.contains(&n.as_str()))
            .map(|n| (find_word(source, &n).unwrap_or(usize::MAX), n))
            .collect();
        missing.sort();
        let (pos, name) = missing.into_iter().next()?;
        let (line, col) = line_col(source, pos);
        Some((name, line, col))
    }

    fn jinja_error(&self, place: &Place<'_>, e: &minijinja::Error) -> Error {
        let what = match e.kind() {
            minijinja::ErrorKind::SyntaxError => "template syntax error".to_string(),
            k => format!("template error: {k}"),
        };
        let msg = match e.detail() {
            Some(d) => format!("{what}: {d}"),
            None => what,
        };
        // A template error may quote a value.
        let msg = crate::util::mask(&msg, &self.secrets);
        place.err(e.line().unwrap_or(1), 1, msg)
    }

    fn render_at(&self, source: &str, place: &Place<'_>, shell: bool) -> Result<String, Error> {
        if !source.contains("{{") && !source.contains("{%") && !source.contains("{#") {
            return Ok(source.to_string());
        }
        let tmpl = if shell {
            check_placement(source).map_err(|m| place.err(m.line, m.column, m.message()))?;
            self.env.template_from_named_str(RUN_TEMPLATE, source)
        } else {
            self.env.template_from_str(source)
        }
        .map_err(|e| self.jinja_error(place, &e))?;
        if let Some((name, line, col)) =
            self.first_undefined(source, tmpl.undeclared_variables(false))
        {
            return Err(place.err(line, col, self.undefined_message(&name)));
        }
        tmpl.render(self.context)
            .map_err(|e| self.jinja_error(place, &e))
    }

    pub fn render(&self, s: &Spanned) -> Result<String, Error> {
        self.render_at(&s.value, &Place::Value(s), false)
    }

    /// A `run:` script: every expression is quoted for the shell.
    pub fn render_shell(&self, s: &Spanned) -> Result<String, Error> {
        self.render_at(&s.value, &Place::Value(s), true)
    }

    /// Evaluate a `when:` expression.
    pub fn eval(&self, s: &Spanned) -> Result<bool, Error> {
        let place = Place::Value(s);
        let expr = self
            .env
            .compile_expression(&s.value)
            .map_err(|e| self.jinja_error(&place, &e))?;
        if let Some((name, line, col)) =
            self.first_undefined(&s.value, expr.undeclared_variables(false))
        {
            return Err(place.err(line, col, self.undefined_message(&name)));
        }
        let v = expr
            .eval(self.context)
            .map_err(|e| self.jinja_error(&place, &e))?;
        // Variables are strings: a bare `when: install_tools` must not be true for "false".
        match v.as_str() {
            Some(text) => match text.trim().to_ascii_lowercase().as_str() {
                "true" | "yes" | "on" | "1" => Ok(true),
                "false" | "no" | "off" | "0" | "" => Ok(false),
                _ if self.secrets.iter().any(|x| text.contains(x.as_str())) => Err(s.err(format!(
                    "when: {:?} evaluates to a string that is not a boolean (the value of a \
                     secret variable, not shown; write a comparison)",
                    s.value
                ))),
                _ => Err(s.err(format!(
                    "when: {:?} evaluates to the string {text:?}, which is not a boolean \
                     (write a comparison, e.g. `x == \"{text}\"`)",
                    s.value
                ))),
            },
            None => Ok(v.is_true()),
        }
    }

    fn user(&self, s: &Spanned) -> Result<String, Error> {
        let v = self.render(s)?;
        check_user(&v).map_err(|e| s.err(e))?;
        Ok(v)
    }

    fn attrs(&self, a: &RawAttrs) -> Result<FileAttrs, Error> {
        Ok(FileAttrs {
            mode: a.mode,
            owner: a.owner.as_ref().map(|s| self.user(s)).transpose()?,
            group: a.group.as_ref().map(|s| self.user(s)).transpose()?,
        })
    }

    pub fn step(&self, raw: &RawStep, number: usize) -> Result<Step, Error> {
        let action = match &raw.action {
            RawAction::Run(s) => Action::Run {
                script: self.render_shell(s)?,
            },
            RawAction::Line {
                path,
                line,
                regexp,
                attrs,
            } => {
                let regexp = match regexp {
                    Some(r) => {
                        let v = self.render(r)?;
                        regex::Regex::new(&v).map_err(|e| {
                            r.err(format!(
                                "invalid regular expression: {}",
                                one_line(&e.to_string())
                            ))
                        })?;
                        Some(v)
                    }
                    None => None,
                };
                Action::Line {
                    path: self.render(path)?,
                    line: self.render(line)?,
                    regexp,
                    attrs: self.attrs(attrs)?,
                }
            }
            RawAction::Upload {
                src,
                dest,
                template,
                attrs,
            } => {
                let path = self.find_source(src, &raw.origin.file)?;
                let rendered = if *template {
                    if path.is_dir() {
                        return Err(src.err(format!(
                            "\"{}\" is a directory ({}); `template: true` works only for single files",
                            src.value,
                            path.display()
                        )));
                    }
                    let bytes = super::read_file(&path)?;
                    let text = String::from_utf8(bytes).map_err(|_| {
                        src.err(format!(
                            "{} is not UTF-8 text, so it cannot be a template",
                            path.display()
                        ))
                    })?;
                    let field = format!("{}.upload", raw.field);
                    let out = self.render_at(
                        &text,
                        &Place::File {
                            path: &path,
                            field: &field,
                        },
                        false,
                    )?;
                    Some(out.into_bytes())
                } else {
                    None
                };
                Action::Upload {
                    src: path,
                    dest: self.render(dest)?,
                    rendered,
                    attrs: self.attrs(attrs)?,
                }
            }
            RawAction::File {
                path,
                content,
                attrs,
            } => Action::File {
                path: self.render(path)?,
                content: self.render(content)?,
                attrs: self.attrs(attrs)?,
            },
            RawAction::Reboot { timeout } => Action::Reboot { timeout: *timeout },
        };
        let when = match &raw.when {
            Some(w) => Some((w.value.clone(), self.eval(w)?)),
            None => None,
        };
        let mut env = Vec::new();
        for (k, v) in &raw.env {
            env.push((k.clone(), self.render(v)?));
        }
        Ok(Step {
            number,
            phase: raw.phase,
            name: self.render(&raw.name)?,
            origin: raw.origin.clone(),
            action,
            user: raw.user.as_ref().map(|u| self.user(u)).transpose()?,
            env,
            retries: raw.retries,
            delay: raw.delay,
            timeout: raw.timeout,
            when,
            creates: raw.creates.as_ref().map(|c| self.render(c)).transpose()?,
        })
    }

    /// Resolve an upload source: `<dir>/files/`, `<dir>/../files/`, `<dir>/` for the folder of
    /// the file the step is written in, then for the top-level recipe's folder; first match wins.
    fn find_source(&self, src: &Spanned, step_file: &Path) -> Result<PathBuf, Error> {
        let value = self.render(src)?;
        let rel = Path::new(&value);
        if rel.is_absolute()
            || rel
                .components()
                .any(|c| !matches!(c, Component::Normal(_) | Component::CurDir))
        {
            return Err(src.err(format!(
                "\"{value}\" must be a relative path inside the recipe's files/ folder (no leading / and no ..)"
            )));
        }
        let mut dirs = Vec::new();
        for d in [
            step_file.parent().unwrap_or(Path::new("")),
            self.top_dir.as_path(),
        ] {
            for c in [d.join("files"), d.join("..").join("files"), d.to_path_buf()] {
                let c = normalize(&c);
                if !dirs.contains(&c) {
                    dirs.push(c);
                }
            }
        }
        let mut tried = Vec::new();
        for d in &dirs {
            let p = d.join(rel);
            if p.exists() {
                if let Some(special) = special_file(&p, 0) {
                    return Err(src.err(format!(
                        "{} is not a regular file or folder (a device, a FIFO or a socket): it cannot be uploaded",
                        special.display()
                    )));
                }
                return Ok(p);
            }
            tried.push(p.display().to_string());
        }
        Err(src.err(format!(
            "upload source \"{value}\" not found; looked in: {}",
            tried.join(", ")
        )))
    }
}

/// The first thing at or below `path` (symlinks followed, 32 levels at most) that is neither
/// a regular file nor a folder: uploading a device or a FIFO would never end.
fn special_file(path: &Path, depth: usize) -> Option<PathBuf> {
    let meta = std::fs::metadata(path).ok()?;
    if meta.is_file() {
        return None;
    }
    if !meta.is_dir() {
        return Some(path.to_path_buf());
    }
    if depth >= 32 {
        return None;
    }
    let entries = std::fs::read_dir(path).ok()?;
    entries
        .filter_map(Result::ok)
        .find_map(|e| special_file(&e.path(), depth + 1))
}

/// Prints a value: quoted for the shell in `run:` scripts (a list item by item, separated by
/// spaces; a value marked `safe` as it is), as minijinja does everywhere else.
fn format_value(out: &mut Output, state: &State, value: &Value) -> Result<(), minijinja::Error> {
    if state.auto_escape() != SH {
        return minijinja::escape_formatter(out, state, value);
    }
    let text = if value.is_safe() {
        value.to_string()
    } else if matches!(value.kind(), ValueKind::Seq | ValueKind::Iterable) {
        let mut words = Vec::new();
        for item in value.try_iter()? {
            words.push(if item.is_safe() {
                item.to_string()
            } else {
                shell_quote(&item.to_string())
            });
        }
        words.join(" ")
    } else {
        shell_quote(&value.to_string())
    };
    out.write_str(&text).map_err(minijinja::Error::from)
}

/// `{{ x | sh }}`: the value quoted for the shell (and marked safe, so a `run:` script does
/// not quote it twice).
fn sh_filter(value: &Value) -> Value {
    Value::from_safe_string(shell_quote(&value.to_string()))
}

/// Byte offset of `word` used as an identifier in `source`.
fn find_word(source: &str, word: &str) -> Option<usize> {
    let is_ident = |c: char| c.is_alphanumeric() || c == '_';
    let mut start = 0;
    while let Some(i) = source[start..].find(word) {
        let at = start + i;
        let before = source[..at].chars().next_back();
        let after = source[at + word.len()..].chars().next();
        if !before.is_some_and(is_ident) && !after.is_some_and(is_ident) {
            return Some(at);
        }
        start = at + word.len();
    }
    None
}

/// 1-based line and column of a byte offset (usize::MAX → 1:1).
fn line_col(source: &str, pos: usize) -> (usize, usize) {
    if pos > source.len() {
        return (1, 1);
    }
    let before = &source[..pos];
    let line = before.matches('\n').count() + 1;
    let col = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    (line, col)
}
