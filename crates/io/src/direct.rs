//! Reads that bypass the page cache (O_DIRECT on Linux) into aligned buffers: the streamer's
//! disk tier. O_DIRECT needs the file offset, the length and the buffer address aligned to the
//! device's block size; [`ALIGN`] (4 KiB) covers the usual ones. A read of an unaligned byte
//! range fetches the aligned span around it and reports where the wanted bytes start.
//!
//! Where the filesystem refuses O_DIRECT (tmpfs, some overlay filesystems) the file is opened
//! normally and [`DirectFile::is_direct`] says so, so measurements can name what they measured.

use std::alloc::{Layout, alloc_zeroed, dealloc};
use std::fs::{File, OpenOptions};
use std::io;
use std::path::{Path, PathBuf};
use std::ptr::NonNull;

use crate::{IoError, Result};

/// Alignment of offsets, lengths and buffers for direct reads.
pub const ALIGN: usize = 4096;

/// A zeroed host buffer aligned to [`ALIGN`], its length a multiple of it.
#[derive(Debug)]
pub struct AlignedBuf {
    ptr: NonNull<u8>,
    len: usize,
}

// SAFETY: the buffer is plain owned bytes; access goes through &/&mut self.
unsafe impl Send for AlignedBuf {}
// SAFETY: shared access is read-only.
unsafe impl Sync for AlignedBuf {}

impl AlignedBuf {
    /// At least `len` bytes (rounded up to [`ALIGN`]; at least one block).
    pub fn new(len: usize) -> Self {
        let len = len.max(1).next_multiple_of(ALIGN);
        let layout = Layout::from_size_align(len, ALIGN).expect("ALIGN is a power of two and len fits");
        // SAFETY: layout has non-zero size.
        let raw = unsafe { alloc_zeroed(layout) };
        let ptr = NonNull::new(raw).unwrap_or_else(|| std::alloc::handle_alloc_error(layout));
        Self { ptr, len }
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: ptr is valid for len initialised (zeroed) bytes while self lives.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }

    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: as above, and &mut self gives exclusive access.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        // SAFETY: allocated in `new` with this exact layout.
        unsafe { dealloc(self.ptr.as_ptr(), Layout::from_size_align_unchecked(self.len, ALIGN)) }
    }
}

/// The aligned span `[start, end)` that covers bytes `offset..offset + len`.
pub fn aligned_span(offset: u64, len: usize) -> (u64, u64) {
    let a = ALIGN as u64;
    let start = offset / a * a;
    let end = (offset + len as u64).next_multiple_of(a);
    (start, end)
}

/// A file opened for direct reads.
#[derive(Debug)]
pub struct DirectFile {
    path: PathBuf,
    file: File,
    len_bytes: u64,
    direct: bool,
}

impl DirectFile {
    /// Opens `path` with O_DIRECT where the platform and filesystem allow it.
    pub fn open(path: &Path) -> Result<Self> {
        let err = |source| IoError::Open { path: path.to_path_buf(), source };
        let (file, direct) = match open_direct(path) {
            Ok(f) => (f, true),
            Err(_) => (File::open(path).map_err(err)?, false),
        };
        let len_bytes = file.metadata().map_err(err)?.len();
        Ok(Self { path: path.to_path_buf(), file, len_bytes, direct })
    }

    /// Creates (or truncates) `path` for direct writes and reads: the KV store's spill file.
    pub fn create(path: &Path) -> Result<Self> {
        let err = |source| IoError::Open { path: path.to_path_buf(), source };
        let plain = || OpenOptions::new().read(true).write(true).create(true).truncate(true).open(path);
        let (file, direct) = match create_direct(path) {
            Ok(f) => (f, true),
            Err(_) => (plain().map_err(err)?, false),
        };
        Ok(Self { path: path.to_path_buf(), file, len_bytes: 0, direct })
    }

