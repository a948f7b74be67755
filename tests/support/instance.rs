//! Instance tier: a booted Debian system (systemd-nspawn) standing in for an EC2
//! instance, driven through `scripts/instance`.
//!
//! ```ignore
//! let vm = Instance::builder("boot").up();
//! let out = vm.ssh("sudo -n id -u").output().expect("ssh");
//! ```
//!
//! Dropping an [`Instance`] runs `scripts/instance down`, even when the test panics.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use tempfile::TempDir;

/// `scripts/instance` of this checkout.
pub fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/instance")
}

/// Builds (once per machine, cached) or reuses the base image; returns its path.
pub fn base_image() -> PathBuf {
    let out = super::command(script())
        .arg("rootfs")
        .stderr(Stdio::inherit())
        .output()
        .expect("run scripts/instance rootfs");
    assert!(out.status.success(), "scripts/instance rootfs failed");
    PathBuf::from(String::from_utf8_lossy(&out.stdout).trim())
}

/// Once per test process: `down` the instances of test runs that were killed
/// (their owner process is gone; running ones of other processes are left alone).
fn prune_once() {
    static PRUNED: OnceLock<()> = OnceLock::new();
    PRUNED.get_or_init(|| {
        let status = super::command(script())
            .arg("prune")
            .stdin(Stdio::null())
            .status()
            .expect("run scripts/instance prune");
        assert!(status.success(), "scripts/instance prune failed");
    });
}

/// A name no other instance of this or a parallel test process uses.
pub fn unique_name(prefix: &str) -> String {
    static COUNTER: AtomicUsize = AtomicUsize::new(0);
    format!(
        "{prefix}-{}-{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::SeqCst)
    )
}

/// Options of `scripts/instance up`.
#[derive(Debug, Clone)]
pub struct Builder {
    name: String,
    image: Option<PathBuf>,
    binds: Vec<(PathBuf, String)>,
    authorized_keys: Vec<String>,
    host_key: Option<PathBuf>,
}

impl Builder {
    /// Boot this `.tar.zst` (e.g. from [`Instance::snapshot`]) instead of the base image.
    pub fn image(mut self, archive: impl Into<PathBuf>) -> Self {
        self.image = Some(archive.into());
        self
    }
    /// Bind-mount a host folder into the guest.
    pub fn bind(mut self, host: impl Into<PathBuf>, guest: &str) -> Self {
        self.binds.push((host.into(), guest.to_string()));
        self
    }
    /// Also authorize this public key (a `ssh-ed25519 AAAA…` line) for `admin`.
    pub fn authorized_key(mut self, key: &str) -> Self {
        self.authorized_keys.push(key.to_string());
        self
    }
    /// Use this private key file as the instance's ed25519 host key.
    pub fn host_key(mut self, private_key: impl Into<PathBuf>) -> Self {
        self.host_key = Some(private_key.into());
        self
    }

    /// Boots the instance and waits until its sshd answers.
    pub fn up(self) -> Instance {
        prune_once();
        let mut cmd = super::command(script());
        cmd.arg("up").arg(&self.name);
        if let Some(image) = &self.image {
            cmd.arg("--image").arg(image);
        }
        for (host, guest) in &self.binds {
            cmd.arg("--bind").arg(format!("{}:{guest}", host.display()));
        }
        for key in &self.authorized_keys {
            cmd.arg("--authorized-key").arg(key);
        }
        if let Some(key) = &self.host_key {
            cmd.arg("--host-key").arg(key);
        }
        let out = cmd
            .stdin(Stdio::null())
            .stderr(Stdio::inherit())
            .output()
            .expect("run scripts/instance up");
        assert!(
            out.status.success(),
            "scripts/instance up {} failed (see its stderr above)",
            self.name
        );
        Instance::from_env(&self.name, &String::from_utf8_lossy(&out.stdout))
    }
}

/// A running (or stopped) instance; `down` on drop.
#[derive(Debug)]
pub struct Instance {
    pub name: String,
    pub host: String,
    pub port: u16,
    pub user: String,
    /// The client's private key for `user`.
    pub identity: PathBuf,
    /// `ssh-ed25519 AAAA…`
    pub host_key: String,
    /// The guest's root file system on the host.
    pub root: PathBuf,
    pub supervisor_pid: u32,
    /// The host side of the veth (169.254.N.1): host services bound there are
    /// reachable from the guest.
    pub gateway: String,
    files: TempDir,
    down_on_drop: bool,
}

impl Instance {
    /// Options for `up`; the name gets a unique suffix (see [`unique_name`]).
    pub fn builder(prefix: &str) -> Builder {
        Builder {
            name: unique_name(prefix),
            image: None,
            binds: Vec::new(),
            authorized_keys: Vec::new(),
            host_key: None,
        }
    }

