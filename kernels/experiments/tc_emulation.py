# Not part of the build: a check of paged_attention_tc.cu made without a GPU (2026-12-02).
# `python3 kernels/experiments/tc_emulation.py` (numpy) runs the kernel's per-lane logic for one
# CTA with mma.m16n8k16 emulated from the PTX ISA fragment layouts and compares with softmax
# attention in f64, including the partial results the merge reads.
# Lane-level emulation of paged_decode_tc for one CTA (one KV head, one partition), following
# the kernel's code line by line, with mma.m16n8k16 emulated from the PTX fragment layouts.
import numpy as np
rng = np.random.default_rng(0)

def frag_A_to_mat(a):  # a[lane][4 regs][2 halves] -> A 16x16
    A = np.zeros((16, 16))
    for lane in range(32):
        g, t = lane // 4, lane % 4
        for reg in range(4):
            for h in range(2):
                row = g + (8 if reg in (1, 3) else 0)
                col = t * 2 + h + (8 if reg in (2, 3) else 0)
                A[row, col] = a[lane][reg][h]
    return A

def frag_B_to_mat(b):  # b[lane][2 regs][2 halves] -> B 16x8 (k x n)
    B = np.zeros((16, 8))
    for lane in range(32):
        g, t = lane // 4, lane % 4
        for reg in range(2):
            for h in range(2):
                B[t * 2 + h + 8 * reg, g] = b[lane][reg][h]
    return B

def mma(d, a, b):  # d[lane][4], returns new d
    A, B = frag_A_to_mat(a), frag_B_to_mat(b)
    C = np.zeros((16, 8))
    for lane in range(32):
        g, t = lane // 4, lane % 4
        C[g, 2 * t] = d[lane][0]; C[g, 2 * t + 1] = d[lane][1]
        C[g + 8, 2 * t] = d[lane][2]; C[g + 8, 2 * t + 1] = d[lane][3]
    D = A @ B + C
    out = []
    for lane in range(32):
        g, t = lane // 4, lane % 4
        out.append([D[g, 2 * t], D[g, 2 * t + 1], D[g + 8, 2 * t], D[g + 8, 2 * t + 1]])
    return out

