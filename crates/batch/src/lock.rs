//! One writer per output file: `ollm batch` holds an exclusive `flock` on `<file>.lock` (which
//! holds its pid) while it writes `<file>`, so a second process on the same results or errors
//! file refuses at once, naming the holder, instead of doubling every line. The lock goes with
//! the process (exit, crash or `kill -9`); the small lock file stays.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, Write};
use std::path::{Path, PathBuf};

use crate::BatchError;
use crate::job::JobOptions;

/// Holds the lock on one output file until dropped.
#[derive(Debug)]
pub struct OutputLock {
    _file: File,
    path: PathBuf,
    target: PathBuf,
}

/// The locks on a job's results and errors files, taken before the model loads so that a
/// second process refuses at once; [`run_job`](crate::run_job) asks for them.
#[derive(Debug)]
pub struct JobLocks {
    pub output: OutputLock,
    pub errors: OutputLock,
}

impl JobLocks {
    pub fn acquire(opts: &JobOptions) -> Result<Self, BatchError> {
        Ok(Self { output: OutputLock::acquire(&opts.output)?, errors: OutputLock::acquire(&opts.errors)? })
    }

    /// Whether these are the locks of `opts`'s files.
    pub fn cover(&self, opts: &JobOptions) -> bool {
        self.output.target == opts.output && self.errors.target == opts.errors
    }
}

impl OutputLock {
    /// Locks `target` (through `<target>.lock`) for this process, or says which process has it.
    pub fn acquire(target: &Path) -> Result<Self, BatchError> {
        let mut name = target.as_os_str().to_owned();
        name.push(".lock");
        let path = PathBuf::from(name);
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(|e| BatchError::io(&path, "open the lock file", &e))?;
        if !try_lock(&file).map_err(|e| BatchError::io(&path, "lock", &e))? {
            let mut holder = String::new();
            let _ = file.read_to_string(&mut holder);
            let holder = holder.trim();
            return Err(BatchError::Locked {
                path: target.to_path_buf(),
                holder: if holder.is_empty() { "unknown".into() } else { holder.chars().take(20).collect() },
            });
        }
        file.set_len(0)
            .and_then(|()| file.rewind())
            .and_then(|()| writeln!(file, "{}", std::process::id()))
            .map_err(|e| BatchError::io(&path, "write the pid into the lock file", &e))?;
        Ok(Self { _file: file, path, target: target.to_path_buf() })
    }

    /// The lock file.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// Takes an exclusive lock without waiting; false if another open file holds it.
#[cfg(unix)]
fn try_lock(file: &File) -> std::io::Result<bool> {
    use std::os::fd::AsRawFd;
    // SAFETY: flock on a file descriptor this `File` owns and keeps open; no memory is passed.
    if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
        return Ok(true);
    }
    let e = std::io::Error::last_os_error();
    if e.raw_os_error() == Some(libc::EWOULDBLOCK) { Ok(false) } else { Err(e) }
}

/// Without flock the file is not locked.
#[cfg(not(unix))]
fn try_lock(_file: &File) -> std::io::Result<bool> {
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_lock_on_the_same_file_names_the_holder() {
        let dir = tempfile::tempdir().expect("tempdir");
        let out = dir.path().join("out.jsonl");
        let held = OutputLock::acquire(&out).expect("first lock");
        assert_eq!(std::fs::read_to_string(held.path()).expect("lock file"), format!("{}\n", std::process::id()));
        let err = OutputLock::acquire(&out).expect_err("second lock").to_string();
        assert!(err.contains(&format!("pid {}", std::process::id())), "{err}");
        drop(held);
        OutputLock::acquire(&out).expect("free again once dropped");
    }
}
