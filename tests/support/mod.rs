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
//! - [`prereq`]: a test whose prerequisites are missing skips with a reason, or
//!   panics under `CI=true`.
//!
//! Everything a test starts is stopped by PID when its handle is dropped, also
//! when the test panics. Needs root. Debian packages: openssh-server,
//! openssh-client, sudo, passwd, util-linux, procps (quick tier); systemd-container,
//! debootstrap, debian-archive-keyring, zstd, tar, iproute2, python3 (instance tier).

#![allow(dead_code)] // each test module uses a different part of the harness

pub mod cli;
pub mod instance;
pub mod moto;
pub mod prereq;
pub mod sshd;
