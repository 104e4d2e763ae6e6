#!/usr/bin/env python3
"""Regenerates the tokenizer test fixtures in this folder.

Run once by hand (the fixtures are committed; tests never run Python):

    pip install gguf tokenizers transformers jinja2
    python3 crates/model/tests/data/tokenizer/gen_fixtures.py PATH/TO/SmolLM2-135M-Instruct.Q4_1.gguf

Outputs (all next to this script):
- smollm2_vocab.json.gz   the GGUF tokenizer metadata of SmolLM2-135M-Instruct (tokens, token types,
                          merges, special ids, flags, chat template), keys named as in GGUF.
- smollm2_encode.json     texts with the reference ids of HF `tokenizers` built exactly like SmolLM2's
                          tokenizer.json (Digits(individual) + ByteLevel, BPE, ByteLevel decoder), and
                          the reference decodes (with and without special tokens).
- pretype_encode.json     the same vocabulary under the HF pre-tokenizer chains of other GGUF pre types
                          (llama-bpe, qwen2, gpt2), with reference ids per text.
- chat_templates.json     chat templates, conversations and the output of transformers'
                          `apply_chat_template` (or the error it raised).
- tiny_tokenizer.json,
  tiny_tokenizer_config.json,
  tiny_encode.json        a small tokenizer.json/tokenizer_config.json pair (SmolLM2's layout, the vocab
                          cut to its first tokens) and its reference ids, for `Tokenizer::from_file`.
"""

import gzip
import json
import os
import random
import sys

from gguf import GGUFReader
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

HERE = os.path.dirname(os.path.abspath(__file__))

GPT2_RE = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
LLAMA3_RE = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
             r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_RE = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
            r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")


def read_gguf_vocab(path):
    r = GGUFReader(path)
    out = {}
    for k, f in r.fields.items():
        if k.startswith("tokenizer."):
            out[k] = f.contents()
    return out


def build_hf(meta, pre="smollm", tokens_limit=None):
    """An HF tokenizer laid out like the real tokenizer.json of the model family."""
    tokens = meta["tokenizer.ggml.tokens"]
    types = meta["tokenizer.ggml.token_type"]
    merges = [tuple(m.split(" ", 1)) for m in meta["tokenizer.ggml.merges"]]
    if tokens_limit is not None:
        tokens = tokens[:tokens_limit]
        types = types[:tokens_limit]
        vocab_set = set(tokens)
        merges = [m for m in merges if m[0] in vocab_set and m[1] in vocab_set and m[0] + m[1] in vocab_set]
    vocab = {t: i for i, t in enumerate(tokens)}
    bpe = models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False,
                     ignore_merges=(pre == "llama-bpe"))
    tok = Tokenizer(bpe)
    if pre == "smollm":
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True),
        ])
    elif pre == "llama-bpe":
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(LLAMA3_RE), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=False),
        ])
    elif pre == "qwen2":
        tok.normalizer = normalizers.NFC()
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(QWEN2_RE), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
        ])
    elif pre == "gpt2":
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True)
    else:
        raise ValueError(pre)
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    tok.decoder = decoders.ByteLevel()
    specials = [AddedToken(t, special=True, normalized=False) for t, ty in zip(tokens, types) if ty == 3]
    tok.add_special_tokens(specials)
    return tok


SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<repo_name>", "<file_sep>", "<empty_output>"]

HAND_TEXTS = [
    "", " ", "  ", "\n", "\n\n", "\t", "\r\n", "a", "Hello world", "Hello, World!", " Hello world",
    "   leading spaces", "trailing spaces   ", "multiple   internal    spaces", "tabs\tand\nnewlines\r\nmixed",
    "I'm sure they'll say it's fine, don't you think? We've seen it. I'D SAY IT'S OK",
    "Numbers 12345 and 3.14159 and 1,000,000", "2024-01-01T12:34:56Z", "0", "00", "007", "x1y22z333",
    "ABC123def456", "Arabic-Indic ٣٤٥ and full-width １２３ and superscript ² and roman Ⅻ",
    "Emoji: 😀👍🏽🇺🇸 and ❤️ and 👨‍👩‍👧‍👦", "🦀", "😀😀😀",
    "你好，世界！这是一个测试。", "日本語のテキストとカタカナ ー", "한국어 텍스트입니다", "Россия и Україна",
    "مرحبا بالعالم", "नमस्ते दुनिया", "Café naïve résumé façade Ångström", "e\u0301 combining (decomposed é)",
    "zero\u200bwidth and non\u00a0breaking and ideographic\u3000space",
    "def foo(x):\n    return x ** 2  # comment\n", "fn main() {\n\tprintln!(\"hi {}\", 1 + 2);\n}\n",
    "https://example.com/path?q=1&r=two#frag", "user@example.com", "C:\\Windows\\System32",
    "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n", "<|endoftext|>",
    "text<|endoftext|>more text", "<|im_start|><|im_end|>", "<|im_start|>" * 3,
    "not <|a special|> token", "<|im_start", "im_end|>", "<>", "<||>", " <|im_start|> spaced ",
    "<repo_name>kvserve<file_sep>src/lib.rs\n", "<empty_output>",
    "The quick brown fox jumps over the lazy dog. " * 8,
    "supercalifragilisticexpialidocious antidisestablishmentarianism",
    "!!! ??? ... --- (parens) [brackets] {braces} <angles> ~`@#$%^&*_+=|\\/",
    "\u00ff\u0100\ud7ff\ue000\uffef", "\U0001F600\U0010FFFF", "a\u0000b", "\x7f\x01\x1b[31mred\x1b[0m",
    "'s 's 'S 'll 'LL 're 'RE", "     \n     \n", " \n \n ", "\n\n\n\n    x",
]


