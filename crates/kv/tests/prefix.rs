//! The persistent prefix cache on the CPU backend with random KV contents: what is stored comes
//! back bit for bit (cache on the device, or offloaded with spilled blocks); corrupt, truncated,
//! wrong-version and wrong-model entries are reported, deleted and not used; the size cap evicts
//! the least recently used entries, deepest first; a full disk leaves nothing behind; recurrent
//! layers' fixed state comes back with the block it ends.

use std::path::Path;

use ollm_kv::prefix::PrefixError;
use ollm_kv::{FixedShape, KvOffload, KvShape, PrefixCache, PrefixConfig, SeqState};
use ollm_ops::cpu::{CpuBackend, Precision};
use ollm_ops::{Backend, DType, Memory};

const SHAPE: KvShape = KvShape { n_kv_heads: 2, head_dim: 8, window: None };
const LAYERS: usize = 3;
const FINGERPRINT: u128 = 0x1234_5678_9abc_def0;

/// A small xorshift stream of f32 values in [-1, 1).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> f32 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 >> 40) as f32 / (1u64 << 23) as f32 - 1.0
    }

    fn vec(&mut self, n: usize) -> Vec<f32> {
        (0..n).map(|_| self.next()).collect()
    }
}

fn device_state(be: &dyn Backend) -> SeqState {
    SeqState::new(be, vec![SHAPE; LAYERS], 4096).expect("state")
}

fn offloaded_state(be: &dyn Backend, spill: &Path, ram_bytes: u64) -> SeqState {
    let cfg = KvOffload { block: 16, ram_bytes, spill_dir: spill.to_path_buf(), window_positions: 0 };
    SeqState::offloaded(be, vec![SHAPE; LAYERS], 4096, 64, cfg).expect("offloaded state")
}

/// Appends `t` positions of random K and V to every layer, the way a forward does.
fn append(be: &dyn Backend, state: &mut SeqState, t: usize, rng: &mut Rng) {
    let pos0 = state.len();
    state.reserve(be, pos0 + t).expect("reserve");
    state.begin(be, t).expect("begin");
    let n = t * SHAPE.n_kv_heads * SHAPE.head_dim;
    for l in 0..LAYERS {
        state.acquire(be, l).expect("acquire");
        let k = be.upload_f32(vec![t, SHAPE.n_kv_heads, SHAPE.head_dim], &rng.vec(n)).expect("k");
        let v = be.upload_f32(vec![t, SHAPE.n_kv_heads, SHAPE.head_dim], &rng.vec(n)).expect("v");
        let kv = state.layer_mut(l);
        be.write_kv(&mut kv.k, &k, pos0).expect("write k");
        be.write_kv(&mut kv.v, &v, pos0).expect("write v");
        state.release(be, l).expect("release");
    }
    state.advance(t);
}

/// Every full block of `state`, layer by layer, as bytes.
fn blocks(be: &dyn Backend, state: &mut SeqState, n: usize) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    for bi in 0..n {
        state
            .export_block(be, bi, |views: &[&[u8]]| -> ollm_ops::Result<()> {
                out.extend(views.iter().map(|v| v.to_vec()));
                Ok(())
            })
            .expect("export");
    }
    out
}

fn tokens(n: usize, seed: u32) -> Vec<u32> {
    (0..n as u32).map(|i| (i * 31 + seed * 7 + 3) % 500).collect()
}

fn open(dir: &Path, fingerprint: u128, state: &SeqState, be: &dyn Backend, max_bytes: u64) -> PrefixCache {
    let cfg = PrefixConfig { dir: dir.to_path_buf(), max_bytes };
    PrefixCache::open(&cfg, fingerprint, state.block_layout(be).expect("layout")).expect("open")
}

/// The CPU backend with each KV dtype it keeps: f32 (exact activations), bf16 (bf16 ones).
fn backends() -> [CpuBackend; 2] {
    [CpuBackend::new(), CpuBackend::with_precision(Precision::Bf16Activations)]
}

fn entries(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> =
        std::fs::read_dir(dir).expect("dir").flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect();
    names.sort();
    names
}

#[test]
fn stored_blocks_come_back_bit_for_bit_on_device() {
    for be in backends() {
        stored_blocks_come_back_bit_for_bit_on_device_with(&be);
    }
}

