//! Integration tests: they drive the real `jbake` binary against real stand-ins
//! (a throwaway OpenSSH server, a booted Debian instance, moto).

mod support;

mod apply;
mod apply_instance;
mod boot_test;
mod build;
mod deploy;
mod distribute;
mod handover;
mod harness;
mod harness_aws;
mod iam;
mod images;
mod install;
mod keys;
mod keys_instance;
mod nightly;
mod prune;
mod roll;
mod security;
mod terraform;
mod validate;
