//! Compiling `.cu` sources with NVRTC once, keeping the PTX on disk.
//!
//! The cache key is the source text, the GPU architecture and the NVRTC version, so an edited
//! kernel, another GPU or another toolkit compiles afresh. NVRTC ships no headers of its own:
//! `cuda_bf16.h` comes from the toolkit's include directory (`$CUDA_HOME`, `$CUDA_PATH`, or
//! `/usr/local/cuda`). This crate's own headers (`kernels/*.cuh`) are spliced into the source
//! text where it includes them, so NVRTC sees one file and the cache key covers the headers.

use std::borrow::Cow;
use std::path::{Path, PathBuf};

use cudarc::nvrtc::{CompileOptions, Ptx, compile_ptx_with_opts};

use crate::{OpsError, Result};

/// Owns the include path, the target architecture and the on-disk cache directory.
#[derive(Debug)]
pub struct KernelCache {
    include_dir: PathBuf,
    /// `sm_90` for compute capability 9.0.
    arch: String,
    /// None when no writable cache directory exists (then every run compiles).
    dir: Option<PathBuf>,
}

/// The toolkit's include directory holding `cuda_bf16.h`.
fn find_include_dir() -> Result<PathBuf> {
    let mut candidates: Vec<PathBuf> = ["CUDA_HOME", "CUDA_PATH"]
        .iter()
        .filter_map(std::env::var_os)
        .map(|p| PathBuf::from(p).join("include"))
        .collect();
    candidates.push(PathBuf::from("/usr/local/cuda/include"));
    candidates.into_iter().find(|d| d.join("cuda_bf16.h").exists()).ok_or_else(|| {
        OpsError::Backend(
            "CUDA headers not found (cuda_bf16.h, needed by NVRTC): set CUDA_HOME to the CUDA toolkit directory, or run with --device cpu"
                .into(),
        )
    })
}

/// `$OLLM_HOME/kernels`, else `$XDG_CACHE_HOME/ollm/kernels`, else `~/.cache/ollm/kernels`.
fn cache_dir() -> Option<PathBuf> {
    let root = std::env::var_os("OLLM_HOME").map(PathBuf::from).or_else(|| {
        std::env::var_os("XDG_CACHE_HOME")
            .map(|p| PathBuf::from(p).join("ollm"))
            .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache").join("ollm")))
    })?;
    let dir = root.join("kernels");
    std::fs::create_dir_all(&dir).ok()?;
    Some(dir)
}

/// The crate's kernel headers, by the name a kernel file includes them with.
const LOCAL_HEADERS: &[(&str, &str)] = &[("common.cuh", include_str!("../../kernels/common.cuh"))];

/// `source` with each `#include "<local header>"` line replaced by that header's text.
fn splice_headers(source: &str) -> Cow<'_, str> {
    if !LOCAL_HEADERS.iter().any(|(name, _)| source.contains(&format!("#include \"{name}\""))) {
        return Cow::Borrowed(source);
    }
    let mut out = String::with_capacity(source.len() + 1024);
    for line in source.lines() {
        let header = LOCAL_HEADERS.iter().find(|(name, _)| line.trim() == format!("#include \"{name}\""));
        match header {
            Some((_, text)) => out.push_str(text),
            None => {
                out.push_str(line);
                out.push('\n');
            }
        }
    }
    Cow::Owned(out)
}

