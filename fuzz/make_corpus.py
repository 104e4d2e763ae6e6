#!/usr/bin/env python3
"""Writes the small seed corpus of each fuzz target under fuzz/corpus/<target>/.

Run from the repository root: python3 fuzz/make_corpus.py. Deterministic; the files are
committed (a few KiB each). The GGUF seeds include the truncated and corrupted copies of the
real model's header from crates/model/tests/data/gguf (see its README.md).
"""
import json
import shutil
import struct
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CORPUS = ROOT / "fuzz" / "corpus"
DATA = ROOT / "crates" / "model" / "tests" / "data"


def write(target, name, data):
    d = CORPUS / target
    d.mkdir(parents=True, exist_ok=True)
    (d / name).write_bytes(data if isinstance(data, bytes) else data.encode())


# --- GGUF -------------------------------------------------------------------------------------
def gguf_str(s):
    b = s.encode()
    return struct.pack("<Q", len(b)) + b


def gguf(version, kvs, tensors):
    """kvs: (key, type id, payload bytes); tensors: (name, dims, ggml type, data)."""
    out = b"GGUF" + struct.pack("<IQQ", version, len(tensors), len(kvs))
    for key, ty, payload in kvs:
        out += gguf_str(key) + struct.pack("<I", ty) + payload
    offset = 0
    for name, dims, ty, data in tensors:
        out += gguf_str(name) + struct.pack("<I", len(dims))
        out += b"".join(struct.pack("<Q", d) for d in dims)
        out += struct.pack("<IQ", ty, offset)
        offset += (len(data) + 31) // 32 * 32
    out += b"\0" * (-len(out) % 32)
    for _, _, _, data in tensors:
        out += data + b"\0" * (-len(data) % 32)
    return out


U32, F32, STRING, ARRAY = 4, 6, 8, 9
tokens = ["<unk>", "a", "b", "ab"]
small = gguf(
    3,
    [
        ("general.architecture", STRING, gguf_str("llama")),
        ("llama.block_count", U32, struct.pack("<I", 1)),
        ("llama.embedding_length", U32, struct.pack("<I", 8)),
        ("tokenizer.ggml.model", STRING, gguf_str("gpt2")),
        ("tokenizer.ggml.tokens", ARRAY,
         struct.pack("<IQ", STRING, len(tokens)) + b"".join(gguf_str(t) for t in tokens)),
        ("tokenizer.ggml.merges", ARRAY, struct.pack("<IQ", STRING, 1) + gguf_str("a b")),
    ],
    [("token_embd.weight", [2, 2], 0, struct.pack("<4f", 1, 2, 3, 4))],
)
write("gguf_reader", "small_v3.gguf", small)
write("gguf_reader", "empty_v2.gguf", b"GGUF" + struct.pack("<IQQ", 2, 0, 0))
for name in ["truncated_header.gguf", "corrupted_header.gguf"]:
    shutil.copy(DATA / "gguf" / name, CORPUS / "gguf_reader" / name)

# --- safetensors and config.json --------------------------------------------------------------
def safetensors(tensors):
    header, data = {}, b""
    for name, dtype, shape, raw in tensors:
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [len(data), len(data) + len(raw)]}
        data += raw
    h = json.dumps(header, separators=(",", ":")).encode()
    h += b" " * (-len(h) % 8)
    return struct.pack("<Q", len(h)) + h + data


write("safetensors_config", "two_tensors.safetensors", safetensors([
    ("model.embed_tokens.weight", "F32", [2, 2], struct.pack("<4f", 1, 2, 3, 4)),
    ("model.norm.weight", "F16", [2], b"\x00\x3c\x00\x3c"),
]))
for arch in ["llama3", "mistral", "qwen2"]:
    write("safetensors_config", f"config_{arch}.json",
          (DATA / "tiny_hf" / arch / "config.json").read_bytes())

# --- chat templates ---------------------------------------------------------------------------
fixture = json.loads((DATA / "tokenizer" / "chat_templates.json").read_text())
messages = fixture["conversations"]["multi_turn"]
records = "\x1e".join(f"{m['role']}\x1f{m['content']}" for m in messages)
for name, template in fixture["templates"].items():
    write("chat_template", f"{name}.txt",
          f"{template}\0{fixture['bos_token'] or ''}\0{fixture['eos_token'] or ''}\0{records}")

# --- GenerateRequest (protobuf wire format) ----------------------------------------------------
def varint(n):
    out = b""
    while True:
        b, n = n & 0x7F, n >> 7
        out += bytes([b | (0x80 if n else 0)])
        if not n:
            return out


def field(num, wire, payload):
    key = varint(num << 3 | wire)
    if wire == 2:
        return key + varint(len(payload)) + payload
    return key + payload


def s(num, text):
    return field(num, 2, text.encode())


def u(num, n):
    return field(num, 0, varint(n))


sampling = field(1, 5, struct.pack("<f", 0.7)) + field(2, 5, struct.pack("<f", 0.9)) + u(6, 7)
write("generate_request", "text.pb", s(1, "req-1") + s(2, "t1 t2 t3") + u(5, 16) + field(6, 2, sampling))
write("generate_request", "token_ids.pb",
      field(3, 2, b"".join(varint(i) for i in [1, 2, 3, 511])) + u(10, 2) + u(11, 3)
      + s(7, "t9") + field(8, 2, varint(4)) + u(9, 1))
write("generate_request", "messages.pb",
      field(4, 2, s(1, "system") + s(2, "Be brief.")) + field(4, 2, s(1, "user") + s(2, "t5 t6")))
write("generate_request", "two_prompts.pb", s(2, "t1") + field(3, 2, varint(1)))

# --- block manager / scheduler op streams (arbitrary's format: any bytes are an input) --------
write("kv_scheduler_ops", "block_ops.bin", bytes(range(0, 256, 3)))
write("kv_scheduler_ops", "sched_ops.bin", bytes([1]) + bytes((i * 37 + 11) % 256 for i in range(200)))
write("kv_scheduler_ops", "sched_steps.bin", bytes([1, 8, 4, 0x41, 0, 0]) + bytes([0, 5, 40, 3, 30, 2, 0, 0, 0, 2, 1, 0, 0] * 3) + bytes([2, 1, 0, 0] * 20))
