#!/usr/bin/env python3
"""logits_check.py - second opinion on the golden file from llama.cpp's quantized math.

What: for every prompt of crates/model/tests/data/golden/smollm2_golden.json, teacher-forces
prompt_ids + generated_ids through llama.cpp (llama-cpp-python, logits_all=True) and compares
with the f32 oracle:
  * argmax agreement at the positions whose golden top1-top2 gap is >= 0.3 (the 32 greedy
    steps, and separately all positions incl. the prompt);
  * |llama.cpp logit - golden logit| over the golden top-10 ids of every position (max, p99,
    mean), and the same for the log-probs (logit - logsumexp; removes a common shift);
  * llama.cpp's own greedy continuation (32 tokens from prompt_ids, token-by-token decode
    with its KV cache): how many leading tokens match the golden generated_ids, and the golden
    gap at the first differing step;
  * llama.cpp's perplexity on the same GPL-3 windows/tokens as gpl3_perplexity.json.
llama.cpp multiplies Q4_1 weights with Q8_1-quantized activations, so these numbers show how
close a quantized-math implementation gets to the f32 oracle (to calibrate the Rust tolerances).

Run (from the repo root):
    /work/venv-ref/bin/python scripts/llamacpp/logits_check.py [--gguf PATH] [--golden PATH] [--out FILE.json]

Output: a per-prompt table and a JSON summary on stdout (and in --out).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

REPO_ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
DEFAULT_GGUF = os.path.join(REPO_ROOT, "models", "SmolLM2-135M-Instruct.Q4_1.gguf")
DEFAULT_GOLDEN = os.path.join(REPO_ROOT, "crates", "model", "tests", "data", "golden",
                              "smollm2_golden.json")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--gguf", default=DEFAULT_GGUF)
    ap.add_argument("--golden", default=DEFAULT_GOLDEN)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--gap", type=float, default=0.3)
    ap.add_argument("--ppl-golden", default=os.path.join(os.path.dirname(DEFAULT_GOLDEN),
                                                          "gpl3_perplexity.json"))
    ap.add_argument("--no-perplexity", action="store_true",
                    help="skip scoring the GPL-3 perplexity windows with llama.cpp")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    import numpy as np
    import llama_cpp
    from llama_cpp import Llama

    golden = json.load(open(args.golden))
    llm = Llama(model_path=args.gguf, n_threads=args.threads, n_threads_batch=args.threads,
                n_ctx=2048, n_batch=512, logits_all=True, verbose=False, seed=0)

    def lse(x: np.ndarray) -> float:
        m = float(x.max())
        return m + float(np.log(np.exp(x.astype(np.float64) - m).sum()))

    rows = []
    tot = dict(step_n=0, step_ok=0, all_n=0, all_ok=0, step_n_any=0, step_ok_any=0)
    all_diffs, all_lp_diffs, step_diffs = [], [], []
    for p in golden["prompts"]:
        prompt_ids, gen = p["prompt_ids"], p["generated_ids"]
        full = prompt_ids + gen
        pos = p["positions"]
        start, first_gen = pos["start"], p["first_gen_pos"]
        llm.reset()
        llm.eval(full)
        scores = np.array(llm.scores[: len(full)], dtype=np.float32)  # [L, V]
        assert scores.shape[0] == len(full)
        r = dict(name=p["name"], prompt_tokens=len(prompt_ids), step_n=0, step_ok=0, all_n=0,
                 all_ok=0, step_ok_any=0, max_abs_top10=0.0, max_abs_top10_pos=-1,
                 max_abs_top10_steps=0.0,
                 max_abs_top10_logprob=0.0)
        for i, (ids, lg, gap, glse) in enumerate(zip(pos["top_ids"], pos["top_logits"],
                                                     pos["gap"], pos["lse"])):
            q = start + i
            s = scores[q]
            am = int(s.argmax())
            ok = am == ids[0]
            d = np.abs(s[ids] - np.asarray(lg, dtype=np.float32))
            dlp = np.abs((s[ids] - lse(s)) - (np.asarray(lg, dtype=np.float64) - glse))
            all_diffs.append(d)
            all_lp_diffs.append(dlp)
            if float(d.max()) > r["max_abs_top10"]:
                r["max_abs_top10"], r["max_abs_top10_pos"] = float(d.max()), q
            r["max_abs_top10_logprob"] = max(r["max_abs_top10_logprob"], float(dlp.max()))
            is_step = first_gen <= q < first_gen + len(gen)
            if is_step:
                step_diffs.append(d)
                r["max_abs_top10_steps"] = max(r["max_abs_top10_steps"], float(d.max()))
                r["step_ok_any"] += int(ok)
            if gap >= args.gap:
                r["all_n"] += 1
                r["all_ok"] += int(ok)
                if is_step:
                    r["step_n"] += 1
                    r["step_ok"] += int(ok)
        # llama.cpp's own greedy continuation from the prompt.
        llm.reset()
        own = []
        for t in llm.generate(prompt_ids, top_k=1, top_p=1.0, min_p=0.0, temp=0.0,
                              repeat_penalty=1.0, reset=True):
            own.append(t)
            if len(own) >= len(gen):
                break
        match = 0
        for a, b in zip(own, gen):
            if a != b:
                break
            match += 1
        r["greedy_prefix_match"] = match
        # Golden top1-top2 gap at the first step where llama.cpp's greedy token differs.
        r["greedy_divergence_golden_gap"] = (
            round(pos["gap"][first_gen + match - start], 4) if match < len(gen) else None)
        for k in ("step_n", "step_ok", "all_n", "all_ok"):
            tot[k] += r[k]
        tot["step_n_any"] += len(gen)
        tot["step_ok_any"] += r["step_ok_any"]
        rows.append(r)

    ppl = None
    if not args.no_perplexity and os.path.isfile(args.ppl_golden):
        # Same windows and tokens as scripts/golden/perplexity.py, scored by llama.cpp.
        pg = json.load(open(args.ppl_golden))
        w, ids = pg["window_size"], pg["token_ids"]
        nlls = []
        for k in range(pg["n_windows"]):
            win = ids[k * w : (k + 1) * w]
            llm.reset()
            llm.eval(win)
            sc = np.array(llm.scores[:w], dtype=np.float64)
            m = sc.max(axis=1, keepdims=True)
            lsm = sc - (m + np.log(np.exp(sc - m).sum(axis=1, keepdims=True)))
            nlls.append(float(-lsm[np.arange(w - 1), win[1:]].mean()))
        mean_nll = sum(nlls) / len(nlls)
        ppl = {"n_windows": len(nlls), "window_size": w,
               "llamacpp_perplexity": round(float(np.exp(mean_nll)), 4),
               "golden_f32_perplexity": pg["perplexity"],
               "llamacpp_window_mean_nll": [round(x, 5) for x in nlls],
               "max_abs_window_nll_diff": round(max(abs(a - b) for a, b in
                                                     zip(nlls, pg["window_mean_nll"])), 5)}

    a = np.concatenate(all_diffs)
    alp = np.concatenate(all_lp_diffs)
    sd = np.concatenate(step_diffs)
    try:
        from importlib.metadata import version
        lcp_version = version("llama_cpp_python")
    except Exception:
        lcp_version = getattr(llama_cpp, "__version__", "unknown")
    summary = {
        "llama_cpp_python": lcp_version,
        "golden": os.path.relpath(args.golden, REPO_ROOT),
        "gap_threshold": args.gap,
        "greedy_steps_gap_ge_threshold": tot["step_n"],
        "greedy_steps_argmax_agree": tot["step_ok"],
        "greedy_steps_argmax_agree_frac": round(tot["step_ok"] / max(tot["step_n"], 1), 4),
        "greedy_steps_all": tot["step_n_any"],
        "greedy_steps_all_argmax_agree": tot["step_ok_any"],
        "all_positions_gap_ge_threshold": tot["all_n"],
        "all_positions_argmax_agree_frac": round(tot["all_ok"] / max(tot["all_n"], 1), 4),
        "top10_logit_abs_diff": {"max": round(float(a.max()), 4),
                                 "p99": round(float(np.percentile(a, 99)), 4),
                                 "mean": round(float(a.mean()), 4)},
        "top10_logit_abs_diff_greedy_steps": {"max": round(float(sd.max()), 4),
                                              "p99": round(float(np.percentile(sd, 99)), 4),
                                              "mean": round(float(sd.mean()), 4)},
        "top10_logprob_abs_diff": {"max": round(float(alp.max()), 4),
                                   "p99": round(float(np.percentile(alp, 99)), 4),
                                   "mean": round(float(alp.mean()), 4)},
        "gpl3_perplexity": ppl,
        "per_prompt": [{k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items()}
                       for r in rows],
    }
    print(f"{'prompt':16} {'#tok':>4} {'steps gap>=':>11} {'all gap>=':>9} {'maxdiff':>7} "
          f"{'maxdiff(steps)':>14} {'greedy prefix':>13}", file=sys.stderr)
    for r in rows:
        print(f"{r['name']:16} {r['prompt_tokens']:4d} {r['step_ok']:5d}/{r['step_n']:<5d} "
              f"{r['all_ok']:4d}/{r['all_n']:<4d} {r['max_abs_top10']:7.3f} "
              f"{r['max_abs_top10_steps']:14.3f} {r['greedy_prefix_match']:10d}/32", file=sys.stderr)
    s = json.dumps(summary, indent=2)
    print(s)
    if args.out:
        with open(args.out, "w") as f:
            f.write(s + "\n")


if __name__ == "__main__":
    main()
