//! ollm-batch: JSONL requests in, JSONL results out, resumable.
//!
//! Each input line is one request (`id`, `prompt` or `messages`, sampling parameters). Each
//! result is appended to the output file with one `write` and an `fsync`, so after a crash —
//! `kill -9` included — the file holds whole lines plus at most one torn last line, which the
//! next run cuts off before it skips the ids already done and completes the rest. One process
//! at a time writes a results (or errors) file: a second one refuses, naming the first's pid.
//! A job can run as N shards on N machines ([`shard`]), whose results [`merge`] joins.

mod error;
pub mod job;
pub mod lock;
pub mod reader;
pub mod shard;
pub mod writer;

pub use error::BatchError;
pub use job::{JobOptions, JobSummary, Progress, run_job};
pub use lock::{JobLocks, OutputLock};
pub use reader::{BatchRequest, Input, LineError, read_requests};
pub use shard::{MergeReport, Shard, merge};
pub use writer::JsonlLog;
