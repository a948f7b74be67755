//! Quick tier: a throwaway OpenSSH server on 127.0.0.1, one per test.
//!
//! ```ignore
//! let sshd = Sshd::start();
//! // ssh -i sshd.identity() -p sshd.port() -o UserKnownHostsFile=sshd.known_hosts() ...
//! ```
//!
//! The server logs in as [`TEST_USER`] (created once, with passwordless sudo),
//! runs in the foreground (`sshd -D -e`) as a child of the test and is killed by
//! PID, with every session it forked, when the [`Sshd`] is dropped.

use std::fs;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use tempfile::TempDir;

/// The unprivileged account the test sshd logs in as.
pub const TEST_USER: &str = "jbake-test";
const SSHD: &str = "/usr/sbin/sshd";
const START_TIMEOUT: Duration = Duration::from_secs(10);

pub struct Sshd {
    dir: TempDir,
    port: u16,
    host_key: String,
    child: Option<Child>,
    log: Arc<Mutex<Vec<String>>>,
}

impl Sshd {
    /// Starts a server on 127.0.0.1 on a free port.
    pub fn start() -> Sshd {
        ensure_test_user();
        fs::create_dir_all("/run/sshd")
            .expect("create /run/sshd (sshd's privilege separation folder)");
        let dir = tempfile::Builder::new()
            .prefix("jbake-sshd-")
            .tempdir()
            .expect("create the sshd temp folder");
        // The test user must reach authorized_keys (sshd reads it with the user's rights).
        set_mode(dir.path(), 0o755);
        let path = dir.path();
        keygen(&path.join("host_ed25519"), "jbake-test-host");
        keygen(&path.join("id_ed25519"), "jbake-test-client");
        let host_key = public_key(&path.join("host_ed25519.pub"));
        fs::copy(path.join("id_ed25519.pub"), path.join("authorized_keys"))
            .expect("write authorized_keys");
        set_mode(&path.join("authorized_keys"), 0o644);
        let work = path.join("work");
        fs::create_dir(&work).expect("create the work folder");
        let (uid, gid) = test_user_ids();
        std::os::unix::fs::chown(&work, Some(uid), Some(gid))
            .expect("chown the work folder to the test user");

        let mut sshd = Sshd {
            dir,
            port: 0,
            host_key,
            child: None,
            log: Arc::new(Mutex::new(Vec::new())),
        };
        // A free port can be taken by someone else before sshd binds it: try again.
        for _ in 0..20 {
            let port = free_port();
            if sshd.spawn(port) {
                return sshd;
            }
        }
        panic!("sshd did not start; its log:\n{}", sshd.log_text());
    }

    pub fn host(&self) -> &str {
        "127.0.0.1"
    }
    pub fn port(&self) -> u16 {
        self.port
    }
    pub fn user(&self) -> &str {
        TEST_USER
    }
    /// The client's private key (ed25519, mode 0600).
    pub fn identity(&self) -> PathBuf {
        self.dir.path().join("id_ed25519")
    }
    /// The server's host public key: `ssh-ed25519 AAAA…`.
    pub fn host_key(&self) -> &str {
        &self.host_key
    }
    /// A known_hosts file with the `[127.0.0.1]:PORT ssh-ed25519 …` line.
    pub fn known_hosts(&self) -> PathBuf {
        self.dir.path().join("known_hosts")
    }
    /// A folder owned by the test user, for the files tests' steps write.
    pub fn workdir(&self) -> PathBuf {
        self.dir.path().join("work")
    }
    /// `user@127.0.0.1:PORT`.
    pub fn target(&self) -> String {
        format!("{}@{}:{}", TEST_USER, self.host(), self.port)
    }
    /// PID of the listening sshd.
    pub fn pid(&self) -> u32 {
        self.child
            .as_ref()
            .map(|c| c.id())
            .expect("sshd is running")
    }
    /// What sshd logged so far (`-e`: its log goes to stderr, collected here).
    pub fn log_text(&self) -> String {
        self.log.lock().map(|l| l.join("\n")).unwrap_or_default()
    }

    /// OpenSSH client arguments for this server (identity, port, pinned host key).
    pub fn ssh_args(&self) -> Vec<String> {
        vec![
            "-i".into(),
            self.identity().display().to_string(),
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
            format!("{}@{}", TEST_USER, self.host()),
        ]
    }

    /// A `ssh … user@127.0.0.1 COMMAND` command, ready to run.
    pub fn ssh(&self, command: &str) -> Command {
        let mut cmd = Command::new("ssh");
        cmd.args(self.ssh_args()).arg(command).stdin(Stdio::null());
        cmd
    }

    /// Authorizes one more public key (`ssh-ed25519 AAAA…`) for the test user.
    pub fn authorize(&self, key: &str) {
        self.reload_handle().authorize(key);
    }

