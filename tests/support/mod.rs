//! Test harness: real components started and stopped by the tests.
//!
//! - [`sshd`] (quick tier): a throwaway OpenSSH server on 127.0.0.1 per test,
//!   logging in as `jbake-test` with passwordless sudo.
//! - [`instance`] (instance tier): a Debian bookworm system booted with
//!   systemd-nspawn in its own network namespace (`scripts/instance`), the
//!   stand-in for an EC2 instance: real systemd, sshd, sudo, apt (through a proxy),
//!   reboot.
//! - [`moto`] (AWS tier): a moto server per test, a fault-injecting proxy in
//!   front of it, and a stand-in for cloud-init that installs the launched
//!   instance's user-data host key and key pair into an sshd or an instance.
//! - [`net`]: a file server and a loopback forwarder on an instance's GATEWAY
//!   (a download site, moto for the guest), and a one-shot HTTP client.
//! - [`archive`]: looks inside an image archive (private keys).
//! - [`prereq`]: a test whose prerequisites are missing skips with a reason, or
//!   panics under `CI=true`.
//! - [`bake`]: `jbake controller|agent` against moto with SSH going to an instance, and the
//!   Jenkins stand-in war; shared by the image tests and `examples/sandbox.rs` (the README's
//!   `scripts/demo`), so the demo runs exactly what the tests prove.
//!
//! Everything a test starts is stopped by PID when its handle is dropped, also
//! when the test panics. Needs root. Debian packages: openssh-server,
//! openssh-client, sudo, passwd, util-linux, procps (quick tier); systemd-container,
//! debootstrap, debian-archive-keyring, zstd, tar, iproute2, python3 (instance tier).

#![allow(dead_code)] // each test module uses a different part of the harness

pub mod archive;
pub mod bake;
pub mod cli;
pub mod instance;
pub mod moto;
pub mod net;
pub mod prereq;
pub mod sshd;

use std::ffi::OsStr;
use std::os::unix::process::CommandExt;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};

static OWN_PROCESS_GROUPS: AtomicBool = AtomicBool::new(false);

/// From now on every process the harness starts (moto, the proxy, the cloud-init watcher,
/// `scripts/instance`, jbake, javac) gets a process group of its own, so that Ctrl-C on the
/// terminal reaches only the driver, which then stops them in order: jbake first (it removes
/// what it made, through moto), then the rest. For `examples/sandbox.rs`; tests leave it off,
/// so that a Ctrl-C on `cargo test` still stops every helper at once.
pub fn use_own_process_groups() {
    OWN_PROCESS_GROUPS.store(true, Ordering::SeqCst);
}

/// `Command::new(program)`, in a process group of its own after [`use_own_process_groups`].
pub fn command(program: impl AsRef<OsStr>) -> Command {
    let mut cmd = Command::new(program);
    if OWN_PROCESS_GROUPS.load(Ordering::SeqCst) {
        cmd.process_group(0);
    }
    cmd
}
