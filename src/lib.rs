//! jbake: bake and roll Jenkins machine images on AWS.
//!
//! The crate is organised by concern: [`recipe`] turns YAML into a validated, rendered [`recipe::Plan`].

pub mod aws;
pub mod bake;
pub mod cli;
pub mod exec;
pub mod keys;
pub mod manifest;
pub mod nightly;
pub mod progress;
pub mod prune;
pub mod recipe;
pub mod roll;
pub mod shipped;
pub mod ssh;
pub mod util;