    /// Replaces the server's ed25519 host key (an OpenSSH private key, PEM text) and
    /// restarts it on the same port; [`host_key`](Self::host_key) and the known_hosts
    /// file then show the new key.
    pub fn set_host_key(&mut self, private_pem: &str) {
        self.host_key = self.reload_handle().write_host_key(private_pem);
        self.restart();
    }

    /// What a background thread needs to change this server's keys while the test
    /// keeps using the [`Sshd`] (see `moto::CloudInit::for_sshd`).
    pub fn reload_handle(&self) -> SshdReload {
        SshdReload {
            dir: self.dir.path().to_path_buf(),
            port: self.port,
            pid: self.pid(),
            log: Arc::clone(&self.log),
        }
    }

    /// Kills every session the server forked (all descendants of the listener), as
    /// if the network dropped: clients see their connection end.
    pub fn drop_connections(&self) {
        if let Some(child) = &self.child {
            let sessions = descendants(child.id());
            kill(&sessions, "KILL");
        }
    }

    /// Stops the server (and its sessions) and starts it again on the same port
    /// with the same host key, as after a reboot of the server.
    pub fn restart(&mut self) {
        self.stop();
        for _ in 0..50 {
            if self.spawn(self.port) {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!(
            "sshd did not restart on port {}; its log:\n{}",
            self.port,
            self.log_text()
        );
    }

    fn stop(&mut self) {
        self.drop_connections();
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts sshd on `port`; false when it could not listen there.
    fn spawn(&mut self, port: u16) -> bool {
        let path = self.dir.path();
        let config = path.join("sshd_config");
        fs::write(&config, sshd_config(path, port)).expect("write sshd_config");
        fs::write(
            path.join("known_hosts"),
            format!("[127.0.0.1]:{port} {}\n", self.host_key),
        )
        .expect("write known_hosts");
        let mut child = Command::new(SSHD)
            .arg("-D")
            .arg("-e")
            .arg("-f")
            .arg(&config)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn /usr/sbin/sshd");
        // Drain sshd's log for as long as it runs; report when it listens.
        let stderr = child.stderr.take().expect("sshd stderr");
        let (ready_tx, ready_rx) = mpsc::channel();
        let log = Arc::clone(&self.log);
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                if line.starts_with("Server listening on") {
                    let _ = ready_tx.send(true);
                }
                if let Ok(mut log) = log.lock() {
                    log.push(line);
                }
            }
            let _ = ready_tx.send(false);
        });
        match ready_rx.recv_timeout(START_TIMEOUT) {
            Ok(true) => {
                self.port = port;
                self.child = Some(child);
                true
            }
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                false
            }
        }
    }
}

impl Drop for Sshd {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Changes the keys of a running [`Sshd`] from another thread: files are rewritten
/// and the server re-reads them on SIGHUP (it re-executes itself with the same PID,
/// port and log). [`Sshd::host_key`] keeps returning the key it started with.
#[derive(Debug, Clone)]
pub struct SshdReload {
    dir: PathBuf,
    port: u16,
    pid: u32,
    log: Arc<Mutex<Vec<String>>>,
}

impl SshdReload {
    /// Appends a public key line to the server's authorized_keys.
    pub fn authorize(&self, key: &str) {
        let path = self.dir.join("authorized_keys");
        let mut file = fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
        writeln!(file, "{}", key.trim())
            .unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
    }