def run(G, HD, ctx, p_start, p_end, scale, kWarps=2, kTile=16, codes=False):
    q = rng.standard_normal((G, HD)); K = rng.standard_normal((ctx, HD)) * 2; V = rng.standard_normal((ctx, HD))
    ks_ = np.ones(ctx); vs_ = np.ones(ctx)
    if codes:  # int8-like codes and one scale per token: K = ks * Kc
        ks_ = rng.uniform(0.01, 0.05, ctx); vs_ = rng.uniform(0.01, 0.05, ctx)
        Kc = rng.integers(-127, 128, (ctx, HD)).astype(float); Vc = rng.integers(-127, 128, (ctx, HD)).astype(float)
        K = Kc * ks_[:, None]; V = Vc * vs_[:, None]
    else:
        Kc, Vc = K, V
    log2e = 1.4426950408889634
    kKSteps, kNTiles = HD // 16, HD // 8
    scale2 = scale * log2e
    warp_state = []
    for warp in range(kWarps):
        m = [-np.inf] * 32; l = [0.0] * 32; o = [[[0.0, 0.0] for _ in range(kNTiles)] for _ in range(32)]
        qa = []
        for lane in range(32):
            r, kq = lane // 4, (lane % 4) * 2
            live = r < G
            regs = []
            for s in range(kKSteps):
                a0 = [q[r, 16*s+kq], q[r, 16*s+kq+1]] if live else [0, 0]
                a2 = [q[r, 16*s+kq+8], q[r, 16*s+kq+9]] if live else [0, 0]
                regs.append([a0, [0, 0], a2, [0, 0]])
            qa.append(regs)
        tiles_total = (p_end - p_start + kTile - 1) // kTile
        my_tiles = (tiles_total - warp + kWarps - 1) // kWarps if tiles_total > warp else 0
        my_first = p_start + warp * kTile
        for i in range(my_tiles):
            t0 = my_first + i * kWarps * kTile
            # smem tile (zero for invalid tokens)
            Kt = np.zeros((kTile, HD)); Vt = np.zeros((kTile, HD)); kst = np.zeros(kTile); vst = np.zeros(kTile)
            for row in range(kTile):
                t = t0 + row
                if p_start <= t < p_end:
                    Kt[row] = Kc[t]; Vt[row] = Vc[t]
                    kst[row] = ks_[t] if codes else 1.0; vst[row] = vs_[t] if codes else 1.0
            s = []
            for n in range(2):
                d = [[0.0] * 4 for _ in range(32)]
                for ks in range(kKSteps):
                    a = [qa[lane][ks] for lane in range(32)]
                    b = []
                    for lane in range(32):
                        r, kq = lane // 4, (lane % 4) * 2
                        krow = Kt[8 * n + r]
                        b.append([[krow[16*ks+kq], krow[16*ks+kq+1]], [krow[16*ks+kq+8], krow[16*ks+kq+9]]])
                    d = mma(d, a, b)
                s.append(d)
            # per lane softmax
            newm = [0] * 32; alphas = [0] * 32; ps = []
            tmax = []
            for lane in range(32):
                kq = (lane % 4) * 2
                mx = -np.inf
                vals = {}
                for n in range(2):
                    for c in range(2):
                        t = t0 + 8 * n + kq + c
                        logit = s[n][lane][c] * (kst[8 * n + kq + c] if codes else 1.0)
                        x = logit * scale2 if p_start <= t < p_end else -np.inf
                        vals[(n, c)] = x
                        mx = max(mx, x)
                tmax.append(mx); ps.append(vals)
            for lane in range(32):  # quad max
                base = lane - lane % 4
                tm = max(tmax[base:base + 4])
                mn = max(m[lane], tm)
                alpha = 1.0 if mn == -np.inf else 2 ** (m[lane] - mn)
                p = {}
                for n in range(2):
                    for c in range(2):
                        p[(n, c)] = 0.0 if mn == -np.inf else 2 ** (ps[lane][(n, c)] - mn)
                        l[lane] = l[lane] * (alpha if (n == 0 and c == 0) else 1.0) + p[(n, c)]
                m[lane] = mn
                for j in range(kNTiles):
                    o[lane][j][0] *= alpha; o[lane][j][1] *= alpha
                ps[lane] = p
            def vsc(lane, tok):
                return vst[tok] if codes else 1.0
            pa = [[[ps[lane][(0, 0)] * vsc(lane, (lane % 4) * 2), ps[lane][(0, 1)] * vsc(lane, (lane % 4) * 2 + 1)], [0, 0],
                   [ps[lane][(1, 0)] * vsc(lane, 8 + (lane % 4) * 2), ps[lane][(1, 1)] * vsc(lane, 9 + (lane % 4) * 2)], [0, 0]] for lane in range(32)]
            for j in range(kNTiles):
                b = []
                for lane in range(32):
                    r, kq = lane // 4, (lane % 4) * 2
                    ch = 8 * j + r
                    b.append([[Vt[kq, ch], Vt[kq + 1, ch]], [Vt[kq + 8, ch], Vt[kq + 9, ch]]])
                d = [[o[lane][j][0], o[lane][j][1], 0, 0] for lane in range(32)]
                d = mma(d, pa, b)
                for lane in range(32):
                    o[lane][j][0], o[lane][j][1] = d[lane][0], d[lane][1]
        # quad sum of l
        lsum = [sum(l[lane - lane % 4: lane - lane % 4 + 4]) for lane in range(32)]
        warp_state.append((m, lsum, o))
    # merge
    out = np.zeros((G, HD)); mg_all = []; lg_all = []
    for g in range(G):
        lane = 4 * g
        mg = max(ws[0][lane] for ws in warp_state)
        lg = sum(0 if ws[0][lane] == -np.inf else ws[1][lane] * 2 ** (ws[0][lane] - mg) for ws in warp_state)
        acc = np.zeros(HD)
        for ws in warp_state:
            for ln in range(4 * g, 4 * g + 4):
                mine = 0 if ws[0][ln] == -np.inf else 2 ** (ws[0][ln] - mg)
                kq = (ln % 4) * 2
                for j in range(kNTiles):
                    acc[8 * j + kq] += ws[2][ln][j][0] * mine
                    acc[8 * j + kq + 1] += ws[2][ln][j][1] * mine
        out[g] = acc / lg
        mg_all.append(mg / log2e); lg_all.append(lg)
    # reference
    ref = np.zeros((G, HD))
    for g in range(G):
        lg = (K[p_start:p_end] @ q[g]) * scale
        w = np.exp(lg - lg.max())
        ref[g] = (w / w.sum()) @ V[p_start:p_end]
        assert abs(mg_all[g] - lg.max()) < 1e-9, (mg_all[g], lg.max())
        assert abs(lg_all[g] - w.sum()) < 1e-6 * w.sum()
    return np.abs(out - ref).max() / np.abs(ref).max()

for codes in (False, True):
    for (G, HD, ctx, ps, pe) in [(4, 64, 100, 0, 100), (1, 64, 40, 7, 40), (8, 128, 300, 32, 97), (3, 64, 20, 3, 5), (5, 128, 70, 0, 70)]:
        e = run(G, HD, ctx, ps, pe, 1 / np.sqrt(HD), codes=codes)
        print("codes" if codes else "16-bit", G, HD, ctx, ps, pe, "rel err", e)
        assert e < 1e-9
print("ok")
