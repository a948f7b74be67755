//! The recipes and files jbake ships (`recipes/`, `files/`), built into the binary by
//! `build.rs`, so an installed jbake bakes the controller and agent images from any folder.
//!
//! The recipe loader reads files (includes, uploads, templates relative to the recipe), so the
//! shipped tree is extracted into a private temporary folder for the length of one command and
//! loaded from there like a checkout; an explicit `--recipe` still wins. `jbake recipes export
//! DIR` writes the same tree out to customise.

use std::io::Write as _;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

mod generated {
    include!(concat!(env!("OUT_DIR"), "/shipped.rs"));
}

/// How error messages name the extracted tree.
pub const DISPLAY_PREFIX: &str = "<built-in>";

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot extract the built-in recipes into {dir}: {source}")]
    Extract {
        dir: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot write {path}: {source}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "{path} exists and differs from the built-in file: pass --force to overwrite it (or export into an empty folder)"
    )]
    Exists { path: PathBuf },
    #[error("there is no built-in recipe named {name:?}: the built-in recipes are {known}")]
    Unknown { name: String, known: String },
}

/// Every shipped file: `(path under the tree, contents, executable)`.
pub fn files() -> impl Iterator<Item = (&'static str, &'static [u8], bool)> {
    generated::FILES.iter().copied()
}

/// The top-level recipes (`recipes/NAME.yaml`): `(file stem, contents)`.
pub fn recipes() -> impl Iterator<Item = (&'static str, &'static [u8])> {
    files().filter_map(|(path, bytes, _)| {
        let name = path.strip_prefix("recipes/")?.strip_suffix(".yaml")?;
        (!name.contains('/')).then_some((name, bytes))
    })
}

/// The shipped tree extracted for one command; removed when dropped.
pub struct Extracted {
    dir: tempfile::TempDir,
}

impl Extracted {
    /// Extracts every shipped file into a new private folder (0700, under `$TMPDIR`).
    pub fn new() -> Result<Extracted, Error> {
        let dir = tempfile::Builder::new()
            .prefix("jbake-shipped-")
            .tempdir()
            .map_err(|source| Error::Extract {
                dir: std::env::temp_dir(),
                source,
            })?;
        // Private before anything is written into it (the recipes are not secret, but a
        // folder others can write to would let them change what gets baked).
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o700)).map_err(
            |source| Error::Extract {
                dir: dir.path().to_path_buf(),
                source,
            },
        )?;
        write_tree(dir.path(), true)?;
        Ok(Extracted { dir })
    }

    /// The path of built-in recipe `name` (`controller` → `recipes/controller.yaml`).
    pub fn recipe(&self, name: &str) -> Result<PathBuf, Error> {
        if recipes().any(|(n, _)| n == name) {
            Ok(self.dir.path().join("recipes").join(format!("{name}.yaml")))
        } else {
            Err(Error::Unknown {
                name: name.to_string(),
                known: recipes().map(|(n, _)| n).collect::<Vec<_>>().join(", "),
            })
        }
    }

    /// The folder the tree is in (what error messages show as [`DISPLAY_PREFIX`]).
    pub fn root(&self) -> &Path {
        self.dir.path()
    }

    /// `text` with the temporary folder replaced by [`DISPLAY_PREFIX`].
    pub fn display(&self, text: &str) -> String {
        text.replace(&self.dir.path().display().to_string(), DISPLAY_PREFIX)
    }
}

/// Writes the shipped tree into `dest` (`dest/recipes/…`, `dest/files/…`). An existing file
/// with other contents is an error unless `overwrite`. Returns the files written (changed).
pub fn export(dest: &Path, overwrite: bool) -> Result<Vec<PathBuf>, Error> {
    // Check everything first: nothing is written when one file would be refused.
    if !overwrite {
        for (rel, bytes, _) in files() {
            let path = dest.join(rel);
            if let Ok(existing) = std::fs::read(&path) {
                if existing != bytes {
                    return Err(Error::Exists { path });
                }
            }
        }
    }
    write_tree(dest, false)
}

