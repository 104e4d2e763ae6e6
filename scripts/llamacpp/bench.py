#!/usr/bin/env python3
"""bench.py - llama.cpp (via llama-cpp-python) batch-1 decode speed on SmolLM2-135M-Instruct Q4_1.

What: the speed peer for kvserve's CPU path. Loads the GGUF with n_threads=2, n_ctx=2048,
then per repetition: clears the context (no prompt cache reuse), evaluates a ~32-token prompt,
and generates 128 tokens greedily (temperature 0, top_k 1; EOS is masked so every run gives
exactly 128 tokens). Decode speed is read from llama.cpp's own perf counters
(llama_perf_context: t_eval_ms / n_eval, i.e. single-token decode calls only, prompt eval
excluded). A wall-clock figure through the Python API (tokens after the first / time after the
first token) is reported beside it. One warm-up run is not counted. Before each run the
CPU busy fraction of the machine is sampled for 1 s and recorded; with --wait-s the run waits
(up to that long) for the machine to be quiet (< --max-busy), since any other load on the
2 cores slows llama.cpp's spinning OpenMP threads a lot.

Run (from the repo root, venv with scripts/llamacpp/requirements.txt installed):
    /work/venv-ref/bin/python scripts/llamacpp/bench.py [--gguf PATH] [--runs 5] [--wait-s 120] [--out FILE.json]

Output: JSON on stdout (and in --out): llama-cpp-python version, llama.cpp system info /
build flags, threads, n_ctx, prompt tokens, decode tok/s (median and every run), wall-clock
tok/s, prompt-eval tok/s.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time

REPO_ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
DEFAULT_GGUF = os.path.join(REPO_ROOT, "models", "SmolLM2-135M-Instruct.Q4_1.gguf")

def cpu_busy(interval: float = 1.0) -> float:
    """Fraction of all CPUs busy over `interval` seconds (from /proc/stat; -1 if unavailable)."""
    def snap():
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:]]
        idle = v[3] + (v[4] if len(v) > 4 else 0)
        return sum(v), idle
    try:
        t0, i0 = snap()
        time.sleep(interval)
        t1, i1 = snap()
    except OSError:
        return -1.0
    return 1.0 - (i1 - i0) / max(t1 - t0, 1)


def wait_quiet(max_busy: float, max_wait_s: float) -> float:
    """Wait (up to max_wait_s) until the machine is quiet; return the last busy fraction."""
    deadline = time.time() + max_wait_s
    busy = cpu_busy()
    while busy > max_busy and time.time() < deadline:
        time.sleep(2.0)
        busy = cpu_busy()
    return busy


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--gguf", default=DEFAULT_GGUF)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--n-ctx", type=int, default=2048)
    ap.add_argument("--n-gen", type=int, default=128)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--prompt-tokens", type=int, default=32,
                    help="prompt length: the raw story prompt is cut/padded to this many tokens")
    ap.add_argument("--build-flags", default=os.environ.get("LLAMA_BUILD_FLAGS",
                    "CMAKE_ARGS=-DGGML_NATIVE=ON (llama-cpp-python built from the PyPI sdist)"),
                    help="free text recorded in the output: how llama-cpp-python was built")
    ap.add_argument("--max-busy", type=float, default=0.10,
                    help="before each run wait until other load keeps < this fraction of the CPUs busy")
    ap.add_argument("--wait-s", type=float, default=0.0,
                    help="how long to wait for a quiet machine before each run (0: do not wait)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    import numpy as np
    import llama_cpp
    from llama_cpp import Llama

    llm = Llama(model_path=args.gguf, n_threads=args.threads, n_threads_batch=args.threads,
                n_ctx=args.n_ctx, n_batch=512, logits_all=False, verbose=False, seed=0)
    ctx = llm._ctx.ctx

    # A fixed prompt of exactly --prompt-tokens tokens (plain text, BOS as the model wants it).
    text = ("Once upon a time, in a quiet town by the sea, there lived a small robot named Pip. "
            "Pip spent every day watching the painters on the pier, and one morning he decided "
            "that he, too, would learn to paint. He found an old brush and")
    prompt = llm.tokenize(text.encode(), add_bos=True, special=False)
    if len(prompt) < args.prompt_tokens:
        sys.exit(f"prompt has only {len(prompt)} tokens")
    prompt = prompt[: args.prompt_tokens]

    eos_ids = {llm.token_eos()}
    for t in ("<|im_end|>", "<|endoftext|>"):
        ids = llm.tokenize(t.encode(), add_bos=False, special=True)
        if len(ids) == 1:
            eos_ids.add(ids[0])

    def ban_eos(_input_ids, scores):
        for e in eos_ids:
            scores[e] = -np.inf
        return scores

    def one_run():
        busy = wait_quiet(args.max_busy, args.wait_s) if args.wait_s > 0 else cpu_busy()
        load_before = os.getloadavg()[0]
        llm.reset()
        llama_cpp.llama_perf_context_reset(ctx)
        n = 0
        t_first = t_last = None
        toks = []
        stamps = []
        t_start = time.perf_counter()
        cpu_start = time.process_time()
        for tok in llm.generate(prompt, top_k=1, top_p=1.0, min_p=0.0, temp=0.0,
                                repeat_penalty=1.0, reset=True,
                                logits_processor=llama_cpp.LogitsProcessorList([ban_eos])):
            now = time.perf_counter()
            if t_first is None:
                t_first = now
            t_last = now
            stamps.append(now)
            toks.append(tok)
            n += 1
            if n >= args.n_gen:
                break
        cpu_used = time.process_time() - cpu_start
        wall = time.perf_counter() - t_start
        perf = llama_cpp.llama_perf_context(ctx)
        return {
            "generated_tokens": n,
            "decode_calls": int(perf.n_eval),
            "decode_ms": round(perf.t_eval_ms, 3),
            "decode_tok_s": round(perf.n_eval / (perf.t_eval_ms / 1e3), 2),
            "prompt_tokens": int(perf.n_p_eval),
            "prompt_ms": round(perf.t_p_eval_ms, 3),
            "prompt_tok_s": round(perf.n_p_eval / (perf.t_p_eval_ms / 1e3), 2) if perf.t_p_eval_ms else None,
            "wall_time_to_first_token_ms": round((t_first - t_start) * 1e3, 3),
            "wall_decode_tok_s": round((n - 1) / (t_last - t_first), 2),
            # 1 / median inter-token interval: robust to a few interrupted tokens.
            "wall_median_token_tok_s": round(
                1.0 / statistics.median(b - a for a, b in zip(stamps, stamps[1:])), 2),
            "first_tokens": toks[:8],
            "cpu_busy_before": round(busy, 3),
            # CPU time of this process / (wall time x threads): well below 1 means the threads
            # were descheduled (another process competed for the cores) during the run.
            "own_cpu_share": round(cpu_used / (wall * args.threads), 3),
            "loadavg_1m_before": round(load_before, 2),
        }

    one_run()  # warm-up
    runs = [one_run() for _ in range(args.runs)]
    for r in runs:
        if r["generated_tokens"] != args.n_gen:
            sys.exit(f"run generated {r['generated_tokens']} tokens, want {args.n_gen}")

    dec = [r["decode_tok_s"] for r in runs]
    wall = [r["wall_decode_tok_s"] for r in runs]
    try:
        from importlib.metadata import version
        lcp_version = version("llama_cpp_python")
    except Exception:
        lcp_version = getattr(llama_cpp, "__version__", "unknown")
    result = {
        "what": "llama.cpp batch-1 greedy decode speed, SmolLM2-135M-Instruct Q4_1",
        "date_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "llama_cpp_python": lcp_version,
        "build_flags": args.build_flags,
        "system_info": llama_cpp.llama_print_system_info().decode(errors="replace").strip(),
        "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count(),
                    "processor": platform.processor()},
        "gguf": os.path.basename(args.gguf),
        "threads": args.threads,
        "n_ctx": args.n_ctx,
        "batch": 1,
        "prompt_tokens": len(prompt),
        "generated_tokens": args.n_gen,
        "sampling": "greedy (temp 0, top_k 1), EOS masked",
        "metric": "decode tok/s = n_eval / t_eval from llama_perf_context (single-token decode "
                  "calls only; prompt eval excluded); warm-up run excluded",
        "decode_tok_s_median": round(statistics.median(dec), 2),
        "decode_tok_s_runs": dec,
        "wall_decode_tok_s_median": round(statistics.median(wall), 2),
        "wall_decode_tok_s_runs": wall,
        "wall_median_token_tok_s_runs": [r["wall_median_token_tok_s"] for r in runs],
        "note": "cpu_busy_before = fraction of the machine's CPUs busy (other processes) in the "
                "second before each run; llama.cpp's 2 OpenMP threads degrade sharply when "
                "another process shares the 2 cores, so only quiet runs are comparable",
        "prompt_eval_tok_s_median": round(statistics.median(r["prompt_tok_s"] for r in runs), 2),
        "runs": runs,
    }
    s = json.dumps(result, indent=2)
    print(s)
    if args.out:
        with open(args.out, "w") as f:
            f.write(s + "\n")


if __name__ == "__main__":
    main()
