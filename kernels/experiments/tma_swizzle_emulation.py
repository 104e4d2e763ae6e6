# Not part of the build: a check, made without a GPU, of the TMA tile loader of
# paged_attention_tc.cu (-DKVS_TC_TMA=1; kernels/NOTES.md, "a TMA tile loader").
# `python3 kernels/experiments/tma_swizzle_emulation.py` (plain Python, no numpy) checks:
#  1. layout: where the TMA engine puts each 16-byte chunk of a box (the 128-byte swizzle as
#     a function of the shared-memory address: chunk c of the 128-byte line at address L goes
#     to chunk position c ^ ((L >> 7) & 7)) is where tma_chunk_offset says, and the cp.async
#     fallback (copy_tile_rows under KVS_TC_TMA) writes the same places;
#  2. ldmatrix: every lane's address in the T16 body (k_lane / v_lane and tc_addr, the fast
#     xor form) points at the same (token, 16-byte chunk) as the padded layout's address does
#     without TMA, so each ldmatrix returns the same fragments; and each 8-lane phase of every
#     ldmatrix touches 32 distinct banks (no conflicts);
#  3. tma_zero_masked_v: physical line P of a tile holds row 8 (P / (8 kHalves)) + P % 8;
#  4. shared-memory placement: every stage's K and V tile is 1024-byte aligned after the
#     kernel's alignment of the dynamic shared memory, for 2/4 warps and 2-4 stages;
#  5. tiles and boxes: for random contexts, windows, partitions and block sizes >= 8, the
#     warps' tiles (from p_start rounded down to 16) cover every token of the partition once,
#     every box is a run of rows of one block, a box is issued iff it holds a live token (so
#     only table entries of attended tokens are read), the box's first cache row is the
#     row offset kv_value_offset gives, and the rows zeroed are exactly the masked ones.
import random

KTILE = 16
BOX_ROWS = 8


