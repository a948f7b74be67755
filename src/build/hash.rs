//! The content hash of an image: everything that defines it, and nothing that does not.
//!
//! Inputs: jbake's recipe schema and hash format versions, the base AMI id, the recipe's name,
//! instance settings, every rendered step and check (built with `build_id` and `version` left as
//! placeholders, so they do not count), the value of every variable (secret values are replaced
//! by a marker: they must never reach an image anyway), and the bytes of every uploaded file and
//! folder. Two builds with the same hash produce the same image, so the second is skipped.

use sha2::{Digest, Sha256};

use crate::recipe::{Action, Plan};

/// Bump when the hash's inputs change meaning.
const HASH_FORMAT: &str = "jbake-content-hash-1";

pub fn content_hash(plan: &Plan, base_ami: &str) -> Result<String, std::io::Error> {
    let mut h = Sha256::new();
    let mut field = |name: &str, value: &[u8]| {
        h.update((name.len() as u64).to_le_bytes());
        h.update(name.as_bytes());
        h.update((value.len() as u64).to_le_bytes());
        h.update(value);
    };
    field("format", HASH_FORMAT.as_bytes());
    field("schema", plan.schema_version.to_string().as_bytes());
    field("base_ami", base_ami.as_bytes());
    field("name", plan.name.as_bytes());
    field("instance", format!("{:?}", plan.instance).as_bytes());
    for v in &plan.vars {
        let value = if v.secret {
            "<secret>"
        } else {
            v.value.as_str()
        };
        field(&format!("var:{}", v.name), value.as_bytes());
    }
    for (k, v) in &plan.tags {
        field(&format!("tag:{k}"), v.as_bytes());
    }
    let secrets = plan.secrets();
    for step in plan.all_steps() {
        // The step as rendered, without where it is written (moving a step between files
        // changes nothing on the machine).
        let mut s = step.clone();
        s.origin.line = 0;
        s.origin.column = 0;
        s.origin.file = Default::default();
        // Nor where the checkout is (a cron job may clone afresh each night): the file's bytes
        // and mode are hashed below, and `dest` says where it goes.
        if let Action::Upload { src, .. } = &mut s.action {
            *src = Default::default();
        }
        let rendered = crate::util::mask(&format!("{s:?}"), &secrets);
        field("step", rendered.as_bytes());
        if let Action::Upload {
            src,
            rendered: None,
            ..
        } = &step.action
        {
            hash_path(src, &mut field)?;
        }
    }
    Ok(format!("{:x}", h.finalize()))
}

fn hash_path(path: &std::path::Path, field: &mut impl FnMut(&str, &[u8])) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let meta = std::fs::metadata(path)?;
    if meta.is_dir() {
        let mut entries: Vec<_> = std::fs::read_dir(path)?.collect::<Result<_, _>>()?;
        entries.sort_by_key(|e| e.file_name());
        for e in entries {
            field("entry", e.file_name().to_string_lossy().as_bytes());
            hash_path(&e.path(), field)?;
        }
    } else {
        field(
            "mode",
            format!("{:o}", meta.permissions().mode() & 0o7777).as_bytes(),
        );
        field("file", &std::fs::read(path)?);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::recipe::{load, LoadOptions};

    fn recipe_in(dir: &std::path::Path, file: &str, var: &str) -> String {
        std::fs::create_dir_all(dir.join("files")).unwrap();
        std::fs::write(dir.join("files/app.conf"), file).unwrap();
        std::fs::write(
            dir.join("r.yaml"),
            "version: 1\nname: r\nbase: { ami: ami-0123456789abcdef0, ssh_user: admin }\n\
             vars:\n  v: { default: a }\n  t: { secret: true, default: s3cret }\n\
             steps:\n  - name: conf\n    upload: { src: app.conf, dest: /etc/app.conf }\n  - name: v\n    run: echo {{ v }}\n",
        )
        .unwrap();
        let opts = LoadOptions {
            vars: vec![("v".into(), var.into())],
            ..Default::default()
        };
        let plan = load(&dir.join("r.yaml"), &opts).unwrap();
        content_hash(&plan, "ami-0123456789abcdef0").unwrap()
    }

    #[test]
    fn the_hash_changes_with_what_defines_the_image_only() {
        let a = tempfile::tempdir().unwrap();
        let b = tempfile::tempdir().unwrap();
        let base = recipe_in(a.path(), "x=1\n", "a");
        // The same recipe in another checkout: the same hash.
        assert_eq!(recipe_in(b.path(), "x=1\n", "a"), base);
        // One byte of an uploaded file, or a variable: another hash.
        assert_ne!(recipe_in(b.path(), "x=2\n", "a"), base);
        assert_ne!(recipe_in(b.path(), "x=1\n", "b"), base);
        // The base AMI.
        let plan = load(&a.path().join("r.yaml"), &LoadOptions::default()).unwrap();
        assert_ne!(content_hash(&plan, "ami-0fffffffffffffff0").unwrap(), base);
    }
}