    /// Writes `buf` (its address and length multiples of [`ALIGN`]) at `offset` (a multiple of
    /// [`ALIGN`]), growing the file as needed.
    pub fn write_at(&mut self, offset: u64, buf: &[u8]) -> Result<()> {
        let bad = |source| IoError::Write { path: self.path.clone(), offset, len: buf.len(), source };
        if !offset.is_multiple_of(ALIGN as u64)
            || !buf.len().is_multiple_of(ALIGN)
            || !(buf.as_ptr() as usize).is_multiple_of(ALIGN)
        {
            return Err(bad(io::Error::new(io::ErrorKind::InvalidInput, "unaligned direct write")));
        }
        let mut done = 0usize;
        while done < buf.len() {
            match pwrite(&self.file, &buf[done..], offset + done as u64) {
                Ok(0) => return Err(bad(io::ErrorKind::WriteZero.into())),
                Ok(n) => done += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(bad(e)),
            }
        }
        self.len_bytes = self.len_bytes.max(offset + buf.len() as u64);
        Ok(())
    }

    /// Flushes what was written to the device (before a rename makes it visible).
    pub fn sync(&self) -> Result<()> {
        self.file.sync_data().map_err(|source| IoError::Write { path: self.path.clone(), offset: 0, len: 0, source })
    }

