//! Decode the spanned YAML tree into a typed, not yet rendered recipe. Structural checks
//! (keys, types, kinds, modes, durations, ranges) happen here; templates are rendered later.

use std::sync::LazyLock;
use std::time::Duration;

use regex::Regex;

use super::error::Error;
use super::plan::{Base, BaseImage, Instance, Origin, Phase};
use super::values::{is_identifier, parse_duration, parse_mode};
use super::yaml::{Map, Node, Value};

static NAME: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(r"^[a-z0-9][a-z0-9-]{0,62}$").expect("static regex"));
static AMI: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(r"^ami-[0-9a-f]{8}([0-9a-f]{9})?$").expect("static regex"));
static INSTANCE_TYPE: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(r"^[a-z0-9-]+\.[a-z0-9-]+$").expect("static regex"));

pub(crate) const SCHEMA_VERSION: u32 = 1;
const TOP_KEYS: &[&str] = &[
    "version",
    "name",
    "description",
    "base",
    "instance",
    "vars",
    "tags",
    "facts",
    "include",
    "steps",
    "validate",
    "test",
];
/// Tag keys jbake writes itself: a recipe's `tags:` cannot set them.
pub(crate) const RESERVED_TAGS: &[&str] = &[
    "Name",
    "jbake:build-id",
    "jbake:recipe",
    "jbake:expires-at",
    "jbake:created-at",
    "jbake:version",
    "jbake:content-hash",
    "jbake:base-ami",
    "jbake:jbake-version",
    "jbake:complete",
    "jbake:tested",
    "jbake:tested-at",
    "jbake:build-host-key",
    "jbake:build-key",
    "jbake:build-machine-id",
];
static TAG_KEY: LazyLock<Regex> = LazyLock::new(|| {
    // What EC2 accepts in a tag key (letters, digits, spaces and + - = . _ : / @), 1-128.
    Regex::new(r"^[\p{L}\p{N} +\-=._:/@]{1,128}$").expect("static regex")
});
const INCLUDED_KEYS: &[&str] = &["include", "steps", "validate", "test"];
const STEP_KEYS: &[&str] = &[
    "name", "run", "line", "upload", "file", "reboot", "retries", "delay", "timeout", "when",
    "env", "user", "creates",
];
pub(crate) const KINDS: &[&str] = &["run", "line", "upload", "file", "reboot"];

/// A string as written, with where it was written and its field path.
#[derive(Debug, Clone)]
pub(crate) struct Spanned {
    pub value: String,
    pub origin: Origin,
    pub field: String,
}

impl Spanned {
    fn of(node: &Node, field: String, value: &str) -> Spanned {
        Spanned {
            value: value.to_string(),
            origin: node.origin(),
            field,
        }
    }

    pub fn err(&self, message: impl Into<String>) -> Error {
        Error::invalid(&self.origin, &self.field, message)
    }
}

#[derive(Debug)]
pub(crate) struct VarDecl {
    pub name: String,
    pub origin: Origin,
    pub default: Option<Spanned>,
    pub required: bool,
    pub pattern: Option<(Regex, Spanned)>,
    pub secret: bool,
    pub description: Option<String>,
}

#[derive(Debug, Default)]
pub(crate) struct RawAttrs {
    pub mode: Option<u32>,
    pub owner: Option<Spanned>,
    pub group: Option<Spanned>,
}

#[derive(Debug)]
pub(crate) enum RawAction {
    Run(Spanned),
    Line {
        path: Spanned,
        line: Spanned,
        regexp: Option<Spanned>,
        attrs: RawAttrs,
    },
    Upload {
        src: Spanned,
        dest: Spanned,
        template: bool,
        attrs: RawAttrs,
    },
    File {
        path: Spanned,
        content: Spanned,
        attrs: RawAttrs,
    },
    Reboot {
        timeout: Duration,
    },
}