fn stored_blocks_come_back_bit_for_bit_on_device_with(be: &CpuBackend) {
    let be = *be;
    let dir = tempfile::tempdir().expect("tempdir");
    let mut rng = Rng(7);
    let mut a = device_state(&be);
    append(&be, &mut a, 500, &mut rng);
    append(&be, &mut a, 400, &mut rng);
    let toks = tokens(900, 1);
    let cache = open(dir.path(), FINGERPRINT, &a, &be, u64::MAX);
    assert_eq!(cache.layout().block, ollm_kv::DEVICE_PREFIX_BLOCK);
    let stored = cache.store(&be, &mut a, &toks, &[]).expect("store");
    assert_eq!((stored.blocks, stored.present), (3, 0));
    assert_eq!(stored.bytes, 3 * cache.entry_bytes(false));
    assert_eq!(entries(cache.dir()).len(), 3);

    let mut b = device_state(&be);
    let r = cache.restore(&be, &mut b, &toks).expect("restore");
    assert_eq!((r.tokens, r.blocks, b.len()), (768, 3, 768));
    assert!(r.rejected.is_empty());
    assert_eq!(blocks(&be, &mut b, 3), blocks(&be, &mut a, 3));

    // A prompt of exactly two blocks loads one: the last token is computed for its logits.
    let mut c = device_state(&be);
    assert_eq!(cache.restore(&be, &mut c, &toks[..512]).expect("restore").blocks, 1);
    // A prompt differing in block 1 shares block 0 only.
    let mut other = toks.clone();
    other[300] += 1;
    let mut d = device_state(&be);
    assert_eq!(cache.restore(&be, &mut d, &other).expect("restore").blocks, 1);
    // Storing again finds them all present.
    let again = cache.store(&be, &mut a, &toks, &[]).expect("store again");
    assert_eq!((again.blocks, again.present), (0, 3));
}

#[test]
fn offloaded_blocks_spilled_or_in_ram_come_back_and_keep_working() {
    for be in backends() {
        offloaded_blocks_come_back_with(&be);
    }
}

fn offloaded_blocks_come_back_with(be: &CpuBackend) {
    let be = *be;
    let elem = be.kv_dtype().size_bytes();
    let dir = tempfile::tempdir().expect("tempdir");
    let spill = dir.path().join("spill");
    let mut rng = Rng(11);
    // Every full block is spilled before the store reads it.
    let mut a = offloaded_state(&be, &spill, 0);
    for t in [20, 30, 25, 30] {
        append(&be, &mut a, t, &mut rng);
    }
    assert!(a.offload_stats().expect("offloaded").disk_blocks > 0, "the test needs spilled blocks");
    let toks = tokens(105, 2);
    let cache = open(&dir.path().join("pc"), FINGERPRINT, &a, &be, u64::MAX);
    assert_eq!(cache.store(&be, &mut a, &toks, &[]).expect("store").blocks, 6);
    for ram in [0, u64::MAX] {
        let mut b = offloaded_state(&be, &spill, ram);
        let r = cache.restore(&be, &mut b, &toks).expect("restore");
        assert_eq!((r.tokens, r.blocks), (96, 6));
        assert_eq!(blocks(&be, &mut b, 6), blocks(&be, &mut a, 6));
        // The restored state goes on like the original: the same new positions, then the whole
        // window compared (positions 0..len as the attention would see them).
        let mut a2 = offloaded_state(&be, &spill, ram);
        assert_eq!(cache.restore(&be, &mut a2, &toks).expect("restore").blocks, 6);
        let (mut r1, mut r2) = (Rng(99), Rng(99));
        append(&be, &mut b, 40, &mut r1);
        append(&be, &mut a2, 40, &mut r2);
        assert_eq!(blocks(&be, &mut b, 8), blocks(&be, &mut a2, 8));
        let mut rw = Rng(5);
        append(&be, &mut b, 1, &mut rw);
        b.begin(&be, 0).expect("begin");
        b.acquire(&be, 2).expect("acquire");
        let seen = be.to_host_f32(&b.layer_mut(2).k).expect("window");
        let mut mine = blocks(&be, &mut b, 8);
        assert_eq!(mine.len(), 8 * LAYERS);
        // Layer 2's K of block 0, as the window holds it: [n_kv, capacity, d] vs [n_kv, 16, d].
        let k0: Vec<f32> = mine.swap_remove(2)[..16 * 16 * elem]
            .chunks_exact(elem)
            .map(|c| match c {
                &[a, b] => f32::from_bits(u32::from(u16::from_le_bytes([a, b])) << 16),
                c => f32::from_le_bytes(c.try_into().expect("4 bytes")),
            })
            .collect();
        let cap = seen.len() / 16;
        for h in 0..2 {
            assert_eq!(&seen[h * cap * 8..h * cap * 8 + 16 * 8], &k0[h * 16 * 8..(h + 1) * 16 * 8]);
        }
    }
}

