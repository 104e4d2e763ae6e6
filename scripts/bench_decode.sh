#!/usr/bin/env bash
# Decode throughput of kvserve's CPU backend beside llama.cpp, in one run, on the same GGUF and
# thread count (2): llama.cpp batch 1 (scripts/llamacpp/bench.py, needs its venv), then
# kvserve at batch 1, 4, 16 and 64 (crates/model/examples/decode_bench.rs), then the ratios.
#
#   scripts/bench_decode.sh [PYTHON]    (PYTHON: a python with llama-cpp-python; default /work/venv-ref/bin/python)
set -euo pipefail
cd "$(dirname "$0")/.."
python=${1:-/work/venv-ref/bin/python}
out=$(mktemp -d)
cargo run -q --release -p xtask -- fetch-model >/dev/null
cargo build -q --release -p model --example decode_bench
echo "== llama.cpp (llama-cpp-python), batch 1, 2 threads"
"$python" scripts/llamacpp/bench.py --runs 5 --out "$out/llamacpp.json" >/dev/null
"$python" - "$out/llamacpp.json" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
print({k: r[k] for k in r if "tok" in k or k in ("llama_cpp_python_version", "n_threads")})
PY
echo "== kvserve CPU backend, 2 threads"
RAYON_NUM_THREADS=2 ./target/release/examples/decode_bench --steps 64 1 4 16 64 | tee "$out/kvserve.txt"
python3 - "$out/llamacpp.json" "$out/kvserve.txt" <<'PY'
import json, sys
llama = json.load(open(sys.argv[1]))
base = llama.get("decode_tok_per_s_median") or llama.get("decode_tok_s_median")
ours = json.loads(open(sys.argv[2]).read().strip().splitlines()[-1])["tok_per_s"]
print(f"llama.cpp batch 1: {base:.1f} tok/s")
for b, t in ours.items():
    print(f"kvserve batch {b:>2}: {t:7.1f} tok/s aggregate = {t / base:.2f}x llama.cpp batch 1")
PY
