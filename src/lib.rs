//! jbake: bake and roll Jenkins machine images on AWS.
//!
//! The crate is organised by concern: [`recipe`] turns YAML into a validated, rendered [`recipe::Plan`].

pub mod cli;
pub mod exec;
pub mod progress;
pub mod recipe;
pub mod ssh;
pub mod util;
