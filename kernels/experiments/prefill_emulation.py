# Not part of the build: a check of paged_prefill_tc.cu made without a GPU.
# `python3 kernels/experiments/prefill_emulation.py [--bf16]` (numpy) runs the kernel's logic
# lane by lane for every CTA of a batch: the host's work list (prefill.rs `work_items`), each
# CTA's key range and tiles, the thread -> chunk mapping of the cp.async loads (through the
# block table, zero-filling outside the CTA's range; a read of a table entry outside the cache
# fails), the 8-bit code conversion pass, ldmatrix (.x4 and .x4.trans) from the byte addresses
# the kernel computes (checking 16-byte alignment and that the 8 rows of each matrix fall in
# distinct bank groups), mma.m16n8k16 from the PTX fragment layouts, the per-warp skipping of
# unattended tiles and of the mask on fully attended ones, the online softmax per row with quad
# shuffles, the scale folding for codes, and the output stores (each output row written exactly
# once). It compares with causal (windowed) softmax attention in f64.
#
# Default: exact arithmetic (f64 everywhere), so the emulation must match to ~1e-12: any
# indexing, masking or fragment mistake shows as an O(1) error. `--bf16` rounds what the GPU
# rounds (P before the P.V mma, and the output) and prints the error to expect on the GPU.
import sys

import numpy as np

ROUND = "--bf16" in sys.argv
rng = np.random.default_rng(1)
LANES = np.arange(32)
G8, T4 = LANES // 4, LANES % 4  # fragment row (g) and column pair (tq) of each lane


def bf16(x):
    """Round to bfloat16 (nearest even), as __float2bfloat16_rn."""
    x = np.asarray(x, dtype=np.float32)
    b = x.view(np.uint32).astype(np.uint64)
    b = ((b + 0x7FFF + ((b >> 16) & 1)) >> 16) << 16
    return b.astype(np.uint32).view(np.float32).astype(np.float64)


def rnd(x):
    return bf16(x) if ROUND else np.asarray(x, dtype=np.float64)


# ---- fragments (PTX ISA, mma.m16n8k16 with 16-bit A/B, f32 C/D) ----
def a_to_mat(a):  # a[lane][reg][half] -> A 16x16
    A = np.zeros((16, 16))
    for reg in range(4):
        for h in range(2):
            row = G8 + (8 if reg in (1, 3) else 0)
            col = 2 * T4 + h + (8 if reg in (2, 3) else 0)
            A[row, col] = a[:, reg, h]
    return A


def b_to_mat(b):  # b[lane][reg][half] -> B 16x8 (k x n)
    B = np.zeros((16, 8))
    for reg in range(2):
        for h in range(2):
            B[2 * T4 + h + 8 * reg, G8] = b[:, reg, h]
    return B


def mma(d, a, b):  # d[lane][4] += A . B, returns the new d
    C = np.zeros((16, 8))
    C[G8, 2 * T4], C[G8, 2 * T4 + 1] = d[:, 0], d[:, 1]
    C[G8 + 8, 2 * T4], C[G8 + 8, 2 * T4 + 1] = d[:, 2], d[:, 3]
    D = a_to_mat(a) @ b_to_mat(b) + C
    return np.stack([D[G8, 2 * T4], D[G8, 2 * T4 + 1], D[G8 + 8, 2 * T4], D[G8 + 8, 2 * T4 + 1]], 1)


