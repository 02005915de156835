"""Shared fixtures: the demo model from the Rust tests' cache, and the `ollm` binary.

The demo model (SmolLM2-135M) is provisioned by the CLI's own code into $OLLM_HOME; the suite
points OLLM_HOME at the cache the Rust tests fill (target/ollm-test-home, or $OLLM_TEST_HOME),
so CI downloads it once for both.
"""

import os
import pathlib

import pytest

REPO = pathlib.Path(__file__).resolve().parents[2]
TEST_HOME = pathlib.Path(os.environ.get("OLLM_TEST_HOME") or REPO / "target" / "ollm-test-home")
os.environ["OLLM_HOME"] = str(TEST_HOME)

MODEL = "smollm2-135m"


@pytest.fixture(scope="session")
def llm():
    import ollm_rs

    return ollm_rs.LLM(MODEL, device="cpu")


@pytest.fixture(scope="session")
def ollm_bin():
    """The `ollm` binary: $OLLM_BIN, else target/{debug,release}/ollm. Missing, the tests that
    compare with it skip, unless OLLM_REQUIRE_CLI=1 (CI), where that is a failure."""
    given = os.environ.get("OLLM_BIN")
    candidates = [pathlib.Path(given)] if given else [REPO / "target" / d / "ollm" for d in ("debug", "release")]
    for c in candidates:
        if c.is_file():
            return c
    why = f"no ollm binary at {', '.join(map(str, candidates))} (build it with cargo build -p ollm-cli, or set OLLM_BIN)"
    if os.environ.get("OLLM_REQUIRE_CLI") == "1":
        pytest.fail(why)
    pytest.skip(f"SKIPPED: {why}")
