#!/usr/bin/env python3
"""torch.distributed.all_reduce (NCCL backend) latency and bandwidth over the GPUs of this host:
the baseline of `crates/dist/examples/allreduce_bench.rs`, measured the same way and printed in
the same table.

One process per GPU (torch.multiprocessing, spawn). Per size (8 KiB ... 64 MiB by default, x2
steps): one checked all-reduce of ones (each element must come back as the number of GPUs),
--warmup untimed calls, then --repeats timed batches of --iters back-to-back calls (the ranks
start each batch together at a host barrier; a batch ends with torch.cuda.synchronize(); its
time / --iters is one sample). The table shows the median sample of the slowest rank, algbw =
size / time and busbw = algbw * 2(n-1)/n, as nccl-tests defines them (GB = 1e9 bytes).

    python3 scripts/allreduce_torch.py [--gpus N] [--min-size 8KiB] [--max-size 64MiB]
        [--factor 2] [--warmup 5] [--iters 20] [--repeats 10]

NVLink multicast stays off: NCCL_NVLS_ENABLE=0 and TORCH_SYMM_MEM_DISABLE_MULTICAST=1 are set
here, before torch loads, for this process and the ranks it spawns.
"""

import os

os.environ["NCCL_NVLS_ENABLE"] = "0"
os.environ["TORCH_SYMM_MEM_DISABLE_MULTICAST"] = "1"

import argparse  # noqa: E402
import re  # noqa: E402
import socket  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

UNITS = {"": 1, "B": 1, "K": 1 << 10, "k": 1 << 10, "KiB": 1 << 10, "M": 1 << 20,
         "MiB": 1 << 20, "G": 1 << 30, "GiB": 1 << 30}


def parse_size(text):
    """`8KiB`, `64MiB`, `1GiB`, `4096`: bytes (a positive even number: bf16 elements)."""
    match = re.fullmatch(r"\s*(\d+)\s*([A-Za-z]*)\s*", text)
    if not match or match.group(2) not in UNITS:
        raise argparse.ArgumentTypeError(f"`{text}`: expected a size such as 8KiB or 65536")
    size = int(match.group(1)) * UNITS[match.group(2)]
    if size < 2 or size % 2:
        raise argparse.ArgumentTypeError(f"`{text}`: not a positive even number of bytes")
    return size


def human(size):
    for shift, unit in ((30, "GiB"), (20, "MiB"), (10, "KiB")):
        if size >= 1 << shift and size % (1 << shift) == 0:
            return f"{size >> shift} {unit}"
    return f"{size} B"


def sizes_of(args):
    sizes = [args.min_size]
    while sizes[-1] * args.factor <= args.max_size:
        sizes.append(sizes[-1] * args.factor)
    return sizes


def rank_main(rank, world, args, port, barrier, results):
    import torch
    import torch.distributed as dist

    torch.cuda.set_device(rank)
    device = torch.device("cuda", rank)
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world, device_id=device)
    medians = []
    for size in sizes_of(args):
        buf = torch.ones(size // 2, dtype=torch.bfloat16, device=device)
        dist.all_reduce(buf)
        torch.cuda.synchronize()
        if not bool(torch.all(buf == world)):
            raise SystemExit(f"rank {rank}, {human(size)}: the all-reduce of ones is not {world}")
        buf.zero_()
        for _ in range(args.warmup):
            dist.all_reduce(buf)
        torch.cuda.synchronize()
        samples = []
        for _ in range(args.repeats):
            barrier.wait()
            start = time.perf_counter()
            for _ in range(args.iters):
                dist.all_reduce(buf)
            torch.cuda.synchronize()
            samples.append((time.perf_counter() - start) / args.iters)
        medians.append(sorted(samples)[len(samples) // 2])  # as the Rust bench
    results.put((rank, torch.cuda.get_device_name(rank), medians))
    dist.destroy_process_group()


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gpus", type=int, help="GPUs (ranks); default: every visible GPU")
    parser.add_argument("--min-size", type=parse_size, default=parse_size("8KiB"))
    parser.add_argument("--max-size", type=parse_size, default=parse_size("64MiB"))
    parser.add_argument("--factor", type=int, default=2, choices=range(2, 17),
                        metavar="{2..16}", help="step between sizes")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()
    if args.min_size > args.max_size:
        parser.error(f"--min-size {human(args.min_size)} is above --max-size "
                     f"{human(args.max_size)}")
    if args.iters < 1 or args.repeats < 1 or args.warmup < 0:
        parser.error("--iters and --repeats must be at least 1, --warmup at least 0")

    import torch
    import torch.multiprocessing as mp

    world = args.gpus if args.gpus is not None else torch.cuda.device_count()
    if world < 1 or world > torch.cuda.device_count():
        parser.error(f"--gpus {world}: {torch.cuda.device_count()} GPUs visible")
    ctx = mp.get_context("spawn")
    barrier, results = ctx.Barrier(world), ctx.SimpleQueue()
    mp.spawn(rank_main, args=(world, args, free_port(), barrier, results), nprocs=world,
             join=True)
    ranks = sorted(results.get() for _ in range(world))
    name = ranks[0][1]
    nccl = ".".join(str(v) for v in torch.cuda.nccl.version())
    bus_factor = 2 * (world - 1) / world
    print(f"torch.distributed all-reduce (NCCL {nccl}, torch {torch.__version__}), bf16 sum in "
          f"place, {world} × {name}, median of {args.repeats} batches of {args.iters} calls "
          f"after {args.warmup} warm-up")
    print()
    print("| size | latency µs (median) | algbw GB/s | busbw GB/s |")
    print("| ---: | ---: | ---: | ---: |")
    for i, size in enumerate(sizes_of(args)):
        secs = max(r[2][i] for r in ranks)
        algbw = size / secs / 1e9
        print(f"| {human(size)} | {secs * 1e6:.1f} | {algbw:.2f} | {algbw * bus_factor:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