def random_texts(n, seed=1234):
    rng = random.Random(seed)
    words = ["the", "The", "kv", "cache", "token", "GPU", "blocks", "inference", "Rust", "don't", "it's",
             "hello", "World", "naïve", "straße", "ÆØÅ", "über", "x", "I", "a"]
    pieces = [
        lambda: rng.choice(words),
        lambda: str(rng.randint(0, 10 ** rng.randint(1, 9))),
        lambda: rng.choice([" ", "  ", "   ", "\n", "\n\n", "\t", "\r\n", " \n", "\u00a0", "\u3000"]),
        lambda: rng.choice([".", ",", "!", "?", "...", "--", "(", ")", "\"", "'", ":", ";", "#", "$", "%", "&",
                            "@", "*", "/", "\\", "{", "}", "[", "]", "<", ">", "=", "+", "_", "|", "~", "`"]),
        lambda: "".join(chr(rng.choice([rng.randint(0x4E00, 0x9FFF), rng.randint(0x3040, 0x30FF),
                                        rng.randint(0xAC00, 0xD7A3), rng.randint(0x0600, 0x06FF),
                                        rng.randint(0x0900, 0x097F), rng.randint(0x0400, 0x04FF)]))
                        for _ in range(rng.randint(1, 6))),
        lambda: "".join(chr(rng.randint(0x1F300, 0x1FAFF)) for _ in range(rng.randint(1, 3))),
        lambda: rng.choice(["👍🏽", "🇩🇪", "👨‍💻", "❤️", "e\u0301", "\u200d", "\ufeff"]),
        lambda: rng.choice(SPECIALS + ["<|im_", "|>", "<|", "im_start"]),
        lambda: chr(rng.randint(0x20, 0x7E)) * rng.randint(1, 5),
        lambda: chr(rng.choice([rng.randint(0xA0, 0x2FFF), rng.randint(0x10000, 0x1FFFF)])),
    ]
    weights = [30, 8, 15, 10, 6, 4, 3, 3, 6, 5]
    out = []
    for _ in range(n):
        k = rng.randint(1, 14)
        out.append("".join(rng.choices(pieces, weights)[0]() for _ in range(k)))
    return out


def encode_fixture(tok, texts):
    rows = []
    for t in texts:
        ids = tok.encode(t, add_special_tokens=True).ids
        rows.append({
            "text": t,
            "ids": ids,
            "decoded": tok.decode(ids, skip_special_tokens=False),
            "decoded_skip_special": tok.decode(ids, skip_special_tokens=True),
        })
    return rows


def compact(obj):
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":"))


def dump(name, obj):
    """Writes a JSON object whose values are lists one element a line (small, and diffs stay readable)."""
    path = os.path.join(HERE, name)
    parts = []
    for k, v in obj.items():
        if isinstance(v, list):
            body = ",\n".join(compact(x) for x in v)
            parts.append(f"{compact(k)}:[\n{body}\n]")
        else:
            parts.append(f"{compact(k)}:{compact(v)}")
    with open(path, "w", encoding="utf-8") as f:
        f.write("{\n" + ",\n".join(parts) + "\n}\n")
    json.load(open(path, encoding="utf-8"))  # still valid JSON
    print(f"{name}: {os.path.getsize(path)} bytes")


