#!/usr/bin/env python3
"""make_tiny_hf.py - tiny random HF checkpoints and their transformers logits, for
crates/model/tests/hf_tiny_models.rs.

What: builds, with transformers and fixed seeds, four tiny Llama-family models (hidden 64,
2 layers, 4 query heads / 2 KV heads, head_dim 16, intermediate 64, vocab 300) and saves each
with `save_pretrained` into crates/model/tests/data/tiny_hf/<variant>/:

- llama3: Llama, untied lm_head, Llama-3 rope scaling (rope_type "llama3", factor 8, original
  context 64, so the three frequency bands - kept, smoothed, divided - all occur at head_dim
  16), rope_theta 500000; bf16 weights;
- qwen2: Qwen2 (biases on q/k/v, drawn large so they matter), rope_theta 1e6; bf16 weights;
- mistral: Mistral with sliding_window 8 (< the 20-token test sequences); transformers applies
  the window in eager attention through create_sliding_window_causal_mask; bf16 weights;
- llama_tied_sharded: Llama with tied embeddings, f16 weights, saved as 2 safetensors shards
  plus model.safetensors.index.json.

Weights are redrawn after construction so that the model is sensitive to what the tests want
to catch (HF's default init, N(0, 0.02), gives near-uniform attention, where RoPE, biases and
the window barely matter): matrices N(0, 1/fan_in) (q/k scaled by 1.5 for peaked attention),
embeddings N(0, 0.25^2) (max |logit| 9.4 when tied, 3.6-4.2 untied), norm weights
1 + N(0, 0.1^2), biases N(0, 0.5^2).

Every directory also gets the same tokenizer.json: a byte-level BPE (300 ids: 256 bytes, 43
merges, `<|endoftext|>`) trained with the `tokenizers` package on a fixed text.

golden.json (next to the model): the model is reloaded from the saved directory with
`AutoModelForCausalLM.from_pretrained(dir, dtype=float32, attn_implementation="eager")`, so the
reference uses exactly the stored (bf16/f16) weights in f32 math; for each of 2 token-id
sequences (20 tokens: one the tokenization of a fixed text, one seeded random ids) it stores
the teacher-forced logits of every position, [20, 300] row-major, as base64 of little-endian
f32 ("logits_f32le_b64"). Also stored: the text and its ids (to check the Rust tokenizer),
and, as a sanity figure, how far the transformers logits move when the feature the variant
tests is removed ("sensitivity": max |logit diff| with rope scaling off / biases zeroed /
no sliding window; none for the tied model).

Run (from the repo root; seconds of CPU):
    /work/venv-ref/bin/python scripts/golden/make_tiny_hf.py [--out DIR]
"""

from __future__ import annotations

import argparse
import base64
import copy
import json
import os
import shutil
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

OUT_DIR = os.path.join(common.REPO_ROOT, "crates", "model", "tests", "data", "tiny_hf")
VOCAB = 300
SEQ_LEN = 20
SEED = 20261128

TEXT = "The quick brown fox jumps over the lazy dog; 12 ducks swim."

# Training text of the tokenizer (fixed, so the merges are reproducible).
CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "the cat sat on the mat and the dog sat on the log",
    "This program is free software: you can redistribute it and/or modify it.",
    "There is no warranty for the program, to the extent permitted by law.",
    "Tiny models make fast tests; the tests compare logits with the reference.",
    "In the beginning the sliding window keeps the last tokens in the cache.",
] * 4

SHAPE = dict(
    hidden_size=64,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    vocab_size=VOCAB,
    rms_norm_eps=1e-5,
    max_position_embeddings=256,
)

VARIANTS = {
    "llama3": dict(
        arch="llama",
        dtype="bfloat16",
        config=dict(
            tie_word_embeddings=False,
            rope_parameters=dict(
                rope_type="llama3",
                rope_theta=500000.0,
                factor=8.0,
                low_freq_factor=1.0,
                high_freq_factor=4.0,
                original_max_position_embeddings=64,
            ),
        ),
        # What the test must catch if ignored: the llama3 rope scaling.
        control=("rope_parameters", dict(rope_type="default", rope_theta=500000.0)),
    ),
    "qwen2": dict(
        arch="qwen2",
        dtype="bfloat16",
        config=dict(
            tie_word_embeddings=False,
            rope_parameters=dict(rope_type="default", rope_theta=1000000.0),
            use_sliding_window=False,
        ),
        control=("zero_biases", None),
    ),
    "mistral": dict(
        arch="mistral",
        dtype="bfloat16",
        config=dict(
            tie_word_embeddings=False,
            sliding_window=8,
            rope_parameters=dict(rope_type="default", rope_theta=10000.0),
        ),
        control=("sliding_window", None),
    ),
    "llama_tied_sharded": dict(
        arch="llama",
        dtype="float16",
        shards=2,
        config=dict(
            tie_word_embeddings=True,
            rope_parameters=dict(rope_type="default", rope_theta=10000.0),
        ),
        control=None,
    ),
}


def make_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS, trainer)
    assert tok.get_vocab_size() == VOCAB, tok.get_vocab_size()
    return tok


def config_class(arch):
    from transformers import LlamaConfig, MistralConfig, Qwen2Config

    return {"llama": LlamaConfig, "qwen2": Qwen2Config, "mistral": MistralConfig}[arch]


