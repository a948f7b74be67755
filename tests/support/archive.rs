//! Looking inside an image archive (a `.tar.zst` from [`Instance::snapshot`]).
//!
//! [`Instance::snapshot`]: crate::support::instance::Instance::snapshot

use std::path::Path;
use std::process::Command;

/// Every file in the archive that holds a private key (a PEM or OpenSSH
/// `-----BEGIN … PRIVATE KEY-----` line), as paths inside the image (`etc/ssh/…`). Unpacks
/// into a temporary folder in memory (/dev/shm) and searches every regular file.
pub fn private_keys(archive: &Path) -> Vec<String> {
    let base = if Path::new("/dev/shm").is_dir() {
        Path::new("/dev/shm").to_path_buf()
    } else {
        std::env::temp_dir()
    };
    let dir = tempfile::Builder::new()
        .prefix("jbake-scan-")
        .tempdir_in(base)
        .expect("create a scan folder");
    let unpack = Command::new("sh")
        .arg("-c")
        .arg("zstd -dc -q \"$1\" | tar --numeric-owner -C \"$2\" -xf -")
        .args(["sh", &archive.display().to_string()])
        .arg(dir.path())
        .status()
        .expect("unpack the archive");
    assert!(unpack.success(), "cannot unpack {}", archive.display());
    let out = Command::new("grep")
        .args([
            "-rlaE",
            "--no-messages",
            "^-----BEGIN ([A-Z0-9]+ )*PRIVATE KEY-----",
        ])
        .arg(".")
        .current_dir(dir.path())
        .output()
        .expect("run grep");
    let mut found: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| l.trim_start_matches("./").to_string())
        .collect();
    found.sort();
    found
}

/// Every path in the archive (`etc/ssh/…`, without the leading `./`; folders end in `/`).
pub fn list(archive: &Path) -> Vec<String> {
    let out = Command::new("sh")
        .arg("-c")
        .arg("zstd -dc -q \"$1\" | tar -tf -")
        .args(["sh", &archive.display().to_string()])
        .output()
        .expect("list the archive");
    assert!(out.status.success(), "cannot list {}", archive.display());
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| l.trim_start_matches("./").to_string())
        .filter(|l| !l.is_empty())
        .collect()
}

/// The content of one file of the archive (`etc/machine-id`), `None` if it has none there.
pub fn read(archive: &Path, path: &str) -> Option<Vec<u8>> {
    let out = Command::new("sh")
        .arg("-c")
        .arg("zstd -dc -q \"$1\" | tar -xOf - \"./$2\"")
        .args(["sh", &archive.display().to_string(), path])
        .output()
        .expect("read from the archive");
    out.status.success().then_some(out.stdout)
}
