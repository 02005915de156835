#!/usr/bin/env bash
# SmolLM2 on the GPU against the transformers references (fixtures/smollm2/greedy.json).
#
# The demo GGUF (98 MB) is larger than one device call carries (64 MiB), so it travels in two
# calls made back to back (the machine stays warm ~30 s between calls):
#   here:   cp target/release/ollm .carry/bin/ && strip .carry/bin/ollm
#           split -b 49000000 target/ollm-test-home/downloads/SmolLM2-135M-Instruct.Q4_1.gguf /tmp/gpart.
#           mkdir -p .carry/g1 .carry/g2 && mv /tmp/gpart.aa .carry/g1/ && mv /tmp/gpart.a[b-z] .carry/g2/
#   call 1 (carry .carry/g1 .carry/bin):  cp .carry/g1/gpart.aa /tmp/ && cp .carry/bin/ollm /tmp/ollm
#   call 2 (carry .carry/g2):             bash scripts/gpu-demo-check.sh
set -u
export LD_LIBRARY_PATH=/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}
cat /tmp/gpart.aa .carry/g2/gpart.a[b-z] > /tmp/smollm2.gguf
sha256sum /tmp/smollm2.gguf | cut -c1-16   # b179c9523d0e6a0f expected
rm -rf /tmp/smol && /tmp/ollm import-gguf /tmp/smollm2.gguf --out /tmp/smol || exit 1
python3 - <<'PY'
import json, subprocess
cases = json.load(open("fixtures/smollm2/greedy.json"))["cases"]
ok = 0
for c in cases:
    args = ["/tmp/ollm", "run", "--model", "/tmp/smol", "--device", "cuda", "--temperature", "0", "-n", "40"]
    if "messages" in c:
        args += ["--chat", "--prompt", c["messages"][0]["content"]]
    else:
        args += ["--prompt", c["prompt"]]
    r = subprocess.run(args, capture_output=True, text=True)
    got = r.stdout[:-1] if r.stdout.endswith("\n") else r.stdout
    same_bf16w = got == c["greedy_bf16w_text"]
    print(c["name"], "match_bf16w" if same_bf16w else "DIFF", "|", r.stderr.strip().splitlines()[-1][:160])
    if not same_bf16w:
        print("  got :", repr(got[:200])); print("  want:", repr(c["greedy_bf16w_text"][:200]))
    ok += same_bf16w
print(f"{ok}/{len(cases)} cases match transformers (bf16-rounded weights, 40 greedy tokens)")
PY
