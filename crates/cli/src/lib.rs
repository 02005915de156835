//! The pieces of the `ollm` binary, as a library so integration tests can reuse them
//! (demo provisioning in particular).

pub mod bench_ops;
pub mod bench_spec;
pub mod commands;
pub mod demo;
pub mod errors;
pub mod gemma3_demo;
pub mod hub;
pub mod loaded;
pub mod npy;
pub mod planning;
pub mod progress;
pub mod prompt;
pub mod resources;
pub mod speculation;
pub mod units;