    /// Parses the KEY=VALUE lines of `scripts/instance up`.
    fn from_env(name: &str, text: &str) -> Instance {
        let get = |key: &str| -> String {
            text.lines()
                .find_map(|l| l.strip_prefix(key).and_then(|r| r.strip_prefix('=')))
                .unwrap_or_else(|| panic!("scripts/instance up printed no {key}=: {text:?}"))
                .to_string()
        };
        let files = tempfile::Builder::new()
            .prefix("jbake-instance-")
            .tempdir()
            .expect("create a temp folder");
        let instance = Instance {
            name: name.to_string(),
            host: get("HOST"),
            port: get("PORT").parse().expect("PORT is a number"),
            user: get("USER"),
            identity: PathBuf::from(get("IDENTITY")),
            host_key: get("HOST_KEY"),
            root: PathBuf::from(get("ROOT")),
            supervisor_pid: get("SUPERVISOR_PID")
                .parse()
                .expect("SUPERVISOR_PID is a number"),
            gateway: get("GATEWAY"),
            files,
            down_on_drop: true,
        };
        std::fs::write(
            instance.known_hosts(),
            format!("{} {}\n", instance.host, instance.host_key),
        )
        .expect("write known_hosts");
        instance
    }

    /// `user@host:port`.
    pub fn target(&self) -> String {
        format!("{}@{}:{}", self.user, self.host, self.port)
    }

    /// A known_hosts file that pins the instance's host key.
    pub fn known_hosts(&self) -> PathBuf {
        self.files.path().join("known_hosts")
    }

    /// OpenSSH client arguments: identity, port, pinned host key, `user@host`.
    pub fn ssh_args(&self) -> Vec<String> {
        vec![
            "-i".into(),
            self.identity.display().to_string(),
            "-p".into(),
            self.port.to_string(),
            "-o".into(),
            format!("UserKnownHostsFile={}", self.known_hosts().display()),
            "-o".into(),
            "StrictHostKeyChecking=yes".into(),
            "-o".into(),
            "IdentitiesOnly=yes".into(),
            "-o".into(),
            "BatchMode=yes".into(),
            "-o".into(),
            "ConnectTimeout=10".into(),
            format!("{}@{}", self.user, self.host),
        ]
    }

    /// `ssh … admin@HOST COMMAND`, ready to run.
    pub fn ssh(&self, command: &str) -> Command {
        let mut cmd = Command::new("ssh");
        cmd.args(self.ssh_args()).arg(command).stdin(Stdio::null());
        cmd
    }

    /// Runs a shell command as root inside the guest (not over SSH).
    pub fn exec(&self, command: &str) -> Output {
        super::command(script())
            .args(["exec", &self.name, "--", "sh", "-c", command])
            .stdin(Stdio::null())
            .output()
            .expect("run scripts/instance exec")
    }

    /// [`exec`](Self::exec) that must succeed; returns its trimmed stdout.
    pub fn exec_ok(&self, command: &str) -> String {
        let out = self.exec(command);
        assert!(
            out.status.success(),
            "in {}: {command:?} failed: {}{}",
            self.name,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }

    /// Waits until sshd answers again (after a reboot), up to `timeout`.
    pub fn wait_for_ssh(&self, timeout: Duration) {
        let start = Instant::now();
        loop {
            let ok = self
                .ssh("true")
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .map(|s| s.success())
                .unwrap_or(false);
            if ok {
                return;
            }
            assert!(
                start.elapsed() < timeout,
                "{} did not answer over SSH within {timeout:?}",
                self.name
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Powers the guest off; its files stay (for [`snapshot`](Self::snapshot)).
    pub fn stop(&mut self) {
        self.run_script(&["stop", &self.name.clone()]);
    }

    /// Writes the stopped instance's root file system to `archive` (.tar.zst).
    pub fn snapshot(&self, archive: &Path) {
        let archive = archive.to_str().expect("archive path is UTF-8");
        self.run_script(&["snapshot", &self.name, archive]);
    }

    /// Powers off and removes everything now (also done on drop).
    pub fn down(mut self) {
        self.down_on_drop = false;
        self.run_script(&["down", &self.name.clone()]);
    }

    fn run_script(&self, args: &[&str]) {
        let status = super::command(script())
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::inherit())
            .stderr(Stdio::inherit())
            .status()
            .expect("run scripts/instance");
        assert!(
            status.success(),
            "scripts/instance {} failed",
            args.join(" ")
        );
    }
}

impl Drop for Instance {
    fn drop(&mut self) {
        if !self.down_on_drop {
            return;
        }
        match super::command(script())
            .args(["down", &self.name])
            .stdin(Stdio::null())
            .status()
        {
            Ok(status) if status.success() => {}
            other => eprintln!("scripts/instance down {} failed: {other:?}", self.name),
        }
    }
}

/// The file system type the guest sees for a bind mount of `dir` (that of the host folder).
pub fn fstype_of(dir: &Path) -> String {
    let out = std::process::Command::new("findmnt")
        .args(["-n", "-o", "FSTYPE", "--target"])
        .arg(dir)
        .output()
        .expect("run findmnt");
    let t = String::from_utf8_lossy(&out.stdout).trim().to_string();
    assert!(!t.is_empty(), "no file system type for {}", dir.display());
    t
}
