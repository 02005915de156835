//! The persistent prefix cache (docs/architecture.md §5): KV blocks kept on disk under the model's
//! identity and the hash of the token prefix, so a later run whose prompt starts the same way
//! loads them instead of recomputing them.
//!
//! **Keys.** A block of positions `i * B .. (i + 1) * B` is keyed by a chain hash: `key_i =
//! xxh3-128(model key, key_{i-1}, the block's tokens)` with `key_{-1} = 0`, so a key names the
//! whole prefix up to the block's end. The model key hashes the model's fingerprint (config and
//! weights, computed by the caller) with the block layout (block size, layers, heads, KV dtype),
//! so runs whose KV dtypes differ (a CPU run with f32 activations keeps an f32 cache, a GPU run
//! or a CPU run with bf16 activations a bf16 one) never share entries. The header records the
//! dtype too: an entry of another dtype found under this model's name is refused in one line.
//!
//! **Files.** `DIR/<model key>/<depth>-<key>.kvb`, one per block: a header (magic, format
//! version, model key, key, parent key, depth, layout with the KV dtype, the block's tokens, one xxh3-64 checksum
//! per layer, one for the fixed-state snapshot, and a checksum of the header itself), then per
//! attention layer the block as [`SeqState::export_block`] gives it, then the recurrent layers'
//! fixed state at the block's end when the model has any. Everything is 4096-aligned and moved
//! with O_DIRECT. An entry is written under a temporary name, synced, and renamed; a full disk
//! stops storing with one error line and removes the partial file.
//!
//! **Trust.** Nothing read is used before its header, tokens, length and checksums match. A
//! corrupt, truncated or mismatched entry is reported in one line, deleted, and that part of the
//! prompt is recomputed (and stored again).
//!
//! **Size.** Entries of every model under `DIR` share a byte cap; beyond it the least recently
//! used go first (file modification time, touched on every use; among equal times the deepest
//! block first, so a prefix stays loadable from its start).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

use ollm_io::direct::{ALIGN, AlignedBuf, DirectFile};
use ollm_ops::{Backend, DType, OpsError};
use xxhash_rust::xxh3::{xxh3_64, xxh3_128};

use crate::offload::unique;
use crate::{BlockLayout, SeqState};

/// Version of the entry format; entries of another version are reported and recomputed.
/// Version 2 records the KV dtype (version 1 left those header bytes zero).
pub const FORMAT_VERSION: u32 = 2;
const MAGIC: [u8; 8] = *b"OLLMKVPC";
/// Bytes of the header before the tokens.
const HEAD: usize = 128;
/// Where the header keeps the KV dtype: after magic, version, header length, model key, key,
/// parent key, depth and five layout numbers (8 + 4 + 4 + 3·16 + 8 + 5·4).
const DTYPE_AT: usize = 92;
const EXT: &str = "kvb";
/// Threads that read, write and checksum an entry's layers.
const THREADS: usize = 4;
/// Temporary files older than this were left by a run that died; they are removed.
const STALE_PART: Duration = Duration::from_secs(3600);

/// Where the cache lives and how large it may grow.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PrefixConfig {
    pub dir: PathBuf,
    /// Bytes all entries under `dir` may take; least recently used entries go beyond it.
    pub max_bytes: u64,
}

/// What [`PrefixCache::restore`] loaded.
#[derive(Debug, Clone, Default)]
pub struct Restored {
    /// Prompt tokens whose KV came from the cache.
    pub tokens: usize,
    pub blocks: usize,
    pub bytes: u64,
    pub elapsed: Duration,
    /// One line per entry that was found but not trusted.
    pub rejected: Vec<String>,
}

/// What [`PrefixCache::store`] wrote.
#[derive(Debug, Clone, Default)]
pub struct Stored {
    /// Entries written now.
    pub blocks: usize,
    /// Entries already present (touched).
    pub present: usize,
    /// One line per entry found under a block's name but not holding that block (deleted and
    /// written again).
    pub rejected: Vec<String>,
    pub bytes: u64,
    /// Entries removed to stay under the cap.
    pub evicted: usize,
    pub elapsed: Duration,
}

#[derive(Debug, thiserror::Error)]
pub enum PrefixError {
    #[error("prefix cache {path}: {detail}")]
    Io { path: PathBuf, detail: String },

