#!/usr/bin/env bash
# The GPU half of `cargo xtask bench --gpu`: runs on the GPU machine (no cargo there) from the
# repository root, with the kvserve binary that `cargo xtask bench --gpu` bundled into .gpu/bin.
#
#   bash scripts/gpu_bench.sh [OUT_DIR]
#
# 1. kvserve bench: Llama-3.1-8B shape with dummy bf16 weights, the ShareGPT-like workload
#    (KVS_REQUESTS requests, default 512, seed 0), saving the very requests it ran;
#    then the same with int8 KV (KVS_KV_EXTRA, default int8; empty to skip). Engine:
#    --max-num-seqs KVS_MAX_NUM_SEQS (512), --max-num-batched-tokens KVS_MAX_BATCHED_TOKENS (16384).
# 2. scripts/hf_bench.py on the same requests and model shape: transformers' generate() (static
#    batches of 64; the first KVS_HF_GENERATE_REQUESTS requests, default 128, since it is slow)
#    and its continuous batching (all requests).
#    Optional: KVS_SWEEP=bf16,int8,int4,fp8 (KVS_SWEEP_MEMORY, default 8GiB) adds a KV-dtype
#    sweep at that KV budget; KVS_SKIP_HF=1 skips transformers.
# 3. The ratios, in OUT_DIR/gpu_bench.json and OUT_DIR/gpu_bench.md; `cargo xtask bench --gpu
#    --record OUT_DIR` appends the latter to BENCHMARKS.md on the build machine.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
OUT_DIR="${1:-${OUT:-gpu-bench-out}}"
mkdir -p "$OUT_DIR"
KVSERVE="${KVSERVE:-.gpu/bin/kvserve}"
MODEL="${KVS_MODEL:-benches/models/llama-3.1-8b}"
REQUESTS="${KVS_REQUESTS:-512}"
KV_EXTRA="${KVS_KV_EXTRA-int8}"
HF_GEN="${KVS_HF_GENERATE_REQUESTS:-128}"
export NCCL_NVLS_ENABLE=0
log() { echo "== $(date -u +%H:%M:%S) $*" | tee -a "$OUT_DIR/log.txt"; }

if [[ -f "$KVSERVE.gz" && ! -x "$KVSERVE" ]]; then gunzip -k "$KVSERVE.gz" && chmod +x "$KVSERVE"; fi
[[ -x "$KVSERVE" ]] || { echo "no kvserve binary at $KVSERVE: run cargo xtask bench --gpu first" >&2; exit 2; }
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader > "$OUT_DIR/gpu.txt" 2>&1
log "GPU: $(cat "$OUT_DIR/gpu.txt")"

flags_for() {  # max-num-seqs, max-num-batched-tokens
  engine_flags=(--load-format dummy --model "$MODEL" --device cuda --max-num-seqs "$1"
    --max-num-batched-tokens "$2" --max-queued-requests 4096 --gpu-memory-utilization 0.9)
}
flags_for "${KVS_MAX_NUM_SEQS:-512}" "${KVS_MAX_BATCHED_TOKENS:-16384}"
workload=(--workload sharegpt --num-requests "$REQUESTS" --seed 0)

log "kvserve bench (KV auto)"
timeout 300 "$KVSERVE" bench "${engine_flags[@]}" "${workload[@]}" \
  --save-requests "$OUT_DIR/requests.json" --json "$OUT_DIR/kvserve.json" 2>&1 | tee -a "$OUT_DIR/log.txt"
if [[ ! -s "$OUT_DIR/kvserve.json" ]]; then
  log "kvserve bench failed: once more at --max-num-seqs 256 --max-num-batched-tokens 8192"
  flags_for 256 8192
  timeout 300 "$KVSERVE" bench "${engine_flags[@]}" "${workload[@]}" \
    --save-requests "$OUT_DIR/requests.json" --json "$OUT_DIR/kvserve.json" 2>&1 | tee -a "$OUT_DIR/log.txt"
fi
if [[ -n "$KV_EXTRA" ]]; then
  log "kvserve bench (KV $KV_EXTRA)"
  timeout 240 "$KVSERVE" bench "${engine_flags[@]}" "${workload[@]}" --kv-cache-dtype "$KV_EXTRA" \
    --json "$OUT_DIR/kvserve-$KV_EXTRA.json" 2>&1 | tee -a "$OUT_DIR/log.txt"
fi

if [[ -n "${KVS_SWEEP:-}" ]]; then
  # KV-dtype sweep at a fixed KV budget: blocks, the sequences they hold, throughput.
  log "kvserve bench --kv-sweep $KVS_SWEEP at ${KVS_SWEEP_MEMORY:-8GiB}"
  timeout "${KVS_SWEEP_TIMEOUT:-300}" "$KVSERVE" bench "${engine_flags[@]}" "${workload[@]}" \
    --kv-sweep "$KVS_SWEEP" --kv-cache-memory "${KVS_SWEEP_MEMORY:-8GiB}" \
    --json "$OUT_DIR/sweep.json" 2>&1 | tee -a "$OUT_DIR/log.txt"