#[derive(Debug)]
pub(crate) struct RawStep {
    /// `steps[3]`, `validate[0]` or `test[1]`: position in the file where it is written.
    pub field: String,
    pub phase: Phase,
    pub origin: Origin,
    pub name: Spanned,
    pub action: RawAction,
    pub user: Option<Spanned>,
    pub env: Vec<(String, Spanned)>,
    pub retries: u32,
    pub delay: Duration,
    pub timeout: Option<Duration>,
    pub when: Option<Spanned>,
    pub creates: Option<Spanned>,
}

/// The parts of a file that includes expand: its own includes and its steps.
#[derive(Debug, Default)]
pub(crate) struct StepFile {
    pub includes: Vec<Spanned>,
    pub steps: Vec<RawStep>,
    pub validate: Vec<RawStep>,
    /// `test:`: checks run on an instance booted from the image (the boot test).
    pub test: Vec<RawStep>,
}

#[derive(Debug)]
pub(crate) struct RawRecipe {
    pub name: String,
    pub description: Option<String>,
    pub base: Base,
    pub instance: Instance,
    pub vars: Vec<VarDecl>,
    /// Where `vars:` is written (or the top of the file), for errors about variables.
    pub vars_origin: Origin,
    /// `tags:`: tag key → value template, put on the image and its snapshots.
    pub tags: Vec<(String, Spanned)>,
    /// `facts:`: tag key → a shell command run as root after the checks; its output is the
    /// value of the tag on the image and its snapshots.
    pub facts: Vec<(String, Spanned)>,
    pub body: StepFile,
}

/// Decode a top-level recipe.
pub(crate) fn decode_recipe(root: &Node) -> Result<RawRecipe, Error> {
    if root.value == Value::Null {
        return Err(root.err(
            "",
            "the recipe is empty; it needs at least version, name, base and steps",
        ));
    }
    // The version first: a newer recipe may use keys this jbake does not know.
    let loose = root.map("", &[])?;
    let version = loose.require("version", "the recipe schema version; write `version: 1`")?;
    match version.value {
        Value::Int(v) if v == i64::from(SCHEMA_VERSION) => {}
        Value::Int(v) => {
            return Err(version.err(
                "version",
                format!(
                "unsupported recipe version {v}; this jbake understands version {SCHEMA_VERSION}"
            ),
            ))
        }
        _ => {
            return Err(version.err(
                "version",
                format!("expected an integer (1), found {}", version.kind_name()),
            ))
        }
    }
    let m = root.map("", TOP_KEYS)?;
    let name_node = m.require("name", "the image name, e.g. `name: jenkins-controller`")?;
    let name = name_node.str("name")?;
    if !NAME.is_match(name) {
        return Err(name_node.err(
            "name",
            format!("\"{name}\" is not a valid name (lowercase letters, digits and -, starting with a letter or digit, at most 63 characters)"),
        ));
    }
    let description = match m.get("description") {
        Some(n) => Some(n.str("description")?.to_string()),
        None => None,
    };
    let base = decode_base(m.require("base", "the base image and ssh_user")?)?;
    let instance = match m.get("instance") {
        Some(n) => decode_instance(n)?,
        None => Instance {
            instance_type: "t3.small".into(),
            volume_gb: 16,
        },
    };
    let (vars, vars_origin) = match m.get("vars") {
        Some(n) => {
            let key = m
                .entries
                .iter()
                .find(|(k, _, _)| *k == "vars")
                .map(|(_, k, _)| k.origin());
            (decode_vars(n)?, key.unwrap_or_else(|| n.origin()))
        }
        None => (Vec::new(), root.origin()),
    };
    let tags = match m.get("tags") {
        Some(n) => decode_tags(n, "tags")?,
        None => Vec::new(),
    };
    // `facts:` — tag key → a shell command whose output (read on the machine after the checks)
    // is the tag's value.
    let facts = match m.get("facts") {
        Some(n) => decode_tags(n, "facts")?,
        None => Vec::new(),
    };
    if let Some((key, script)) = facts.iter().find(|(k, _)| tags.iter().any(|(t, _)| t == k)) {
        return Err(script.err(format!(
            "'{key}' is both in tags: and in facts:; a tag has one value"
        )));
    }
    let body = decode_step_file_body(&m)?;
    if body.steps.is_empty() && body.includes.is_empty() {
        if let Some(n) = m.get("steps") {
            return Err(n.err("steps", "the recipe has no steps"));
        }
        return Err(root.err(
            "",
            "missing 'steps' (the list of steps that build the image)",
        ));
    }
    Ok(RawRecipe {
        name: name.to_string(),
        description,
        base,
        instance,
        vars,
        vars_origin,
        tags,
        facts,
        body,
    })
}

