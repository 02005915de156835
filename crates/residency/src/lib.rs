//! ollm-residency: where weights and the KV cache live and when they move. Knows bytes, spans,
//! device slots and tiers (VRAM, pinned RAM, disk); knows nothing of model families or tensor
//! names beyond what a caller hands it.
//!
//! - [`plan`]: the placement planner — which decoder layers stay on the device, which wait in
//!   pinned RAM or on disk, how many slots, whether the KV cache leaves the device, and the time
//!   per token that predicts. Its sizes come from the code that allocates them: the KV store's
//!   [`ollm_kv::kv_capacity`] and each family's scratch bytes (passed in as plain numbers).
//! - [`stream`]: the layer streamer (a thread that fills device slots from RAM or disk).
//! - [`experts`]: the expert cache (MoE experts moved into LRU device slots on demand).
//! - [`calibrate`]: the tier bandwidths the planner predicts with, measured once and cached.

pub mod calibrate;
pub mod error;
pub mod experts;
pub mod measure;
pub mod plan;
pub mod stream;

pub use error::{ResidencyError, Result};