def chat_fixture(meta):
    from transformers import PreTrainedTokenizerFast

    smol = meta["tokenizer.chat_template"]
    templates = {
        "smollm2": smol,
        # Llama-3 style: bos_token, trim, whitespace control.
        "llama3_like": (
            "{{- bos_token }}\n"
            "{%- for message in messages %}\n"
            "    {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'"
            " + message['content'] | trim + '<|eot_id|>' }}\n"
            "{%- endfor %}\n"
            "{%- if add_generation_prompt %}\n"
            "    {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}\n"
            "{%- endif %}\n"
        ),
        # Mistral style: role alternation enforced with raise_exception, eos_token, loop.index0.
        "mistral_like": (
            "{{ bos_token }}{% for message in messages %}"
            "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
            "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
            "{% endif %}"
            "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
            "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token }}"
            "{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}"
            "{% endfor %}"
        ),
        # Python string methods (pycompat), namespace, trim_blocks/lstrip_blocks, tojson, loop.last.
        "pycompat": (
            "{% set ns = namespace(sys='') %}\n"
            "{% for m in messages %}\n"
            "    {% if m.role == 'system' %}\n"
            "        {% set ns.sys = m.content.strip() %}\n"
            "    {% endif %}\n"
            "{% endfor %}\n"
            "SYS={{ ns.sys.upper() }}|{{ ns.sys | tojson }}|{{ messages[0] | tojson }}\n"
            "{{ {'b': 1, 'a': [1.5, true, none, 'é\\\"\\n\\t<&>', -2, 3.0]} | tojson }}\n"
            "{{ {'z': {'y': []}, 'x': {}} | tojson(indent=2) }}\n"
            "{{ {'b': 1, 'a': 'ü'} | tojson(sort_keys=true, ensure_ascii=true) }}\n"
            "{% for m in messages if m.role != 'system' %}\n"
            "  [{{ m['role'].title() }}] {{ m['content'].strip().replace('\\n', ' / ') }}"
            "{% if m.content.startswith('Q:') %} (question){% endif %}"
            "{% if not loop.last %}\n{% endif %}\n"
            "{% endfor %}\n"
            "{% if add_generation_prompt %}\n"
            ">>> {{ messages | length }} {{ messages[-1].content.split()[0] | default('') }}\n"
            "{% endif %}\n"
        ),
    }
    convs = {
        "system_user": [
            {"role": "system", "content": "You are a concise assistant."},
            {"role": "user", "content": "What is the capital of France?"},
        ],
        "user_only": [{"role": "user", "content": "Hello! 👋 Tell me a joke about Rust 🦀."}],
        "multi_turn": [
            {"role": "system", "content": "  Be brief.\n"},
            {"role": "user", "content": "Q: 2+2?"},
            {"role": "assistant", "content": "4"},
            {"role": "user", "content": "And 3*3?\nThanks."},
        ],
        "user_assistant_user": [
            {"role": "user", "content": "Q: hi"},
            {"role": "assistant", "content": "Hello there."},
            {"role": "user", "content": "  spaced   content  \n\n"},
        ],
        "unicode_empty": [
            {"role": "user", "content": ""},
            {"role": "assistant", "content": "你好，世界 <|im_end|> not special here"},
        ],
        "bad_roles": [
            {"role": "assistant", "content": "I speak first"},
            {"role": "user", "content": "hm"},
        ],
    }
    bos, eos = "<|im_start|>", "<|im_end|>"
    tok = build_hf(meta)
    cases = []
    for tname, tsrc in templates.items():
        hf = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=bos, eos_token=eos, chat_template=tsrc)
        for cname, conv in convs.items():
            for agp in (False, True):
                case = {"template": tname, "conversation": cname, "add_generation_prompt": agp}
                try:
                    case["output"] = hf.apply_chat_template(conv, tokenize=False, add_generation_prompt=agp)
                except Exception as e:  # noqa: BLE001 - the error is the expected result
                    case["error"] = str(e)
                cases.append(case)
    return {"bos_token": bos, "eos_token": eos, "templates": templates, "conversations": convs, "cases": cases}


def main():
    gguf_path = sys.argv[1]
    meta = read_gguf_vocab(gguf_path)

    vocab = {k: (list(v) if isinstance(v, list) else v) for k, v in meta.items()}
    path = os.path.join(HERE, "smollm2_vocab.json.gz")
    with gzip.GzipFile(path, "wb", compresslevel=9, mtime=0) as f:
        f.write(json.dumps(vocab, ensure_ascii=False, separators=(",", ":")).encode("utf-8"))
    print(f"smollm2_vocab.json.gz: {os.path.getsize(path)} bytes")

    texts = HAND_TEXTS + random_texts(300)
    tok = build_hf(meta, "smollm")
    dump("smollm2_encode.json", {"pre": "smollm", "cases": encode_fixture(tok, texts)})

    # Ids per pre type, one list per text of smollm2_encode.json, in the same order.
    pretypes = {}
    for pre in ("llama-bpe", "qwen2", "gpt2"):
        t = build_hf(meta, pre)
        pretypes[pre] = [t.encode(x, add_special_tokens=True).ids for x in texts]
    dump("pretype_encode.json", pretypes)

    dump("chat_templates.json", chat_fixture(meta))

    tiny = build_hf(meta, "smollm", tokens_limit=1200)
    tiny.save(os.path.join(HERE, "tiny_tokenizer.json"), pretty=False)
    print(f"tiny_tokenizer.json: {os.path.getsize(os.path.join(HERE, 'tiny_tokenizer.json'))} bytes")
    dump("tiny_tokenizer_config.json", {
        "add_prefix_space": False,
        "bos_token": "<|im_start|>",
        "eos_token": {"__type": "AddedToken", "content": "<|im_end|>", "lstrip": False, "normalized": False,
                      "rstrip": False, "single_word": False, "special": True},
        "unk_token": "<|endoftext|>",
        "pad_token": "<|im_end|>",
        "chat_template": meta["tokenizer.chat_template"],
        "clean_up_tokenization_spaces": False,
        "model_max_length": 8192,
        "tokenizer_class": "GPT2Tokenizer",
    })
    dump("tiny_encode.json", {"cases": encode_fixture(tiny, HAND_TEXTS)})


if __name__ == "__main__":
    main()