    #[error(
        "prefix cache {path}: the disk is full ({detail}); the partial entry was removed. Free space, lower --prefix-cache-max, or point --prefix-cache elsewhere"
    )]
    Full { path: PathBuf, detail: String },

    #[error(transparent)]
    State(#[from] OpsError),
}

/// Why an entry on disk is not used.
enum Reject {
    /// Its bytes are wrong: reported and deleted.
    Corrupt(String),
    /// It could not be read (an I/O error): reported, left alone.
    Unreadable(String),
    State(OpsError),
}

impl From<OpsError> for Reject {
    fn from(e: OpsError) -> Self {
        Reject::State(e)
    }
}

/// An entry about to be written: block `depth` of a prompt, its chain key and its parent's, the
/// block's tokens, and the fixed-state snapshot at its end, if any.
struct NewEntry<'a> {
    depth: usize,
    key: u128,
    parent: u128,
    tokens: &'a [u32],
    fixed: Option<&'a [u8]>,
}

/// A decoded entry header.
struct Header {
    key: u128,
    parent: u128,
    depth: u64,
    tokens: Vec<u32>,
    layer_sums: Vec<u64>,
    fixed_bytes: u64,
    fixed_sum: u64,
}

/// The prefix cache of one model and block layout.
#[derive(Debug)]
pub struct PrefixCache {
    root: PathBuf,
    dir: PathBuf,
    model_key: u128,
    lay: BlockLayout,
    max_bytes: u64,
    header_len: usize,
    /// Test hook: the disk fills once this many more bytes have been written (writes past it
    /// fail with ENOSPC, as a full disk's do).
    fail_writes_after: Option<u64>,
    /// Bytes written since the hook was set.
    written: std::sync::atomic::AtomicU64,
}

impl PrefixCache {
    /// Opens (creating) the cache under `cfg.dir` for a model with this fingerprint whose states
    /// cut blocks as `lay` says, and removes temporary files a dead run left behind.
    pub fn open(cfg: &PrefixConfig, fingerprint: u128, lay: BlockLayout) -> Result<Self, PrefixError> {
        let mut id = Vec::with_capacity(64);
        id.extend_from_slice(&MAGIC);
        id.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
        id.extend_from_slice(&fingerprint.to_le_bytes());
        for x in [lay.block, lay.n_layers, lay.n_kv_heads, lay.head_dim, lay.elem_bytes, lay.fixed_bytes] {
            id.extend_from_slice(&(x as u64).to_le_bytes());
        }
        id.extend_from_slice(&dtype_code(lay.kv_dtype).to_le_bytes());
        let model_key = xxh3_128(&id);
        let dir = cfg.dir.join(format!("{model_key:032x}"));
        std::fs::create_dir_all(&dir).map_err(|e| PrefixError::Io {
            path: dir.clone(),
            detail: format!("cannot create the directory: {e} (check permissions or choose another --prefix-cache)"),
        })?;
        let header_len = (HEAD + 4 * lay.block + 8 * lay.n_layers + 8).next_multiple_of(ALIGN);
        let cache = Self {
            root: cfg.dir.clone(),
            dir,
            model_key,
            lay,
            max_bytes: cfg.max_bytes,
            header_len,
            fail_writes_after: None,
            written: 0.into(),
        };
        cache.remove_stale_parts();
        Ok(cache)
    }