#[test]
fn corrupt_truncated_wrong_version_and_wrong_model_entries_are_rejected_and_recomputed() {
    let be = CpuBackend::new();
    let dir = tempfile::tempdir().expect("tempdir");
    let mut rng = Rng(3);
    let mut a = device_state(&be);
    append(&be, &mut a, 800, &mut rng);
    let toks = tokens(800, 3);
    let cache = open(dir.path(), FINGERPRINT, &a, &be, u64::MAX);
    let keys = cache.chain(&toks[..768]);
    let path = |i: usize| cache.entry_path(i, keys[i]);
    let header_len = (cache.entry_bytes(false) as usize) - LAYERS * cache.layout().layer_bytes;

    type Damage = Box<dyn Fn(&Path)>;
    let patch = |at: usize, byte: u8| -> Damage {
        Box::new(move |p: &Path| {
            let mut b = std::fs::read(p).expect("read");
            b[at] ^= byte;
            std::fs::write(p, b).expect("write");
        })
    };
    let cases: Vec<(&str, usize, Damage, &str)> = vec![
        ("a flipped KV byte", 1, patch(header_len + 5000, 0x40), "checksum does not match its bytes"),
        ("a flipped token", 0, patch(128 + 4 * 17, 1), "header checksum"),
        ("another format version", 2, patch(8, 3), "format version"),
        (
            "a truncated file",
            1,
            Box::new(|p: &Path| {
                let f = std::fs::OpenOptions::new().write(true).open(p).expect("open");
                f.set_len(f.metadata().expect("meta").len() - 4096).expect("truncate");
            }),
            "truncated",
        ),
    ];
    for (what, bad, damage, reason) in cases {
        cache.store(&be, &mut a, &toks, &[]).expect("store");
        damage(&path(bad));
        let mut b = device_state(&be);
        let r = cache.restore(&be, &mut b, &toks).expect("restore");
        assert_eq!(r.blocks, bad, "{what}: the blocks before the bad one are used, none after");
        assert_eq!(b.len(), bad * 256, "{what}");
        assert_eq!(r.rejected.len(), 1, "{what}: {:?}", r.rejected);
        let line = &r.rejected[0];
        assert!(line.contains(reason) && line.contains("recomputed") && !line.contains('\n'), "{what}: {line}");
        assert!(!path(bad).exists(), "{what}: the bad entry is deleted");
        assert_eq!(blocks(&be, &mut b, bad), blocks(&be, &mut a, bad), "{what}");
        // Stored again, it is whole.
        assert_eq!(cache.store(&be, &mut a, &toks, &[]).expect("store").blocks, 1, "{what}");
        let mut c = device_state(&be);
        assert_eq!(cache.restore(&be, &mut c, &toks).expect("restore").blocks, 3, "{what}");
    }

    // An entry copied from another model's cache to the name this model looks for.
    let mut other = open(dir.path(), FINGERPRINT + 1, &a, &be, u64::MAX);
    other.set_fail_writes_after(None);
    assert_ne!(other.dir(), cache.dir());
    let their = other.chain(&toks[..256])[0];
    std::fs::copy(path(0), other.entry_path(0, their)).expect("copy");
    let mut b = device_state(&be);
    let r = other.restore(&be, &mut b, &toks).expect("restore");
    assert_eq!(r.blocks, 0);
    assert!(r.rejected[0].contains("another model"), "{:?}", r.rejected);
    assert!(!other.entry_path(0, their).exists());
}

/// Entries of one KV dtype are never read by a run of the other: they live under another model
/// key, and one copied to the name the other run looks for is refused in one line naming both.
#[test]
fn an_entry_of_another_kv_dtype_is_refused_in_one_line() {
    let [f32_be, bf16_be] = backends();
    let dir = tempfile::tempdir().expect("tempdir");
    let mut rng = Rng(21);
    let mut a = device_state(&f32_be);
    append(&f32_be, &mut a, 300, &mut rng);
    let toks = tokens(300, 4);
    let f32_cache = open(dir.path(), FINGERPRINT, &a, &f32_be, u64::MAX);
    assert_eq!(f32_cache.store(&f32_be, &mut a, &toks, &[]).expect("store").blocks, 1);
    let mut b = device_state(&bf16_be);
    let bf16_cache = open(dir.path(), FINGERPRINT, &b, &bf16_be, u64::MAX);
    assert_eq!(bf16_cache.layout().kv_dtype, DType::BF16);
    assert_ne!(bf16_cache.dir(), f32_cache.dir(), "each KV dtype has its own entries");
    let r = bf16_cache.restore(&bf16_be, &mut b, &toks).expect("restore");
    assert_eq!((r.blocks, r.rejected.len()), (0, 0), "nothing of the f32 run's is found");
    // The f32 entry under the name the bf16 run looks for (its length also differs: the check
    // of the dtype comes first and says what to change).
    let theirs = f32_cache.entry_path(0, f32_cache.chain(&toks)[0]);
    let mine = bf16_cache.entry_path(0, bf16_cache.chain(&toks)[0]);
    std::fs::copy(&theirs, &mine).expect("copy");
    let r = bf16_cache.restore(&bf16_be, &mut b, &toks).expect("restore");
    assert_eq!((r.blocks, b.len()), (0, 0));
    let line = r.rejected.first().expect("a rejection");
    assert!(line.contains("KV cache is f32 and this run's is bf16") && !line.contains('\n'), "{line}");
    assert!(!mine.exists(), "the mismatched entry is deleted");
}

