#!/usr/bin/env python3
"""perplexity.py - f32 reference perplexity of SmolLM2-135M-Instruct on the GNU GPL v3 text.

What: tokenizes /usr/share/common-licenses/GPL-3 with the model's HF tokenizer (loaded from
the GGUF, pre-tokenizer corrected as in common.fix_pre_tokenizer; no BOS, no special tokens),
splits the ids into non-overlapping windows of 512
tokens (full windows only; the remainder is dropped), and scores each window independently
with the f32 model (HF transformers, GGUF dequantized on load): the NLL of tokens 1..511 of
each window given the previous tokens of the same window. Perplexity = exp(mean NLL over all
scored tokens) (= exp of the mean of the per-window means, since every window scores 511).

Run (from the repo root):
    /work/venv-ref/bin/python scripts/golden/perplexity.py [--gguf PATH] [--text PATH] [--out PATH]

Output: crates/model/tests/data/golden/gpl3_perplexity.json with the text's sha256, the
window size and count, token_ids (the ids of the WHOLE text, including the dropped tail, so the
Rust tokenizer can be checked against them), per-window mean NLL (nats), and the perplexity.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

DEFAULT_TEXT = "/usr/share/common-licenses/GPL-3"
WINDOW = 512


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--gguf", default=common.DEFAULT_GGUF)
    ap.add_argument("--text", default=DEFAULT_TEXT)
    ap.add_argument("--out", default=os.path.join(common.GOLDEN_DIR, "gpl3_perplexity.json"))
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()

    import torch
    import torch.nn.functional as F

    t0 = time.time()
    digest = common.check_gguf(args.gguf)
    tok, model = common.load_model(args.gguf, args.threads)
    with open(args.text, "rb") as f:
        raw = f.read()
    text = raw.decode("utf-8")
    ids = [int(i) for i in tok(text, add_special_tokens=False)["input_ids"]]
    # Decoding the ids must give back the text (byte-level BPE is lossless).
    assert tok.decode(ids) == text, "tokenizer round trip failed"
    n_windows = len(ids) // WINDOW
    print(f"{len(ids)} tokens -> {n_windows} windows of {WINDOW}", file=sys.stderr)

    window_nll = []
    with torch.no_grad():
        for w in range(n_windows):
            x = torch.tensor([ids[w * WINDOW : (w + 1) * WINDOW]], dtype=torch.long)
            logits = model(x).logits[0].float()  # [512, V]
            # logits[i] predicts token i+1: NLL of tokens 1..511.
            nll = F.cross_entropy(logits[:-1], x[0, 1:], reduction="none").double()
            window_nll.append(float(nll.mean()))
            print(f"window {w}: mean NLL {window_nll[-1]:.5f}", file=sys.stderr)
    mean_nll = sum(window_nll) / n_windows
    ppl = math.exp(mean_nll)

    doc = {
        "description": "f32 perplexity of SmolLM2-135M-Instruct on the GPL-3 text. "
        "See scripts/golden/perplexity.py.",
        "metadata": {
            "gguf_file": os.path.basename(args.gguf),
            "gguf_sha256": digest,
            "dtype": "float32",
            "attn_implementation": "eager",
            "date_utc": common.now_utc(),
            "versions": common.versions(),
            "generator": "scripts/golden/perplexity.py",
        },
        "text_path": args.text,
        "text_sha256": common.sha256_file(args.text),
        "text_bytes": len(raw),
        "tokenization": "HF tokenizer from the GGUF with SmolLM2's real pre-tokenizer (Digits("
        "individual) + ByteLevel; identical to llama.cpp's 'smollm' pre type), "
        "add_special_tokens=False (no BOS/EOS)",
        "window_size": WINDOW,
        "n_windows": n_windows,
        "n_tokens": len(ids),
        "scored_tokens_per_window": WINDOW - 1,
        "scoring": "each window alone; NLL of window tokens 1..511 given the preceding tokens "
        "of the same window; remainder after the last full window dropped",
        "window_mean_nll": [round(v, 6) for v in window_nll],
        "mean_nll": round(mean_nll, 6),
        "perplexity": round(ppl, 5),
        "token_ids": ids,
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(doc, f, separators=(",", ":"))
        f.write("\n")
    print(f"perplexity {ppl:.4f} (mean NLL {mean_nll:.5f}) over {n_windows} windows x {WINDOW - 1} "
          f"scored tokens; wrote {args.out} in {time.time() - t0:.1f}s")


if __name__ == "__main__":
    main()
