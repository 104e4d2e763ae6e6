#!/usr/bin/env python3
"""make_kquant.py - Q4_K and Q6_K blocks and their reference dequantization, for the K-quant
tests of crates/model (tests/kquant_gguf.rs and the `kquant_*` test in src/cpu/tests.rs).

What: random but valid super-blocks (256 elements each; seeded) of both types, plus crafted
edge blocks, written as two tensors of 2 rows x 512 columns (4 super-blocks each) into a tiny
GGUF with the `gguf` package's GGUFWriter: `q4_k` (Q4_K, 144 bytes per block) and `q6_k`
(Q6_K, 210 bytes per block). The expected floats come from `gguf.quants.dequantize` (numpy,
float32) and are stored as the f32 bit patterns (u32), so the Rust test can compare exactly.

Blocks (in row-major order of each tensor):
- Q4_K: 0: random (d, dmin in +-[1e-3, 1e-1]), 1: every 6-bit scale and min 63 (all high
  bits of the packed scales set), d = 60000 (near the f16 maximum), dmin = -0.5; 2: d = 0 and
  a subnormal dmin (f16 bits 0x0001); 3: random with negative d.
- Q6_K: 0: random (d in +-[1e-3, 1e-1]), 1: every scale -128 and every 6-bit code 63 (all bits
  of ql and qh set), d = -60000; 2: scales 127, codes 0, a subnormal d (f16 bits 0x03ff);
  3: random.

Output: crates/model/tests/data/kquant/kquant.gguf and kquant_expected.json (per tensor:
name, ggml type name and id, GGML dims [cols, rows], bytes, and `expected_f32_bits`, the
dequantized values row after row).

Run (from the repo root; instant):
    /work/venv-ref/bin/python scripts/golden/make_kquant.py [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

OUT_DIR = os.path.join(common.REPO_ROOT, "crates", "model", "tests", "data", "kquant")
SEED = 20261128
ROWS, COLS = 2, 512


def f16_bytes(values):
    import numpy as np

    return np.asarray(values, dtype="<f2").view(np.uint8)


def random_scale(rng, sign=None):
    mag = 10 ** rng.uniform(-3, -1)
    s = sign if sign is not None else rng.choice([-1.0, 1.0])
    return s * mag


def q4_k_blocks(rng):
    import numpy as np

    blocks = []

    def block(d, dmin, scales, qs):
        b = np.concatenate([f16_bytes([d, dmin]), scales, qs]).astype(np.uint8)
        assert b.size == 144
        return b

    rand = lambda n: rng.integers(0, 256, n, dtype=np.uint8)  # noqa: E731
    blocks.append(block(random_scale(rng), random_scale(rng), rand(12), rand(128)))
    blocks.append(block(60000.0, -0.5, np.full(12, 0xFF, np.uint8), rand(128)))
    b = block(0.0, 0.0, rand(12), rand(128))
    b[2:4] = [0x01, 0x00]  # dmin: the smallest f16 subnormal
    blocks.append(b)
    blocks.append(block(random_scale(rng, -1.0), random_scale(rng), rand(12), rand(128)))
    return np.stack(blocks)


def q6_k_blocks(rng):
    import numpy as np

    blocks = []

    def block(ql, qh, scales, d):
        b = np.concatenate([ql, qh, np.asarray(scales, np.int8).view(np.uint8), f16_bytes([d])])
        assert b.size == 210
        return b.astype(np.uint8)

    rand = lambda n: rng.integers(0, 256, n, dtype=np.uint8)  # noqa: E731
    rand_scales = lambda: rng.integers(-128, 128, 16).astype(np.int8)  # noqa: E731
    blocks.append(block(rand(128), rand(64), rand_scales(), random_scale(rng)))
    blocks.append(block(np.full(128, 0xFF, np.uint8), np.full(64, 0xFF, np.uint8), [-128] * 16, -60000.0))
    b = block(np.zeros(128, np.uint8), np.zeros(64, np.uint8), [127] * 16, 0.0)
    b[208:210] = [0xFF, 0x03]  # d: the largest f16 subnormal
    blocks.append(b)
    blocks.append(block(rand(128), rand(64), rand_scales(), random_scale(rng)))
    return np.stack(blocks)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=OUT_DIR)
    args = ap.parse_args()

    import numpy as np
    from gguf import GGMLQuantizationType, GGUFReader, GGUFWriter
    from gguf.quants import dequantize

    rng = np.random.default_rng(SEED)
    tensors = [
        ("q4_k", GGMLQuantizationType.Q4_K, q4_k_blocks(rng)),
        ("q6_k", GGMLQuantizationType.Q6_K, q6_k_blocks(rng)),
    ]
    os.makedirs(args.out, exist_ok=True)
    gguf_path = os.path.join(args.out, "kquant.gguf")
    w = GGUFWriter(gguf_path, arch="kquant-test")
    for name, qtype, blocks in tensors:
        data = blocks.reshape(ROWS, -1)  # [rows, row bytes]
        w.add_tensor(name, data, raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()

    doc = {
        "description": "Q4_K / Q6_K blocks in kquant.gguf and their dequantization by "
        "gguf.quants.dequantize (f32 bit patterns). See scripts/golden/make_kquant.py.",
        "generator": "scripts/golden/make_kquant.py",
        "versions": {k: v for k, v in common.versions().items() if k in ("python", "gguf", "numpy")},
        "tensors": [],
    }
    reader = GGUFReader(gguf_path)
    for (name, qtype, blocks), t in zip(tensors, reader.tensors):
        assert t.name == name and t.tensor_type == qtype
        raw = np.asarray(t.data, dtype=np.uint8).reshape(ROWS, -1)
        assert np.array_equal(raw, blocks.reshape(ROWS, -1))
        values = dequantize(raw, qtype).astype(np.float32)
        assert values.shape == (ROWS, COLS) and np.isfinite(values).all()
        doc["tensors"].append(
            {
                "name": name,
                "ggml_type": qtype.name,
                "ggml_type_id": int(qtype),
                "dims": [COLS, ROWS],
                "n_bytes": int(raw.size),
                "expected_f32_bits": [int(v) for v in values.reshape(-1).view(np.uint32)],
            }
        )
        print(f"{name}: {raw.size} bytes, values in [{values.min():.4g}, {values.max():.4g}]")
    with open(os.path.join(args.out, "kquant_expected.json"), "w") as f:
        json.dump(doc, f, separators=(",", ":"))
        f.write("\n")


if __name__ == "__main__":
    main()