    /// The directory holding this model's entries.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn layout(&self) -> BlockLayout {
        self.lay
    }

    /// Bytes of one entry on disk.
    pub fn entry_bytes(&self, with_fixed: bool) -> u64 {
        let fixed = if with_fixed { self.lay.fixed_bytes.next_multiple_of(ALIGN) } else { 0 };
        (self.header_len + self.lay.n_layers * self.lay.layer_bytes + fixed) as u64
    }

    /// The file of the block at `depth` whose chain key is `key`.
    pub fn entry_path(&self, depth: usize, key: u128) -> PathBuf {
        self.dir.join(format!("{depth:06}-{key:032x}.{EXT}"))
    }

    /// The chain keys of the full blocks of `tokens`.
    pub fn chain(&self, tokens: &[u32]) -> Vec<u128> {
        let mut parent = 0u128;
        tokens
            .chunks_exact(self.lay.block)
            .map(|block| {
                let mut bytes = Vec::with_capacity(32 + 4 * block.len());
                bytes.extend_from_slice(&self.model_key.to_le_bytes());
                bytes.extend_from_slice(&parent.to_le_bytes());
                bytes.extend(block.iter().flat_map(|t| t.to_le_bytes()));
                parent = xxh3_128(&bytes);
                parent
            })
            .collect()
    }

    /// Test hook: the disk fills once `bytes` more have been written.
    #[doc(hidden)]
    pub fn set_fail_writes_after(&mut self, bytes: Option<u64>) {
        self.fail_writes_after = bytes;
        *self.written.get_mut() = 0;
    }

    /// Loads the longest stored prefix of `tokens` into the empty `state`, leaving at least one
    /// token to compute (the logits come from it). Entries that fail a check are reported (a
    /// tracing warning and [`Restored::rejected`]) and not used.
    pub fn restore(
        &self,
        backend: &dyn Backend,
        state: &mut SeqState,
        tokens: &[u32],
    ) -> Result<Restored, PrefixError> {
        let t0 = Instant::now();
        let mut out = Restored::default();
        if !state.is_empty() {
            return Ok(out);
        }
        let b = self.lay.block;
        let max_blocks = (tokens.len().saturating_sub(1) / b).min(state.max_positions() / b);
        let keys = self.chain(&tokens[..max_blocks * b]);
        let mut found = Vec::new();
        let mut parent = 0u128;
        for (i, &key) in keys.iter().enumerate() {
            let path = self.entry_path(i, key);
            if !path.exists() {
                break;
            }
            match self.open_entry(&path, i, key, parent, &tokens[i * b..(i + 1) * b]) {
                Ok(entry) => found.push((path, entry)),
                Err(reject) => {
                    self.reject(&path, reject, &mut out.rejected)?;
                    break;
                }
            }
            parent = key;
        }
        if state.has_fixed() {
            // A recurrent model resumes from a fixed-state snapshot: the prefix ends at one.
            while found.last().is_some_and(|(_, (_, h))| h.fixed_bytes == 0) {
                found.pop();
            }
        }
        let loaded = self.load_blocks(backend, state, &found, &mut out)?;
        let fixed = if state.has_fixed() {
            // A recurrent model resumes from the last good block with a snapshot.
            let last = loaded.iter().rposition(Option::is_some).map_or(0, |i| i + 1);
            state.truncate(last * b);
            out.blocks = last;
            loaded.into_iter().take(last).flatten().last()
        } else {
            None
        };
        out.bytes = found.iter().take(out.blocks).map(|(_, (f, _))| f.len_bytes()).sum();
        if let Some(snap) = fixed {
            state.restore_fixed(backend, &snap)?;
        }
        out.tokens = out.blocks * b;
        self.touch(found.iter().take(out.blocks).map(|(p, _)| p.as_path()));
        out.elapsed = t0.elapsed();
        Ok(out)
    }

    /// Stores the full blocks of `state` (whose first positions hold `tokens`) that the cache
    /// lacks, up to the size cap, then evicts beyond it. `snapshots` are fixed-state snapshots by
    /// position, taken when a forward ended there (recurrent models only).
    pub fn store(
        &self,
        backend: &dyn Backend,
        state: &mut SeqState,
        tokens: &[u32],
        snapshots: &[(usize, Vec<u8>)],
    ) -> Result<Stored, PrefixError> {
        let t0 = Instant::now();
        let mut out = Stored::default();
        let b = self.lay.block;
        let cap_blocks = (self.max_bytes / self.entry_bytes(state.has_fixed()).max(1)) as usize;
        let n = (state.len().min(tokens.len()) / b).min(cap_blocks);
        let keys = self.chain(&tokens[..n * b]);
        let mut chain_paths = Vec::with_capacity(n);
        let mut parent = 0u128;
        for (i, &key) in keys.iter().enumerate() {
            let path = self.entry_path(i, key);
            // A file under this block's name counts only if its header says it is this block; a
            // wrong one is reported and replaced now, not at the next restore.
            let present = path.exists()
                && match self.open_entry(&path, i, key, parent, &tokens[i * b..(i + 1) * b]) {
                    Ok(_) | Err(Reject::Unreadable(_)) => true,
                    Err(reject) => {
                        self.reject(&path, reject, &mut out.rejected)?;
                        false
                    }
                };
            if present {
                out.present += 1;
            } else {
                let end = (i + 1) * b;
                let fixed = snapshots.iter().find(|(pos, _)| *pos == end).map(|(_, s)| s.as_slice());
                let entry = NewEntry { depth: i, key, parent, tokens: &tokens[i * b..end], fixed };
                out.bytes += self.write_entry(backend, state, &entry, &path)?;
                out.blocks += 1;
            }
            chain_paths.push(path);
            parent = key;
        }
        self.touch(chain_paths.iter().map(PathBuf::as_path));
        out.evicted = self.evict();
        out.elapsed = t0.elapsed();
        Ok(out)
    }

    /// Loads the payloads of `found` in order into `state` until one fails its checks (reported),
    /// with the reads of one block overlapping the host allocations of the next; returns each
    /// loaded block's fixed-state snapshot, if any.
    fn load_blocks(
        &self,
        backend: &dyn Backend,
        state: &mut SeqState,
        found: &[(PathBuf, (DirectFile, Header))],
        out: &mut Restored,
    ) -> Result<Vec<Option<Vec<u8>>>, PrefixError> {
        use std::sync::mpsc::{channel, sync_channel};
        let lb = self.lay.layer_bytes;
        let mut snapshots = Vec::new();
        std::thread::scope(|s| -> Result<(), PrefixError> {
            let (to_reader, jobs) = sync_channel::<(usize, Vec<ollm_ops::HostBuffer>)>(1);
            let (to_main, done) = channel();
            s.spawn(move || {
                for (i, mut bufs) in jobs {
                    let (_, (file, h)) = &found[i];
                    let read = {
                        let mut views: Vec<&mut [u8]> = bufs.iter_mut().map(|b| &mut b.as_mut_slice()[..lb]).collect();
                        self.read_layers(file, h, &mut views)
                    };
                    let r = read.and_then(|()| self.read_fixed(file, h));
                    if to_main.send((i, bufs, r)).is_err() {
                        return;
                    }
                }
            });
            let (mut next, mut in_flight, mut failed) = (0, 0, false);
            loop {
                while in_flight < 2 && next < found.len() && !failed {
                    let bufs = state.block_buffers(backend)?;
                    if to_reader.send((next, bufs)).is_err() {
                        break;
                    }
                    next += 1;
                    in_flight += 1;
                }
                if in_flight == 0 {
                    return Ok(());
                }
                let Ok((i, bufs, r)) = done.recv() else { return Ok(()) };
                in_flight -= 1;
                if failed {
                    state.return_buffers(bufs);
                    continue;
                }
                match r {
                    Ok(snap) => {
                        state.push_block(backend, bufs)?;
                        snapshots.push(snap);
                        out.blocks += 1;
                    }
                    Err(reject) => {
                        state.return_buffers(bufs);
                        self.reject(&found[i].0, reject, &mut out.rejected)?;
                        failed = true;
                    }
                }
            }
        })?;
        Ok(snapshots)
    }

    /// Reads and checks the header and length of the entry at `path`, expected to hold block
    /// `depth` with this key, parent and tokens.
    fn open_entry(
        &self,
        path: &Path,
        depth: usize,
        key: u128,
        parent: u128,
        tokens: &[u32],
    ) -> Result<(DirectFile, Header), Reject> {
        let file = DirectFile::open(path).map_err(|e| Reject::Unreadable(e.to_string()))?;
        if (file.len_bytes() as usize) < self.header_len {
            return Err(Reject::Corrupt(format!("truncated: {} B, shorter than its header", file.len_bytes())));
        }
        let mut buf = AlignedBuf::new(self.header_len);
        file.read_into(0, self.header_len, buf.as_mut_slice()).map_err(|e| Reject::Unreadable(e.to_string()))?;
        let h = self.decode(&buf.as_slice()[..self.header_len]).map_err(Reject::Corrupt)?;
        if h.key != key || h.parent != parent || h.depth != depth as u64 || h.tokens != tokens {
            return Err(Reject::Corrupt("its key, parent or tokens do not match the prompt's block".into()));
        }
        let want = self.entry_bytes(h.fixed_bytes > 0);
        if file.len_bytes() != want {
            return Err(Reject::Corrupt(format!("truncated or padded: {} B, expected {want} B", file.len_bytes())));
        }
        Ok((file, h))
    }

    /// Reads every layer's block of the entry into `views` and checks each checksum.
    fn read_layers(&self, file: &DirectFile, h: &Header, views: &mut [&mut [u8]]) -> Result<(), Reject> {
        let lb = self.lay.layer_bytes;
        let results = on_threads(views, |l, view| {
            file.read_into((self.header_len + l * lb) as u64, lb, view)
                .map_err(|e| Reject::Unreadable(e.to_string()))?;
            if xxh3_64(&view[..lb]) != h.layer_sums[l] {
                return Err(Reject::Corrupt(format!("layer {l}'s checksum does not match its bytes")));
            }
            Ok(())
        });
        results.into_iter().collect()
    }

    /// The entry's fixed-state snapshot, checked, if it has one.
    fn read_fixed(&self, file: &DirectFile, h: &Header) -> Result<Option<Vec<u8>>, Reject> {
        if h.fixed_bytes == 0 {
            return Ok(None);
        }
        let n = h.fixed_bytes as usize;
        let mut buf = AlignedBuf::new(n);
        let off = self.header_len + self.lay.n_layers * self.lay.layer_bytes;
        file.read_into(off as u64, n, buf.as_mut_slice()).map_err(|e| Reject::Unreadable(e.to_string()))?;
        if xxh3_64(&buf.as_slice()[..n]) != h.fixed_sum {
            return Err(Reject::Corrupt("the recurrent state's checksum does not match its bytes".into()));
        }
        Ok(Some(buf.as_slice()[..n].to_vec()))
    }

    /// Reports an entry not used (one line), deleting it when its bytes are wrong.
    fn reject(&self, path: &Path, why: Reject, rejected: &mut Vec<String>) -> Result<(), PrefixError> {
        let line = match why {
            Reject::Corrupt(why) => {
                let _ = std::fs::remove_file(path);
                format!("prefix cache: {}: {why}; deleted, that part of the prompt is recomputed", path.display())
            }
            Reject::Unreadable(why) => {
                format!(
                    "prefix cache: {}: cannot read it ({why}); that part of the prompt is recomputed",
                    path.display()
                )
            }
            Reject::State(e) => return Err(e.into()),
        };
        tracing::warn!("{line}");
        rejected.push(line);
        Ok(())
    }

    /// Writes block `depth` of `state` as an entry at `path` (temporary name, sync, rename) and
    /// returns its bytes.
    fn write_entry(
        &self,
        backend: &dyn Backend,
        state: &mut SeqState,
        e: &NewEntry<'_>,
        path: &Path,
    ) -> Result<u64, PrefixError> {
        let bytes = self.entry_bytes(e.fixed.is_some());
        if let Some(free) = ollm_io::available_bytes(&self.dir).filter(|&f| f < bytes) {
            return Err(PrefixError::Full {
                path: self.dir.clone(),
                detail: format!("{} free, an entry needs {}", size(free), size(bytes)),
            });
        }
        let tmp = self.dir.join(format!(".{:06}-{:032x}.{}-{}.part", e.depth, e.key, std::process::id(), unique()));
        let written = self.write_parts(backend, state, e, &tmp);
        let renamed = written.and_then(|()| {
            std::fs::rename(&tmp, path).map_err(|e| PrefixError::Io {
                path: path.to_path_buf(),
                detail: format!("cannot rename into place: {e}"),
            })
        });
        if let Err(e) = renamed {
            let _ = std::fs::remove_file(&tmp);
            return Err(e);
        }
        Ok(bytes)
    }

    fn write_parts(
        &self,
        backend: &dyn Backend,
        state: &mut SeqState,
        e: &NewEntry<'_>,
        tmp: &Path,
    ) -> Result<(), PrefixError> {
        let fixed = e.fixed;
        let io = |e: ollm_io::IoError| self.io_error(tmp, e);
        let mut file = DirectFile::create(tmp).map_err(io)?;
        let mut fixed_buf = fixed.map(|f| {
            let mut buf = AlignedBuf::new(f.len());
            buf.as_mut_slice()[..f.len()].copy_from_slice(f);
            buf
        });
        let lb = self.lay.layer_bytes;
        state.export_block(backend, e.depth, |views: &[&[u8]]| -> Result<(), PrefixError> {
            let mut sums = vec![0u64; views.len()];
            let mut slots: Vec<&mut u64> = sums.iter_mut().collect();
            on_threads(&mut slots, |l, slot| {
                **slot = xxh3_64(&views[l][..lb]);
                Ok::<(), PrefixError>(())
            })
            .into_iter()
            .collect::<Result<(), _>>()?;
            let header = Header {
                key: e.key,
                parent: e.parent,
                depth: e.depth as u64,
                tokens: e.tokens.to_vec(),
                layer_sums: sums,
                fixed_bytes: fixed.map_or(0, |f| f.len() as u64),
                fixed_sum: fixed.map_or(0, xxh3_64),
            };
            let mut head = AlignedBuf::new(self.header_len);
            self.encode(&header, head.as_mut_slice());
            self.put(&mut file, 0, &head.as_slice()[..self.header_len])?;
            for (l, view) in views.iter().enumerate() {
                self.put(&mut file, (self.header_len + l * lb) as u64, &view[..lb])?;
            }
            if let Some(buf) = fixed_buf.as_mut() {
                let off = self.header_len + self.lay.n_layers * lb;
                self.put(&mut file, off as u64, buf.as_slice())?;
            }
            file.sync().map_err(|e| self.io_error(tmp, e))
        })
    }

    /// One direct write, counted against the test hook's limit.
    fn put(&self, file: &mut DirectFile, off: u64, bytes: &[u8]) -> Result<(), PrefixError> {
        let n = bytes.len() as u64;
        let written = self.written.fetch_add(n, std::sync::atomic::Ordering::Relaxed) + n;
        if self.fail_writes_after.is_some_and(|limit| written > limit) {
            let source = std::io::Error::from_raw_os_error(ENOSPC);
            let e = ollm_io::IoError::Write { path: file.path().to_path_buf(), offset: off, len: bytes.len(), source };
            return Err(self.io_error(file.path(), e));
        }
        file.write_at(off, bytes).map_err(|e| self.io_error(file.path(), e))
    }

    fn io_error(&self, path: &Path, e: ollm_io::IoError) -> PrefixError {
        let full = matches!(&e, ollm_io::IoError::Write { source, .. } if source.raw_os_error() == Some(ENOSPC));
        if full {
            PrefixError::Full { path: self.dir.clone(), detail: format!("writing {} failed", path.display()) }
        } else {
            PrefixError::Io { path: path.to_path_buf(), detail: e.to_string() }
        }
    }

    fn encode(&self, h: &Header, out: &mut [u8]) {
        let lay = &self.lay;
        out.fill(0);
        let mut w = Writer { out, at: 0 };
        w.put(&MAGIC);
        w.put(&FORMAT_VERSION.to_le_bytes());
        w.put(&(self.header_len as u32).to_le_bytes());
        w.put(&self.model_key.to_le_bytes());
        w.put(&h.key.to_le_bytes());
        w.put(&h.parent.to_le_bytes());
        w.put(&h.depth.to_le_bytes());
        for x in [lay.block, lay.n_layers, lay.n_kv_heads, lay.head_dim, lay.elem_bytes] {
            w.put(&(x as u32).to_le_bytes());
        }
        debug_assert_eq!(w.at, DTYPE_AT);
        w.put(&dtype_code(lay.kv_dtype).to_le_bytes());
        w.put(&(lay.layer_bytes as u64).to_le_bytes());
        w.put(&h.fixed_bytes.to_le_bytes());
        w.put(&h.fixed_sum.to_le_bytes());
        w.at = HEAD;
        for t in &h.tokens {
            w.put(&t.to_le_bytes());
        }
        for s in &h.layer_sums {
            w.put(&s.to_le_bytes());
        }
        let sum = xxh3_64(&w.out[..w.at]);
        w.put(&sum.to_le_bytes());
    }

    /// Decodes a header, or says in a few words why it is not one of this cache's.
    fn decode(&self, buf: &[u8]) -> Result<Header, String> {
        let lay = &self.lay;
        let mut r = Reader { buf, at: 0 };
        if r.take(8) != MAGIC {
            return Err("not an ollm prefix-cache entry".into());
        }
        let version = r.u32();
        if version != FORMAT_VERSION {
            return Err(format!("written in format version {version}, this build reads version {FORMAT_VERSION}"));
        }
        if r.u32() as usize != self.header_len {
            return Err("its header length does not match this model's block layout".into());
        }
        let sum_at = HEAD + 4 * lay.block + 8 * lay.n_layers;
        let stored_sum = Reader { buf, at: sum_at }.u64();
        if xxh3_64(&buf[..sum_at]) != stored_sum {
            return Err("its header checksum does not match (corrupt)".into());
        }
        // The dtype before the model key (which it also changes): a mismatch says what differs.
        let stored_dtype = Reader { buf, at: DTYPE_AT }.u32();
        if stored_dtype != dtype_code(lay.kv_dtype) {
            return Err(format!(
                "its KV cache is {} and this run's is {} (on the CPU, --cpu-activations picks the KV dtype)",
                dtype_name(stored_dtype),
                dtype_name(dtype_code(lay.kv_dtype))
            ));
        }
        if r.u128() != self.model_key {
            return Err("it was written for another model or KV layout".into());
        }
        let (key, parent, depth) = (r.u128(), r.u128(), r.u64());
        let dims = [r.u32(), r.u32(), r.u32(), r.u32(), r.u32()].map(|x| x as usize);
        r.take(4);
        let layer_bytes = r.u64() as usize;
        if dims != [lay.block, lay.n_layers, lay.n_kv_heads, lay.head_dim, lay.elem_bytes]
            || layer_bytes != lay.layer_bytes
        {
            return Err("its block layout does not match this model's".into());
        }
        let (fixed_bytes, fixed_sum) = (r.u64(), r.u64());
        if fixed_bytes != 0 && fixed_bytes != lay.fixed_bytes as u64 {
            return Err("its recurrent-state size does not match this model's".into());
        }
        r.at = HEAD;
        let tokens = (0..lay.block).map(|_| r.u32()).collect();
        let layer_sums = (0..lay.n_layers).map(|_| r.u64()).collect();
        Ok(Header { key, parent, depth, tokens, layer_sums, fixed_bytes, fixed_sum })
    }

    /// Sets the modification time of `paths` to now (their last use).
    fn touch<'a>(&self, paths: impl Iterator<Item = &'a Path>) {
        let now = SystemTime::now();
        for p in paths {
            if let Ok(f) = std::fs::File::options().write(true).open(p) {
                let _ = f.set_modified(now);
            }
        }
    }

    /// Removes least recently used entries (of every model under the root) until the rest fit
    /// the cap; returns how many went.
    fn evict(&self) -> usize {
        let mut entries = Vec::new();
        let Ok(models) = std::fs::read_dir(&self.root) else { return 0 };
        for m in models.flatten() {
            let is_model_dir =
                m.file_name().to_str().is_some_and(|n| n.len() == 32 && n.bytes().all(|c| c.is_ascii_hexdigit()));
            let Ok(files) = std::fs::read_dir(m.path()) else { continue };
            if !is_model_dir {
                continue;
            }
            for f in files.flatten() {
                let name = f.file_name();
                let Some(depth) = name.to_str().and_then(entry_depth) else { continue };
                let Ok(meta) = f.metadata() else { continue };
                entries.push((meta.modified().unwrap_or(SystemTime::UNIX_EPOCH), depth, meta.len(), f.path()));
            }
        }
        let mut total: u64 = entries.iter().map(|e| e.2).sum();
        entries.sort_by(|a, b| a.0.cmp(&b.0).then(b.1.cmp(&a.1)));
        let mut evicted = 0;
        for (_, _, len, path) in entries {
            if total <= self.max_bytes {
                break;
            }
            if std::fs::remove_file(&path).is_ok() {
                total -= len;
                evicted += 1;
            }
        }
        evicted
    }

    fn remove_stale_parts(&self) {
        let Ok(files) = std::fs::read_dir(&self.dir) else { return };
        for f in files.flatten() {
            let stale = f.file_name().to_str().is_some_and(|n| n.starts_with('.') && n.ends_with(".part"))
                && f.metadata().and_then(|m| m.modified()).is_ok_and(|t| t.elapsed().is_ok_and(|age| age > STALE_PART));
            if stale {
                let _ = std::fs::remove_file(f.path());
            }
        }
    }
}

