//! Recipes: parse → validate → render. The output is a [`Plan`].

pub mod plan;

pub use plan::*;
