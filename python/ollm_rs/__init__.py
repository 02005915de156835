"""ollm_rs: oLLM's engine in Rust, from Python.

Large-context LLMs in full precision on little memory: decoder layers stream from pinned RAM or
disk when the GPU cannot hold them, and the KV cache can live off the device. The engine is
the `ollm` CLI's; this package loads a model as `ollm --model` does and generates from it.

    import ollm_rs
    llm = ollm_rs.LLM("smollm2-135m")
    out = llm.generate(["The capital of France is"], max_new_tokens=20)
    print(out[0].text)

See docs/python.md in the repository for the mapping from oLLM's calls.
"""

from ._ollm_rs import LLM, RequestOutput, Stats, TextStream, Tokenizer, Usage, __version__

__all__ = ["LLM", "RequestOutput", "Stats", "TextStream", "Tokenizer", "Usage", "__version__"]
