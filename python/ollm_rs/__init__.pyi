"""Type stubs of ollm_rs (the extension module ollm_rs._ollm_rs)."""

import os
from typing import Any, Dict, Iterator, List, Literal, Optional, Sequence, TypedDict, Union

__version__: str

Size = Union[int, str]
"""A size in bytes: an int, or a string such as "8GiB", "512MiB" or "7.5G"."""

Speculate = str
"""Speculative decoding: "ngram" (prompt lookup) or "draft:MODEL" (a small model with the same
tokenizer: a directory, a hub id ORG/NAME or "smollm2-135m")."""

class Message(TypedDict):
    role: str
    content: str

class ModelInfo(TypedDict):
    architecture: str
    context: int
    weight_bytes: int
    weight_bytes_per_token: int
    kv_bytes_per_position: int
    n_layers: int
    hidden_size: int
    vocab_size: int
    eos_token_ids: List[int]
    device: str
    model_dir: str
    load_s: float

class Usage:
    """Token counts of one generation."""

    @property
    def prompt_tokens(self) -> int: ...
    @property
    def completion_tokens(self) -> int: ...
    @property
    def total_tokens(self) -> int: ...

class Stats:
    """Timings of one generation."""

    @property
    def prefill_s(self) -> float: ...
    @property
    def decode_s(self) -> float: ...
    @property
    def prefill_tok_per_s(self) -> float: ...
    @property
    def decode_tok_per_s(self) -> float: ...
    @property
    def reused_tokens(self) -> int:
        """Prompt tokens kept from the previous generation on the same session."""
    @property
    def target_passes(self) -> Optional[int]:
        """With speculate=: verification passes of the model; None without speculation."""
    @property
    def drafted_tokens(self) -> Optional[int]:
        """With speculate=: tokens drafted."""
    @property
    def accepted_tokens(self) -> Optional[int]:
        """With speculate=: drafted tokens the model kept."""
    @property
    def tokens_per_pass(self) -> Optional[float]:
        """With speculate=: tokens each verification pass produced (1.0 = no gain)."""

class RequestOutput:
    """The result of one prompt."""

    @property
    def text(self) -> str:
        """The generated text (stop strings excluded; a harmony model's final answer)."""
    @property
    def reasoning(self) -> str:
        """A harmony model's reasoning (analysis, commentary); empty otherwise."""
    @property
    def token_ids(self) -> List[int]:
        """The generated token ids (a final end-of-sequence token excluded)."""
    @property
    def finish_reason(self) -> str:
        """"stop" (end of sequence or a stop string), "length" or "cancelled"."""
    @property
    def usage(self) -> Usage: ...
    @property
    def stats(self) -> Stats: ...

class TextStream(Iterator[str]):
    """Text pieces of one generation, as they are produced (LLM.stream)."""

    def __iter__(self) -> "TextStream": ...
    def __next__(self) -> str: ...
    def close(self) -> None:
        """Stops the generation; pieces not read are dropped."""
    @property
    def output(self) -> Optional[RequestOutput]:
        """The whole result once the stream is exhausted; None before."""

class Tokenizer:
    """The model's tokenizer.json and chat template."""

    def encode(self, text: str, add_special_tokens: bool = True) -> List[int]:
        """Token ids of text; add_special_tokens applies the post-processor (e.g. a BOS)."""
    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        """The text of token ids."""
    def apply_chat_template(
        self, messages: Sequence[Message], add_generation_prompt: bool = True, tokenize: bool = False
    ) -> Union[str, List[int]]:
        """The conversation rendered with the chat template (token ids with tokenize=True)."""
    def token_to_id(self, token: str) -> Optional[int]: ...
    def id_to_token(self, id: int) -> Optional[str]: ...
    @property
    def vocab_size(self) -> int: ...
    @property
    def eos_token_ids(self) -> List[int]: ...
    @property
    def has_chat_template(self) -> bool: ...