/// FNV-1a, 64 bits: a stable key for file names (not for security).
fn fnv1a(parts: &[&[u8]]) -> u64 {
    let mut h = 0xcbf2_9ce4_8422_2325u64;
    for p in parts {
        for &b in *p {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
        h ^= 0xff;
    }
    h
}

impl KernelCache {
    pub fn new(compute_capability: (i32, i32)) -> Result<Self> {
        Ok(Self {
            include_dir: find_include_dir()?,
            arch: format!("sm_{}{}", compute_capability.0, compute_capability.1),
            dir: cache_dir(),
        })
    }

    /// The architecture every file compiles for unless it names its own (`sm_90` on an H100).
    pub fn arch(&self) -> &str {
        &self.arch
    }

    /// Where the PTX of `source` compiled for `arch` is (or would be) kept.
    fn cached_path(&self, name: &str, source: &str, arch: &str) -> Option<PathBuf> {
        let spliced = splice_headers(source);
        let version = nvrtc_version();
        let key = fnv1a(&[spliced.as_bytes(), arch.as_bytes(), version.as_bytes()]);
        self.dir.as_ref().map(|d| d.join(format!("{name}-{key:016x}.ptx")))
    }

    /// Whether the disk cache holds the PTX of `source`.
    pub fn is_cached(&self, name: &str, source: &str) -> bool {
        self.cached_path(name, source, &self.arch).is_some_and(|p| p.exists())
    }

    /// Whether the disk cache holds the PTX of `source` compiled for `arch`.
    pub fn is_cached_for_arch(&self, name: &str, source: &str, arch: &str) -> bool {
        self.cached_path(name, source, arch).is_some_and(|p| p.exists())
    }

    /// PTX for `source` (named `name` in messages), from the disk cache or freshly compiled.
    pub fn ptx(&self, name: &str, source: &str) -> Result<Ptx> {
        self.ptx_for_arch(name, source, &self.arch)
    }

    /// As [`KernelCache::ptx`], for `arch` instead of the device's own (`sm_90a` for a file
    /// that uses Hopper's architecture-specific instructions such as wgmma).
    pub fn ptx_for_arch(&self, name: &str, source: &str, arch: &str) -> Result<Ptx> {
        let path = self.cached_path(name, source, arch);
        if let Some(text) = path.as_deref().and_then(|p| std::fs::read_to_string(p).ok()) {
            return Ok(Ptx::from_src(text));
        }
        let ptx = self.compile_for_arch(name, source, arch)?;
        if let Some(p) = path {
            write_atomically(&p, &ptx.to_src());
        }
        Ok(ptx)
    }

    /// Compiles `source` (named `name` in messages) with NVRTC, bypassing the disk cache. Needs
    /// NVRTC and the CUDA headers, not a GPU.
    pub fn compile(&self, name: &str, source: &str) -> Result<Ptx> {
        self.compile_for_arch(name, source, &self.arch)
    }

    /// As [`KernelCache::compile`], for `arch` (e.g. `sm_90a`) instead of the device's own.
    pub fn compile_for_arch(&self, name: &str, source: &str, arch: &str) -> Result<Ptx> {
        let source = splice_headers(source);
        let opts = CompileOptions {
            include_paths: vec![self.include_dir.display().to_string()],
            options: vec![format!("--gpu-architecture={arch}"), "-std=c++17".into()],
            name: Some(format!("{name}.cu")),
            ..Default::default()
        };
        compile_ptx_with_opts(source.as_ref(), opts)
            .map_err(|e| OpsError::Backend(format!("NVRTC could not compile {name}.cu for {arch}: {e}")))
    }
}

/// "major.minor" of the loaded NVRTC (part of the cache key).
fn nvrtc_version() -> String {
    let (mut major, mut minor) = (0, 0);
    // SAFETY: `probe` checked that libnvrtc loads; the call only writes the two integers.
    unsafe { cudarc::nvrtc::sys::nvrtcVersion(&mut major, &mut minor) };
    format!("{major}.{minor}")
}

/// Best effort: a cache write that fails only costs a recompile next time.
fn write_atomically(path: &Path, text: &str) {
    let tmp = path.with_extension(format!("tmp{}", std::process::id()));
    if std::fs::write(&tmp, text).is_ok() && std::fs::rename(&tmp, path).is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
}

#[cfg(test)]
mod tests {
    use super::{fnv1a, splice_headers};

    #[test]
    fn key_depends_on_every_part() {
        assert_ne!(fnv1a(&[b"ab", b"c"]), fnv1a(&[b"a", b"bc"]));
        assert_eq!(fnv1a(&[b"x"]), fnv1a(&[b"x"]));
    }

    #[test]
    fn local_headers_are_spliced_in() {
        let src = "// k\n#include \"common.cuh\"\n#include <cuda_bf16.h>\nint x;\n";
        let out = splice_headers(src);
        assert!(out.contains("to_f32(__nv_bfloat16 v)"), "{out}");
        assert!(!out.lines().any(|l| l.trim() == "#include \"common.cuh\""), "{out}");
        assert!(out.contains("#include <cuda_bf16.h>\nint x;"), "system headers stay");
        assert!(matches!(splice_headers("int y;"), std::borrow::Cow::Borrowed(_)));
    }
}