fn write_tree(dest: &Path, fresh: bool) -> Result<Vec<PathBuf>, Error> {
    let mut written = Vec::new();
    for (rel, bytes, exec) in files() {
        let path = dest.join(rel);
        let werr = |source| Error::Write {
            path: path.clone(),
            source,
        };
        if !fresh && std::fs::read(&path).is_ok_and(|b| b == bytes) {
            continue;
        }
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).map_err(werr)?;
        }
        let mode = if exec { 0o755 } else { 0o644 };
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(mode)
            .open(&path)
            .map_err(werr)?;
        f.write_all(bytes).map_err(werr)?;
        // The mode of an existing file is not changed by open(): set it (the umask too).
        f.set_permissions(std::fs::Permissions::from_mode(mode))
            .map_err(werr)?;
        written.push(path);
    }
    Ok(written)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_shipped_tree_is_the_checkout() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR"));
        let mut n = 0;
        for (rel, bytes, exec) in files() {
            let on_disk = std::fs::read(root.join(rel)).unwrap();
            assert_eq!(on_disk, bytes, "{rel}");
            let mode = std::fs::metadata(root.join(rel))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o111 != 0, exec, "{rel}");
            n += 1;
        }
        assert!(n > 10, "only {n} files shipped");
        let names: Vec<&str> = recipes().map(|(n, _)| n).collect();
        for want in ["controller", "agent"] {
            assert!(names.contains(&want), "{names:?}");
        }
    }

    #[test]
    fn extracted_recipes_load_and_name_themselves_as_built_in() {
        let x = Extracted::new().unwrap();
        let path = x.recipe("agent").unwrap();
        let plan = crate::recipe::load(&path, &Default::default()).unwrap();
        assert_eq!(plan.name, "jenkins-agent");
        let err = crate::recipe::load(&x.recipe("controller").unwrap(), &Default::default())
            .unwrap_err()
            .to_string();
        let shown = x.display(&err);
        assert!(
            shown.starts_with("<built-in>/recipes/controller.yaml:"),
            "{shown}"
        );
        assert!(matches!(x.recipe("nope"), Err(Error::Unknown { .. })));
        let mode = std::fs::metadata(x.root()).unwrap().permissions().mode();
        assert_eq!(mode & 0o077, 0, "the extracted tree is private");
    }

    #[test]
    fn a_built_in_recipe_hashes_like_the_checkout() {
        // An installed jbake and a checkout bake the same image: the nightly must not
        // rebuild because it switched from one to the other.
        let root = Path::new(env!("CARGO_MANIFEST_DIR"));
        let x = Extracted::new().unwrap();
        for name in ["controller", "agent"] {
            let vars = match name {
                "controller" => vec![("efs_id".into(), "fs-01234567".into())],
                _ => Vec::new(),
            };
            let opts = crate::recipe::LoadOptions {
                vars,
                ..Default::default()
            };
            let shipped = crate::recipe::load(&x.recipe(name).unwrap(), &opts).unwrap();
            let checkout =
                crate::recipe::load(&root.join(format!("recipes/{name}.yaml")), &opts).unwrap();
            let ami = "ami-0123456789abcdef0";
            assert_eq!(
                crate::bake::hash::content_hash(&shipped, ami).unwrap(),
                crate::bake::hash::content_hash(&checkout, ami).unwrap(),
                "{name}"
            );
        }
    }

    #[test]
    fn export_refuses_to_overwrite_a_changed_file_unless_forced() {
        let d = tempfile::tempdir().unwrap();
        let first = export(d.path(), false).unwrap();
        assert!(first.iter().any(|p| p.ends_with("recipes/controller.yaml")));
        // Again: nothing to write.
        assert!(export(d.path(), false).unwrap().is_empty());
        let conf = d.path().join("recipes/controller.yaml");
        std::fs::write(&conf, "changed").unwrap();
        assert!(matches!(export(d.path(), false), Err(Error::Exists { .. })));
        assert_eq!(std::fs::read_to_string(&conf).unwrap(), "changed");
        let forced = export(d.path(), true).unwrap();
        assert_eq!(forced, vec![conf.clone()]);
        let exec = d.path().join("files/jbake-ssm-get");
        let mode = std::fs::metadata(exec).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o755);
    }
}