/// `tags:` — a mapping of tag key to a value template (rendered like a step's fields).
fn decode_tags(node: &Node, section: &str) -> Result<Vec<(String, Spanned)>, Error> {
    let m = node.map(section, &[])?;
    let mut out = Vec::new();
    for (key, key_node, v) in &m.entries {
        let field = format!("{section}.{key}");
        if !TAG_KEY.is_match(key) {
            return Err(key_node.err(
                &field,
                format!("'{key}' is not a tag key (1 to 128 letters, digits, spaces and + - = . _ : / @)"),
            ));
        }
        if key.to_ascii_lowercase().starts_with("aws:") {
            return Err(key_node.err(&field, "tag keys starting with aws: are reserved by AWS"));
        }
        if RESERVED_TAGS.contains(key) {
            return Err(key_node.err(
                &field,
                format!("'{key}' is written by jbake itself and cannot be set by a recipe"),
            ));
        }
        let value = v.scalar_string(&field)?;
        out.push((key.to_string(), Spanned::of(v, field, &value)));
    }
    Ok(out)
}

/// Decode an included file: a mapping with `steps:`, optional `validate:`, `test:` and
/// `include:`.
pub(crate) fn decode_included(root: &Node) -> Result<StepFile, Error> {
    if root.value == Value::Null {
        return Err(root.err("", "the included file is empty; it needs `steps:`"));
    }
    let m = root.map("", INCLUDED_KEYS)?;
    decode_step_file_body(&m)
}

fn decode_step_file_body(m: &Map<'_>) -> Result<StepFile, Error> {
    let mut out = StepFile::default();
    if let Some(n) = m.get("include") {
        for (i, item) in n.seq("include")?.iter().enumerate() {
            let field = format!("include[{i}]");
            let s = item.nonempty_str(&field)?;
            out.includes.push(Spanned::of(item, field, s));
        }
    }
    if let Some(n) = m.get("steps") {
        out.steps = decode_steps(n, Phase::Steps)?;
    }
    if let Some(n) = m.get("validate") {
        out.validate = decode_steps(n, Phase::Validate)?;
    }
    if let Some(n) = m.get("test") {
        out.test = decode_steps(n, Phase::Test)?;
    }
    Ok(out)
}

