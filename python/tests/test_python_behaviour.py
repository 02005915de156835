"""What a Python user expects besides the results: other threads run during generation,
Ctrl-C stops it with KeyboardInterrupt, memory stays flat over many calls."""

import os
import signal
import threading
import time

import pytest

PROMPT = "Write a long story about a dragon."


def test_another_thread_runs_while_generation_does(llm):
    ticks = []
    span = {}

    def generate():
        span["start"] = time.monotonic()
        llm.generate(PROMPT, max_new_tokens=48, ignore_eos=True, temperature=0)
        span["end"] = time.monotonic()

    t = threading.Thread(target=generate)
    t.start()
    while t.is_alive():
        ticks.append(time.monotonic())
        time.sleep(0.005)
    t.join()
    inside = [x for x in ticks if span["start"] + 0.05 < x < span["end"] - 0.05]
    # With the GIL held throughout, this thread would not tick until the generation ended.
    assert span["end"] - span["start"] > 0.2
    assert len(inside) >= 10, (len(inside), span["end"] - span["start"])


def interrupt_after(seconds):
    timer = threading.Timer(seconds, lambda: os.kill(os.getpid(), signal.SIGINT))
    timer.start()
    return timer


@pytest.mark.skipif(not hasattr(signal, "SIGINT") or os.name != "posix", reason="SKIPPED: needs POSIX signals")
def test_ctrl_c_raises_keyboard_interrupt_and_stops_cleanly(llm):
    # Python's own Ctrl-C handler, as an interactive Python has it: a process started in the
    # background by a non-interactive shell inherits SIGINT ignored, and Python keeps it so.
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        ctrl_c_raises_and_stops_cleanly(llm)
    finally:
        signal.signal(signal.SIGINT, previous)


def ctrl_c_raises_and_stops_cleanly(llm):
    t0 = time.monotonic()
    interrupt_after(0.5)
    with pytest.raises(KeyboardInterrupt):
        llm.generate(PROMPT, max_new_tokens=8000, ignore_eos=True, temperature=0)
    assert time.monotonic() - t0 < 30
    # Streaming: the interrupt comes out of next().
    interrupt_after(0.5)
    stream = llm.stream(PROMPT, max_new_tokens=8000, ignore_eos=True, temperature=0)
    pieces = []
    with pytest.raises(KeyboardInterrupt):
        for p in stream:
            pieces.append(p)
    assert time.monotonic() - t0 < 60
    # The model is still usable, and gives what it gave before.
    assert len(pieces) > 0
    a = llm.generate("The capital of France is", max_new_tokens=8, temperature=0)[0]
    b = llm.generate("The capital of France is", max_new_tokens=8, temperature=0)[0]
    assert a.token_ids == b.token_ids and len(a.token_ids) == 8


def rss_bytes():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="SKIPPED: needs /proc (Linux)")
def test_memory_is_stable_over_200_calls(llm):
    prompts = ["The capital of France is", "def fibonacci(n):"]
    for i in range(20):
        llm.generate(prompts[i % 2], max_new_tokens=4, temperature=0)
    before = rss_bytes()
    for i in range(200):
        out = llm.generate(prompts[i % 2], max_new_tokens=4, temperature=0)[0]
        assert len(out.token_ids) > 0
        if i % 50 == 0:
            list(llm.stream(prompts[i % 2], max_new_tokens=4, temperature=0))
    grown = rss_bytes() - before
    assert grown < 16 << 20, f"resident memory grew by {grown / 2**20:.1f} MiB over 200 calls"