/// The depth in an entry's file name (`000012-<key>.kvb`).
/// The header's code for a KV dtype (0 is never written: version 1 left the bytes zero).
fn dtype_code(d: DType) -> u32 {
    match d {
        DType::F32 => 1,
        DType::F16 => 2,
        DType::BF16 => 3,
        DType::U8 => 4,
    }
}

/// The name of a header's dtype code.
fn dtype_name(code: u32) -> String {
    match code {
        1 => "f32".into(),
        2 => "f16".into(),
        3 => "bf16".into(),
        4 => "u8".into(),
        c => format!("of unknown dtype {c}"),
    }
}

fn entry_depth(name: &str) -> Option<usize> {
    let stem = name.strip_suffix(&format!(".{EXT}"))?;
    let (depth, key) = stem.split_once('-')?;
    (key.len() == 32 && key.bytes().all(|c| c.is_ascii_hexdigit())).then_some(())?;
    depth.parse().ok()
}

/// Runs `f(i, item)` over `items` on up to [`THREADS`] threads; results in item order.
fn on_threads<T: Send, R: Send>(items: &mut [T], f: impl Fn(usize, &mut T) -> R + Sync) -> Vec<R> {
    let threads = THREADS.min(items.len()).max(1);
    let mut lanes: Vec<Vec<(usize, &mut T)>> = (0..threads).map(|_| Vec::new()).collect();
    for (i, item) in items.iter_mut().enumerate() {
        lanes[i % threads].push((i, item));
    }
    let f = &f;
    let mut results: Vec<(usize, R)> = std::thread::scope(|s| {
        let handles: Vec<_> = lanes
            .into_iter()
            .map(|lane| s.spawn(move || lane.into_iter().map(|(i, item)| (i, f(i, item))).collect::<Vec<_>>()))
            .collect();
        handles.into_iter().flat_map(|h| h.join().unwrap_or_else(|p| std::panic::resume_unwind(p))).collect()
    });
    results.sort_by_key(|r| r.0);
    results.into_iter().map(|r| r.1).collect()
}

