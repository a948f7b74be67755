//! Embeds the shipped recipes (`recipes/`) and the files they upload (`files/`) in the binary, so
//! an installed jbake (`cargo install`) bakes the images from any folder (see `src/shipped.rs`).
//!
//! Hand-written rather than `include_dir`/`rust-embed`: those do not keep the executable bit,
//! which an extracted `files/jbake-ssm-get` needs (and the content hash reads).

use std::fmt::Write as _;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

fn walk(root: &Path, dir: &Path, out: &mut Vec<(String, PathBuf, bool)>) {
    let mut entries: Vec<_> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("build.rs: cannot read {}: {e}", dir.display()))
        .map(|e| e.expect("build.rs: directory entry").path())
        .collect();
    entries.sort();
    for path in entries {
        let meta = std::fs::symlink_metadata(&path)
            .unwrap_or_else(|e| panic!("build.rs: cannot stat {}: {e}", path.display()));
        if meta.is_dir() {
            walk(root, &path, out);
        } else if meta.is_file() {
            let rel = path
                .strip_prefix(root)
                .expect("build.rs: path under the crate root")
                .to_str()
                .expect("build.rs: shipped file names are UTF-8")
                .to_string();
            let exec = meta.permissions().mode() & 0o111 != 0;
            out.push((rel, path, exec));
        }
    }
}

fn main() {
    let root = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").expect("CARGO_MANIFEST_DIR"));
    let mut files = Vec::new();
    for dir in ["recipes", "files"] {
        println!("cargo:rerun-if-changed={dir}");
        walk(&root, &root.join(dir), &mut files);
    }
    let mut code = String::from("/// `(path, contents, executable)`, sorted by path.\n");
    code.push_str("pub static FILES: &[(&str, &[u8], bool)] = &[\n");
    for (rel, path, exec) in &files {
        let _ = writeln!(
            code,
            "    ({rel:?}, include_bytes!({:?}), {exec}),",
            path.display().to_string()
        );
    }
    code.push_str("];\n");
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("OUT_DIR")).join("shipped.rs");
    std::fs::write(&out, code)
        .unwrap_or_else(|e| panic!("build.rs: cannot write {}: {e}", out.display()));
}