fi

if [[ -f "$OUT_DIR/requests.json" && -z "${KVS_SKIP_HF:-}" ]]; then
  log "transformers on the same requests"
  timeout 420 python3 scripts/hf_bench.py --requests "$OUT_DIR/requests.json" --config "$MODEL" \
    --generate-requests "$HF_GEN" --json "$OUT_DIR/hf.json" 2>&1 | tail -n 40 | tee -a "$OUT_DIR/log.txt"
fi

log "ratios"
KVS_FLAGS="${engine_flags[*]} ${workload[*]}" KVS_HF_GEN="$HF_GEN" \
python3 - "$OUT_DIR" <<'EOF' 2>&1 | tee -a "$OUT_DIR/log.txt"
import glob, json, os, sys, datetime
out = sys.argv[1]
def load(p):
    try:
        with open(p) as f: return json.load(f)
    except (OSError, ValueError): return None
def tok_s(r):
    s = r.get("stats", r)
    return s["output_tokens_per_s"]
runs = {}
for p in sorted(glob.glob(os.path.join(out, "kvserve*.json"))):
    r = load(p)
    if r: runs[r["meta"]["kv_cache_dtype"]] = r
hf = load(os.path.join(out, "hf.json")) or {"modes": {}}
gpu = open(os.path.join(out, "gpu.txt")).read().strip().split(",")[0]
best = max(runs.values(), key=tok_s) if runs else None
res = {"gpu": gpu, "date_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
       "kvserve": {k: {"output_tok_s": round(tok_s(v), 1), "requests": v.get("stats", v)["requests"],
                       "elapsed_s": round(v.get("stats", v)["elapsed_s"], 2),
                       "ttft_p50_ms": round(v.get("stats", v)["ttft"]["p50_ms"], 1),
                       "tpot_p50_ms": round(v.get("stats", v)["tpot"]["p50_ms"], 2),
                       "preemptions": v.get("preemptions"), "kv_blocks_total": v["meta"]["kv_blocks_total"]}
                   for k, v in runs.items()},
       "hf": hf, "ratios": {}, "kvserve_flags": os.environ.get("KVS_FLAGS", "")}
lines = [f"GPU: {gpu}; {res['date_utc']}", "",
         "| engine | requests | output tok/s | vs HF generate() | vs HF generate_batch |",
         "| --- | ---: | ---: | ---: | ---: |"]
g = hf["modes"].get("generate", {}).get("output_tok_s")
b = hf["modes"].get("generate_batch", {}).get("output_tok_s")
fmt = lambda x, y: f"{x / y:.1f}x" if x and y else "-"
for k, v in res["kvserve"].items():
    lines.append(f"| kvserve (KV {k}) | {v['requests']} | {v['output_tok_s']:,.0f} | {fmt(v['output_tok_s'], g)} | {fmt(v['output_tok_s'], b)} |")
    res["ratios"][k] = {"vs_generate": g and v["output_tok_s"] / g, "vs_generate_batch": b and v["output_tok_s"] / b}
for m in ("generate", "generate_batch"):
    r = hf["modes"].get(m)
    if r: lines.append(f"| HF {m} | {r['requests']} | {r['output_tok_s']:,.0f} | | |")
sweep = load(os.path.join(out, "sweep.json"))
if sweep:
    res["sweep"] = {"kv_cache_memory": sweep["kv_cache_memory"], "entries": [
        {"kv_cache_dtype": e["report"]["meta"]["kv_cache_dtype"], "kv_blocks": e["kv_blocks"],
         "kv_capacity_seqs": e["kv_capacity_seqs"], "running_peak": e["report"].get("running_peak"),
         "preemptions": e["report"].get("preemptions"), "output_tok_s": round(tok_s(e["report"]), 1)}
        for e in sweep["entries"]]}
    lines += ["", f"KV sweep at {sweep['kv_cache_memory'] / 2**30:.1f} GiB:", "",
              "| KV | blocks | seqs held | peak running | preemptions | output tok/s |", "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for e in res["sweep"]["entries"]:
        lines.append(f"| {e['kv_cache_dtype']} | {e['kv_blocks']} | {e['kv_capacity_seqs']} | {e['running_peak']} | {e['preemptions']} | {e['output_tok_s']:,.0f} |")
with open(os.path.join(out, "gpu_bench.json"), "w") as f: json.dump(res, f, indent=2)
with open(os.path.join(out, "gpu_bench.md"), "w") as f: f.write("\n".join(lines) + "\n")
print("\n".join(lines))
EOF