fn decode_base(node: &Node) -> Result<Base, Error> {
    let m = node.map("base", &["ssm_parameter", "ami", "filter", "ssh_user"])?;
    let given: Vec<&str> = m.keys().filter(|k| *k != "ssh_user").collect();
    if given.len() > 1 {
        let (_, k, _) = m
            .entries
            .iter()
            .find(|(k, _, _)| *k == given[1])
            .copied()
            .unwrap_or(m.entries[0]);
        return Err(k.err(
            "base",
            format!(
                "'{}' and '{}' given; choose one of ssm_parameter, ami, filter",
                given[0], given[1]
            ),
        ));
    }
    let image = if let Some(n) = m.get("ssm_parameter") {
        BaseImage::SsmParameter(n.nonempty_str("base.ssm_parameter")?.to_string())
    } else if let Some(n) = m.get("ami") {
        let ami = n.str("base.ami")?;
        if !AMI.is_match(ami) {
            return Err(n.err(
                "base.ami",
                format!("\"{ami}\" is not an AMI id (like ami-0123456789abcdef0)"),
            ));
        }
        BaseImage::Ami(ami.to_string())
    } else if let Some(n) = m.get("filter") {
        let f = n.map("base.filter", &["name", "owners", "most_recent"])?;
        let name = f.require("name", "an AMI name pattern such as \"debian-12-amd64-*\"")?;
        let mut owners = Vec::new();
        if let Some(o) = f.get("owners") {
            for (i, item) in o.seq("base.filter.owners")?.iter().enumerate() {
                owners.push(item.scalar_string(&format!("base.filter.owners[{i}]"))?);
            }
        }
        let most_recent = match f.get("most_recent") {
            Some(b) => b.bool("base.filter.most_recent")?,
            None => true,
        };
        BaseImage::Filter {
            name: name.nonempty_str("base.filter.name")?.to_string(),
            owners,
            most_recent,
        }
    } else {
        return Err(node.err(
            "base",
            "no base image; give one of ssm_parameter, ami, filter",
        ));
    };
    let user = m.require("ssh_user", "the user to log in as, e.g. `ssh_user: admin`")?;
    let ssh_user = user.str("base.ssh_user")?;
    super::values::check_user(ssh_user).map_err(|e| user.err("base.ssh_user", e))?;
    Ok(Base {
        image,
        ssh_user: ssh_user.to_string(),
    })
}

fn decode_instance(node: &Node) -> Result<Instance, Error> {
    let m = node.map("instance", &["type", "volume_gb"])?;
    let instance_type = match m.get("type") {
        Some(n) => {
            let t = n.str("instance.type")?;
            if !INSTANCE_TYPE.is_match(t) {
                return Err(n.err(
                    "instance.type",
                    format!("\"{t}\" is not an instance type (like t3.small)"),
                ));
            }
            t.to_string()
        }
        None => "t3.small".into(),
    };
    let volume_gb = match m.get("volume_gb") {
        Some(n) => {
            let v = n.int("instance.volume_gb")?;
            if !(8..=16384).contains(&v) {
                return Err(n.err(
                    "instance.volume_gb",
                    format!("{v} is out of range (8 to 16384)"),
                ));
            }
            v as u32
        }
        None => 16,
    };
    Ok(Instance {
        instance_type,
        volume_gb,
    })
}

fn decode_vars(node: &Node) -> Result<Vec<VarDecl>, Error> {
    let m = node.map("vars", &[])?;
    let mut out = Vec::new();
    for (name, key, v) in &m.entries {
        let field = format!("vars.{name}");
        if !is_identifier(name) {
            return Err(key.err(
                &field,
                format!("'{name}' is not a variable name (letters, digits and _, not starting with a digit)"),
            ));
        }
        if let Some(why) = super::vars::builtin_hint(name) {
            return Err(key.err(
                &field,
                format!("'{name}' is a built-in variable and cannot be redefined ({why})"),
            ));
        }
        let mut decl = VarDecl {
            name: name.to_string(),
            origin: key.origin(),
            default: None,
            required: false,
            pattern: None,
            secret: false,
            description: None,
        };
        if v.value != Value::Null {
            let d = v.map(
                &field,
                &["default", "required", "pattern", "secret", "description"],
            )?;
            if let Some(n) = d.get("default") {
                let f = d.path("default");
                let s = n.scalar_string(&f)?;
                decl.default = Some(Spanned::of(n, f, &s));
            }
            if let Some(n) = d.get("required") {
                decl.required = n.bool(&d.path("required"))?;
            }
            if let Some(n) = d.get("secret") {
                decl.secret = n.bool(&d.path("secret"))?;
            }
            if let Some(n) = d.get("description") {
                decl.description = Some(n.str(&d.path("description"))?.to_string());
            }
            if let Some(n) = d.get("pattern") {
                let f = d.path("pattern");
                let p = n.str(&f)?;
                let re = Regex::new(p).map_err(|e| {
                    n.err(
                        &f,
                        format!("invalid regular expression: {}", one_line(&e.to_string())),
                    )
                })?;
                decl.pattern = Some((re, Spanned::of(n, f, p)));
            }
        }
        out.push(decl);
    }
    Ok(out)
}