    /// Writes the host key files and the known_hosts line; returns the public key
    /// (`ssh-ed25519 AAAA…`). Does not reload the server.
    pub fn write_host_key(&self, private_pem: &str) -> String {
        let key = self.dir.join("host_ed25519");
        let mut pem = private_pem.trim_end().to_string();
        pem.push('\n');
        write_private(&key, &pem);
        let out = Command::new("ssh-keygen")
            .arg("-y")
            .arg("-f")
            .arg(&key)
            .output()
            .expect("run ssh-keygen -y");
        assert!(
            out.status.success(),
            "ssh-keygen -y: the host key is not a valid private key: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let public: String = String::from_utf8_lossy(&out.stdout)
            .split_whitespace()
            .take(2)
            .collect::<Vec<_>>()
            .join(" ");
        fs::write(self.dir.join("host_ed25519.pub"), format!("{public}\n"))
            .expect("write host_ed25519.pub");
        fs::write(
            self.dir.join("known_hosts"),
            format!("[127.0.0.1]:{} {public}\n", self.port),
        )
        .expect("write known_hosts");
        public
    }

    /// Makes sshd re-read its configuration and host keys (SIGHUP) and waits until it
    /// listens again.
    pub fn reload(&self) {
        let listening = || {
            self.log
                .lock()
                .map(|l| {
                    l.iter()
                        .filter(|l| l.starts_with("Server listening on"))
                        .count()
                })
                .unwrap_or(0)
        };
        let before = listening();
        kill(&[self.pid], "HUP");
        let start = std::time::Instant::now();
        while listening() <= before {
            assert!(
                start.elapsed() < START_TIMEOUT,
                "sshd (pid {}) did not listen again after SIGHUP; its log:\n{}",
                self.pid,
                self.log.lock().map(|l| l.join("\n")).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

fn sshd_config(dir: &Path, port: u16) -> String {
    format!(
        "\
ListenAddress 127.0.0.1
Port {port}
HostKey {dir}/host_ed25519
AuthorizedKeysFile {dir}/authorized_keys
PidFile none
StrictModes no
UsePAM no
PasswordAuthentication no
KbdInteractiveAuthentication no
PermitRootLogin no
AllowUsers {TEST_USER}
MaxSessions 64
MaxStartups 256
PerSourceMaxStartups none
UseDNS no
LogLevel VERBOSE
Subsystem sftp internal-sftp
",
        dir = dir.display()
    )
}

/// Creates the test user once per machine (parallel-safe: a file lock across
/// processes, a OnceLock within this one). Password field `*`: with `UsePAM no`
/// sshd refuses a locked (`!`) account.
fn ensure_test_user() {
    static DONE: OnceLock<()> = OnceLock::new();
    DONE.get_or_init(|| {
        let script = format!(
            "set -e
if ! id -u {u} >/dev/null 2>&1; then useradd --create-home --shell /bin/bash {u}; fi
usermod --password '*' {u}
printf '%s\\n' '{u} ALL=(ALL) NOPASSWD:ALL' > /etc/sudoers.d/.{u}.tmp
chmod 0440 /etc/sudoers.d/.{u}.tmp
mv /etc/sudoers.d/.{u}.tmp /etc/sudoers.d/{u}",
            u = TEST_USER
        );
        let out = Command::new("flock")
            .args(["/run/jbake-test-user.lock", "sh", "-c", &script])
            .output()
            .expect("run flock/useradd");
        assert!(
            out.status.success(),
            "creating test user {TEST_USER} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    });
}

fn test_user_ids() -> (u32, u32) {
    let id = |flag: &str| -> u32 {
        let out = Command::new("id")
            .args([flag, TEST_USER])
            .output()
            .expect("run id");
        String::from_utf8_lossy(&out.stdout)
            .trim()
            .parse()
            .unwrap_or_else(|_| {
                panic!(
                    "id {flag} {TEST_USER}: {}",
                    String::from_utf8_lossy(&out.stderr)
                )
            })
    };
    (id("-u"), id("-g"))
}

fn keygen(path: &Path, comment: &str) {
    let out = Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-C", comment, "-f"])
        .arg(path)
        .output()
        .expect("run ssh-keygen");
    assert!(
        out.status.success(),
        "ssh-keygen: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `type base64` of a public key file (without the comment).
pub fn public_key(path: &Path) -> String {
    let text = fs::read_to_string(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
    text.split_whitespace()
        .take(2)
        .collect::<Vec<_>>()
        .join(" ")
}

fn set_mode(path: &Path, mode: u32) {
    fs::set_permissions(path, fs::Permissions::from_mode(mode))
        .unwrap_or_else(|e| panic!("chmod {}: {e}", path.display()));
}

fn free_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    listener.local_addr().expect("local address").port()
}

/// All descendants of `pid`, from /proc (children before their parents are
/// irrelevant: they are all killed).
pub fn descendants(pid: u32) -> Vec<u32> {
    let mut parents: Vec<(u32, u32)> = Vec::new();
    if let Ok(entries) = fs::read_dir("/proc") {
        for entry in entries.flatten() {
            let Some(p) = entry
                .file_name()
                .to_str()
                .and_then(|n| n.parse::<u32>().ok())
            else {
                continue;
            };
            if let Some(ppid) = parent_of(p) {
                parents.push((p, ppid));
            }
        }
    }
    let mut found = Vec::new();
    let mut frontier = vec![pid];
    while let Some(parent) = frontier.pop() {
        for &(p, ppid) in &parents {
            if ppid == parent && !found.contains(&p) {
                found.push(p);
                frontier.push(p);
            }
        }
    }
    found
}

fn parent_of(pid: u32) -> Option<u32> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may contain spaces: parse after its closing ')'.
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.split_whitespace().nth(1)?.parse().ok()
}

/// Sends a signal to PIDs with kill(1).
pub fn kill(pids: &[u32], signal: &str) {
    if pids.is_empty() {
        return;
    }
    let _ = Command::new("kill")
        .arg(format!("-{signal}"))
        .args(pids.iter().map(|p| p.to_string()))
        .stderr(Stdio::null())
        .status();
}

/// Writes `text` to a file, creating it with mode 0600.
pub fn write_private(path: &Path, text: &str) {
    let mut file =
        fs::File::create(path).unwrap_or_else(|e| panic!("create {}: {e}", path.display()));
    file.write_all(text.as_bytes())
        .unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
    set_mode(path, 0o600);
}
