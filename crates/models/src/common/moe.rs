//! Turning a router's choices into per-expert work, shared by the MoE families.

/// For each of `n_experts`: the rows that chose it and their weights, in row order, from the
/// router's `ids` and `weights` (`k` per row, as `Backend::router_topk` returns them); and the
/// experts some row chose, ascending.
pub struct Routed {
    pub rows: Vec<(Vec<u32>, Vec<f32>)>,
    pub used: Vec<u32>,
}

impl Routed {
    pub fn new(ids: &[u32], weights: &[f32], k: usize, n_experts: usize) -> Self {
        let mut rows: Vec<(Vec<u32>, Vec<f32>)> = vec![(Vec::new(), Vec::new()); n_experts];
        for (r, (ids, ws)) in ids.chunks_exact(k).zip(weights.chunks_exact(k)).enumerate() {
            for (&e, &w) in ids.iter().zip(ws) {
                let (rs, wv) = &mut rows[e as usize];
                rs.push(r as u32);
                wv.push(w);
            }
        }
        let used = (0..n_experts as u32).filter(|&e| !rows[e as usize].0.is_empty()).collect();
        Self { rows, used }
    }

    /// How many rows chose expert `e`.
    pub fn count(&self, e: u32) -> usize {
        self.rows[e as usize].0.len()
    }
}
