//! Test harness: real components started and stopped by the tests.

pub mod cli;
