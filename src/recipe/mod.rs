//! Recipes: parse → validate → render. The output is a [`Plan`].

mod error;
pub mod plan;
mod yaml;

pub use error::Error;
pub use plan::*;