def tma_chunk_offset(row, chunk, d):
    box_bytes = BOX_ROWS * 2 * d
    return (row // 8) * box_bytes + (chunk // 8) * 1024 + (row % 8) * 128 + (((chunk % 8) ^ (row % 8)) * 16)


def tma_deposit(dst, rows, half, d):
    """What one TMA box (8 rows, 64 channels of `half`) writes: {smem address: (row, chunk)}."""
    out = {}
    for i in range(BOX_ROWS):
        line = dst + i * 128
        for c in range(8):
            out[line + ((c ^ ((line >> 7) & 7)) << 4)] = (rows[i], 8 * half + c)
    return out


def check_layout(d, tile_base):
    """The boxes of one tile deposited at `tile_base` (1024-aligned): {address: (row, chunk)}."""
    halves = d // 64
    box_bytes = BOX_ROWS * 2 * d
    smem = {}
    for b in range(2):
        for h in range(halves):
            smem.update(tma_deposit(tile_base + b * box_bytes + h * 1024, list(range(8 * b, 8 * b + 8)), h, d))
    assert len(smem) == KTILE * 2 * d // 16
    for row in range(KTILE):
        for chunk in range(d // 8):
            a = tile_base + tma_chunk_offset(row, chunk, d)
            assert smem[a] == (row, chunk), (d, row, chunk)
    # cp.async fallback: copy_tile_rows, chunk c = lane + 32 i -> row c / kChunksPerRow, col.
    chunks_per_row = d // 8
    for i in range(KTILE * chunks_per_row // 32):
        for lane in range(32):
            c = lane + 32 * i
            row, col = c // chunks_per_row, c % chunks_per_row
            assert smem[tile_base + tma_chunk_offset(row, col, d)] == (row, col)
    return smem


def banks(addr):
    return {(addr // 4 + j) % 32 for j in range(4)}


def check_ldmatrix(d, stage_bytes, stage, kbase, vbase, smem_k, smem_v):
    box_bytes = BOX_ROWS * 2 * d
    for which in ("k", "v"):
        base0 = kbase if which == "k" else vbase
        smem = smem_k if which == "k" else smem_v
        steps = d // 16  # k steps (K) or m tiles (V)
        for j in range(steps):
            addrs = []
            for lane in range(32):
                if which == "k":
                    # padded layout: row (lane & 7) + 8 ((lane >> 3) & 1), bytes 16 (lane >> 4) + 32 ks
                    row = (lane & 7) + 8 * ((lane >> 3) & 1)
                    chunk = 2 * j + (lane >> 4)
                    lane_base = base0 + ((lane >> 3) & 1) * box_bytes + (lane & 7) * 128 + (((lane >> 4) ^ (lane & 7)) << 4)
                else:
                    row = (lane & 7) + 8 * (lane >> 4)
                    chunk = 2 * j + ((lane >> 3) & 1)
                    lane_base = base0 + (lane >> 4) * box_bytes + (lane & 7) * 128 + ((((lane >> 3) & 1) ^ (lane & 7)) << 4)
                addr = lane_base + stage * stage_bytes
                addr = (addr + (j // 4) * 1024) ^ (32 * (j % 4))  # tc_addr
                assert addr % 16 == 0
                assert smem[addr] == (row, chunk), (which, d, j, lane)
                addrs.append(addr)
            for p in range(4):
                seen = set()
                for a in addrs[8 * p: 8 * p + 8]:
                    bk = banks(a)
                    assert not (seen & bk), ("bank conflict", which, d, j, p)
                    seen |= bk
                assert len(seen) == 32


def check_zero_lines(d):
    halves = d // 64
    for row in range(KTILE):
        for h in range(halves):
            line = tma_chunk_offset(row, 8 * h, d) // 128
            assert (line // (8 * halves)) * 8 + line % 8 == row


def check_placement():
    for d in (64, 128):
        for warps in (2, 4):
            for stages in (2, 3, 4):
                tile = KTILE * 2 * d
                warp_tiles = 2 * stages * tile
                for dyn_base in range(0, 4096, 16):
                    pad = (1024 - dyn_base % 1024) % 1024
                    base = dyn_base + pad
                    assert pad < 1024
                    for w in range(warps):
                        for s in range(stages):
                            k = base + w * warp_tiles + s * tile
                            v = base + w * warp_tiles + stages * tile + s * tile
                            assert k % 1024 == 0 and v % 1024 == 0


def check_tiles(trials=3000):
    rnd = random.Random(1)
    for _ in range(trials):
        bs = rnd.choice([8, 16, 32, 64, 128])
        kvh = rnd.choice([1, 2, 3, 8])
        head = rnd.randrange(kvh)
        warps = rnd.choice([2, 4])
        ctx = rnd.randrange(1, 3000)
        window = rnd.choice([None, rnd.randrange(1, 2000)])
        first = ctx - window if window and ctx > window else 0
        quantum = KTILE * warps
        psize = rnd.choice([quantum * rnd.randrange(1, 40), 0])
        max_parts = rnd.randrange(1, 64)
        if psize <= 0:
            per = (ctx - first + max_parts - 1) // max_parts
            psize = max(quantum, (per + quantum - 1) // quantum * quantum)
        num_parts = (ctx - first + psize - 1) // psize
        nblocks = (ctx + bs - 1) // bs
        # Table: valid entries only for blocks holding attended tokens; others poison (-1).
        ids = list(range(nblocks + 5))
        rnd.shuffle(ids)
        table = [ids[j] if (j + 1) * bs > first else -1 for j in range(nblocks)] + [-1] * 3
        covered = [0] * ctx
        for part in range(num_parts):
            p_start = first + part * psize
            p_end = min(ctx, p_start + psize)
            frm = p_start & ~(KTILE - 1)
            total = (p_end - frm + KTILE - 1) // KTILE
            for warp in range(warps):
                my_tiles = (total - warp + warps - 1) // warps if total > warp else 0
                for i in range(my_tiles):
                    t0 = frm + warp * KTILE + i * warps * KTILE
                    assert t0 % KTILE == 0 and t0 < p_end
                    for b in range(2):
                        t = t0 + BOX_ROWS * b
                        live = not (t >= p_end or t + BOX_ROWS <= p_start)
                        if not live:
                            assert all(x < p_start or x >= p_end for x in range(t, t + BOX_ROWS))
                            continue
                        # one block, attended, and the row the kernel computes
                        assert t // bs == (t + BOX_ROWS - 1) // bs
                        blk = table[t >> (bs.bit_length() - 1)]
                        assert blk >= 0, "an unchecked table entry read"
                        row = blk * kvh * bs + head * bs + (t & (bs - 1))
                        row_bytes = 256
                        assert row * row_bytes == blk * kvh * bs * row_bytes + (head * bs + t % bs) * row_bytes
                    zeroed = set()
                    if t0 < p_start or t0 + KTILE > p_end:
                        zeroed = {r for r in range(KTILE) if not (p_start <= t0 + r < p_end)}
                    for r in range(KTILE):
                        tok = t0 + r
                        if p_start <= tok < p_end:
                            covered[tok] += 1
                            assert r not in zeroed
                        else:
                            assert r in zeroed
        assert covered[:first] == [0] * first and all(c == 1 for c in covered[first:]), (ctx, window, psize)


def main():
    for d in (64, 128):
        for stages in (2, 3, 4):
            stage_bytes = KTILE * 2 * d
            kbase = 8192
            vbase = kbase + stages * stage_bytes
            for stage in range(stages):
                # Each stage's boxes land at that stage's tile (absolute addresses).
                smem_k = check_layout(d, kbase + stage * stage_bytes)
                smem_v = check_layout(d, vbase + stage * stage_bytes)
                check_ldmatrix(d, stage_bytes, stage, kbase, vbase, smem_k, smem_v)
            check_zero_lines(d)
    check_placement()
    check_tiles()
    print("tma_swizzle_emulation: layout, ldmatrix addresses, banks, zeroing, placement, tiles: ok")


if __name__ == "__main__":
    main()
