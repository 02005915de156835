//! [`StepGraphs`]: one-token decode steps captured once and replayed (CUDA graphs), an
//! extension a backend may offer. Models reach it with [`Backend::step_graphs`](crate::Backend),
//! None where the backend has none or they are not turned on (`OLLM_CUDA_GRAPHS=1`).

use crate::{Result, Tensor};

/// Capture and replay of a decode step. The protocol (see docs/architecture.md, "Decode
/// graphs"): the caller names everything the step's launches bake in with a `key` (its
/// weights', caches' and tables' addresses, from [`buffer_addr`](Self::buffer_addr)), tries
/// [`replay_step`](Self::replay_step), and when that gives None runs the step's ordinary forward
/// between [`begin_step_capture`](Self::begin_step_capture) and
/// [`end_step_capture`](Self::end_step_capture). The step must end with one read-back of its
/// output (the logits), queue nothing that reads host memory, and leave every buffer its
/// launches use in place until the key changes. A replay's output equals the plain forward's
/// bit for bit.
pub trait StepGraphs: Send + Sync {
    /// The device address of a tensor's buffer (for keys); None for a tensor of another backend.
    fn buffer_addr(&self, t: &Tensor) -> Option<u64>;

    /// Runs the step kept under `key` for `ids` at position `pos` and returns its output read
    /// back; None when no kept step serves that key, row count and position (capture again).
    fn replay_step(&self, key: u64, ids: &[u32], pos: usize) -> Result<Option<Vec<f32>>>;

    /// Starts capturing the step of `ids` at `pos` under `key`: the forward queued until its
    /// read-back is recorded (and run once, at the read-back) instead of launched.
    fn begin_step_capture(&self, key: u64, ids: &[u32], pos: usize) -> Result<()>;

    /// Ends the capture begun last. True when the step reached its read-back and is kept (its
    /// output was returned by that read-back); false when it stopped before (an error, or an
    /// op that cannot be captured): nothing of it ran and nothing is kept.
    fn end_step_capture(&self) -> bool;
}
