#!/usr/bin/env python3
"""PyTorch baseline for single-token (decode) GQA attention on one CUDA GPU.

1. Copy bandwidth: dst.copy_(src) of 2 GiB bf16 tensors rotated over 2 buffer pairs,
   reported as (bytes read + bytes written) / time in TB/s (the practical HBM ceiling).
2. F.scaled_dot_product_attention(q, k, v, enable_gqa=True) with q [B, Hq, 1, D] and
   contiguous k/v [B, Hkv, L, D], bf16 random normal: Llama-3-8B heads (32/8, D=128) at
   B in {1,16,64,256} x L in {1024,4096,32768}, SmolLM2 heads (9/3, D=64) at B in {1,64} x
   L=2048; shapes whose K+V exceeds 24 GiB are skipped. TB/s = (K bytes + V bytes) / time.

Timing: a measured unit cycles through enough distinct (q, k, v) sets to total >= 256 MiB
(the ~50 MB L2 cannot serve repeats) and reads >= 1 GiB of K/V. It is captured as a CUDA
graph and replayed; each replay is bracketed by CUDA events, and the median replay time /
calls per replay is "SDPA us" (GPU time, no launch overhead). "eager us" is the same unit
launched from Python (launch overhead dominates small shapes); if capture fails the eager
time is used. First the output is checked against a float64 CPU reference (B=2, L=300).

    python3 scripts/bench_attention_baseline.py --json $OUT/sdpa.json
    python3 scripts/bench_attention_baseline.py --quick     # smoke test: B in {1,16}, L=4096
    python3 scripts/bench_attention_baseline.py --check     # correctness check only
    python3 scripts/bench_attention_baseline.py --backends  # also flash/efficient/cudnn alone

Exit codes: 0 ok, 1 check failed, 2 no CUDA. The results table is printed last on stdout.
"""

import argparse
import datetime
import json
import math
import statistics
import sys
import time
from contextlib import nullcontext

import torch
import torch.nn.functional as F

MiB, GiB = 1 << 20, 1 << 30
BF16 = 2  # bytes per element
LLAMA = ("llama3-8b", 32, 8, 128)  # name, Hq, Hkv, D
SMOL = ("smollm2", 9, 3, 64)
MAX_KV_BYTES = 24 * GiB
SET_BYTES = 256 * MiB  # distinct K/V bytes cycled through per measured unit (defeats L2)
UNIT_BYTES = 1 * GiB  # K/V bytes read per measured unit (keeps each replay >> launch cost)
MAX_SETS = 256
CHECK_TOL = 1e-2


def log(*a):
    print(*a, flush=True)


def shape_list(quick):
    if quick:
        return [(LLAMA, b, 4096) for b in (1, 16)]
    return [(LLAMA, b, l) for b in (1, 16, 64, 256) for l in (1024, 4096, 32768)] + [
        (SMOL, b, 2048) for b in (1, 64)]


def kv_bytes(model, b, l):
    return 2 * b * model[2] * l * model[3] * BF16


def reference(q, k, v):
    """float64 CPU attention; query head h reads KV head h // (Hq // Hkv) (torch's enable_gqa)."""
    q, k, v = (t.detach().to("cpu", torch.float64) for t in (q, k, v))
    g = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(g, dim=1), v.repeat_interleave(g, dim=1)
    s = (q @ k.transpose(-1, -2)) / math.sqrt(q.shape[-1])
    return torch.softmax(s, dim=-1) @ v


def check(device="cuda"):
    """(relative L2 error, problem) of bf16 SDPA (B=2, L=300, Llama heads) vs the reference."""
    _, hq, hkv, d = LLAMA
    b, l = 2, 300
    gen = torch.Generator().manual_seed(1234)
    q, k, v = (torch.randn(s, generator=gen).to(device, torch.bfloat16)
               for s in ((b, hq, 1, d), (b, hkv, l, d), (b, hkv, l, d)))
    out = F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
    if tuple(out.shape) != (b, hq, 1, d):
        return float("inf"), f"output shape {tuple(out.shape)} != {(b, hq, 1, d)}"
    ref = reference(q, k, v)
    err = ((out.to("cpu", torch.float64) - ref).norm() / ref.norm()).item()
    return err, "" if math.isfinite(err) else "non-finite output"


