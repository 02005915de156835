//! Launcher for `kernels/tree_attention.cu`: attention of a tree of new tokens over the KV
//! cache ([`TreeMask`]), one block per (node, head), any head dim up to 256. The tree's depths
//! and ancestor bitmask go up with each call (a tree is tens of nodes: a few hundred bytes).

use cudarc::driver::{CudaSlice, LaunchConfig, PushKernelArg};
use half::bf16;

use super::attention::check_shapes;
use super::{CudaDevice, driver_err, shape};
pub use crate::AttnGeometry;
use crate::{Result, TreeMask};

/// The kernel file's source text.
pub const SOURCE: &str = include_str!("../../kernels/tree_attention.cu");

/// q, out `[T, n_heads, d]` f32, T the tree's nodes; k, v `[n_kv, cap, d]` bf16 with the tree
/// at rows `pos0..pos0 + T`; `window` None = no window; sinks `[n_heads]` f32.
#[allow(clippy::too_many_arguments)]
pub fn tree_attention(
    dev: &CudaDevice,
    q: &CudaSlice<f32>,
    k: &CudaSlice<bf16>,
    v: &CudaSlice<bf16>,
    g: AttnGeometry,
    tree: &TreeMask,
    scale: f32,
    window: Option<usize>,
    sinks: Option<&CudaSlice<f32>>,
    out: &mut CudaSlice<f32>,
) -> Result<()> {
    let t = check_shapes(q, k, v, g, sinks, out)?;
    if t != tree.len() || t * g.n_heads > u32::MAX as usize {
        return Err(shape("cuda tree_attention", format!("{t} query rows for a tree of {} nodes", tree.len())));
    }
    let depth: Vec<i32> = tree.depths().iter().map(|&x| x as i32).collect();
    let depth_d = dev.upload(&depth, "tree depths")?;
    let bits_d = dev.upload(tree.bits(), "tree ancestor bits")?;
    let func = dev.function("tree_attention", SOURCE, "tree_attention_bf16kv")?;
    let ints = [g.n_heads as i32, g.n_kv as i32, g.d as i32, g.cap as i32, g.pos0 as i32, t as i32];
    let (window_i32, has_sinks, words) =
        (window.map_or(0, |w| w as i32), i32::from(sinks.is_some()), tree.words() as i32);
    let cfg = LaunchConfig { grid_dim: ((t * g.n_heads) as u32, 1, 1), block_dim: (128, 1, 1), shared_mem_bytes: 0 };
    let mut l = dev.stream.launch_builder(&func);
    l.arg(q).arg(k).arg(v).arg(out);
    for i in &ints {
        l.arg(i);
    }
    l.arg(&scale).arg(&window_i32);
    match sinks {
        Some(s) => l.arg(s),
        None => l.arg(q),
    };
    l.arg(&has_sinks).arg(&*depth_d).arg(&*bits_d).arg(&words);
    // SAFETY: tree_attention_bf16kv takes (q, k, v, out, n_heads, n_kv, d, cap, pos0, t_nodes,
    // scale, window, sinks, has_sinks, depth, bits, words); the buffers' sizes were checked
    // above (depth T ints, bits T·words words); without sinks q stands in as a valid pointer
    // the kernel never reads. The uploads live until the launch is queued; the stream orders
    // their frees after it.
    unsafe { l.launch(cfg) }.map_err(driver_err("tree_attention"))?;
    Ok(())
}
