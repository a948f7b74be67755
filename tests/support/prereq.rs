//! Prerequisites of the test tiers.
//!
//! A test whose prerequisite is missing is skipped with a visible reason on
//! stderr when run locally; under `CI=true` it panics instead, because in CI a
//! missing prerequisite is a failure, never a silent skip.
//!
//! ```ignore
//! if !prereq::quick_tier() { return; }
//! ```

use std::path::Path;

/// True when running under CI (`CI=true` or `CI=1`).
pub fn in_ci() -> bool {
    matches!(std::env::var("CI").as_deref(), Ok("true") | Ok("1"))
}

/// Returns `ok`; when it is false, says which prerequisite is missing (stderr)
/// or, under CI, panics.
pub fn require(what: &str, ok: bool) -> bool {
    if ok {
        return true;
    }
    if in_ci() {
        panic!("missing prerequisite: {what} (under CI a missing prerequisite is a failure)");
    }
    eprintln!("SKIPPED: missing prerequisite: {what}");
    false
}

/// Effective user id is 0 (read from /proc, no libc needed).
pub fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find(|l| l.starts_with("Uid:"))
                .and_then(|l| l.split_whitespace().nth(2).map(|euid| euid == "0"))
        })
        .unwrap_or(false)
}

/// An executable program: an absolute path, or a name found on PATH.
pub fn has_program(program: &str) -> bool {
    if program.contains('/') {
        return Path::new(program).is_file();
    }
    std::env::var_os("PATH")
        .map(|path| std::env::split_paths(&path).any(|dir| dir.join(program).is_file()))
        .unwrap_or(false)
}

fn require_all(checks: &[(&str, bool)]) -> bool {
    // Check everything so that one run names every missing piece.
    let mut ok = true;
    for (what, present) in checks {
        if !present {
            ok = require(what, false) && ok;
        }
    }
    ok
}

/// Quick tier: a throwaway OpenSSH server on 127.0.0.1 and a sudo-capable test user.
pub fn quick_tier() -> bool {
    require_all(&[
        ("running as root", is_root()),
        (
            "/usr/sbin/sshd (apt: openssh-server)",
            has_program("/usr/sbin/sshd"),
        ),
        ("ssh (apt: openssh-client)", has_program("ssh")),
        (
            "ssh-keygen (apt: openssh-client)",
            has_program("ssh-keygen"),
        ),
        ("sudo (apt: sudo)", has_program("sudo")),
        ("useradd (apt: passwd)", has_program("useradd")),
        ("flock (apt: util-linux)", has_program("flock")),
    ])
}

/// Instance tier: a Debian system booted with systemd-nspawn (scripts/instance).
pub fn instance_tier() -> bool {
    quick_tier()
        && require_all(&[
            (
                "systemd-nspawn (apt: systemd-container)",
                has_program("systemd-nspawn"),
            ),
            ("debootstrap (apt: debootstrap)", has_program("debootstrap")),
            ("zstd (apt: zstd)", has_program("zstd")),
            ("ip (apt: iproute2)", has_program("ip")),
            ("nsenter (apt: util-linux)", has_program("nsenter")),
            (
                "/usr/bin/python3 (apt: python3)",
                has_program("/usr/bin/python3"),
            ),
            (
                "ssh-keyscan (apt: openssh-client)",
                has_program("ssh-keyscan"),
            ),
            (
                "cgroup v1 hybrid or v2 at /sys/fs/cgroup/unified or /sys/fs/cgroup",
                Path::new("/sys/fs/cgroup/unified").is_dir()
                    || Path::new("/sys/fs/cgroup/cgroup.controllers").is_file(),
            ),
        ])
}

/// AWS tier: a moto server (`python3 -m moto.server`) and boto3 for the harness's
/// helpers (pip: tests/requirements.txt).
pub fn moto() -> bool {
    let python = has_program("python3");
    let modules = python
        && std::process::Command::new("python3")
            .args(["-c", "import moto.server, boto3"])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
    require_all(&[
        ("python3", python),
        (
            "python modules moto[server] and boto3 (pip install -r tests/requirements.txt)",
            modules,
        ),
    ])
}
