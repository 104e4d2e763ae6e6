#!/usr/bin/env python3
"""Hugging Face transformers on the same requests as `kvserve bench`, on the same GPU.

The requests come from `kvserve bench --save-requests FILE` (prompt token ids and output length
of each, EOS ignored), so both engines run the very same workload. The model is built from a
`config.json` (e.g. benches/models/llama-3.1-8b) with random bf16 weights on the GPU: kvserve's
`--load-format dummy`. Two modes:

* `generate`: `model.generate()` over static batches of `--batch-size` requests in workload
  order, left-padded, dynamic cache, greedy, every request of a batch generating the batch's
  longest output (a static batch cannot stop one row early); only each request's own output
  length counts as useful tokens.
* `generate_batch`: transformers' continuous batching (the manager behind
  `model.generate_batch()`, used directly because `generate_batch` takes one `max_new_tokens`
  for all requests while each request here has its own), paged attention.

Prints one JSON object (and writes it with `--json`): per mode, requests, useful output tokens,
generated tokens, seconds and useful output tokens/s. Timing starts after model construction
and after each mode's warm-up; the continuous-batching warm-up (CUDA-graph capture) is
excluded as kvserve's start-up is.
"""

import argparse
import json
import sys
import time


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--requests", required=True, help="JSON from kvserve bench --save-requests")
    p.add_argument("--config", required=True, help="a config.json or a directory holding one")
    p.add_argument("--modes", default="generate,generate_batch")
    p.add_argument("--batch-size", type=int, default=64, help="static batch of generate()")
    p.add_argument(
        "--generate-requests",
        type=int,
        default=0,
        help="run generate() on only the first N requests (whole batches; 0: all): it is slow",
    )
    p.add_argument("--batch-requests", type=int, default=0, help="generate_batch on the first N (0: all)")
    p.add_argument("--json", help="also write the results here")
    return p.parse_args()


def load_requests(path):
    with open(path) as f:
        reqs = json.load(f)
    if not isinstance(reqs, list) or not reqs:
        raise SystemExit(f"{path}: expected a non-empty JSON list of requests")
    for i, r in enumerate(reqs):
        if not r.get("prompt") or int(r.get("output_len", 0)) < 1:
            raise SystemExit(f"{path}: request {i} has no prompt or no output length")
    return reqs


def build_model(config_path, attn):
    import os

    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    d = config_path if os.path.isdir(config_path) else os.path.dirname(config_path) or "."
    config = AutoConfig.from_pretrained(d)
    torch.manual_seed(0)
    t = time.perf_counter()
    with torch.device("cuda"):
        try:
            model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16, attn_implementation=attn)
        except TypeError:
            model = AutoModelForCausalLM.from_config(config, torch_dtype=torch.bfloat16, attn_implementation=attn)
    model.eval()
    print(f"hf: built {type(model).__name__} ({attn}) in {time.perf_counter() - t:.1f} s", file=sys.stderr)
    return model


def run_generate(model, reqs, batch_size):
    import torch

    gen = model.generation_config
    gen.eos_token_id = None
    gen.pad_token_id = 0
    gen.do_sample = False

    def batch_inputs(chunk):
        width = max(len(r["prompt"]) for r in chunk)
        ids = torch.zeros((len(chunk), width), dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for i, r in enumerate(chunk):
            p = r["prompt"]
            ids[i, width - len(p) :] = torch.tensor(p)
            mask[i, width - len(p) :] = 1
        return ids.cuda(), mask.cuda()

    # Warm-up: one tiny batch.
    ids, mask = batch_inputs(reqs[:2])
    with torch.inference_mode():
        model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=4, min_new_tokens=4, generation_config=gen)
    torch.cuda.synchronize()

    useful = generated = 0
    t = time.perf_counter()
    for s in range(0, len(reqs), batch_size):
        chunk = reqs[s : s + batch_size]
        n = max(int(r["output_len"]) for r in chunk)
        ids, mask = batch_inputs(chunk)
        with torch.inference_mode():
            out = model.generate(
                input_ids=ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, generation_config=gen
            )
        got = out.shape[1] - ids.shape[1]
        if got != n:
            raise SystemExit(f"generate(): batch at {s} made {got} tokens, asked {n}")
        generated += got * len(chunk)
        useful += sum(int(r["output_len"]) for r in chunk)
    torch.cuda.synchronize()
    return summary(len(reqs), useful, generated, time.perf_counter() - t, batch_size=batch_size)


def run_continuous(model, reqs):
    import torch
    from transformers import GenerationConfig

    try:
        model.set_attn_implementation("paged|sdpa")
        attn = "paged|sdpa"
    except Exception as e:  # older or newer spellings
        print(f"hf: set_attn_implementation('paged|sdpa') failed ({e}); trying sdpa_paged", file=sys.stderr)
        model.set_attn_implementation("sdpa_paged")
        attn = "sdpa_paged"
    gen = GenerationConfig(max_new_tokens=max(int(r["output_len"]) for r in reqs), do_sample=False, eos_token_id=-1, pad_token_id=0)
    with model.continuous_batching_context_manager(generation_config=gen, warmup=True) as manager:
        torch.cuda.synchronize()
        t = time.perf_counter()
        for i, r in enumerate(reqs):
            manager.add_request(
                input_ids=r["prompt"], request_id=f"req_{i}", max_new_tokens=int(r["output_len"]), eos_token_id=-1
            )
        done = {}
        while len(done) < len(reqs):
            res = manager.get_result(timeout=5)
            if res is None:
                if not manager.is_running():
                    raise SystemExit(f"generate_batch: the manager stopped after {len(done)} requests")
                continue
            if res.is_finished():
                done[res.request_id] = res
        elapsed = time.perf_counter() - t
    useful = generated = 0
    for i, r in enumerate(reqs):
        got = len(done[f"req_{i}"].generated_tokens)
        if got != int(r["output_len"]):
            raise SystemExit(f"generate_batch: req_{i} made {got} tokens, asked {r['output_len']}")
        generated += got
        useful += got
    return summary(len(reqs), useful, generated, elapsed, attn_implementation=attn)


def summary(requests, useful, generated, elapsed, **extra):
    return {
        "requests": requests,
        "useful_output_tokens": useful,
        "generated_tokens": generated,
        "elapsed_s": round(elapsed, 3),
        "output_tok_s": round(useful / elapsed, 1),
        **extra,
    }


def main():
    args = parse_args()
    import torch
    import transformers

    reqs = load_requests(args.requests)
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    for m in modes:
        if m not in ("generate", "generate_batch"):
            raise SystemExit(f"unknown mode {m!r}: expected generate, generate_batch")
    result = {
        "gpu": torch.cuda.get_device_name(0),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "workload_requests": len(reqs),
        "mean_input_len": round(sum(len(r["prompt"]) for r in reqs) / len(reqs), 1),
        "mean_output_len": round(sum(int(r["output_len"]) for r in reqs) / len(reqs), 1),
        "modes": {},
    }
    model = build_model(args.config, "sdpa")
    for m in modes:
        if m == "generate":
            n = args.generate_requests or len(reqs)
            sub = reqs[: max(args.batch_size, n // args.batch_size * args.batch_size)]
            result["modes"][m] = run_generate(model, sub, args.batch_size)
        else:
            n = args.batch_requests or len(reqs)
            result["modes"][m] = run_continuous(model, reqs[:n])
        print(f"hf {m}: {json.dumps(result['modes'][m])}", file=sys.stderr)
        if args.json:
            with open(args.json, "w") as f:
                json.dump(result, f, indent=2)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
