# Not part of the build: a check of rope_and_cache (kernels/cache.cu) made without a GPU
# (2026-12-02). `python3 kernels/experiments/rope_cache_emulation.py` runs the kernel's
# per-warp, per-lane indexing (the query heads each CTA and warp take, rotate_row's channel
# pairs, inverse-frequency indices and the half-split shuffle) symbolically: every rotated value
# is a tuple (which output of the pair, x0, x1, frequency index), compared with `rope` in
# kernels/elementwise.cu, which rotates pair i = (a, b) as
#   x[a] = x0 * c - x1 * s,  x[b] = x0 * s + x1 * c,  angle = pos * inv_freq[i].
# It also checks that each q value is written exactly once and that the K row a CTA's warp 0
# hands to write_row is the rotated k row. The arithmetic itself (the same f32 operations as
# rope's SASS) is checked on the GPU by crates/kernels-cuda/tests/rope_cache.rs.

MAX_QUERY_WARPS = 8  # kMaxQueryWarps


def rope_ref(row, d, interleaved):
    """elementwise.cu `rope` on one head row of symbolic values."""
    out = list(row)
    half = d // 2
    for i in range(half):
        a, b = (2 * i, 2 * i + 1) if interleaved else (i, i + half)
        x0, x1 = row[a], row[b]
        out[a] = ("a", x0, x1, i)
        out[b] = ("b", x0, x1, i)
    return out


def rotate_row(xs, d, interleaved):
    """cache.cu rotate_row for a whole warp: xs[lane][i] -> ys[lane][i]."""
    kpl = d // 32
    ys = [[None] * kpl for _ in range(32)]
    for lane in range(32):
        x = xs[lane]
        if interleaved:
            for p in range(kpl // 2):
                fi = lane * (kpl // 2) + p
                x0, x1 = x[2 * p], x[2 * p + 1]
                ys[lane][2 * p] = ("a", x0, x1, fi)
                ys[lane][2 * p + 1] = ("b", x0, x1, fi)
        else:
            first = lane < 16
            for i in range(kpl):
                other = xs[lane ^ 16][i]  # __shfl_xor_sync(.., x[i], 16)
                fi = (lane % 16) * kpl + i
                ys[lane][i] = ("a", x[i], other, fi) if first else ("b", other, x[i], fi)
    return ys


def run(tokens, qh, kvh, d, interleaved):
    kpl = d // 32
    q = [[[("q", t, h, c) for c in range(d)] for h in range(qh)] for t in range(tokens)]
    k = [[[("k", t, h, c) for c in range(d)] for h in range(kvh)] for t in range(tokens)]
    writes = {}
    q_out = [[list(row) for row in tok] for tok in q]
    query_warps = min(-(-qh // kvh), MAX_QUERY_WARPS)  # the launcher
    block_warps = 2 + query_warps
    for token in range(tokens):
        for head in range(kvh):  # blockIdx.y
            for warp in range(block_warps):
                if warp >= 2:
                    step = (block_warps - 2) * kvh
                    h = head + (warp - 2) * kvh
                    while h < qh:
                        xs = [[q[token][h][lane * kpl + i] for i in range(kpl)] for lane in range(32)]
                        ys = rotate_row(xs, d, interleaved)
                        for lane in range(32):
                            for i in range(kpl):
                                c = lane * kpl + i
                                key = (token, h, c)
                                writes[key] = writes.get(key, 0) + 1
                                q_out[token][h][c] = ys[lane][i]
                        h += step
                elif warp == 0:
                    xs = [[k[token][head][lane * kpl + i] for i in range(kpl)] for lane in range(32)]
                    ys = rotate_row(xs, d, interleaved)
                    got = [ys[lane][i] for lane in range(32) for i in range(kpl)]
                    want = rope_ref(k[token][head], d, interleaved)
                    assert got == want, ("K row", token, head)
    for t in range(tokens):
        for h in range(qh):
            assert q_out[t][h] == rope_ref(q[t][h], d, interleaved), ("q", t, h)
            for c in range(d):
                assert writes.get((t, h, c)) == 1, ("q written", t, h, c, writes.get((t, h, c)))


def main():
    n = 0
    for d in (64, 128):
        for interleaved in (False, True):
            for kvh, qh in ((1, 1), (2, 2), (2, 8), (8, 32), (1, 12), (2, 5), (3, 7), (1, 40), (4, 64)):
                run(3, qh, kvh, d, interleaved)
                n += 1
    print(f"{n} shapes: q rotated exactly once per value and K rows as rope rotates them")


if __name__ == "__main__":
    main()