#[test]
fn the_size_cap_evicts_least_recently_used_deepest_first() {
    let be = CpuBackend::new();
    let dir = tempfile::tempdir().expect("tempdir");
    let mut rng = Rng(5);
    let mut a = device_state(&be);
    append(&be, &mut a, 800, &mut rng);
    let probe = open(dir.path(), FINGERPRINT, &a, &be, u64::MAX);
    let entry = probe.entry_bytes(false);
    // Room for four entries.
    let cache = open(dir.path(), FINGERPRINT, &a, &be, 4 * entry + entry / 2);
    let (ta, tb) = (tokens(800, 4), tokens(800, 5));
    assert_eq!(cache.store(&be, &mut a, &ta, &[]).expect("store a").blocks, 3);
    std::thread::sleep(std::time::Duration::from_millis(20));
    let sb = cache.store(&be, &mut a, &tb, &[]).expect("store b");
    assert_eq!((sb.blocks, sb.evicted), (3, 2));
    let ka = cache.chain(&ta[..768]);
    assert!(cache.entry_path(0, ka[0]).exists() && !cache.entry_path(1, ka[1]).exists());
    let mut b = device_state(&be);
    assert_eq!(cache.restore(&be, &mut b, &ta).expect("restore").blocks, 1);
    // A chain longer than the cap keeps only its first blocks.
    let small = open(&dir.path().join("small"), FINGERPRINT, &a, &be, 2 * entry);
    assert_eq!(small.store(&be, &mut a, &ta, &[]).expect("store").blocks, 2);
}

#[test]
fn a_full_disk_is_one_clear_error_and_leaves_nothing_half_written() {
    let be = CpuBackend::new();
    let dir = tempfile::tempdir().expect("tempdir");
    let mut rng = Rng(9);
    let mut a = device_state(&be);
    append(&be, &mut a, 600, &mut rng);
    let toks = tokens(600, 6);
    let mut cache = open(dir.path(), FINGERPRINT, &a, &be, u64::MAX);
    // The disk fills halfway through the second entry.
    cache.set_fail_writes_after(Some(cache.entry_bytes(false) + cache.entry_bytes(false) / 2));
    let err = cache.store(&be, &mut a, &toks, &[]).expect_err("disk full");
    assert!(matches!(err, PrefixError::Full { .. }), "{err:?}");
    let msg = err.to_string();
    assert!(msg.contains("disk is full") && msg.contains("--prefix-cache-max") && !msg.contains('\n'), "{msg}");
    let names = entries(cache.dir());
    assert_eq!(names.len(), 1, "only the whole first entry remains, no partial file: {names:?}");
    assert!(names[0].ends_with(".kvb"));
    let mut b = device_state(&be);
    assert_eq!(cache.restore(&be, &mut b, &toks).expect("restore").blocks, 1);
    cache.set_fail_writes_after(None);
    assert_eq!(cache.store(&be, &mut a, &toks, &[]).expect("store").blocks, 1);
}

