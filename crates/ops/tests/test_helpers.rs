//! The contract of the helpers every GPU test uses (tests/common): the gate skips only where
//! skipping is allowed, and random inputs are reproducible from the seed a failure prints.
//! Each check runs this binary again on one of the `child_*` tests (ignored in a plain run),
//! with the environment under test, and reads what it printed and how it exited.
//!
//! Without a usable GPU (a CI machine): the gated child prints one SKIPPED line naming the
//! missing piece and passes; under `OLLM_REQUIRE_GPU=1` it fails with that piece in its message.
//! With one (the GPU machine, where `scripts/run-gpu-tests.sh` runs this binary too): the
//! child reaches the device in both cases and never prints SKIPPED.

#![cfg(feature = "cuda")]

mod common;

use std::process::Command;

use common::gpu::REQUIRE_GPU;
use common::seed::TEST_SEED;

/// Set by the parent to make `child_draws_random_inputs` fail after drawing.
const FAIL: &str = "OLLM_TEST_HELPERS_CHILD_FAIL";

#[test]
#[ignore = "run by gate_skips_without_a_gpu_and_fails_when_one_is_required"]
fn child_passes_the_gate() {
    let Some(dev) = common::device() else { return };
    assert!(dev.info.total_bytes > 0, "{dev:?}");
    eprintln!("CHILD REACHED {} ({} MiB)", dev.info.name, dev.info.total_bytes >> 20);
}

#[test]
#[ignore = "run by random_inputs_come_from_a_printed_settable_seed"]
fn child_draws_random_inputs() {
    let (a, b) = (common::random(4, 1.0), common::random(4, 1.0));
    assert_ne!(a, b, "each draw is a new stream");
    assert!(a.iter().chain(&b).all(|x| (-1.0..1.0).contains(x)), "{a:?} {b:?}");
    eprintln!("CHILD VALUES {a:?} {b:?}");
    assert!(std::env::var_os(FAIL).is_none(), "failing on request, after drawing");
}

/// Runs this binary on the ignored test `name` with `env` set (and the two variables under
/// test removed unless given); its exit status and everything it printed.
fn child(name: &str, env: &[(&str, &str)]) -> (bool, String) {
    let exe = std::env::current_exe().expect("current_exe");
    let mut cmd = Command::new(exe);
    cmd.args(["--ignored", "--exact", name, "--nocapture", "--test-threads=1"]);
    cmd.env_remove(REQUIRE_GPU).env_remove(TEST_SEED).env_remove(FAIL);
    cmd.envs(env.iter().copied());
    let out = cmd.output().expect("run the child test");
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(text.contains(&format!("test {name} ... ")), "the child test did not run:\n{text}");
    (out.status.success(), text)
}

#[test]
fn gate_skips_without_a_gpu_and_fails_when_one_is_required() {
    let name = "child_passes_the_gate";
    match ollm_ops::cuda::probe(0) {
        Err(e) => {
            let reason = e.to_string();
            eprintln!("no usable GPU here ({reason}): checking the skip and the required-GPU failure");
            let (ok, out) = child(name, &[]);
            assert!(ok, "without {REQUIRE_GPU} the gated test passes:\n{out}");
            let skipped: Vec<&str> = out.lines().filter(|l| l.contains("SKIPPED")).collect();
            assert_eq!(skipped.len(), 1, "one SKIPPED line:\n{out}");
            assert!(
                skipped[0].ends_with(&format!("SKIPPED: {name}: no usable CUDA device ({reason})")),
                "the SKIPPED line names the test and what is missing:\n{out}"
            );
            assert!(!out.contains("CHILD REACHED"), "{out}");

            for value in ["1", "yes"] {
                let (ok, out) = child(name, &[(REQUIRE_GPU, value)]);
                assert!(!ok, "with {REQUIRE_GPU}={value} the gated test fails:\n{out}");
                assert!(!out.contains("SKIPPED"), "a required GPU is never skipped:\n{out}");
                let want = format!(
                    "{REQUIRE_GPU} is set, so {name} fails instead of skipping: no usable CUDA device ({reason})"
                );
                assert!(out.lines().any(|l| l == want), "one line naming what is missing, {want:?}:\n{out}");
            }
            let (ok, out) = child(name, &[(REQUIRE_GPU, "0")]);
            assert!(ok && out.contains("SKIPPED"), "{REQUIRE_GPU}=0 asks for nothing:\n{out}");
        }
        Ok(dev) => {
            eprintln!("a GPU is here ({}): checking that the gated test reaches it", dev.info.name);
            drop(dev);
            for env in [&[][..], &[(REQUIRE_GPU, "1")][..]] {
                let (ok, out) = child(name, env);
                assert!(ok, "{env:?}: the gated test passes on a GPU machine:\n{out}");
                assert!(out.contains("CHILD REACHED"), "{env:?}: the gated test reached the device:\n{out}");
                assert!(!out.contains("SKIPPED"), "{env:?}: nothing skipped on a GPU machine:\n{out}");
            }
        }
    }
}

/// The `CHILD VALUES` line a child printed.
fn values(out: &str) -> &str {
    out.lines().find(|l| l.starts_with("CHILD VALUES")).unwrap_or_else(|| panic!("no values printed:\n{out}"))
}

#[test]
fn random_inputs_come_from_a_printed_settable_seed() {
    let name = "child_draws_random_inputs";
    // Unset: a fresh seed, printed when the test first draws.
    let (ok, fresh) = child(name, &[]);
    assert!(ok, "{fresh}");
    let prefix = format!("{name}: random inputs from {TEST_SEED}=");
    let line = fresh.lines().find(|l| l.starts_with(&prefix)).unwrap_or_else(|| panic!("no seed printed:\n{fresh}"));
    let seed = &line[prefix.len()..];
    assert!(seed.parse::<u64>().is_ok(), "{line}");

    // Set to the printed seed: the same inputs; another seed: others.
    let (ok, again) = child(name, &[(TEST_SEED, seed)]);
    assert!(ok && again.contains(&format!("{prefix}{seed}")), "{again}");
    assert_eq!(values(&again), values(&fresh), "{TEST_SEED}={seed} reproduces the inputs");
    let other = (seed.parse::<u64>().expect("seed") ^ 1).to_string();
    let (_, different) = child(name, &[(TEST_SEED, &other)]);
    assert_ne!(values(&different), values(&fresh), "another seed draws other inputs");

    // A failure names the seed that reproduces it.
    let (ok, failed) = child(name, &[(TEST_SEED, "12345"), (FAIL, "1")]);
    assert!(!ok, "{failed}");
    assert!(failed.contains("failing on request"), "{failed}");
    assert!(
        failed.lines().any(|l| l.starts_with(&format!("{TEST_SEED}=12345 reproduces this ({name} drew"))),
        "a failing test prints its seed:\n{failed}"
    );

    // A seed that is not a number is refused, saying how to set one.
    let (ok, bad) = child(name, &[(TEST_SEED, "abc")]);
    assert!(!ok && bad.contains(&format!("{TEST_SEED}=\"abc\" is not a seed")), "{bad}");
}