def ldmatrix_x4(mem, addr, trans):
    """mem: a shared-memory buffer of 16-bit elements (flat, element i at byte 2 i); addr: the
    byte address each lane gives (lane l: row l % 8 of matrix l / 8). Returns r[lane][i][half]."""
    assert np.all(addr % 16 == 0), "ldmatrix rows must be 16-byte aligned"
    r = np.zeros((32, 4, 2))
    for i in range(4):
        rows = addr[8 * i:8 * i + 8]
        # 8 rows of 16 bytes: conflict-free when they cover all 32 banks once.
        assert len(set((rows // 16) % 8)) == 8, "bank conflict in ldmatrix"
        M = np.stack([mem[a // 2:a // 2 + 8] for a in rows])
        if trans:
            r[:, i, 0], r[:, i, 1] = M[2 * T4, G8], M[2 * T4 + 1, G8]
        else:
            r[:, i, 0], r[:, i, 1] = M[G8, 2 * T4], M[G8, 2 * T4 + 1]
    return r


def quad_max(x):  # __shfl_xor 1, 2 max over lanes 4g .. 4g + 3
    return x.reshape(8, 4).max(1).repeat(4)


def quad_sum(x):
    return x.reshape(8, 4).sum(1).repeat(4)


# ---- host side (prefill.rs) ----
BLOCK_M, THREADS, WARPS = 64, 128, 4


def work_items(starts, ctxs, G, window):
    items = []
    for s, ctx in enumerate(ctxs):
        q_len = starts[s + 1] - starts[s]
        p0, rows = ctx - q_len, q_len * G
        for r0 in range(0, rows, BLOCK_M):
            last = min(r0 + BLOCK_M, rows) - 1
            lo = max(0, p0 + r0 // G + 1 - window) if window else 0
            items.append((p0 + last // G + 1 - lo, s, r0))
    items.sort(key=lambda x: -x[0])  # stable: ties keep batch order
    return [(s, r0) for _, s, r0 in items]


def run(G, D, bs, kv_heads, seqs, window, codes):
    """seqs: (query_len, context_len) per sequence. Returns max |out - ref| / max |ref|."""
    Bc = 64 if D == 64 else 32
    kBytes = 1 if codes else 2
    kRow16 = D * 2 + 16
    kChunksPerRow = D * kBytes // 16
    kKSteps, kNTilesS, kKStepsPV, kNTilesO = D // 16, Bc // 8, Bc // 16, D // 8
    log2e = 1.4426950408889634
    scale = 1 / np.sqrt(D)
    scale2 = scale * log2e
    H = kv_heads * G
    # The cache: blocks of [kv_heads][bs][D] values (codes) and per-token scales; block ids
    # shuffled; blocks before each sequence's first attended one left as -1 in the table.
    n_blocks_total = sum(-(-c // bs) for _, c in seqs) + 2
    ids = rng.permutation(n_blocks_total)
    max_blocks = max(-(-c // bs) for _, c in seqs)
    table = -np.ones((len(seqs), max_blocks), dtype=np.int64)
    Kc = np.zeros((n_blocks_total, kv_heads, bs, D)); Vc = np.zeros_like(Kc)
    Ks = np.zeros((n_blocks_total, kv_heads, bs)); Vs = np.zeros_like(Ks)
    Kdec, Vdec = [], []  # dequantized per sequence: [ctx][kv_heads][D]
    nxt = 0
    for s, (ql, ctx) in enumerate(seqs):
        first = max(0, ctx - ql + 1 - window) if window else 0
        for j in range(-(-ctx // bs)):
            b = ids[nxt]; nxt += 1
            if j >= first // bs:  # released blocks stay -1: the kernel must not read them
                table[s, j] = b
        kd = np.zeros((ctx, kv_heads, D)); vd = np.zeros_like(kd)
        for t in range(ctx):
            b = table[s, t // bs]
            if codes:
                kc = rng.integers(-127, 128, (kv_heads, D)).astype(float)
                vc = rng.integers(-127, 128, (kv_heads, D)).astype(float)
                ks, vs = rng.uniform(0.005, 0.03, kv_heads), rng.uniform(0.005, 0.02, kv_heads)
            else:
                kc = bf16(rng.standard_normal((kv_heads, D)) * 2)
                vc = bf16(rng.standard_normal((kv_heads, D)))
                ks = vs = np.ones(kv_heads)
            if b >= 0:
                Kc[b, :, t % bs], Vc[b, :, t % bs], Ks[b, :, t % bs], Vs[b, :, t % bs] = kc, vc, ks, vs
            kd[t], vd[t] = kc * ks[:, None], vc * vs[:, None]
        Kdec.append(kd); Vdec.append(vd)
    starts = np.concatenate([[0], np.cumsum([ql for ql, _ in seqs])]).astype(int)
    ctxs = [c for _, c in seqs]
    tokens = starts[-1]
    q = bf16(rng.standard_normal((tokens, H, D)))
    out = np.full((tokens, H, D), np.nan)
    writes = np.zeros((tokens, H), dtype=int)
    shift = bs.bit_length() - 1

    def row_offset(seq, t, lo, hi):  # -> (block, slot) or None (zero-fill)
        if t < lo or t >= hi:
            return None
        b = table[seq, t >> shift]
        assert 0 <= b < n_blocks_total, f"read of table entry {t >> shift} = {b}"
        return b, t & (bs - 1)

    items = work_items(starts, ctxs, G, window)
    for blk in range(len(items) * kv_heads):
        head, item = blk % kv_heads, blk // kv_heads
        seq, row0 = items[item]
        q_start = starts[seq]; q_len = starts[seq + 1] - q_start; ctx = ctxs[seq]
        rows = q_len * G; p0 = ctx - q_len
        cta_last = min(row0 + BLOCK_M, rows) - 1
        lo = max(0, p0 + row0 // G - window + 1) if window else 0
        hi = p0 + cta_last // G + 1
        tile_first = lo // Bc
        num_tiles = (hi - 1) // Bc + 1 - tile_first

        def load_tile(t0):
            """The tile as the smem buffers hold it after its cp.async group: 16-bit rows
            (flat, kRow16 bytes per row) or codes and scales."""
            if codes:
                kb = np.full((Bc, D), np.nan); vb = np.full((Bc, D), np.nan)
            else:
                kb = np.full(Bc * kRow16 // 2, np.nan); vb = np.full(Bc * kRow16 // 2, np.nan)
            per = 16 // kBytes  # elements per 16-byte chunk
            seen = set()
            for tid in range(THREADS):
                for i in range(Bc * kChunksPerRow // THREADS):
                    c = tid + THREADS * i
                    row, col = c // kChunksPerRow, c % kChunksPerRow
                    seen.add((row, col))
                    off = row_offset(seq, t0 + row, lo, hi)
                    kv = (np.zeros(per), np.zeros(per)) if off is None else (
                        Kc[off[0], head, off[1], col * per:(col + 1) * per],
                        Vc[off[0], head, off[1], col * per:(col + 1) * per])
                    if codes:
                        kb[row, col * per:(col + 1) * per], vb[row, col * per:(col + 1) * per] = kv
                    else:
                        e = row * kRow16 // 2 + col * per
                        kb[e:e + per], vb[e:e + per] = kv
            assert len(seen) == Bc * kChunksPerRow, "chunks not covered"
            if not codes:
                return kb, vb, None, None
            ksc = np.full(Bc, np.nan); vsc = np.full(Bc, np.nan)
            for tid in range(2 * Bc):
                row = tid % Bc
                off = row_offset(seq, t0 + row, lo, hi)
                val = 0.0 if off is None else (Ks if tid < Bc else Vs)[off[0], head, off[1]]
                (ksc if tid < Bc else vsc)[row] = val
            return kb, vb, ksc, vsc

        def convert_tile(kb, vb):  # codes -> 16-bit rows (exact)
            k16 = np.full(Bc * kRow16 // 2, np.nan); v16 = np.full(Bc * kRow16 // 2, np.nan)
            groups = D // 8
            seen = set()
            for tid in range(THREADS):
                for i in range(Bc * groups // THREADS):
                    c = tid + THREADS * i
                    row, col = c // groups, c % groups
                    seen.add((row, col))
                    e = row * kRow16 // 2 + col * 8
                    k16[e:e + 8] = kb[row, col * 8:col * 8 + 8]
                    v16[e:e + 8] = vb[row, col * 8:col * 8 + 8]
            assert len(seen) == Bc * groups
            return k16, v16

        tiles = [load_tile((tile_first + it) * Bc) for it in range(num_tiles)]
        for warp in range(WARPS):
            wr0 = row0 + 16 * warp
            warp_rows = wr0 < rows
            wr_last = min(wr0 + 15, rows - 1)
            wpos_lo, wpos_hi = p0 + wr0 // G, p0 + wr_last // G
            wfirst_lo = wpos_lo - window + 1 if window else 0
            wfirst_hi = wpos_hi - window + 1 if window else 0
            pos = np.zeros((32, 2), dtype=int); first = np.zeros((32, 2), dtype=int)
            qa = np.zeros((32, kKSteps, 4, 2))
            for h in range(2):
                r = wr0 + G8 + 8 * h
                live = r < rows
                pos[:, h] = p0 + r // G
                first[:, h] = pos[:, h] - window + 1 if window else 0
                for lane in range(32):
                    if not live[lane]:
                        continue
                    qrow = q[q_start + r[lane] // G, head * G + r[lane] % G]
                    for s_ in range(kKSteps):
                        u = 8 * s_ + T4[lane]  # 32-bit word index: elements 2u, 2u + 1
                        qa[lane, s_, h] = qrow[2 * u:2 * u + 2]
                        u = 8 * s_ + 4 + T4[lane]
                        qa[lane, s_, 2 + h] = qrow[2 * u:2 * u + 2]
            m = np.full((32, 2), -np.inf); l = np.zeros((32, 2))
            o = np.zeros((32, kNTilesO, 4))
            mi, mr = LANES // 8, LANES % 8
            k_lane = (8 * (mi // 2) + mr) * kRow16 + 16 * (mi % 2)
            v_lane = (8 * (mi % 2) + mr) * kRow16 + 16 * (mi // 2)
            for it in range(num_tiles):
                t0 = (tile_first + it) * Bc
                kb, vb, ksc, vsc = tiles[it]
                if codes:
                    kb, vb = convert_tile(kb, vb)
                attended = warp_rows and t0 <= wpos_hi and t0 + Bc - 1 >= wfirst_lo
                if not attended:
                    continue
                s = np.zeros((32, kNTilesS, 4))
                for ks in range(kKSteps):
                    for np_ in range(kNTilesS // 2):
                        b = ldmatrix_x4(kb, k_lane + np_ * 16 * kRow16 + ks * 32, trans=False)
                        s[:, 2 * np_] = mma(s[:, 2 * np_], qa[:, ks], b[:, 0:2])
                        s[:, 2 * np_ + 1] = mma(s[:, 2 * np_ + 1], qa[:, ks], b[:, 2:4])
                full = t0 + Bc - 1 <= wpos_lo and t0 >= wfirst_hi
                tile_max = np.full((32, 2), -np.inf)
                for n in range(kNTilesS):
                    for c in range(2):
                        key = 8 * n + 2 * T4 + c
                        ks_ = ksc[key] * scale2 if codes else scale2
                        for h in range(2):
                            x = s[:, n, 2 * h + c] * ks_
                            if not full:
                                t = t0 + key
                                x = np.where((t <= pos[:, h]) & (t >= first[:, h]), x, -np.inf)
                            elif ROUND is False:
                                # The skipped mask must not have masked anything.
                                t = t0 + key
                                live = (wr0 + G8 + 8 * h) < rows
                                assert np.all(((t <= pos[:, h]) & (t >= first[:, h])) | ~live)
                            s[:, n, 2 * h + c] = x
                            tile_max[:, h] = np.maximum(tile_max[:, h], x)
                m_use = np.zeros((32, 2))
                for h in range(2):
                    tile_max[:, h] = quad_max(tile_max[:, h])
                    m_new = np.maximum(m[:, h], tile_max[:, h])
                    m_use[:, h] = np.where(m_new == -np.inf, 0.0, m_new)
                    alpha = np.exp2(m[:, h] - m_use[:, h])
                    m[:, h] = m_new
                    l[:, h] *= alpha
                    o[:, :, 2 * h] *= alpha[:, None]; o[:, :, 2 * h + 1] *= alpha[:, None]
                for n in range(kNTilesS):
                    for c in range(4):
                        p = np.exp2(s[:, n, c] - m_use[:, c // 2])
                        l[:, c // 2] += p
                        s[:, n, c] = p
                for kk in range(kKStepsPV):
                    if codes:
                        vs0 = (vsc[16 * kk + 2 * T4], vsc[16 * kk + 2 * T4 + 1])
                        vs1 = (vsc[16 * kk + 8 + 2 * T4], vsc[16 * kk + 8 + 2 * T4 + 1])
                    else:
                        vs0 = vs1 = (1.0, 1.0)
                    pa = np.zeros((32, 4, 2))
                    pa[:, 0] = np.stack([s[:, 2 * kk, 0] * vs0[0], s[:, 2 * kk, 1] * vs0[1]], 1)
                    pa[:, 1] = np.stack([s[:, 2 * kk, 2] * vs0[0], s[:, 2 * kk, 3] * vs0[1]], 1)
                    pa[:, 2] = np.stack([s[:, 2 * kk + 1, 0] * vs1[0], s[:, 2 * kk + 1, 1] * vs1[1]], 1)
                    pa[:, 3] = np.stack([s[:, 2 * kk + 1, 2] * vs1[0], s[:, 2 * kk + 1, 3] * vs1[1]], 1)
                    pa = rnd(pa)
                    for jp in range(kNTilesO // 2):
                        b = ldmatrix_x4(vb, v_lane + kk * 16 * kRow16 + jp * 32, trans=True)
                        o[:, 2 * jp] = mma(o[:, 2 * jp], pa, b[:, 0:2])
                        o[:, 2 * jp + 1] = mma(o[:, 2 * jp + 1], pa, b[:, 2:4])
            for h in range(2):
                lsum = quad_sum(l[:, h])
                for lane in range(32):
                    r = wr0 + G8[lane] + 8 * h
                    if r >= rows:
                        continue
                    inv = 1 / lsum[lane] if lsum[lane] > 0 else 0.0
                    tok, qh = q_start + r // G, head * G + r % G
                    for j in range(kNTilesO):
                        u = 4 * j + T4[lane]
                        out[tok, qh, 2 * u:2 * u + 2] = rnd(o[lane, j, 2 * h:2 * h + 2] * inv)
                    if T4[lane] == 0:
                        writes[tok, qh] += 1
    assert np.all(writes == 1), "every output row written exactly once"
    assert np.all(np.isfinite(out)), "non-finite output"
    # f64 reference.
    err, ref_max = 0.0, 1e-30
    for s, (ql, ctx) in enumerate(seqs):
        for i in range(ql):
            p = ctx - ql + i
            f = max(0, p - window + 1) if window else 0
            for h in range(H):
                kv = h // G
                lg = Kdec[s][f:p + 1, kv] @ q[starts[s] + i, h] * scale
                w = np.exp(lg - lg.max())
                ref = w @ Vdec[s][f:p + 1, kv] / w.sum()
                err = max(err, np.abs(out[starts[s] + i, h] - ref).max())
                ref_max = max(ref_max, np.abs(ref).max())
    return err / ref_max


cases = [
    # (G, D, block_size, kv_heads, [(query_len, context_len)], window)
    (1, 64, 16, 2, [(70, 70), (1, 33), (20, 150)], 0),
    (4, 128, 16, 1, [(40, 40), (1, 100), (17, 81)], 0),
    (3, 64, 8, 1, [(45, 45), (9, 200), (1, 1)], 0),
    (8, 128, 32, 1, [(20, 20), (1, 130), (13, 77)], 0),
    (4, 64, 32, 2, [(100, 100), (1, 90)], 37),
    (3, 128, 8, 1, [(30, 120), (50, 50), (1, 61)], 20),
    (5, 64, 16, 1, [(26, 26), (7, 300)], 64),
    (7, 128, 16, 1, [(10, 10), (1, 40), (19, 58)], 1),
    (2, 128, 32, 1, [(96, 96)], 0),
]
worst = 0.0
for codes in (False, True):
    for G, D, bs, kvh, seqs, window in cases:
        e = run(G, D, bs, kvh, seqs, window, codes)
        worst = max(worst, e)
        print(f"{'codes ' if codes else '16-bit'} G={G} d={D} bs={bs} kv_heads={kvh} "
              f"seqs={seqs} window={window}: rel err {e:.2e}")
        assert e < (2e-2 if ROUND else 1e-10), e
print(f"ok (worst {worst:.2e})")
