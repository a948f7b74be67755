//! The content hash of an image: everything that defines it, and nothing that does not.
//!
//! The hash is SHA-256 over a canonical, versioned serialization of [`Inputs`]: JSON with object
//! keys sorted, no whitespace, every field named (never `Debug` text, which changes whenever a
//! type gains a field and would rebuild every image at once). [`FORMAT`] is part of the input:
//! bump it when an input changes meaning.
//!
//! Inputs: the recipe schema version, the base AMI id, the recipe's name, instance type and
//! volume size, the value of every variable (secret values replaced by a marker: they must never
//! reach an image anyway), the recipe's tags, and every step and check as it acts on the machine
//! (its kind and rendered fields, user, environment, whether `when:` lets it run, `creates:`),
//! with the bytes and modes of every uploaded file or folder. Not inputs: where a step is
//! written, its name, its retries, delay and timeout, where the checkout is, the build id and the
//! version (rendered as placeholders). Two builds with the same hash make the same image, so the
//! second is skipped.
//!
//! Extending it: [`Inputs::with`] adds a named input (e.g. the state of the package index, so
//! that security updates rebuild an image whose recipe did not change). An empty set of extra
//! inputs is not serialized, so adding the mechanism changed no hash; a new input changes the
//! hashes that carry it, and only those.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Serialize;
use serde_json::Value;
use sha2::{Digest, Sha256};

use crate::recipe::{Action, FileAttrs, Phase, Plan, Step};
use crate::util::mask;

/// The serialization's version. 1 was `Debug` text; 2 is [`Inputs`] as canonical JSON.
pub const FORMAT: u32 = 2;

/// A file that could not be read for the hash.
#[derive(Debug, thiserror::Error)]
#[error("cannot read {} for the content hash: {source}", path.display())]
pub struct HashError {
    pub path: PathBuf,
    #[source]
    pub source: std::io::Error,
}

/// Everything that defines an image.
#[derive(Debug, Clone, Serialize)]
pub struct Inputs {
    format: u32,
    schema: u32,
    base_ami: String,
    name: String,
    instance_type: String,
    volume_gb: u32,
    vars: BTreeMap<String, String>,
    tags: BTreeMap<String, String>,
    /// The `facts:` commands (not their output: that is read on the machine).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    facts: Vec<(String, String)>,
    steps: Vec<StepInputs>,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    extra: BTreeMap<String, Value>,
}

#[derive(Debug, Clone, Serialize)]
struct StepInputs {
    phase: &'static str,
    #[serde(flatten)]
    action: ActionInputs,
    user: Option<String>,
    env: Vec<(String, String)>,
    runs: bool,
    creates: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
enum ActionInputs {
    Run {
        script: String,
    },
    Line {
        path: String,
        line: String,
        regexp: Option<String>,
        attrs: Attrs,
    },
    Upload {
        dest: String,
        attrs: Attrs,
        content: Vec<Entry>,
    },
    File {
        path: String,
        content: String,
        attrs: Attrs,
    },
    Reboot,
}

#[derive(Debug, Clone, Serialize)]
struct Attrs {
    mode: Option<u32>,
    owner: Option<String>,
    group: Option<String>,
}

/// One uploaded file: its path relative to the upload's source (empty for a single file), its
/// mode, and the SHA-256 of its bytes (of the rendered bytes, secrets masked, for a template).
#[derive(Debug, Clone, Serialize)]
struct Entry {
    path: String,
    mode: Option<u32>,
    sha256: String,
}

impl Inputs {
    /// The inputs of `plan` built on `base_ami`. Reads the uploaded files.
    pub fn of(plan: &Plan, base_ami: &str) -> Result<Inputs, HashError> {
        let secrets = plan.secrets();
        let m = |s: &str| mask(s, &secrets);
        let mut steps = Vec::new();
        // The boot test's checks too: new checks are a new image to test (the nightly bakes
        // and tests it instead of calling the old one unchanged). A recipe without `test:`
        // hashes as before.
        for step in plan.all_steps().chain(plan.test.iter()) {
            steps.push(step_inputs(step, &m)?);
        }
        Ok(Inputs {
            format: FORMAT,
            schema: plan.schema_version,
            base_ami: base_ami.to_string(),
            name: plan.name.clone(),
            instance_type: plan.instance.instance_type.clone(),
            volume_gb: plan.instance.volume_gb,
            vars: plan
                .vars
                .iter()
                .map(|v| {
                    let value = if v.secret {
                        "<secret>".to_string()
                    } else {
                        m(&v.value)
                    };
                    (v.name.clone(), value)
                })
                .collect(),
            tags: plan.tags.iter().cloned().collect(),
            facts: plan
                .facts
                .iter()
                .map(|f| (f.key.clone(), m(&f.script)))
                .collect(),
            steps,
            extra: BTreeMap::new(),
        })
    }

