#!/usr/bin/env bash
# Long fuzzing runs of every target of fuzz/ on a machine with many cores and no cargo (the GPU
# machine has 16): libFuzzer's fork mode, JOBS processes per target, all targets at once.
#
# Build the bundle here (stripped binaries, the corpora grown so far):
#   cargo +nightly fuzz build -s none          # CARGO_TARGET_DIR=<dir> to keep it apart
#   mkdir -p .gpu/fuzz && for t in gguf_reader safetensors_config chat_template \
#       generate_request kv_scheduler_ops; do
#     strip -o .gpu/fuzz/$t <target>/x86_64-unknown-linux-gnu/release/$t; gzip -f .gpu/fuzz/$t; done
#   tar czf .gpu/fuzz/corpus.tgz -C <corpora parent> corpus     # corpus/<target>/...
# Run there (carry .gpu): scripts/fuzz_many_cores.sh SECONDS JOBS OUT
# OUT gets summary.txt (the last stats line of each target), results.tgz (logs and any crash,
# timeout or out-of-memory input) and corpus.tgz (the corpora, grown).
set -uo pipefail
SECONDS_PER_TARGET="${1:?seconds}"
JOBS="${2:?jobs per target}"
OUT="${3:?output folder}"
TARGETS="gguf_reader safetensors_config chat_template generate_request kv_scheduler_ops"
WORK=/tmp/fuzzwork
rm -rf "$WORK" && mkdir -p "$WORK/results"
tar xzf .gpu/fuzz/corpus.tgz -C "$WORK"
for t in $TARGETS; do
  mkdir -p "$WORK/corpus/$t"
  if [ -f ".gpu/fuzz/$t.gz" ]; then gunzip -c ".gpu/fuzz/$t.gz" > "$WORK/$t"; else cp ".gpu/fuzz/$t" "$WORK/$t"; fi
  chmod 755 "$WORK/$t"
  # -fork: JOBS children, corpus merged into the first folder; -ignore_crashes etc. keep the
  # run going after a finding, whose input is written under results/.
  "$WORK/$t" -fork="$JOBS" -ignore_crashes=1 -ignore_timeouts=1 -ignore_ooms=1 \
    -max_total_time="$SECONDS_PER_TARGET" -rss_limit_mb=2048 -timeout=10 \
    -artifact_prefix="$WORK/results/$t-" -print_final_stats=1 \
    "$WORK/corpus/$t" "fuzz/corpus/$t" > "$WORK/results/$t.log" 2>&1 &
done
wait
{
  echo "fuzz_many_cores: $SECONDS_PER_TARGET s per target, $JOBS processes each, $(nproc) cores, $(date -u +%FT%TZ)"
  for t in $TARGETS; do
    echo "== $t: $(ls "$WORK/corpus/$t" | wc -l) inputs in the corpus"
    grep -E '^#[0-9]+' "$WORK/results/$t.log" | tail -1
    grep -E 'ERROR|deadly signal|panicked|Test unit written' "$WORK/results/$t.log" | sort | uniq -c | head -20
  done
  ls -la "$WORK/results"
} > "$OUT/summary.txt" 2>&1
tar czf "$OUT/results.tgz" -C "$WORK" results
tar czf "$OUT/corpus.tgz" -C "$WORK" corpus
cat "$OUT/summary.txt"