class LLM:
    """A language model loaded for generation.

    model: a Hugging Face model directory, a hub id ORG/NAME (downloaded on first use), or
    "smollm2-135m" for the demo model (provisioned into $OLLM_HOME, else ~/.cache/ollm).
    device: "auto" (the GPU when usable, else the CPU), "cpu", "cuda" or "cuda:N".
    vram_budget: most GPU memory to use, CUDA context included (default: the whole device).
    ram_budget: pinned RAM for layers that do not fit the VRAM budget (0 = read them from disk).
    kv_offload: keep the KV cache off the GPU (pinned RAM, then a spill file in kv_cache_dir).
    prefix_cache: a directory that keeps prompts' KV blocks across runs.
    max_context: positions (prompt + generated) to plan the KV cache for.
    offload_layers_to_cpu: keep this many fewer layers on the GPU than would fit.
    expert_slots: MoE models, most experts on the device at once.
    prefix_cache_max: most disk the prefix cache may take (default 32GiB).

    Raises FileNotFoundError (no such model), ValueError (a bad argument), MemoryError (the
    model does not fit the budgets) or RuntimeError, each with the CLI's one-line message.
    """

    def __init__(
        self,
        model: Union[str, "os.PathLike[str]"],
        device: str = "auto",
        vram_budget: Optional[Size] = None,
        ram_budget: Optional[Size] = None,
        kv_offload: Optional[bool] = None,
        kv_cache_dir: Optional[Union[str, "os.PathLike[str]"]] = None,
        prefix_cache: Optional[Union[str, "os.PathLike[str]"]] = None,
        max_context: Optional[int] = None,
        offload_layers_to_cpu: Optional[int] = None,
        expert_slots: Optional[int] = None,
        prefix_cache_max: Optional[Size] = None,
    ) -> None: ...
    def generate(
        self,
        prompts: Union[str, Sequence[str]],
        max_new_tokens: int = 256,
        *,
        temperature: Optional[float] = None,
        top_p: Optional[float] = None,
        top_k: Optional[int] = None,
        min_p: Optional[float] = None,
        repetition_penalty: Optional[float] = None,
        seed: Optional[int] = None,
        stop: Optional[Union[str, Sequence[str]]] = None,
        ignore_eos: bool = False,
        speculate: Optional[Speculate] = None,
        draft_tokens: Optional[Union[int, Literal["auto"]]] = None,
        json_schema: Optional[Union[Dict[str, Any], str]] = None,
        grammar: Optional[str] = None,
        response_format: Optional[Dict[str, Any]] = None,
    ) -> List[RequestOutput]:
        """Generates for each prompt; returns the outputs in the prompts' order.

        Unset sampling settings take the model's generation_config.json (greedy unless it asks
        for sampling); temperature=0 is greedy. stop ends a generation where the text appears
        (not included); seed makes sampling repeatable. The GIL is released while the engine
        computes; Ctrl-C raises KeyboardInterrupt.

        speculate="ngram" or "draft:MODEL" drafts tokens that one pass of the model verifies
        (greedy text unchanged; stats.tokens_per_pass reports the gain); draft_tokens is a
        number or "auto" (default). json_schema (a dict or a JSON string), grammar (llguidance's
        Lark syntax; <|name|> names a special token) or response_format (OpenAI's
        {"type": "json_object" | "json_schema", "json_schema": {"schema": ...}}) constrains the
        output; one of the three at most, and with one decoding is plain (no speculation).
        A list of prompts runs through the batching scheduler, which takes every option.
        A bad value is a ValueError with the CLI's one-line message; an unknown keyword a
        TypeError.
        """
    def stream(
        self,
        prompt: Union[str, Sequence[Message]],
        max_new_tokens: int = 256,
        *,
        temperature: Optional[float] = None,
        top_p: Optional[float] = None,
        top_k: Optional[int] = None,
        min_p: Optional[float] = None,
        repetition_penalty: Optional[float] = None,
        seed: Optional[int] = None,
        stop: Optional[Union[str, Sequence[str]]] = None,
        ignore_eos: bool = False,
        speculate: Optional[Speculate] = None,
        draft_tokens: Optional[Union[int, Literal["auto"]]] = None,
        json_schema: Optional[Union[Dict[str, Any], str]] = None,
        grammar: Optional[str] = None,
        response_format: Optional[Dict[str, Any]] = None,
    ) -> TextStream:
        """Yields text pieces as they are produced (a list of messages is chat-templated).

        Takes the keyword arguments of generate().
        """
    def chat(
        self,
        messages: Sequence[Message],
        max_new_tokens: int = 256,
        *,
        temperature: Optional[float] = None,
        top_p: Optional[float] = None,
        top_k: Optional[int] = None,
        min_p: Optional[float] = None,
        repetition_penalty: Optional[float] = None,
        seed: Optional[int] = None,
        stop: Optional[Union[str, Sequence[str]]] = None,
        ignore_eos: bool = False,
        speculate: Optional[Speculate] = None,
        draft_tokens: Optional[Union[int, Literal["auto"]]] = None,
        json_schema: Optional[Union[Dict[str, Any], str]] = None,
        grammar: Optional[str] = None,
        response_format: Optional[Dict[str, Any]] = None,
    ) -> RequestOutput:
        """Answers a conversation through the chat template (reasoning apart for harmony models).

        Takes the keyword arguments of generate(); a grammar constrains a harmony model's whole
        output, its channel markers included.
        """
    @property
    def tokenizer(self) -> Tokenizer: ...
    @property
    def info(self) -> ModelInfo:
        """Architecture, context (positions), weight bytes, layers, device, model directory."""
    def plan(self) -> Dict[str, object]:
        """Where each decoder layer lives ("tiers", "layers", slots, predicted bytes, "description")."""

__all__ = ["LLM", "RequestOutput", "Stats", "TextStream", "Tokenizer", "Usage", "__version__"]