/// regex errors are multi-line drawings; keep the gist on one line.
pub(crate) fn one_line(s: &str) -> String {
    let lines: Vec<&str> = s.lines().map(str::trim).filter(|l| !l.is_empty()).collect();
    match lines.iter().rev().find(|l| l.starts_with("error:")) {
        Some(l) => l.trim_start_matches("error:").trim().to_string(),
        None => lines.join(" "),
    }
}

fn decode_steps(node: &Node, phase: Phase) -> Result<Vec<RawStep>, Error> {
    let list = match phase {
        Phase::Steps => "steps",
        Phase::Validate => "validate",
        Phase::Test => "test",
    };
    let items = node.seq(list)?;
    items
        .iter()
        .enumerate()
        .map(|(i, n)| decode_step(n, format!("{list}[{i}]"), phase))
        .collect()
}

fn decode_step(node: &Node, field: String, phase: Phase) -> Result<RawStep, Error> {
    let m = node.map(&field, STEP_KEYS)?;
    let kinds: Vec<&str> = m.keys().filter(|k| KINDS.contains(k)).collect();
    match kinds.len() {
        0 => {
            return Err(node.err(
                &field,
                format!("no action; a step needs one of {}", KINDS.join(", ")),
            ));
        }
        1 => {}
        _ => {
            return Err(node.err(
                &field,
                format!(
                    "'{}' and '{}' in one step; split them into two steps",
                    kinds[0], kinds[1]
                ),
            ))
        }
    }
    let name_node = m.require("name", "every step needs a name")?;
    let name = Spanned::of(
        name_node,
        m.path("name"),
        name_node.nonempty_str(&m.path("name"))?,
    );
    let kind = kinds[0];
    let kind_node = m.get(kind).unwrap_or(node);
    let kf = m.path(kind);
    let action = match kind {
        "run" => RawAction::Run(Spanned::of(
            kind_node,
            kf.clone(),
            kind_node.nonempty_str(&kf)?,
        )),
        "line" => {
            let a = kind_node.map(&kf, &["path", "line", "regexp", "mode", "owner", "group"])?;
            RawAction::Line {
                path: req_str(&a, "path", "the file to edit")?,
                line: {
                    let n = a.require("line", "the line that must be present")?;
                    Spanned::of(n, a.path("line"), n.str(&a.path("line"))?)
                },
                regexp: opt_str(&a, "regexp")?,
                attrs: attrs(&a)?,
            }
        }
        "upload" => {
            let a = kind_node.map(&kf, &["src", "dest", "mode", "owner", "group", "template"])?;
            let template = match a.get("template") {
                Some(n) => n.bool(&a.path("template"))?,
                None => false,
            };
            RawAction::Upload {
                src: req_str(
                    &a,
                    "src",
                    "a file or directory next to the recipe, in files/",
                )?,
                dest: req_str(&a, "dest", "where to put it on the machine")?,
                template,
                attrs: attrs(&a)?,
            }
        }
        "file" => {
            let a = kind_node.map(&kf, &["path", "content", "mode", "owner", "group"])?;
            RawAction::File {
                path: req_str(&a, "path", "the file to write")?,
                content: {
                    let n = a.require("content", "what to write")?;
                    Spanned::of(n, a.path("content"), n.str(&a.path("content"))?)
                },
                attrs: attrs(&a)?,
            }
        }
        _ => {
            let mut timeout = Duration::from_secs(600);
            if kind_node.value != Value::Null {
                let a = kind_node.map(&kf, &["timeout"])?;
                if let Some(n) = a.get("timeout") {
                    timeout = duration(n, &a.path("timeout"))?;
                }
            }
            RawAction::Reboot { timeout }
        }
    };
    let retries = match m.get("retries") {
        Some(n) => {
            let r = n.int(&m.path("retries"))?;
            if !(0..=100).contains(&r) {
                return Err(n.err(
                    &m.path("retries"),
                    format!("{r} is out of range (0 to 100)"),
                ));
            }
            r as u32
        }
        None => 0,
    };
    let delay = match m.get("delay") {
        Some(n) => duration(n, &m.path("delay"))?,
        None => Duration::from_secs(5),
    };
    let timeout = match m.get("timeout") {
        Some(n) => Some(duration(n, &m.path("timeout"))?),
        None => None,
    };
    let mut env = Vec::new();
    if let Some(n) = m.get("env") {
        let e = n.map(&m.path("env"), &[])?;
        for (k, key, v) in &e.entries {
            let f = e.path(k);
            if !is_identifier(k) {
                return Err(key.err(
                    &f,
                    format!("'{k}' is not an environment variable name (letters, digits and _)"),
                ));
            }
            env.push((
                k.to_string(),
                Spanned::of(v, f.clone(), &v.scalar_string(&f)?),
            ));
        }
    }
    Ok(RawStep {
        origin: node.origin(),
        phase,
        name,
        action,
        user: opt_str(&m, "user")?,
        env,
        retries,
        delay,
        timeout,
        when: opt_when(&m)?,
        creates: opt_str(&m, "creates")?,
        field,
    })
}

