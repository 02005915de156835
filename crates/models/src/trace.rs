//! Named activations. A forward calls `trace.record(layer, name, tensor)` after each named
//! step; with no sink nothing is copied. Used to find where a mismatch against the reference
//! starts, layer by layer.

use ollm_ops::Tensor;

/// Receives named intermediate activations. `layer` is None for steps outside the layer stack
/// (`embed`, `final_norm`).
pub trait TraceSink: Sync {
    fn record(&self, layer: Option<usize>, name: &str, t: &Tensor);
}