    /// Adds (or replaces) a named input beyond the recipe's.
    pub fn with(mut self, key: &str, value: Value) -> Inputs {
        self.extra.insert(key.to_string(), value);
        self
    }

    /// The canonical serialization: what is hashed.
    pub fn canonical(&self) -> String {
        let value = serde_json::to_value(self).unwrap_or(Value::Null);
        let mut out = String::new();
        canonical(&value, &mut out);
        out
    }

    /// The hex SHA-256 of [`canonical`](Self::canonical).
    pub fn hash(&self) -> String {
        format!("{:x}", Sha256::digest(self.canonical().as_bytes()))
    }
}

/// The content hash of `plan` on `base_ami`.
pub fn content_hash(plan: &Plan, base_ami: &str) -> Result<String, HashError> {
    Ok(Inputs::of(plan, base_ami)?.hash())
}

fn attrs(a: &FileAttrs) -> Attrs {
    Attrs {
        mode: a.mode,
        owner: a.owner.clone(),
        group: a.group.clone(),
    }
}

fn step_inputs(step: &Step, m: &impl Fn(&str) -> String) -> Result<StepInputs, HashError> {
    let action = match &step.action {
        Action::Run { script } => ActionInputs::Run { script: m(script) },
        Action::Line {
            path,
            line,
            regexp,
            attrs: a,
        } => ActionInputs::Line {
            path: m(path),
            line: m(line),
            regexp: regexp.as_deref().map(m),
            attrs: attrs(a),
        },
        Action::Upload {
            src,
            dest,
            rendered,
            attrs: a,
        } => {
            let content = match rendered {
                Some(bytes) => vec![Entry {
                    path: String::new(),
                    mode: None,
                    sha256: sha256(m(&String::from_utf8_lossy(bytes)).as_bytes()),
                }],
                None => {
                    let mut entries = Vec::new();
                    tree(src, String::new(), &mut entries)?;
                    entries
                }
            };
            ActionInputs::Upload {
                dest: m(dest),
                attrs: attrs(a),
                content,
            }
        }
        Action::File {
            path,
            content,
            attrs: a,
        } => ActionInputs::File {
            path: m(path),
            content: m(content),
            attrs: attrs(a),
        },
        Action::Reboot { .. } => ActionInputs::Reboot,
    };
    Ok(StepInputs {
        phase: match step.phase {
            Phase::Steps => "steps",
            Phase::Validate => "validate",
            Phase::Test => "test",
        },
        action,
        user: step.user.clone(),
        env: step.env.iter().map(|(k, v)| (k.clone(), m(v))).collect(),
        runs: step.when.as_ref().is_none_or(|(_, runs)| *runs),
        creates: step.creates.as_deref().map(m),
    })
}

fn sha256(bytes: &[u8]) -> String {
    format!("{:x}", Sha256::digest(bytes))
}

/// The files under `path` (or `path` itself), sorted by relative path, with their modes.
fn tree(path: &Path, rel: String, out: &mut Vec<Entry>) -> Result<(), HashError> {
    use std::os::unix::fs::PermissionsExt;
    let fail = |source| HashError {
        path: path.to_path_buf(),
        source,
    };
    let meta = std::fs::metadata(path).map_err(fail)?;
    if meta.is_dir() {
        let mut names: Vec<_> = std::fs::read_dir(path)
            .map_err(fail)?
            .map(|e| e.map(|e| e.file_name()))
            .collect::<Result<_, _>>()
            .map_err(fail)?;
        names.sort();
        for name in names {
            let name_text = name.to_string_lossy();
            let child = if rel.is_empty() {
                name_text.to_string()
            } else {
                format!("{rel}/{name_text}")
            };
            tree(&path.join(&name), child, out)?;
        }
    } else {
        // Executable or not, as git keeps it: the rest of the mode depends on the umask of
        // whoever checked out (or extracted) the files, and changes nothing on the machine
        // (an upload's mode is its `mode:`, else 0644).
        let executable = meta.permissions().mode() & 0o111 != 0;
        out.push(Entry {
            path: rel,
            mode: Some(if executable { 0o755 } else { 0o644 }),
            sha256: sha256(&std::fs::read(path).map_err(fail)?),
        });
    }
    Ok(())
}

/// JSON with object keys sorted and no whitespace: one text for one value, whatever the order
/// of insertion (serde_json's map type depends on a crate feature another crate may turn on).
fn canonical(v: &Value, out: &mut String) {
    match v {
        Value::Object(map) => {
            let mut keys: Vec<&String> = map.keys().collect();
            keys.sort();
            out.push('{');
            for (i, k) in keys.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                out.push_str(&Value::String((*k).clone()).to_string());
                out.push(':');
                if let Some(v) = map.get(*k) {
                    canonical(v, out);
                }
            }
            out.push('}');
        }
        Value::Array(items) => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                canonical(item, out);
            }
            out.push(']');
        }
        other => out.push_str(&other.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::recipe::{load, LoadOptions};

    const RECIPE: &str = "version: 1\nname: r\nbase: { ami: ami-0123456789abcdef0, ssh_user: admin }\n\
        vars:\n  v: { default: a }\n  t: { secret: true, default: s3cret }\n\
        steps:\n  - name: conf\n    upload: { src: app.conf, dest: /etc/app.conf }\n  - name: v\n    run: echo {{ v }} {{ t }}\n";

    fn plan_in(dir: &Path, recipe: &str, file: &str, vars: &[(&str, &str)]) -> Plan {
        std::fs::create_dir_all(dir.join("files")).unwrap();
        std::fs::write(dir.join("files/app.conf"), file).unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(
            dir.join("files/app.conf"),
            std::fs::Permissions::from_mode(0o644),
        )
        .unwrap();
        std::fs::write(dir.join("r.yaml"), recipe).unwrap();
        let opts = LoadOptions {
            vars: vars
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            ..Default::default()
        };
        load(&dir.join("r.yaml"), &opts).unwrap()
    }

    fn hash_in(dir: &Path, recipe: &str, file: &str, vars: &[(&str, &str)]) -> String {
        content_hash(&plan_in(dir, recipe, file, vars), "ami-0123456789abcdef0").unwrap()
    }

    #[test]
    fn the_hash_changes_with_what_defines_the_image_only() {
        let a = tempfile::tempdir().unwrap();
        let b = tempfile::tempdir().unwrap();
        let base = hash_in(a.path(), RECIPE, "x=1\n", &[]);
        // The same recipe in another checkout: the same hash.
        assert_eq!(hash_in(b.path(), RECIPE, "x=1\n", &[]), base);
        // One byte of an uploaded file, or a variable: another hash.
        assert_ne!(hash_in(b.path(), RECIPE, "x=2\n", &[]), base);
        assert_ne!(hash_in(b.path(), RECIPE, "x=1\n", &[("v", "b")]), base);
        // A secret's value never reaches the image: the same hash.
        assert_eq!(hash_in(b.path(), RECIPE, "x=1\n", &[("t", "other")]), base);
        // A step's name, timeout and retries do not change the machine: the same hash.
        let renamed = RECIPE.replace(
            "- name: v\n    run:",
            "- name: renamed\n    timeout: 5m\n    retries: 2\n    run:",
        );
        assert_eq!(hash_in(b.path(), &renamed, "x=1\n", &[]), base);
        // The base AMI.
        let plan = plan_in(a.path(), RECIPE, "x=1\n", &[]);
        assert_ne!(content_hash(&plan, "ami-0fffffffffffffff0").unwrap(), base);
        // An extra input changes it; none changes nothing.
        let inputs = Inputs::of(&plan, "ami-0123456789abcdef0").unwrap();
        assert_eq!(inputs.hash(), base);
        assert_ne!(
            inputs
                .with("package-index", Value::from("2026-11-29"))
                .hash(),
            base
        );
    }

    #[test]
    fn the_serialization_is_canonical_and_versioned() {
        let a = tempfile::tempdir().unwrap();
        let plan = plan_in(a.path(), RECIPE, "x=1\n", &[]);
        let text = Inputs::of(&plan, "ami-0123456789abcdef0")
            .unwrap()
            .canonical();
        assert!(
            text.starts_with("{\"base_ami\":\"ami-0123456789abcdef0\",\"format\":2,"),
            "{text}"
        );
        assert!(!text.contains("s3cret"), "{text}");
        assert!(
            !text.contains(' ') || text.contains("echo a ****"),
            "{text}"
        );
        assert!(text.contains("\"kind\":\"upload\""), "{text}");
        // Pinned: a change here rebuilds every image. Bump FORMAT when that is intended.
        assert_eq!(
            Inputs::of(&plan, "ami-0123456789abcdef0").unwrap().hash(),
            PINNED,
            "{text}"
        );
    }

    const PINNED: &str = "cf9d2e36ce58939dac15c9f60752a72c8541bb1327215f48dad6c2bb2b56e0f0";

    #[test]
    fn canonical_json_sorts_keys_at_every_level() {
        let v: Value = serde_json::from_str(r#"{"b":[{"z":1,"a":null}],"a":"x\"y"}"#).unwrap();
        let mut out = String::new();
        canonical(&v, &mut out);
        assert_eq!(out, r#"{"a":"x\"y","b":[{"a":null,"z":1}]}"#);
    }
}
