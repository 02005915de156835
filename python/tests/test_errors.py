"""Each failure is the Python exception a user expects, carrying the CLI's one-line message."""

import pytest

import ollm_rs

from conftest import MODEL


def one_line(e):
    msg = str(e.value)
    assert msg and "\n" not in msg
    return msg


def test_a_missing_model_is_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError) as e:
        ollm_rs.LLM(str(tmp_path / "no-such-model"))
    assert "does not exist" in one_line(e) and "smollm2-135m or gemma3-270m for a demo model" in one_line(e)
    # A directory without config.json.
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError) as e:
        ollm_rs.LLM(tmp_path / "empty", device="cpu")
    assert "config.json" in one_line(e)


def test_bad_arguments_are_value_errors(llm):
    with pytest.raises(ValueError) as e:
        ollm_rs.LLM(MODEL, device="gpu")
    assert "cuda:N" in one_line(e)
    with pytest.raises(ValueError) as e:
        ollm_rs.LLM(MODEL, device="cpu", vram_budget="lots")
    assert one_line(e).startswith("vram_budget")
    with pytest.raises(ValueError) as e:
        llm.generate(["hi"], temperature=-1.0)
    assert "temperature" in one_line(e)
    with pytest.raises(ValueError) as e:
        llm.generate(["hi"], top_p=0.0)
    assert "top_p" in one_line(e)
    with pytest.raises(ValueError) as e:
        llm.generate(["hi"], max_new_tokens=-1)
    assert "max_new_tokens" in one_line(e)
    with pytest.raises(ValueError) as e:
        llm.generate(["fine", ""])
    assert "prompts[1] is empty" in one_line(e)
    with pytest.raises(ValueError) as e:
        llm.generate("word " * 9000, max_new_tokens=1)
    assert "context is 8192" in one_line(e)
    with pytest.raises(ValueError) as e:
        llm.chat([{"role": "user"}])
    assert "'content'" in one_line(e)
    with pytest.raises(TypeError):
        llm.generate(42)


def test_a_plan_over_the_budget_is_a_memory_error():
    with pytest.raises(MemoryError) as e:
        ollm_rs.LLM(MODEL, device="cpu", vram_budget="1MiB")
    assert "does not fit in --vram-budget" in one_line(e)


def test_a_broken_checkpoint_is_a_runtime_error(tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(RuntimeError) as e:
        ollm_rs.LLM(tmp_path, device="cpu")
    assert "config.json" in one_line(e) and "invalid JSON" in one_line(e)
