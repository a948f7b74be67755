//! Test harness: real components started and stopped by the tests.

#![allow(dead_code)] // each test module uses a different part of the harness

pub mod cli;
pub mod instance;
pub mod prereq;
pub mod sshd;