struct Writer<'a> {
    out: &'a mut [u8],
    at: usize,
}

impl Writer<'_> {
    fn put(&mut self, bytes: &[u8]) {
        self.out[self.at..self.at + bytes.len()].copy_from_slice(bytes);
        self.at += bytes.len();
    }
}

struct Reader<'a> {
    buf: &'a [u8],
    at: usize,
}

impl Reader<'_> {
    fn take(&mut self, n: usize) -> &[u8] {
        let s = &self.buf[self.at..self.at + n];
        self.at += n;
        s
    }

    fn u32(&mut self) -> u32 {
        u32::from_le_bytes(self.take(4).try_into().unwrap_or_default())
    }

    fn u64(&mut self) -> u64 {
        u64::from_le_bytes(self.take(8).try_into().unwrap_or_default())
    }

    fn u128(&mut self) -> u128 {
        u128::from_le_bytes(self.take(16).try_into().unwrap_or_default())
    }
}

#[cfg(unix)]
const ENOSPC: i32 = 28;
#[cfg(not(unix))]
const ENOSPC: i32 = 112; // ERROR_DISK_FULL

/// `bytes` in the largest binary unit that keeps it at least 1 (2 MiB is "2.00 MiB", not
/// "0.00 GiB").
fn size(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = bytes as f64;
    let mut unit = 0;
    while v >= 1024.0 && unit + 1 < UNITS.len() {
        v /= 1024.0;
        unit += 1;
    }
    if unit == 0 { format!("{bytes} B") } else { format!("{v:.2} {}", UNITS[unit]) }
}

#[cfg(test)]
mod tests {
    use super::size;

    #[test]
    fn sizes_keep_their_digits() {
        assert_eq!(size(2 << 20), "2.00 MiB");
        assert_eq!(size(3 << 29), "1.50 GiB");
        assert_eq!(size(512), "512 B");
        assert_eq!(size(5 << 10), "5.00 KiB");
    }
}
