//! ollm-io: bytes between disk and memory. Knows paths, offsets and lengths, never tensors.
//!
//! Reads are positioned (`pread`), never memory-mapped: the engine decides what is resident, not
//! the page cache. Every error names the file, the offset and what to do.

pub mod direct;

use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};

#[cfg(unix)]
use std::os::unix::fs::FileExt;

#[derive(Debug, thiserror::Error)]
pub enum IoError {
    #[error("cannot open {path}: {source} (check that the path exists and is readable)")]
    Open { path: PathBuf, source: io::Error },

    #[error("{path}: reading {len} bytes at offset {offset} failed: {source}")]
    Read { path: PathBuf, offset: u64, len: usize, source: io::Error },

    #[error(
        "{path}: writing {len} bytes at offset {offset} failed: {source} (is the disk full? free space or point the directory elsewhere)"
    )]
    Write { path: PathBuf, offset: u64, len: usize, source: io::Error },

    #[error(
        "{path}: needs bytes {offset}..{end} but the file has only {file_len} (truncated? re-download or re-convert it)"
    )]
    Truncated { path: PathBuf, offset: u64, end: u64, file_len: u64 },
}

pub type Result<T> = std::result::Result<T, IoError>;

/// An open file read with positioned reads. Owns the handle; cheap to share by reference
/// across threads (positioned reads do not move a cursor).
#[derive(Debug)]
pub struct ReadFile {
    path: PathBuf,
    file: File,
    len_bytes: u64,
}

impl ReadFile {
    pub fn open(path: &Path) -> Result<Self> {
        let err = |source| IoError::Open { path: path.to_path_buf(), source };
        let file = File::open(path).map_err(err)?;
        let len_bytes = file.metadata().map_err(err)?.len();
        Ok(Self { path: path.to_path_buf(), file, len_bytes })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn len_bytes(&self) -> u64 {
        self.len_bytes
    }

    /// Fills `buf` from `offset`; a range past the end of the file is a `Truncated` error.
    pub fn read_exact_at(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        let end = offset.saturating_add(buf.len() as u64);
        if end > self.len_bytes {
            return Err(IoError::Truncated { path: self.path.clone(), offset, end, file_len: self.len_bytes });
        }
        self.pread(offset, buf).map_err(|source| IoError::Read {
            path: self.path.clone(),
            offset,
            len: buf.len(),
            source,
        })
    }

    /// Reads `len` bytes at `offset` into a new vector.
    pub fn read_vec_at(&self, offset: u64, len: usize) -> Result<Vec<u8>> {
        let mut buf = vec![0u8; len];
        self.read_exact_at(offset, &mut buf)?;
        Ok(buf)
    }

    #[cfg(unix)]
    fn pread(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        self.file.read_exact_at(buf, offset)
    }

    #[cfg(not(unix))]
    fn pread(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        use std::os::windows::fs::FileExt;
        let mut done = 0;
        while done < buf.len() {
            let n = self.file.seek_read(&mut buf[done..], offset + done as u64)?;
            if n == 0 {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
            done += n;
        }
        Ok(())
    }
}

/// Bytes an unprivileged user may still write on the filesystem holding `path` (statvfs), or
/// None where the platform cannot say.
pub fn available_bytes(path: &Path) -> Option<u64> {
    #[cfg(unix)]
    {
        use std::os::unix::ffi::OsStrExt;
        let c = std::ffi::CString::new(path.as_os_str().as_bytes()).ok()?;
        // SAFETY: statvfs is plain old data; zeroed is a valid value to be overwritten.
        let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
        // SAFETY: c is a valid NUL-terminated path and st a valid out-pointer.
        if unsafe { libc::statvfs(c.as_ptr(), &mut st) } != 0 {
            return None;
        }
        #[allow(clippy::unnecessary_cast)] // the field widths differ between platforms
        Some(st.f_bavail as u64 * st.f_frsize as u64)
    }
    #[cfg(not(unix))]
    {
        let _ = path;
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn reads_at_offsets_and_reports_truncation() {
        let dir = std::env::temp_dir().join(format!("ollm-io-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let path = dir.join("f.bin");
        std::fs::File::create(&path).and_then(|mut f| f.write_all(b"0123456789")).expect("write");
        let f = ReadFile::open(&path).expect("open");
        assert_eq!(f.read_vec_at(3, 4).expect("read"), b"3456");
        let err = f.read_vec_at(8, 4).expect_err("past the end");
        assert!(err.to_string().contains("truncated"), "{err}");
        let missing = ReadFile::open(&dir.join("nope")).expect_err("missing");
        assert!(missing.to_string().contains("nope"), "{missing}");
        std::fs::remove_dir_all(&dir).ok();
    }

    #[test]
    fn available_bytes_of_the_temp_dir_is_positive() {
        let free = available_bytes(&std::env::temp_dir()).expect("statvfs works on the temp dir");
        assert!(free > 0);
        assert!(available_bytes(Path::new("/no/such/dir/at/all")).is_none());
    }
}
