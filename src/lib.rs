//! jbake: bake and roll Jenkins machine images on AWS.
//!
//! The crate is organised by concern: [`recipe`] turns YAML into a validated, rendered [`recipe::Plan`].

pub mod recipe;
pub mod ssh;
pub mod util;
pub mod progress;
pub mod exec;
pub mod cli;
