"""Shared helpers for the golden-data scripts (imported by make_golden.py and perplexity.py).

Loads SmolLM2-135M-Instruct from its GGUF file with HF transformers in float32. transformers
dequantizes every tensor on load (Q4_1 -> f32 through the `gguf` package) and reverses
llama.cpp's Q/K row permutation for the Llama architecture, so the result is the exact-math
f32 model that the quantized weights describe. The tokenizer's pre-tokenizer is corrected to
SmolLM2's real one (see fix_pre_tokenizer).
"""

from __future__ import annotations

import datetime
import hashlib
import os
import platform
import sys

REPO_ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
DEFAULT_GGUF = os.path.join(REPO_ROOT, "models", "SmolLM2-135M-Instruct.Q4_1.gguf")
EXPECTED_GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
GOLDEN_DIR = os.path.join(REPO_ROOT, "crates", "model", "tests", "data", "golden")


def sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def check_gguf(path: str) -> str:
    """Return the file's sha256; exit if it is not the expected model file."""
    if not os.path.isfile(path):
        sys.exit(f"GGUF not found: {path} (pass --gguf PATH)")
    digest = sha256_file(path)
    if digest != EXPECTED_GGUF_SHA256:
        sys.exit(f"unexpected GGUF sha256 {digest}, want {EXPECTED_GGUF_SHA256}")
    return digest


def load_model(gguf_path: str, threads: int | None = None):
    """Load (tokenizer, model) in float32, eval mode, eager attention."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if threads:
        torch.set_num_threads(threads)
    d, name = os.path.split(os.path.abspath(gguf_path))
    tok = AutoTokenizer.from_pretrained(d, gguf_file=name)
    fix_pre_tokenizer(tok, gguf_path)
    model = AutoModelForCausalLM.from_pretrained(
        d, gguf_file=name, torch_dtype=torch.float32, attn_implementation="eager"
    )
    model.eval()
    # Every parameter must really be f32 (nothing left quantized or in half precision).
    dtypes = {p.dtype for p in model.parameters()}
    assert dtypes == {torch.float32}, dtypes
    return tok, model


def gguf_pre_type(gguf_path: str) -> str | None:
    """The GGUF's tokenizer.ggml.pre (the pre-tokenizer family), or None."""
    from gguf import GGUFReader

    f = GGUFReader(gguf_path).fields.get("tokenizer.ggml.pre")
    return None if f is None else str(f.contents())


def fix_pre_tokenizer(tok, gguf_path: str) -> None:
    """Give the HF tokenizer the pre-tokenizer of the model's real tokenizer.json.

    transformers builds a GPT-2 style tokenizer from the GGUF and ignores tokenizer.ggml.pre,
    so its pre-tokenizer is ByteLevel alone. SmolLM2's tokenizer.json (GGUF pre type "smollm",
    which llama.cpp handles the same way) first splits every digit on its own
    (Digits(individual_digits=True)) and then applies ByteLevel. The two differ where a run of
    whitespace precedes a digit: e.g. "\n\n  0." is ["\n\n  ", "0", "."] for the real tokenizer
    and ["\n\n ", " ", "0", "."] for the GGUF conversion (the GPL-3 text has 19 such places).
    """
    from tokenizers import pre_tokenizers

    pre = gguf_pre_type(gguf_path)
    if pre != "smollm":
        sys.exit(f"unexpected tokenizer.ggml.pre {pre!r}: check the pre-tokenizer fix")
    tok.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True),
        ]
    )


def versions() -> dict:
    import gguf
    import numpy
    import tokenizers
    import torch
    import transformers

    try:
        from importlib.metadata import version as _v

        gguf_version = _v("gguf")
    except Exception:  # pragma: no cover
        gguf_version = getattr(gguf, "__version__", "unknown")
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "tokenizers": tokenizers.__version__,
        "gguf": gguf_version,
        "numpy": numpy.__version__,
        "platform": platform.platform(),
        "torch_threads": torch.get_num_threads(),
    }


def now_utc() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
