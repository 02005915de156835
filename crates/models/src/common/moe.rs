//! Turning a router's choices into per-expert work, shared by the MoE families.

use ollm_ops::RoutedExpert;
use ollm_residency::experts::ExpertWeights;

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

/// A group of experts on the device (as the expert cache hands them over) with their routed
/// rows and weights, as the ops' grouped expert call takes them.
pub fn routed_refs<'a>(
    group: &'a [(u32, ExpertWeights<'a>)],
    rows: &'a [(Vec<u32>, Vec<f32>)],
) -> Vec<RoutedExpert<'a>> {
    group
        .iter()
        .map(|(e, w)| {
            let (rs, ws) = &rows[*e as usize];
            RoutedExpert {
                gate_up: w.gate_up.as_ops(),
                up: w.up.map(|u| u.as_ops()),
                down: w.down.as_ops(),
                gate_up_bias: w.gate_up_bias,
                down_bias: w.down_bias,
                rows: rs,
                weights: ws,
            }
        })
        .collect()
}