def time_ms(fn, target_s=0.25, min_reps=10, max_reps=200):
    """Median milliseconds of fn() over repetitions, each bracketed by CUDA events."""
    fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    est = time.perf_counter() - t0
    reps = int(min(max_reps, max(min_reps, target_s / max(est, 1e-6))))
    evs = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
           for _ in range(reps)]
    for s, e in evs:
        s.record()
        fn()
        e.record()
    torch.cuda.synchronize()
    return statistics.median(s.elapsed_time(e) for s, e in evs)


def copy_bandwidth(nbytes=2 * GiB, pairs=2):
    n = nbytes // BF16
    bufs = [(torch.randn(n, device="cuda", dtype=torch.bfloat16),
             torch.empty(n, device="cuda", dtype=torch.bfloat16)) for _ in range(pairs)]

    def unit():
        for src, dst in bufs:
            dst.copy_(src)

    ms = time_ms(unit, target_s=0.5, min_reps=20) / pairs
    del bufs
    torch.cuda.empty_cache()
    return {"bytes_per_copy": nbytes, "pairs": pairs, "ms_per_copy": ms,
            "tbps": 2 * nbytes / (ms * 1e-3) / 1e12}


def graph_of(unit):
    """Capture unit() as a CUDA graph (warm-up on a side stream, as torch recommends)."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(2):
            unit()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        unit()
    return g


def first_line(e, n=120):
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:n]


def time_sdpa(calls, backend=None):
    """(graph us per call or None, eager us per call or None, error) over the call list."""
    def unit():
        if backend is None:
            ctx = nullcontext()
        else:
            from torch.nn.attention import sdpa_kernel
            ctx = sdpa_kernel([backend])
        with ctx:
            for q, k, v in calls:
                F.scaled_dot_product_attention(q, k, v, enable_gqa=True)

    try:
        eager = time_ms(unit) * 1e3 / len(calls)
    except RuntimeError as e:  # includes torch.cuda.OutOfMemoryError, unsupported backend
        torch.cuda.synchronize()
        return None, None, first_line(e)
    try:
        g = graph_of(unit)
        graph = time_ms(g.replay) * 1e3 / len(calls)
        del g
        return graph, eager, ""
    except RuntimeError as e:
        torch.cuda.synchronize()
        return None, eager, "graph capture failed: " + first_line(e)


def bench_shape(model, b, l, copy_tbps, backends):
    name, hq, hkv, d = model
    kvb = kv_bytes(model, b, l)
    n_sets = min(MAX_SETS, max(1, math.ceil(SET_BYTES / kvb)))
    n_calls = n_sets * max(1, math.ceil(UNIT_BYTES / (kvb * n_sets)))
    sets = [tuple(torch.randn(b, h, n, d, device="cuda", dtype=torch.bfloat16)
                  for h, n in ((hq, 1), (hkv, l), (hkv, l))) for _ in range(n_sets)]
    calls = [sets[i % n_sets] for i in range(n_calls)]
    graph_us, eager_us, err = time_sdpa(calls)
    us = graph_us if graph_us is not None else eager_us
    row = {"model": name, "B": b, "L": l, "Hq": hq, "Hkv": hkv, "D": d, "kv_bytes": kvb,
           "sets": n_sets, "calls_per_unit": n_calls, "sdpa_us": us, "graph_us": graph_us,
           "eager_us": eager_us, "error": err}
    if us is not None:
        row["tbps"] = kvb / (us * 1e-6) / 1e12
        row["frac_copy"] = row["tbps"] / copy_tbps
    if backends:
        from torch.nn.attention import SDPBackend
        row["backends"] = {}
        for nm in ("FLASH_ATTENTION", "EFFICIENT_ATTENTION", "CUDNN_ATTENTION"):
            bk = getattr(SDPBackend, nm, None)
            gu, eu, e = time_sdpa(calls, bk) if bk is not None else (None, None, "absent")
            row["backends"][nm.lower()] = {"us": gu if gu is not None else eu,
                                           "graph": gu is not None, "error": e}
    del sets, calls
    torch.cuda.empty_cache()
    return row


def fmt(x, spec):
    return "-" if x is None else format(x, spec)


def table(rows, copy_tbps):
    lines = [f"copy bandwidth (read+write): {copy_tbps:.3f} TB/s",
             f"{'model':<10}{'B':>5}{'L':>7}{'KV MiB':>9}{'sets':>6}{'SDPA us':>10}"
             f"{'eager us':>10}{'TB/s':>7}{'frac':>7}  notes"]
    for r in rows:
        notes = [r["error"]] if r.get("error") else []
        notes += [f"{k.split('_')[0]}={fmt(v['us'], '.1f')}"
                  for k, v in r.get("backends", {}).items()]
        lines.append(f"{r['model']:<10}{r['B']:>5}{r['L']:>7}{r['kv_bytes'] / MiB:>9.1f}"
                     f"{r['sets']:>6}{fmt(r['sdpa_us'], '.1f'):>10}{fmt(r['eager_us'], '.1f'):>10}"
                     f"{fmt(r.get('tbps'), '.3f'):>7}{fmt(r.get('frac_copy'), '.2f'):>7}  "
                     + " ".join(notes))
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--json", metavar="PATH", help="write all numbers to this JSON file")
    ap.add_argument("--quick", action="store_true", help="smoke test: Llama B in {1,16}, L=4096")
    ap.add_argument("--check", action="store_true",
                    help="only run the float64 correctness check and exit (0 pass, 1 fail)")
    ap.add_argument("--backends", action="store_true",
                    help="also time the flash / efficient / cudnn SDPA backends one by one")
    args = ap.parse_args()

    if not torch.cuda.is_available():
        print(f"error: CUDA is not available (torch {torch.__version__}, built for CUDA "
              f"{torch.version.cuda}); this benchmark needs an NVIDIA GPU", file=sys.stderr)
        sys.exit(2)
    gpu = torch.cuda.get_device_name()
    log(f"gpu: {gpu}  torch {torch.__version__}  cuda {torch.version.cuda}")

    err, why = check()
    log(f"check: B=2 L=300 Llama heads, ||out-ref||/||ref|| = {err:.2e} (tol {CHECK_TOL:g})")
    if why or not err < CHECK_TOL:
        print(f"CHECK FAILED: SDPA does not match the float64 reference: rel err {err:.3e} "
              f"{why}", file=sys.stderr, flush=True)
        sys.exit(1)
    if args.check:
        log("check passed")
        return

    copy = copy_bandwidth()
    log(f"copy: {copy['ms_per_copy']:.3f} ms per 2 GiB copy -> {copy['tbps']:.3f} TB/s")
    rows, skipped = [], []
    for model, b, l in shape_list(args.quick):
        shape, kvb = f"{model[0]} B={b} L={l}", kv_bytes(model, b, l)
        if kvb > MAX_KV_BYTES:
            skipped.append({"model": model[0], "B": b, "L": l, "kv_bytes": kvb})
            log(f"skip {shape}: K+V {kvb / GiB:.1f} GiB > 24 GiB")
            continue
        try:
            row = bench_shape(model, b, l, copy["tbps"], args.backends)
        except torch.cuda.OutOfMemoryError as e:
            torch.cuda.empty_cache()
            row = {"model": model[0], "B": b, "L": l, "kv_bytes": kvb, "sets": 0,
                   "sdpa_us": None, "eager_us": None, "error": "OOM: " + first_line(e, 80)}
        log(f"{shape}: sdpa {fmt(row['sdpa_us'], '.1f')} us, {fmt(row.get('tbps'), '.3f')} TB/s"
            + (f" ({row['error']})" if row.get("error") else ""))
        rows.append(row)

    if args.json:
        out = {"gpu": gpu, "torch": torch.__version__, "cuda": torch.version.cuda,
               "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
               "quick": args.quick, "check_rel_err": err, "copy": copy, "results": rows,
               "skipped": skipped,
               "method": "sdpa_us = median CUDA-event time of CUDA-graph replays / calls per "
                         "replay; tbps = (K+V bytes) / time; frac_copy = tbps / copy tbps"}
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)
        log(f"wrote {args.json}")
    log(table(rows, copy["tbps"]))


if __name__ == "__main__":
    main()