def build_model(arch, config_kwargs, seed):
    import torch
    from transformers import AutoModelForCausalLM

    config = config_class(arch)(**SHAPE, **config_kwargs)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation="eager")
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
            elif name.endswith(".bias"):
                p.copy_(0.5 * torch.randn(p.shape, generator=g))
            elif "embed_tokens" in name:
                p.copy_(0.25 * torch.randn(p.shape, generator=g))
            elif p.dim() == 2:
                gain = 1.5 if ("q_proj" in name or "k_proj" in name) else 1.0
                p.copy_(gain * torch.randn(p.shape, generator=g) / p.shape[1] ** 0.5)
            else:
                raise AssertionError(f"unexpected parameter {name}")
    return model


def load_f32(d):
    import torch
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32, attn_implementation="eager")
    m.eval()
    assert {p.dtype for p in m.parameters()} == {torch.float32}
    return m


def logits_of(model, ids):
    import torch

    with torch.no_grad():
        return model(torch.tensor([ids], dtype=torch.long)).logits[0].float().numpy()


def b64_f32(a):
    import numpy as np

    return base64.b64encode(np.ascontiguousarray(a, dtype="<f4").tobytes()).decode("ascii")


def save(model, d, dtype, shards):
    import torch

    model = copy.deepcopy(model).to(getattr(torch, dtype))
    if shards == 1:
        model.save_pretrained(d)
        return
    # Split into `shards` files of about equal size.
    total = sum(p.numel() * p.element_size() for p in model.state_dict().values())
    model.save_pretrained(d, max_shard_size=total // shards + 4096)


def sensitivity(variant, spec, d, sequences, golden):
    """Max |logit diff| of transformers itself when the variant's feature is removed."""
    import torch

    control = spec["control"]
    if control is None:
        return None
    kind, value = control
    with tempfile.TemporaryDirectory() as tmp:
        for f in os.listdir(d):
            shutil.copy(os.path.join(d, f), tmp)
        if kind == "zero_biases":
            m = load_f32(tmp)
            with torch.no_grad():
                for name, p in m.named_parameters():
                    if name.endswith(".bias"):
                        p.zero_()
        else:
            with open(os.path.join(tmp, "config.json")) as f:
                cfg = json.load(f)
            cfg[kind] = value
            with open(os.path.join(tmp, "config.json"), "w") as f:
                json.dump(cfg, f)
            m = load_f32(tmp)
        diffs = [float(abs(logits_of(m, ids) - g).max()) for ids, g in zip(sequences, golden)]
    return {"removed": kind, "max_abs_logit_diff": round(max(diffs), 4)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=OUT_DIR)
    args = ap.parse_args()

    import numpy as np
    import torch

    torch.set_num_threads(1)
    tok = make_tokenizer()
    text_ids = tok.encode(TEXT, add_special_tokens=False).ids
    assert tok.decode(text_ids) == TEXT
    # Sequence 0: the text's ids, cut or extended (with ids of its start) to SEQ_LEN.
    seq0 = (text_ids * (SEQ_LEN // len(text_ids) + 1))[:SEQ_LEN]
    rng = np.random.default_rng(SEED)
    seq1 = [int(i) for i in rng.integers(0, VOCAB, SEQ_LEN)]
    sequences = [seq0, seq1]

    os.makedirs(args.out, exist_ok=True)
    for k, (variant, spec) in enumerate(VARIANTS.items()):
        d = os.path.join(args.out, variant)
        if os.path.isdir(d):
            shutil.rmtree(d)
        os.makedirs(d)
        model = build_model(spec["arch"], spec["config"], SEED + k)
        save(model, d, spec["dtype"], spec.get("shards", 1))
        files = sorted(os.listdir(d))
        weight_files = [f for f in files if f.endswith(".safetensors")]
        assert len(weight_files) == spec.get("shards", 1), files
        tok.save(os.path.join(d, "tokenizer.json"))
        for f in os.listdir(d):
            os.chmod(os.path.join(d, f), 0o644)  # save_pretrained writes weights as 0600

        ref = load_f32(d)
        golden = [logits_of(ref, ids) for ids in sequences]
        doc = {
            "description": f"transformers f32 eager logits of the tiny `{variant}` model in this "
            "directory. See scripts/golden/make_tiny_hf.py.",
            "generator": "scripts/golden/make_tiny_hf.py",
            "date_utc": common.now_utc(),
            "versions": {
                k2: v
                for k2, v in common.versions().items()
                if k2 in ("python", "torch", "transformers", "tokenizers", "numpy")
            },
            "variant": variant,
            "model_type": spec["arch"],
            "weights_dtype": spec["dtype"],
            "weight_files": weight_files,
            "vocab_size": VOCAB,
            "text": TEXT,
            "text_ids": text_ids,
            "sensitivity": sensitivity(variant, spec, d, sequences, golden),
            "sequences": [
                {
                    "token_ids": ids,
                    "logits_shape": list(g.shape),
                    "max_abs_logit": round(float(abs(g).max()), 4),
                    "logits_f32le_b64": b64_f32(g),
                }
                for ids, g in zip(sequences, golden)
            ],
        }
        with open(os.path.join(d, "golden.json"), "w") as f:
            json.dump(doc, f, indent=1)
            f.write("\n")
        size = sum(os.path.getsize(os.path.join(d, f)) for f in os.listdir(d))
        print(
            f"{variant}: {', '.join(sorted(os.listdir(d)))}; {size} bytes; "
            f"max |logit| {max(float(abs(g).max()) for g in golden):.3f}; "
            f"sensitivity {doc['sensitivity']}"
        )


if __name__ == "__main__":
    main()