fn duration(n: &Node, field: &str) -> Result<Duration, Error> {
    let s = n.scalar_string(field)?;
    parse_duration(&s).map_err(|e| n.err(field, e))
}

fn req_str(m: &Map<'_>, key: &str, what: &str) -> Result<Spanned, Error> {
    let n = m.require(key, what)?;
    let f = m.path(key);
    let s = n.nonempty_str(&f)?;
    Ok(Spanned::of(n, f, s))
}

fn opt_str(m: &Map<'_>, key: &str) -> Result<Option<Spanned>, Error> {
    match m.get(key) {
        Some(n) => {
            let f = m.path(key);
            let s = n.nonempty_str(&f)?;
            Ok(Some(Spanned::of(n, f, s)))
        }
        None => Ok(None),
    }
}

/// `when:` is an expression; a YAML boolean (`when: false`) is the expression `false`.
fn opt_when(m: &Map<'_>) -> Result<Option<Spanned>, Error> {
    match m.get("when") {
        Some(n) if matches!(n.value, Value::Bool(_)) => {
            let f = m.path("when");
            let b = n.bool(&f)?;
            Ok(Some(Spanned::of(n, f, if b { "true" } else { "false" })))
        }
        _ => opt_str(m, "when"),
    }
}

/// mode/owner/group; owner and group may be numeric ids written as YAML integers.
fn attrs(m: &Map<'_>) -> Result<RawAttrs, Error> {
    let mut a = RawAttrs::default();
    if let Some(n) = m.get("mode") {
        let f = m.path("mode");
        let raw = match &n.value {
            Value::Str(s) => s.clone(),
            Value::Int(_) => n.raw.clone(),
            _ => {
                return Err(n.err(
                    &f,
                    format!(
                        "expected an octal mode like \"0644\", found {}",
                        n.kind_name()
                    ),
                ))
            }
        };
        a.mode = Some(parse_mode(&raw).map_err(|e| n.err(&f, e))?);
    }
    for key in ["owner", "group"] {
        if let Some(n) = m.get(key) {
            let f = m.path(key);
            let s = match &n.value {
                Value::Int(_) => n.raw.clone(),
                _ => n.nonempty_str(&f)?.to_string(),
            };
            let sp = Spanned::of(n, f, &s);
            if key == "owner" {
                a.owner = Some(sp);
            } else {
                a.group = Some(sp);
            }
        }
    }
    Ok(a)
}
