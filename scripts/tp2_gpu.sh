#!/usr/bin/env bash
# Issue 9 on a 2-GPU machine, in one device call: the NCCL tests, the sharded CUDA backend over
# NCCL against TP 1, a rank failing over NCCL, all-reduce vs torch, TP 1 vs TP 2 decode, and
# kvserve bench at TP 2 and TP 1.
#
# Here (no GPU), build and bundle into .gpu/ (the device tool carries it, kind nvidia-h200-x2):
#   cargo xtask bench --gpu                      # .gpu/bin/kvserve.gz
#   cargo build --release -p dist --example allreduce_bench --example tp_decode_bench
#   cargo test --release --no-run -p dist --test nccl --test cuda_tp
#   then strip + gzip the two examples into .gpu/bin/ and the two test executables
#   (target/release/deps/{nccl,cuda_tp}-*) into .gpu/tests/{nccl,cuda_tp}.gz
# There: bash scripts/tp2_gpu.sh "$OUT"
set -uo pipefail
OUT="${1:-out}"; mkdir -p "$OUT"
export NCCL_NVLS_ENABLE=0
for t in nccl cuda_tp; do gunzip -kf .gpu/tests/$t.gz && chmod +x .gpu/tests/$t; done
for b in allreduce_bench tp_decode_bench kvserve; do [[ -x .gpu/bin/$b ]] || { gunzip -kf .gpu/bin/$b.gz && chmod +x .gpu/bin/$b; }; done
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
nvidia-smi topo -m | head -5 | tee -a "$OUT/gpu.txt"
log() { echo "== $(date -u +%T) $*" | tee -a "$OUT/log.txt"; }
log nccl tests
timeout 90 .gpu/tests/nccl --include-ignored 2>&1 | grep -E "^test |test result|panicked" | tee -a "$OUT/log.txt"
log cuda_tp tests
timeout 150 .gpu/tests/cuda_tp --include-ignored --test-threads 1 --nocapture --skip a_rank_that_fails 2>&1 | grep -E "^test |test result|panicked|rel err|Error|error" | head -30 | tee -a "$OUT/log.txt"
timeout 60 .gpu/tests/cuda_tp --include-ignored --nocapture a_rank_that_fails 2>&1 | grep -E "^test |test result|panicked|after|rank" | head -20 | tee -a "$OUT/log.txt"
log allreduce kvserve
timeout 90 .gpu/bin/allreduce_bench --gpus 2 2>&1 | tee "$OUT/allreduce_kvserve.txt" | tee -a "$OUT/log.txt"
log allreduce torch
timeout 150 python3 scripts/allreduce_torch.py --gpus 2 2>&1 | tail -20 | tee "$OUT/allreduce_torch.txt" | tee -a "$OUT/log.txt"
log tp decode
timeout 200 .gpu/bin/tp_decode_bench --tp 2 --batches 1,16,64 2>&1 | tee "$OUT/tp_decode.txt" | tee -a "$OUT/log.txt"
log kvserve bench TP 2 vs TP 1
F=(--load-format dummy --model benches/models/llama-3.1-8b --device cuda --max-num-seqs 512
   --max-num-batched-tokens 16384 --max-queued-requests 4096 --gpu-memory-utilization 0.9
   --workload sharegpt --num-requests 512 --seed 0 --kv-cache-dtype bf16)
for tp in 2 1; do
  log "kvserve bench --tensor-parallel-size $tp"
  timeout 150 .gpu/bin/kvserve bench "${F[@]}" --tensor-parallel-size $tp --json "$OUT/bench-tp$tp.json" 2>&1 | grep -v "^\s*$" | tail -n 22 | tee -a "$OUT/log.txt"
done
log done