    /// Whether reads bypass the page cache.
    pub fn is_direct(&self) -> bool {
        self.direct
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn len_bytes(&self) -> u64 {
        self.len_bytes
    }

    /// Reads the aligned span around bytes `offset..offset + len` into the front of `buf` and
    /// returns where byte `offset` landed in it. `buf` must start on an [`ALIGN`] boundary (an
    /// [`AlignedBuf`] or a pinned host buffer) and hold the span ([`aligned_span`]); bytes of
    /// the last block past the end of the file are unspecified (a direct read may zero them).
    pub fn read_into(&self, offset: u64, len: usize, buf: &mut [u8]) -> Result<usize> {
        let end = offset.saturating_add(len as u64);
        if end > self.len_bytes {
            return Err(IoError::Truncated { path: self.path.clone(), offset, end, file_len: self.len_bytes });
        }
        let (start, span_end) = aligned_span(offset, len);
        let span = (span_end - start) as usize;
        let bad = |why: String| IoError::Read {
            path: self.path.clone(),
            offset,
            len,
            source: io::Error::new(io::ErrorKind::InvalidInput, why),
        };
        if span > buf.len() {
            return Err(bad(format!("buffer of {} B < span {span} B", buf.len())));
        }
        if !(buf.as_ptr() as usize).is_multiple_of(ALIGN) {
            return Err(bad(format!("buffer not aligned to {ALIGN} B")));
        }
        // The file may end inside the last block: read whole blocks, accept a short final read.
        let want = (self.len_bytes.min(span_end) - start) as usize;
        let dst = &mut buf[..span];
        let mut done = 0usize;
        while done < want {
            match pread(&self.file, &mut dst[done..], start + done as u64) {
                Ok(0) => break,
                Ok(n) => done += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(source) => return Err(IoError::Read { path: self.path.clone(), offset, len, source }),
            }
        }
        if done < want {
            return Err(IoError::Truncated { path: self.path.clone(), offset, end, file_len: start + done as u64 });
        }
        Ok((offset - start) as usize)
    }
}

#[cfg(target_os = "linux")]
fn open_direct(path: &Path) -> io::Result<File> {
    use std::os::unix::fs::OpenOptionsExt;
    let f = OpenOptions::new().read(true).custom_flags(libc::O_DIRECT).open(path)?;
    // Some filesystems accept the flag at open and refuse the first read: probe one block.
    let mut probe = AlignedBuf::new(ALIGN);
    pread(&f, probe.as_mut_slice(), 0)?;
    Ok(f)
}

#[cfg(target_os = "linux")]
fn create_direct(path: &Path) -> io::Result<File> {
    use std::os::unix::fs::OpenOptionsExt;
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .custom_flags(libc::O_DIRECT)
        .open(path)?;
    // Some filesystems accept the flag at open and refuse the first write: probe one block.
    let probe = AlignedBuf::new(ALIGN);
    pwrite(&f, probe.as_slice(), 0)?;
    f.set_len(0)?;
    Ok(f)
}

#[cfg(not(target_os = "linux"))]
fn create_direct(_path: &Path) -> io::Result<File> {
    Err(io::ErrorKind::Unsupported.into())
}

#[cfg(unix)]
fn pwrite(f: &File, buf: &[u8], offset: u64) -> io::Result<usize> {
    use std::os::unix::fs::FileExt;
    f.write_at(buf, offset)
}

#[cfg(not(unix))]
fn pwrite(f: &File, buf: &[u8], offset: u64) -> io::Result<usize> {
    use std::os::windows::fs::FileExt;
    f.seek_write(buf, offset)
}

#[cfg(not(target_os = "linux"))]
fn open_direct(_path: &Path) -> io::Result<File> {
    Err(io::ErrorKind::Unsupported.into())
}

#[cfg(unix)]
fn pread(f: &File, buf: &mut [u8], offset: u64) -> io::Result<usize> {
    use std::os::unix::fs::FileExt;
    f.read_at(buf, offset)
}

#[cfg(not(unix))]
fn pread(f: &File, buf: &mut [u8], offset: u64) -> io::Result<usize> {
    use std::os::windows::fs::FileExt;
    f.seek_read(buf, offset)
}

/// Bytes per read request of [`DirectFile::read_span_parallel`].
pub const READ_CHUNK: usize = 8 << 20;
/// Reader threads the streamer and the calibration use (NVMe drives want several requests in
/// flight).
pub const READERS: usize = 4;

/// Reads aligned spans `(file, start, end)` of `files`, back to back, into the front of `buf`
/// with `readers` threads taking `piece`-byte pieces in turn across all of them, so that many
/// reads are in flight even when each span is small (an expert's few matrices). Bytes past a
/// file's end are unspecified.
pub fn read_spans_parallel(
    files: &[DirectFile],
    spans: &[(usize, u64, u64)],
    buf: &mut [u8],
    piece: usize,
    readers: usize,
) -> Result<()> {
    let piece = piece.max(ALIGN).next_multiple_of(ALIGN);
    let readers = readers.max(1);
    let mut jobs: Vec<Vec<Job<'_>>> = (0..readers).map(|_| Vec::new()).collect();
    let mut rest = buf;
    let mut next = 0usize;
    for &(f, start, end) in spans {
        let len = end.saturating_sub(start) as usize;
        let bad = |why: &str| IoError::Read {
            path: files.get(f).map_or_else(Default::default, |x| x.path.clone()),
            offset: start,
            len,
            source: io::Error::new(io::ErrorKind::InvalidInput, why.to_string()),
        };
        let file = files.get(f).ok_or_else(|| bad("no such file"))?;
        if !start.is_multiple_of(ALIGN as u64) || !(len).is_multiple_of(ALIGN) || len > rest.len() {
            return Err(bad("unaligned span or short buffer"));
        }
        let (mine, tail) = std::mem::take(&mut rest).split_at_mut(len);
        rest = tail;
        for (k, c) in mine.chunks_mut(piece).enumerate() {
            let off = start + (k * piece) as u64;
            let in_file = file.len_bytes.saturating_sub(off).min(c.len() as u64) as usize;
            jobs[next % readers].push((file, off, in_file, c));
            next += 1;
        }
    }
    run_jobs(jobs)
}

/// One read of a parallel read: the file, the offset, the bytes of it in the file (0: none,
/// the piece lies past the end) and the aligned piece of buffer it lands in.
type Job<'a> = (&'a DirectFile, u64, usize, &'a mut [u8]);

/// Runs each list of reads on a thread of its own, in order within a list.
fn run_jobs(jobs: Vec<Vec<Job<'_>>>) -> Result<()> {
    let results: Vec<Result<()>> = std::thread::scope(|s| {
        let handles: Vec<_> = jobs
            .into_iter()
            .filter_map(|job| {
                let path = job.first()?.0.path.clone();
                let handle = s.spawn(move || -> Result<()> {
                    for (file, off, n, chunk) in job {
                        if n > 0 {
                            file.read_into(off, n, chunk)?;
                        }
                    }
                    Ok(())
                });
                Some((path, handle))
            })
            .collect();
        handles.into_iter().map(|(path, h)| h.join().unwrap_or_else(|_| Err(reader_panicked(&path)))).collect()
    });
    results.into_iter().collect()
}

impl DirectFile {
    /// Reads the aligned span `start..end` (`start` a multiple of [`ALIGN`]) into the front of
    /// `buf` with `readers` threads taking [`READ_CHUNK`]-sized pieces in turn; bytes of the span
    /// past the end of the file are unspecified.
    pub fn read_span_parallel(&self, start: u64, end: u64, buf: &mut [u8], readers: usize) -> Result<()> {
        let span_len = (end - start) as usize;
        if !start.is_multiple_of(ALIGN as u64) || span_len > buf.len() {
            return Err(IoError::Read {
                path: self.path.clone(),
                offset: start,
                len: span_len,
                source: io::Error::new(io::ErrorKind::InvalidInput, "unaligned span or short buffer"),
            });
        }
        let len_in_file = (self.len_bytes.min(end).saturating_sub(start)) as usize;
        let readers = readers.max(1);
        let mut jobs: Vec<Vec<Job<'_>>> = (0..readers).map(|_| Vec::new()).collect();
        for (i, c) in buf[..span_len].chunks_mut(READ_CHUNK).enumerate() {
            let off = i * READ_CHUNK;
            let len = c.len().min(len_in_file.saturating_sub(off));
            jobs[i % readers].push((self, start + off as u64, len, c));
        }
        run_jobs(jobs)
    }
}

/// Best-of-3 direct-read bandwidth over up to `max_bytes` of `path`, bytes/s, read the way the
/// streamer reads a layer: 256 MiB spans one after another, each with `threads` readers
/// ([`DirectFile::read_span_parallel`]). Also says whether the reads bypassed the page cache.
pub fn measure_read_bandwidth(path: &Path, max_bytes: u64, threads: usize) -> Result<(f64, bool)> {
    let f = DirectFile::open(path)?;
    let total = f.len_bytes().min(max_bytes).max(1);
    let span = (256u64 << 20).min(total.next_multiple_of(ALIGN as u64));
    let mut buf = AlignedBuf::new(span as usize);
    let mut best = 0f64;
    for _ in 0..3 {
        let t = std::time::Instant::now();
        let mut start = 0u64;
        while start < total {
            let end = (start + span).min(total.next_multiple_of(ALIGN as u64));
            f.read_span_parallel(start, end, buf.as_mut_slice(), threads)?;
            start = end;
        }
        best = best.max(total as f64 / t.elapsed().as_secs_f64().max(1e-9));
    }
    Ok((best, f.is_direct()))
}

fn reader_panicked(path: &Path) -> IoError {
    IoError::Read { path: path.to_path_buf(), offset: 0, len: 0, source: io::Error::other("a reader thread panicked") }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    /// Spans of two files (one running past its file's end) land back to back, every byte in
    /// place, whatever the piece size and reader count; a misaligned span is an error.
    #[test]
    fn spans_of_several_files_come_back_in_order() {
        let dir = tempfile_dir();
        let a: Vec<u8> = (0..5 * ALIGN).map(|i| (i * 13 % 251) as u8).collect();
        let b: Vec<u8> = (0..2 * ALIGN + 77).map(|i| (i * 5 % 241) as u8).collect();
        for (name, data) in [("a.bin", &a), ("b.bin", &b)] {
            File::create(dir.join(name)).and_then(|mut f| f.write_all(data)).expect("write");
        }
        let files =
            [DirectFile::open(&dir.join("a.bin")).expect("a"), DirectFile::open(&dir.join("b.bin")).expect("b")];
        let (al, bl) = (ALIGN as u64, ALIGN as u64);
        let spans = [(0, al, 4 * al), (1, 0, 3 * bl), (0, 0, al)];
        for (piece, readers) in [(ALIGN, 3), (1 << 20, 8), (ALIGN, 1)] {
            let mut buf = AlignedBuf::new(7 * ALIGN);
            read_spans_parallel(&files, &spans, buf.as_mut_slice(), piece, readers).expect("read");
            let got = buf.as_slice();
            assert_eq!(&got[..3 * ALIGN], &a[ALIGN..4 * ALIGN]);
            assert_eq!(&got[3 * ALIGN..3 * ALIGN + b.len()], &b[..]);
            assert_eq!(&got[6 * ALIGN..7 * ALIGN], &a[..ALIGN]);
        }
        let mut buf = AlignedBuf::new(2 * ALIGN);
        assert!(read_spans_parallel(&files, &[(0, 1, al)], buf.as_mut_slice(), ALIGN, 2).is_err(), "misaligned");
        assert!(read_spans_parallel(&files, &[(0, 0, 3 * al)], buf.as_mut_slice(), ALIGN, 2).is_err(), "short buffer");
        assert!(read_spans_parallel(&files, &[(2, 0, al)], buf.as_mut_slice(), ALIGN, 2).is_err(), "no file 2");
    }

    #[test]
    fn unaligned_ranges_come_back_exactly() {
        let dir = tempfile_dir();
        let path = dir.join("f.bin");
        let data: Vec<u8> = (0..3 * ALIGN + 123).map(|i| (i * 7 % 251) as u8).collect();
        File::create(&path).and_then(|mut f| f.write_all(&data)).expect("write");
        let f = DirectFile::open(&path).expect("open");
        let mut buf = AlignedBuf::new(4 * ALIGN);
        assert_eq!(buf.as_slice().as_ptr() as usize % ALIGN, 0);
        for (off, len) in
            [(0usize, 10usize), (5, ALIGN), (ALIGN - 1, 2), (2 * ALIGN + 100, ALIGN + 23), (0, data.len())]
        {
            let at = f.read_into(off as u64, len, buf.as_mut_slice()).expect("read");
            assert_eq!(&buf.as_slice()[at..at + len], &data[off..off + len], "{off}+{len}");
        }
        let err = f.read_into((data.len() - 5) as u64, 10, buf.as_mut_slice()).expect_err("past the end");
        assert!(err.to_string().contains("truncated"), "{err}");
        let mut small = AlignedBuf::new(ALIGN);
        assert!(f.read_into(ALIGN as u64 - 1, 2, small.as_mut_slice()).is_err(), "span of two blocks in one");
        assert!(f.read_into(0, 10, &mut buf.as_mut_slice()[1..]).is_err(), "misaligned buffer");
        let (bw, _) = measure_read_bandwidth(&path, 1 << 20, 4).expect("bandwidth");
        // A parallel span read lands every byte of the file.
        let mut big = AlignedBuf::new(5 * ALIGN);
        big.as_mut_slice().fill(0xAB);
        f.read_span_parallel(0, 4 * ALIGN as u64, big.as_mut_slice(), 4).expect("span");
        assert_eq!(&big.as_slice()[..data.len()], &data[..]);
        assert!(f.read_span_parallel(1, ALIGN as u64, big.as_mut_slice(), 2).is_err(), "unaligned start");
        assert!(bw > 0.0);
        std::fs::remove_dir_all(&dir).ok();
    }

    #[test]
    fn direct_writes_read_back() {
        let dir = tempfile_dir();
        let path = dir.join("spill.bin");
        let mut f = DirectFile::create(&path).expect("create");
        let mut a = AlignedBuf::new(2 * ALIGN);
        a.as_mut_slice().iter_mut().enumerate().for_each(|(i, b)| *b = (i % 253) as u8);
        f.write_at(ALIGN as u64, a.as_slice()).expect("write");
        assert_eq!(f.len_bytes(), 3 * ALIGN as u64);
        let mut back = AlignedBuf::new(2 * ALIGN);
        let at = f.read_into(ALIGN as u64 + 10, 100, back.as_mut_slice()).expect("read");
        assert_eq!(&back.as_slice()[at..at + 100], &a.as_slice()[10..110]);
        assert!(f.write_at(1, a.as_slice()).is_err(), "unaligned offset");
        assert!(f.write_at(0, &a.as_slice()[..100]).is_err(), "unaligned length");
        std::fs::remove_dir_all(&dir).ok();
    }

    #[test]
    fn spans_cover_the_range() {
        assert_eq!(aligned_span(0, 1), (0, 4096));
        assert_eq!(aligned_span(4095, 2), (0, 8192));
        assert_eq!(aligned_span(4096, 4096), (4096, 8192));
    }

    fn tempfile_dir() -> PathBuf {
        let dir =
            std::env::temp_dir().join(format!("ollm-direct-{}-{:?}", std::process::id(), std::thread::current().id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        dir
    }
}