#[test]
fn recurrent_state_comes_back_with_the_block_it_ends() {
    let be = CpuBackend::new();
    let dir = tempfile::tempdir().expect("tempdir");
    let fixed = vec![FixedShape { tensors: vec![vec![4, 3], vec![2, 2, 2]] }];
    let mut rng = Rng(13);
    let mut a = device_state(&be).with_fixed(&be, fixed.clone()).expect("fixed");
    assert_eq!(a.fixed_bytes(), (12 + 8) * 4);
    let set = |state: &mut SeqState, rng: &mut Rng| {
        state.fixed_mut(0)[0] = be.upload_f32(vec![4, 3], &rng.vec(12)).expect("conv");
        state.fixed_mut(0)[1] = be.upload_f32(vec![2, 2, 2], &rng.vec(8)).expect("rec");
        state.snapshot_fixed(&be).expect("snapshot")
    };
    append(&be, &mut a, 256, &mut rng);
    let at1 = set(&mut a, &mut rng);
    append(&be, &mut a, 256, &mut rng);
    let at2 = set(&mut a, &mut rng);
    append(&be, &mut a, 100, &mut rng);
    let toks = tokens(612, 7);
    let cache = open(dir.path(), FINGERPRINT, &a, &be, u64::MAX);
    assert_eq!(cache.entry_bytes(true), cache.entry_bytes(false) + 4096);
    cache.store(&be, &mut a, &toks, &[(256, at1.clone()), (512, at2.clone())]).expect("store");
    let fresh = || device_state(&be).with_fixed(&be, fixed.clone()).expect("fixed");
    let mut b = fresh();
    assert_eq!(cache.restore(&be, &mut b, &toks).expect("restore").blocks, 2);
    assert_eq!(b.snapshot_fixed(&be).expect("snapshot"), at2);
    let mut c = fresh();
    assert_eq!(cache.restore(&be, &mut c, &toks[..400]).expect("restore").blocks, 1);
    assert_eq!(c.snapshot_fixed(&be).expect("snapshot"), at1);
    // Without a snapshot at block 1's end the prefix stops at block 0, the last one with one.
    let other = open(&dir.path().join("o"), FINGERPRINT, &a, &be, u64::MAX);
    other.store(&be, &mut a, &toks, &[(256, at1.clone())]).expect("store");
    let mut d = fresh();
    assert_eq!(other.restore(&be, &mut d, &toks).expect("restore").blocks, 1);
    assert_eq!(d.snapshot_fixed(&be).expect("snapshot"), at1);
}

#[test]
fn chain_keys_depend_on_the_model_and_every_earlier_token() {
    let be = CpuBackend::new();
    let dir = tempfile::tempdir().expect("tempdir");
    let a = device_state(&be);
    let one = open(dir.path(), FINGERPRINT, &a, &be, u64::MAX);
    let two = open(dir.path(), FINGERPRINT ^ 1, &a, &be, u64::MAX);
    let t = tokens(512, 8);
    let mut u = t.clone();
    u[0] += 1;
    let (k1, k2, ku) = (one.chain(&t), two.chain(&t), one.chain(&u));
    assert_eq!(k1.len(), 2);
    assert!(k1[0] != k2[0] && k1[1] != k2[1]);
    assert!(k1[0] != ku[0] && k1[1] != ku[1], "block 1's key changes with a token of block 0");
    assert_eq!(one.chain(&t), k1);
}

#[test]
fn two_swapped_entries_are_both_caught_in_one_run() {
    let be = CpuBackend::new();
    let dir = tempfile::tempdir().expect("tempdir");
    let mut rng = Rng(11);
    let mut a = device_state(&be);
    append(&be, &mut a, 800, &mut rng);
    let toks = tokens(800, 11);
    let cache = open(dir.path(), FINGERPRINT, &a, &be, u64::MAX);
    assert_eq!(cache.store(&be, &mut a, &toks, &[]).expect("store").blocks, 3);
    let keys = cache.chain(&toks[..768]);
    let (p1, p2) = (cache.entry_path(1, keys[1]), cache.entry_path(2, keys[2]));
    let swap = dir.path().join("swap");
    std::fs::rename(&p1, &swap).expect("rename");
    std::fs::rename(&p2, &p1).expect("rename");
    std::fs::rename(&swap, &p2).expect("rename");
    // The restore finds the first misnamed entry and stops there.
    let mut b = device_state(&be);
    let r = cache.restore(&be, &mut b, &toks).expect("restore");
    assert_eq!((r.blocks, r.rejected.len()), (1, 1), "{:?}", r.rejected);
    // The store that follows checks the other one instead of counting it as present.
    let s = cache.store(&be, &mut a, &toks, &[]).expect("store");
    assert_eq!((s.blocks, s.present, s.rejected.len()), (2, 1, 1), "{:?}", s.rejected);
    assert!(s.rejected[0].contains("do not match") && !s.rejected[0].contains('\n'), "{}", s.rejected[0]);
    // So the next run is clean.
    let mut c = device_state(&be);
    let r = cache.restore(&be, &mut c, &toks).expect("restore");
    assert_eq!((r.blocks, r.rejected.len()), (3, 0), "{:?}", r.rejected);
    assert_eq!(blocks(&be, &mut c, 3), blocks(&be, &mut a, 3));
}
