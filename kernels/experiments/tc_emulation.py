# Not part of the build: a check of paged_attention_tc.cu made without a GPU (2026-12-02).
# `python3 kernels/experiments/tc_emulation.py` (numpy) runs the kernel's per-lane logic for one
# CTA with mma.m16n8k16 emulated from the PTX ISA fragment layouts and compares with softmax
# attention in f64, including the partial results the merge reads. int4 (run_int4, rewritten
# 2026-12-02 for the fp16 body): the loader lane by lane (own-row copies, zero-fill, the
# (scale, min) rows and their zeroed pads), ldmatrix / ldmatrix.trans from the PTX layouts with
# their bank checks, the nib16 patterns (asserted equal to 1024 + w code for every fragment
# register), the permuted channels, sigma, the fold as an mma (hi / lo B), f, the min sums and
# the codes' offset by mma, the output map, for every int4 group size at d 64 / 128, bf16 and
# fp16 activations; `--round` rounds what the GPU rounds (fp16 B, truncated mma results, the
# output; `--no-out-round` keeps the output exact). int8 (2026-12-02, run_int8):
# the transposed fp16 body, the loader lane by lane (shuffles, ballot, swizzled K chunks),
# shared-memory bank checks, the xor/byte_perm code pairs, ldmatrix.trans, sigma and f.
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

# ---- int4 (paged_attention_tc.cu with KVS_TC_INT4: its own, transposed kernel body) ----
# S^T = K q^T and O^T = V^T P^T: the 16 rows of A are tokens (q . K) or channels (P . V), the
# 8 columns of B the query heads; both fp16 mma. Nibbles stay packed in the tiles; ldmatrix
# (.trans for V) brings a lane its words, and one lop3 per pair (plus a shift per word) makes
# fp16 1024 + code (nibbles 0, 2) or 1024 + 16 code (1, 3). q . K: B = q 2^sigma (divided by
# 16 where the codes carry 16), per group S'_g, then
#   logit 2^sigma = sum_g s_g S'_g + [sum_g s_g (-1024 Bsum_g) + m_g Qsum_g]
# with the bracket from one mma over the (scale, min) rows. P . V: B_g = fp16(p s_g f), sum_t
# B_g,t (ones mma) and sum_t p_t m_t,g (an mma over the (scale, min) rows transposed) in one
# accumulator; O = ((O' - 1024 sum_t B_g,t) / w) / f + sum_t p_t m_t,g.
ROUND = "--round" in __import__("sys").argv  # round what the GPU rounds (P * s, the output)



def to_act(x, scalar):  # round to the activation type (nearest even)
    if scalar == "f16":
        return float(np.float16(x))
    b = int(np.array([x], dtype=np.float32).view(np.uint32)[0])
    b = ((b + 0x7FFF + ((b >> 16) & 1)) >> 16) << 16
    return float(np.array([b], dtype=np.uint32).view(np.float32)[0])





def prmt(x, y, sel):  # __byte_perm(x, y, sel)
    b = [(x >> (8 * k)) & 0xFF for k in range(4)] + [(y >> (8 * k)) & 0xFF for k in range(4)]
    return sum(b[(sel >> (4 * n)) & 7] << (8 * n) for n in range(4))



def movmatrix_trans(frag):  # movmatrix.m8n8.trans.b16: frag[lane] = [M[g][2t], M[g][2t + 1]]
    M = np.zeros((8, 8))
    for lane in range(32):
        M[lane // 4, 2 * (lane % 4)], M[lane // 4, 2 * (lane % 4) + 1] = frag[lane]
    return [[M.T[lane // 4, 2 * (lane % 4)], M.T[lane // 4, 2 * (lane % 4) + 1]] for lane in range(32)]


def nib16(w, mask, weight, want=None):  # nib16<kMask>: (w & mask) | 0x64006400, an fp16 pair
    v = (w & mask) | 0x64006400
    out = [f16_value(v & 0xFFFF), f16_value(v >> 16)]
    if want is not None:
        assert out == [1024.0 + weight * c for c in want], (out, want)
    return out


def nibble_pairs(w):  # [(mask, weight, word)] of p[0..3]: nibbles 0/4, 1/5 of w, then of w >> 8
    return [(kNibLo, 1, w), (kNibHi, 16, w), (kNibLo, 1, w >> 8), (kNibHi, 16, w >> 8)]


kNibLo, kNibHi = 0x000F000F, 0x00F000F0


def ldmatrix(buf, addrs, nmat, trans):  # ldmatrix.x{nmat}(.trans).b16: lane L addresses row L % 8 of matrix L / 8
    regs = [[0] * nmat for _ in range(32)]
    for mi in range(nmat):
        rows = addrs[8 * mi:8 * mi + 8]
        assert banks_distinct(sorted(set(rows)), 16), "ldmatrix phase conflict-free (one row read by several lanes: a broadcast)"
        el = [[int.from_bytes(buf[a + 2 * c:a + 2 * c + 2], "little") for c in range(8)] for a in rows]
        for ln in range(32):
            g, t = ln // 4, ln % 4
            if trans:
                regs[ln][mi] = el[2 * t][g] | (el[2 * t + 1][g] << 16)
            else:
                regs[ln][mi] = el[g][2 * t] | (el[g][2 * t + 1] << 16)
    return regs


def online_softmax_transposed(st, m, l):  # the transposed bodies' online softmax (m, l updated in place)
    pr = np.zeros((32, 4)); alpha = np.ones((32, 2))
    for e in range(2):
        for ln in range(32):  # max over the lanes g of column t (xor 4, 8, 16)
            same_t = [x_ for x_ in range(32) if LANE_T[x_] == LANE_T[ln]]
            tmax = max(max(st[x_, e], st[x_, 2 + e]) for x_ in same_t)
            mn = max(m[ln, e], tmax)
            alpha[ln, e] = 1.0 if mn == -np.inf else 2 ** (m[ln, e] - mn)
            pr[ln, e] = 0.0 if mn == -np.inf else 2 ** (st[ln, e] - mn)
            pr[ln, 2 + e] = 0.0 if mn == -np.inf else 2 ** (st[ln, 2 + e] - mn)
            l[ln, e] = l[ln, e] * alpha[ln, e] + pr[ln, e] + pr[ln, 2 + e]
            m[ln, e] = mn
    return pr, alpha


def lowered_f(smax, fbits):  # lowered_f: f's bits given the warp's max V scale of the tile
    sbits = int(np.array([smax], np.float32).view(np.uint32)[0])
    return min(fbits, (268 << 23) - (sbits & 0x7F800000))


def f_ratio(fnew, fbits):  # f_new / f, exact: f_new times 1 / f (bits (254 << 23) - fbits)
    as_f32 = lambda b: float(np.array([b], np.uint32).view(np.float32)[0])
    return as_f32(fnew) * as_f32((254 << 23) - fbits)


def half_lo(word):  # the low half of a 32-bit word as fp16
    return f16_value(word & 0xFFFF)


def run_int4(G, HD, GS, ctx, p_start, p_end, scale, scalar="bf16", kWarps=2, kTile=16, kStages=4,
             v_scale=(0.05, 0.2), zero_rows=(), q_bias=0.0):
    # Values as kv-quant stores them: codes 0..15 (two per byte, low nibble = even channel) and an
    # f16 (scale >= 0, min) per (token, group); x = code * s + m.
    NG = HD // GS
    q = np.array([[to_act(x, scalar) for x in row] for row in rng.standard_normal((G, HD)) + q_bias])
    Kc = rng.integers(0, 16, (ctx, HD)); Vc = rng.integers(0, 16, (ctx, HD))
    f16 = lambda lo, hi: rng.uniform(lo, hi, (ctx, NG)).astype(np.float16).astype(float)
    Ks, Km = f16(0.05, 0.4), f16(-3, -0.5)
    Vs = np.exp(rng.uniform(np.log(v_scale[0]), np.log(v_scale[1]), (ctx, NG))).astype(np.float16).astype(float)
    Vm = f16(-1.5, 0)
    for z in zero_rows:  # an all-zero token: codes, scales and mins 0
        Kc[z] = 0; Vc[z] = 0; Ks[z] = 0; Km[z] = 0; Vs[z] = 0; Vm[z] = 0
    grp_of = np.arange(HD) // GS
    K = Kc * Ks[:, grp_of] + Km[:, grp_of]; V = Vc * Vs[:, grp_of] + Vm[:, grp_of]
    packb = lambda C: b''.join(bytes(int(C[t, 2 * c]) | (int(C[t, 2 * c + 1]) << 4) for c in range(HD // 2)) for t in range(ctx))
    Kflat, Vflat = packb(Kc), packb(Vc)  # token tok's row at tok * HD / 2
    pbytes = lambda S, M: b''.join(np.array([[S[t, i], M[t, i]] for i in range(NG)], np.float16).tobytes() for t in range(ctx))
    Kpflat, Vpflat = pbytes(Ks, Km), pbytes(Vs, Vm)  # (scale, min) rows, 4 NG bytes each
    log2e = 1.4426950408889634
    kSegs, kSPG, kMTiles = HD // 32, GS // 32, HD // 16
    RB, SRB, PRB = HD // 2 + 16, 4 * NG, 16  # padded code rows; (scale, min) row bytes, padded
    kChunks = HD // 32  # 16-byte chunks of a code row
    scale2 = scale * log2e
    g_, t_ = LANE_G, LANE_T
    kappa = 2.0 ** -16
    rnd16 = to_f16 if ROUND else (lambda v: v)
    # Prologue: q^T 2^sigma in fp16 (channels c0, c0 + 4 | c0 + 1, c0 + 5 / 16), Bsum and Qsum per
    # group, the fold's B (group t of head g), qscale.
    x = np.zeros((32, 2 * kSegs, 4))
    for ln in range(32):
        for s_ in range(2 * kSegs):
            c0 = 32 * (s_ // 2) + 8 * t_[ln] + 2 * (s_ % 2)
            for i, c in enumerate((c0, c0 + 4, c0 + 1, c0 + 5)):
                x[ln, s_, i] = q[g_[ln], c] if g_[ln] < G else 0.0
    amax = np.array([np.abs(x[4 * g_[ln]:4 * g_[ln] + 4]).max() for ln in range(32)])
    ebits = [max((int(np.array([a], np.float32).view(np.uint32)[0]) >> 23) & 0xFF, 42) for a in amax]
    qf = np.array([float(np.array([(268 - e) << 23], np.uint32).view(np.float32)[0]) for e in ebits])
    inv_qf = np.array([float(np.array([(e - 14) << 23], np.uint32).view(np.float32)[0]) for e in ebits])
    bsum = np.zeros((32, NG)); qsum = np.zeros((32, NG))
    for ln in range(32):
        if amax[ln] > 0:
            assert 2 ** 14 <= amax[ln] * qf[ln] < 2 ** 15
        for s_ in range(2 * kSegs):
            v = [to_f16(x[ln, s_, 0] * qf[ln]), to_f16(x[ln, s_, 1] * qf[ln]), to_f16(x[ln, s_, 2] * qf[ln] / 16), to_f16(x[ln, s_, 3] * qf[ln] / 16)]
            assert v == [x[ln, s_, 0] * qf[ln], x[ln, s_, 1] * qf[ln], x[ln, s_, 2] * qf[ln] / 16, x[ln, s_, 3] * qf[ln] / 16], "q 2^sigma exact"
            bsum[ln, s_ // (2 * kSPG)] += sum(v)
            qsum[ln, s_ // (2 * kSPG)] += v[0] + v[1] + 16 * (v[2] + v[3])
            x[ln, s_] = v
    qb = [[[[x[ln, s_, 0], x[ln, s_, 1]], [x[ln, s_, 2], x[ln, s_, 3]]] for s_ in range(2 * kSegs)] for ln in range(32)]
    # LDS.128 of q_frag[j][lane]: each quarter warp reads 128 contiguous bytes.
    for q4 in range(4):
        assert banks_distinct([16 * ln for ln in range(8 * q4, 8 * q4 + 8)], 16)
    quad = lambda a: np.array([a[4 * g_[ln]:4 * g_[ln] + 4].sum(0) for ln in range(32)])
    bsum, qsum = quad(bsum), quad(qsum)
    fold_b = []
    for ln in range(32):
        fb = bsum[ln, t_[ln]] if t_[ln] < NG else 0.0
        fq = qsum[ln, t_[ln]] if t_[ln] < NG else 0.0
        vb, vq = -1024.0 * kappa * fb, kappa * fq
        hi = [rnd16(vb), rnd16(vq)]
        fold_b.append([hi, [rnd16(vb - hi[0]), rnd16(vq - hi[1])]])
        h = g_[ln]
        if h < G and t_[ln] < NG:  # Qsum of the weighted B values is q 2^sigma over the group
            assert abs(fq - q[h, GS * t_[ln]:GS * (t_[ln] + 1)].sum() * qf[ln]) <= 1e-9 * max(1.0, abs(fq))
    qscale = np.array([[scale2 * inv_qf[4 * (2 * t_[ln] + e)] for e in range(2)] for ln in range(32)])
    warp_state = []
    for warp in range(kWarps):
        m = np.full((32, 2), -np.inf); l = np.zeros((32, 2)); yv = np.zeros((32, 4))
        o = np.zeros((32, kMTiles, 4)); fbits = 253 << 23
        tiles_total = (p_end - p_start + kTile - 1) // kTile
        my_tiles = (tiles_total - warp + kWarps - 1) // kWarps if tiles_total > warp else 0
        my_first = p_start + warp * kTile
        # Shared memory of the warp's stages: pads of the (scale, min) rows zeroed in the prologue.
        stages = [(bytearray(kTile * RB), bytearray(kTile * RB), bytearray(kTile * PRB), bytearray(kTile * PRB)) for _ in range(kStages)]
        def load(stage, t0):  # load_tile, lane by lane: lane l copies its own token's rows
            kb, vb, kp, vp = stages[stage]
            for ln in range(32):
                r = ln % kTile; tok = t0 + r
                live = p_start <= tok < p_end
                row = tok * (HD // 2) + 16 * (ln // kTile) if live else 0
                for i in range(kChunks // 2):
                    col = ln // kTile + 2 * i
                    src = row + 32 * i
                    kb[r * RB + 16 * col:r * RB + 16 * col + 16] = Kflat[src:src + 16] if live else bytes(16)
                    vb[r * RB + 16 * col:r * RB + 16 * col + 16] = Vflat[src:src + 16] if live else bytes(16)
                src = tok * SRB if live else 0
                dst = kp if ln < kTile else vp
                dst[r * PRB:r * PRB + SRB] = (Kpflat if ln < kTile else Vpflat)[src:src + SRB] if live else bytes(SRB)
        for s_ in range(kStages - 1):
            if s_ < my_tiles:
                load(s_, my_first + s_ * kWarps * kTile)
        lane_off = [((ln & 7) + 8 * ((ln >> 3) & 1)) * RB + 16 * (ln >> 4) for ln in range(32)]
        for i in range(my_tiles):
            nxt = i + kStages - 1
            if nxt < my_tiles:
                load(nxt % kStages, my_first + nxt * kWarps * kTile)
            kb, vb, kp, vp = stages[i % kStages]
            assert all(kp[r * PRB + c] == 0 and vp[r * PRB + c] == 0 for r in range(kTile) for c in range(SRB, PRB))
            t0 = my_first + i * kWarps * kTile
            tl = lambda tok: p_start <= tok < p_end
            # The fold: A = (scale, min) rows by ldmatrix.x4 (lane L: row L % 16; k 8.. = k 0..).
            pa = ldmatrix(kp, [PRB * (ln % 16) for ln in range(32)], 4, False)
            a = []
            for ln in range(32):
                w0, w1 = pa[ln][0], pa[ln][1]
                assert pa[ln][2:] == [w0, w1]
                tk = t_[ln]
                for rr, wd in ((g_[ln], w0), (g_[ln] + 8, w1)):  # word t of row rr = group t's (s, m)
                    want = [Ks[t0 + rr, tk], Km[t0 + rr, tk]] if (tk < NG and tl(t0 + rr)) else [0.0, 0.0]
                    assert [f16_value(wd & 0xFFFF), f16_value(wd >> 16)] == want
                h0 = [f16_value(w0 & 0xFFFF), f16_value(w0 >> 16)]; h1 = [f16_value(w1 & 0xFFFF), f16_value(w1 >> 16)]
                a.append([h0, h1, h0, h1])
            st = np.array(mma_tc([[0.0] * 4 for _ in range(32)], a, fold_b)) * 65536.0
            acc = None
            for j in range(kSegs):
                if j % 2 == 0:
                    words = ldmatrix(kb, [lane_off[ln] + 16 * j for ln in range(32)], 4, False)
                if j % kSPG == 0:
                    acc = [[0.0] * 4 for _ in range(32)]
                for h in range(2):  # k step 2 j + h
                    a = []
                    for ln in range(32):
                        g, t = g_[ln], t_[ln]
                        xw, yw = words[ln][2 * (j % 2)], words[ln][2 * (j % 2) + 1]
                        regs = []
                        for wd, rr in ((xw, g), (yw, g + 8)):
                            c0 = 32 * j + 8 * t + 2 * h
                            cod = lambda c: Kc[t0 + rr, c] if tl(t0 + rr) else 0
                            mk, wt, src = nibble_pairs(wd)[2 * h]
                            p0 = nib16(src, mk, wt, [cod(c0), cod(c0 + 4)])
                            mk, wt, src = nibble_pairs(wd)[2 * h + 1]
                            p1 = nib16(src, mk, wt, [cod(c0 + 1), cod(c0 + 5)])
                            regs.append((p0, p1))
                        a.append([regs[0][0], regs[1][0], regs[0][1], regs[1][1]])
                    acc = mma_tc(acc, a, [qb[ln][2 * j + h] for ln in range(32)])
                if j % kSPG == kSPG - 1:
                    grp = j // kSPG
                    for ln in range(32):
                        for hh in range(2):
                            rr = g_[ln] + 8 * hh
                            sk = half_lo(int.from_bytes(kp[rr * PRB + 4 * grp:rr * PRB + 4 * grp + 4], "little"))
                            for e in range(2):
                                st[ln, 2 * hh + e] += sk * acc[ln][2 * hh + e]
            for ln in range(32):
                for hh in range(2):
                    live = tl(t0 + g_[ln] + 8 * hh)
                    for e in range(2):
                        st[ln, 2 * hh + e] = st[ln, 2 * hh + e] * qscale[ln, e] if live else -np.inf
            pr, alpha = online_softmax_transposed(st, m, l)
            # f: the max V scale (low halves as unsigned) of the warp's tokens.
            mx = 0
            for ln in range(32):
                for rr in (g_[ln], g_[ln] + 8):
                    for grp in range(NG):
                        mx = max(mx, int.from_bytes(vp[rr * PRB + 4 * grp:rr * PRB + 4 * grp + 2], "little"))
            fnew = lowered_f(f16_value(mx), fbits)
            if (alpha != 1.0).any() or fnew != fbits:
                r = alpha * f_ratio(fnew, fbits)
                o *= r[:, None, [0, 1, 0, 1]]
                yv[:, 0:2] *= alpha
                yv[:, 2:4] *= r
                fbits = fnew
            f = float(np.array([fbits], np.uint32).view(np.float32)[0])
            # The min sums: A = (scale, min) rows transposed (ldmatrix.x2.trans), B = fp16(p)^T.
            b0 = movmatrix_trans([[rnd16(pr[ln, 0]), rnd16(pr[ln, 1])] for ln in range(32)])
            b1 = movmatrix_trans([[rnd16(pr[ln, 2]), rnd16(pr[ln, 3])] for ln in range(32)])
            # ldmatrix.x4.trans: matrices 0 / 2 = tokens 0..7 / 8..15, 1 and 3 a zero row (16 bytes
            # past the tile here: vp_z).
            vp_z = vp + bytes(16)
            pa = ldmatrix(vp_z, [kTile * PRB if ln & 8 else PRB * ((ln & 7) + ((ln >> 1) & 8)) for ln in range(32)], 4, True)
            assert all(pa[ln][1] == 0 and pa[ln][3] == 0 for ln in range(32))
            a = [[[f16_value(pa[ln][k] & 0xFFFF), f16_value(pa[ln][k] >> 16)] for k in range(4)] for ln in range(32)]
            for ln in range(32):  # row g = half g of the (scale, min) row: s_(g/2) or m_(g/2); k = tokens 2t, 2t + 1
                g, t = g_[ln], t_[ln]
                for tk, val in ((2 * t, a[ln][0][0]), (2 * t + 1, a[ln][0][1]), (2 * t + 8, a[ln][2][0]), (2 * t + 9, a[ln][2][1])):
                    want = 0.0 if (g // 2 >= NG or not tl(t0 + tk)) else (Vs if g % 2 == 0 else Vm)[t0 + tk, g // 2]
                    assert val == want
            yv = np.array(mma_tc(list(yv), a, [[b0[ln], b1[ln]] for ln in range(32)]))
            pf = pr * f
            for b in range(kSegs):
                if b % 2 == 0:
                    words = ldmatrix(vb, [lane_off[ln] + 16 * b for ln in range(32)], 4, True)
                if b % kSPG == 0:
                    grp = b // kSPG
                    s0 = np.array([half_lo(int.from_bytes(vp[g_[ln] * PRB + 4 * grp:][:4], "little")) for ln in range(32)])
                    s1 = np.array([half_lo(int.from_bytes(vp[(g_[ln] + 8) * PRB + 4 * grp:][:4], "little")) for ln in range(32)])
                    assert (pf[:, :2] * s0[:, None] < 2 ** 15).all() and (pf[:, 2:] * s1[:, None] < 2 ** 15).all()
                    bb0 = movmatrix_trans([[rnd16(pf[ln, 0] * s0[ln]), rnd16(pf[ln, 1] * s0[ln])] for ln in range(32)])
                    bb1 = movmatrix_trans([[rnd16(pf[ln, 2] * s1[ln]), rnd16(pf[ln, 3] * s1[ln])] for ln in range(32)])
                    bfr = [[bb0[ln], bb1[ln]] for ln in range(32)]
                    ones = [[[0, 0], [1.0, 1.0] if g_[ln] == grp else [0, 0], [0, 0], [1.0, 1.0] if g_[ln] == grp else [0, 0]] for ln in range(32)]
                    yv = np.array(mma_tc(list(yv), ones, bfr))
                for i2 in range(2):  # m tile 2 b + i2: rows g (weight 1), g + 8 (weight 16)
                    a = []
                    for ln in range(32):
                        g, t = g_[ln], t_[ln]
                        regs = []
                        for wd, tk in ((words[ln][2 * (b % 2)], 2 * t), (words[ln][2 * (b % 2) + 1], 2 * t + 8)):
                            cod = lambda c, tt: Vc[t0 + tt, c] if tl(t0 + tt) else 0
                            ch = 32 * b + 4 * g + 2 * i2
                            mk, wt, src = nibble_pairs(wd)[2 * i2]
                            r0 = nib16(src, mk, wt, [cod(ch, tk), cod(ch, tk + 1)])
                            mk, wt, src = nibble_pairs(wd)[2 * i2 + 1]
                            r1 = nib16(src, mk, wt, [cod(ch + 1, tk), cod(ch + 1, tk + 1)])
                            regs.append((r0, r1))
                        a.append([regs[0][0], regs[0][1], regs[1][0], regs[1][1]])
                    o[:, 2 * b + i2] = mma_tc(list(o[:, 2 * b + i2]), a, bfr)
        l = np.array([sum(l[x_] for x_ in range(32) if t_[x_] == t_[ln]) for ln in range(32)])
        warp_state.append((m, l, o, yv, fbits))
    merge_m = np.full((kWarps, 8), np.nan); merge_l = np.full((kWarps, 8), np.nan)
    o_sh = np.full((kWarps, 8, HD), np.nan)
    for w, (m, l, o, yv, fbits) in enumerate(warp_state):
        for ln in range(4):
            for e in range(2):
                merge_m[w, 2 * t_[ln] + e], merge_l[w, 2 * t_[ln] + e] = m[ln, e], l[ln, e]
    for w, (m, l, o, yv, fbits) in enumerate(warp_state):
        inv_f = float(np.array([(254 << 23) - fbits], np.uint32).view(np.float32)[0])
        for ln in range(32):
            g, t = g_[ln], t_[ln]
            for e in range(2):
                m_all = merge_m[:, 2 * t + e].max()
                mine = 0.0 if m[ln, e] == -np.inf else 2 ** (m[ln, e] - m_all)
                for mt in range(kMTiles):
                    grp = mt // 2 // kSPG
                    bs = yv[4 * grp + t, 2 + e]  # __shfl from lane (grp, t)
                    ms = yv[4 * (2 * grp + 1) + t, e]  # from lane (2 grp + 1, t)
                    ch = 32 * (mt // 2) + 4 * g + 2 * (mt % 2)
                    for hh, wt in ((0, 1.0), (1, 16.0)):
                        assert np.isnan(o_sh[w, 2 * t + e, ch + hh]), "each (head, channel) once per warp"
                        o_sh[w, 2 * t + e, ch + hh] = ((o[ln, mt, 2 * hh + e] - 1024.0 * bs) * (inv_f / wt) + ms) * mine
    assert not np.isnan(o_sh).any() and not np.isnan(merge_m).any()
    out = np.zeros((G, HD)); mg_all = []
    for h in range(G):
        mg = merge_m[:, h].max()
        lg = sum(0 if merge_m[w, h] == -np.inf else merge_l[w, h] * 2 ** (merge_m[w, h] - mg) for w in range(kWarps))
        out[h] = o_sh[:, h].sum(0) / lg
        if OUT_ROUND:
            out[h] = [to_act(v, scalar) for v in out[h]]
        mg_all.append((mg / log2e, lg))
    ref = np.zeros((G, HD))
    for h in range(G):
        lg = (K[p_start:p_end] @ q[h]) * scale
        w = np.exp(lg - lg.max())
        ref[h] = (w / w.sum()) @ V[p_start:p_end]
        if not ROUND:
            assert abs(mg_all[h][0] - lg.max()) < 1e-9 and abs(mg_all[h][1] - w.sum()) < 1e-6 * w.sum()
    return np.abs(out - ref).max() / np.abs(ref).max()


LANE_G, LANE_T = np.arange(32) // 4, np.arange(32) % 4


# ---- int8 (paged_attention_tc.cu with KVS_TC_INT8: transposed like int4, codes by bit tricks) ----
# Codes are symmetric int8 (kv-quant: -127..127; any byte decodes, -128 too) with an f32 scale
# per (token, head). Both products run as fp16 mma whatever the activation type:
# - q . K: A = K codes as fp16 1152 + code (0x6400 | (byte ^ 0x80): one xor per word, one prmt
#   per pair), B = q^T in fp16 (bf16 q scaled by 2^sigma per head, exact), channels permuted
#   (word kKSteps t + s of lane t's rows: bytes 0, 2 -> k 2t, 2t + 1; bytes 1, 3 -> k 2t + 8,
#   2t + 9); logit = s_k (S' - 1152 Qsum') scale / 2^sigma.
# - P . V: A = V^T codes from ldmatrix.x4.trans of the byte tile (b16 = two channels), the same
#   prmt; B = fp16(p s_v f)^T by movmatrix, f = the warp's power of two keeping p s_v f < 2^15
#   (lowered, with O rescaled, when a larger scale arrives); sum_t B_t per head by one more mma
#   (A = ones), 1152 times it subtracted at the end, O / f.
# K rows are unpadded with chunk c of row r at c ^ (r % 8) when a row has 8 chunks (d = 128);
# V rows padded by 16 bytes. The emulation addresses shared memory as bytes and checks that the
# 128-bit loads and ldmatrix row fetches of each quarter warp hit distinct banks.
OUT_ROUND = ROUND and "--no-out-round" not in __import__("sys").argv  # round the output
TC_TRUNC = ROUND  # with --round: each mma's f32 result truncated toward zero (pessimistic)


def f32_trunc(x):  # round toward zero to f32
    x = np.asarray(x, dtype=np.float64)
    y = x.astype(np.float32).astype(np.float64)
    bad = np.abs(y) > np.abs(x)
    y[bad] = np.nextafter(y[bad].astype(np.float32), np.float32(0)).astype(np.float64)
    return y


def mma_tc(d, a, b):
    out = mma(d, a, b)
    return [list(f32_trunc(r)) for r in out] if TC_TRUNC else out


def f16_value(h):
    return float(np.array([h], dtype=np.uint16).view(np.float16)[0])


def to_f16(x):
    return float(np.float16(x))


def code_pair(x, sel):  # __byte_perm(x, 0x64646464, sel): an fp16 pair 0x64uu = 1024 + uu
    v = prmt(x, 0x64646464, sel)
    return [f16_value(v & 0xFFFF), f16_value(v >> 16)]


SEL02, SEL13 = 0x4240, 0x4341  # bytes 0, 2 / bytes 1, 3 into the low bytes of the halves


def banks_distinct(addrs, width):  # one shared-memory wavefront: lanes' byte addresses, width bytes each
    used = set()
    for a in addrs:
        for w in range(width // 4):
            bank = (a // 4 + w) % 32
            if bank in used:
                return False
            used.add(bank)
    return True


def run_int8(G, HD, ctx, p_start, p_end, scale, scalar="bf16", kWarps=2, kTile=16, kStages=3,
             v_range=(0.005, 0.02), q_outlier=False, zero_rows=()):
    # Values as kv-quant stores them: codes (a few -128 bytes: any byte decodes) and f32 scales.
    q = rng.standard_normal((G, HD))
    if q_outlier:
        q[:, 5] *= 300.0; q[:, 77 % HD] *= 1e-3
    q = np.array([[to_act(x, scalar) for x in row] for row in q])
    Kc = rng.integers(-127, 128, (ctx, HD)); Vc = rng.integers(-127, 128, (ctx, HD))
    Kc[rng.random((ctx, HD)) < 0.01] = -128; Vc[rng.random((ctx, HD)) < 0.01] = -128
    Ks = rng.uniform(0.01, 0.03, ctx).astype(np.float32).astype(float)
    Vs = np.exp(rng.uniform(np.log(v_range[0]), np.log(v_range[1]), ctx)).astype(np.float32).astype(float)
    for z in zero_rows:  # an all-zero token: scale 0, codes 0
        Kc[z] = 0; Vc[z] = 0; Ks[z] = 0.0; Vs[z] = 0.0
    K = Kc * Ks[:, None]; V = Vc * Vs[:, None]
    Kb = [bytes(int(c) & 0xFF for c in row) for row in Kc]; Vb = [bytes(int(c) & 0xFF for c in row) for row in Vc]
    Kflat = b''.join(Kb); Vflat = b''.join(Vb)
    log2e = 1.4426950408889634
    kKSteps, kMTiles = HD // 16, HD // 16
    kChunksPerRow, kCPL = HD // 16, HD // 64  # 16-byte chunks per row; K chunks per lane and row
    kKRow, kVRow = HD, HD + 16  # K rows unpadded (swizzled), V rows padded
    k_chunk = (lambda r, c: c ^ (r & 7)) if kChunksPerRow == 8 else (lambda r, c: c)
    scale2 = scale * log2e
    g_, t_ = LANE_G, LANE_T
    # Prologue: q^T as fp16 B fragments in the permuted order, the per-head 2^sigma, Qsum'.
    x = np.zeros((32, kKSteps, 4)); amax = np.zeros(32)
    for lane in range(32):
        g, t = g_[lane], t_[lane]
        for s_ in range(kKSteps):
            for j in range(4):
                x[lane, s_, j] = q[g, 4 * (kKSteps * t + s_) + j] if g < G else 0.0
        amax[lane] = np.abs(x[lane]).max()
    if scalar == "f16":
        qf = np.ones(32)
    else:
        amax = np.array([amax[4 * g_[ln]:4 * g_[ln] + 4].max() for ln in range(32)])  # quad xor 1, 2
        ebits = np.array([max((int(np.array([a], np.float32).view(np.uint32)[0]) >> 23) & 0xFF, 42) for a in amax])
        qf = np.array([float(np.array([(268 - e) << 23], np.uint32).view(np.float32)[0]) for e in ebits])
        for ln in range(32):
            if amax[ln] > 0:
                assert 2 ** 14 <= amax[ln] * qf[ln] < 2 ** 15
    qb = []; part = np.zeros(32)
    for lane in range(32):
        regs = []
        for s_ in range(kKSteps):
            a = [x[lane, s_, j] * qf[lane] for j in range(4)]
            assert all(to_f16(v) == v for v in a), "q * 2^sigma exact in fp16"
            regs.append([[a[0], a[2]], [a[1], a[3]]])
            part[lane] += (np.float32(a[0]) + np.float32(a[1])) + (np.float32(a[2]) + np.float32(a[3])) if ROUND else sum(a)
        qb.append(regs)
    qsum = np.array([part[4 * g_[ln]:4 * g_[ln] + 4].sum() for ln in range(32)])
    qoff = np.array([[1152.0 * qsum[4 * (2 * t_[ln] + e)] for e in range(2)] for ln in range(32)])
    qscale = np.array([[scale2 / qf[4 * (2 * t_[ln] + e)] for e in range(2)] for ln in range(32)])
    warp_state = []
    for warp in range(kWarps):
        m = np.full((32, 2), -np.inf); l = np.zeros((32, 2)); vsum = np.zeros((32, 4))
        o = np.zeros((32, kMTiles, 4)); fbits = 253 << 23
        tiles_total = (p_end - p_start + kTile - 1) // kTile
        my_tiles = (tiles_total - warp + kWarps - 1) // kWarps if tiles_total > warp else 0
        my_first = p_start + warp * kTile
        stages = [None] * kStages
        def load(stage, t0):  # load_tile, lane by lane (the cache as flat rows: token tok at tok * HD)
            kb = bytearray(kTile * kKRow); vb = bytearray(kTile * kVRow); ks = np.zeros(kTile); vs = np.zeros(kTile)
            live = [p_start <= t0 + ln % kTile < p_end for ln in range(32)]
            ballot = sum(1 << ln for ln in range(32) if live[ln])
            k_row = [(t0 + ln % kTile) * HD if live[ln] else 0 for ln in range(32)]  # 0: a valid address
            for i in range(kTile * kChunksPerRow // 32):
                for ln in range(32):
                    c = ln + 32 * i
                    row, col = c // kChunksPerRow, c % kChunksPerRow
                    src = k_row[row] + 16 * col  # __shfl_sync(k_row, row)
                    nbytes = 16 if (ballot >> row) & 1 else 0
                    src_k = Kflat[src:src + 16] if nbytes else bytes(16)
                    src_v = Vflat[src:src + 16] if nbytes else bytes(16)
                    ko = row * kKRow + 16 * k_chunk(row, col)
                    kb[ko:ko + 16] = src_k
                    vb[row * kVRow + 16 * col:row * kVRow + 16 * col + 16] = src_v
            for ln in range(32):  # lanes 0..15: K scales, 16..31: V scales of token t0 + ln % 16
                if live[ln]:
                    if ln < kTile:
                        ks[ln] = Ks[t0 + ln]
                    else:
                        vs[ln - kTile] = Vs[t0 + ln - kTile]
            stages[stage] = (kb, vb, ks, vs)
        for s_ in range(kStages - 1):
            if s_ < my_tiles:
                load(s_, my_first + s_ * kWarps * kTile)
        for i in range(my_tiles):
            nxt = i + kStages - 1
            if nxt < my_tiles:
                assert nxt % kStages != i % kStages
                load(nxt % kStages, my_first + nxt * kWarps * kTile)
            kb, vb, ks, vs = stages[i % kStages]
            t0 = my_first + i * kWarps * kTile
            # S^T = K q^T: lane (g, t) reads K chunks kCPL t + j of rows g, g + 8 (128-bit loads).
            for j in range(kCPL):
                for h in range(2):
                    for q4 in range(4):  # quarter warps
                        lanes = range(8 * q4, 8 * q4 + 8)
                        assert banks_distinct([(g_[ln] + 8 * h) * kKRow + 16 * k_chunk(g_[ln], kCPL * t_[ln] + j) for ln in lanes], 16)
            d = [[0.0] * 4 for _ in range(32)]
            for s_ in range(kKSteps):
                j, wd = s_ // 4, s_ % 4
                a = []
                for lane in range(32):
                    g, t = g_[lane], t_[lane]
                    col = 16 * k_chunk(g, kCPL * t + j)
                    assert k_chunk(g + 8, kCPL * t + j) == k_chunk(g, kCPL * t + j)
                    xw = int.from_bytes(kb[g * kKRow + col + 4 * wd:][:4], "little") ^ 0x80808080
                    yw = int.from_bytes(kb[(g + 8) * kKRow + col + 4 * wd:][:4], "little") ^ 0x80808080
                    regs = [code_pair(xw, SEL02), code_pair(yw, SEL02), code_pair(xw, SEL13), code_pair(yw, SEL13)]
                    # Exact: 1152 + the codes of channels 4 (kKSteps t + s) + {0, 2} / {1, 3}.
                    for r_, (row, bsel) in enumerate([(g, (0, 2)), (g + 8, (0, 2)), (g, (1, 3)), (g + 8, (1, 3))]):
                        tok = t0 + row
                        want = [1152 + (Kc[tok, 4 * (kKSteps * t + s_) + bb] if p_start <= tok < p_end else 0) for bb in bsel]
                        assert regs[r_] == want, (regs[r_], want)
                    a.append(regs)
                d = mma_tc(d, a, [qb[lane][s_] for lane in range(32)])
            st = np.zeros((32, 4))
            for lane in range(32):
                for h in range(2):
                    sk = ks[g_[lane] + 8 * h]
                    live = p_start <= t0 + g_[lane] + 8 * h < p_end
                    for e in range(2):
                        st[lane, 2 * h + e] = (d[lane][2 * h + e] - qoff[lane, e]) * (sk * qscale[lane, e]) if live else -np.inf
            pr, alpha = online_softmax_transposed(st, m, l)
            # f: a power of two with p s_v f < 2^15 for every token of the warp so far.
            sv0, sv1 = vs[g_], vs[g_ + 8]
            fnew = lowered_f(np.maximum(sv0, sv1).max(), fbits)  # max over the lanes g (xor 4, 8, 16)
            if (alpha != 1.0).any() or fnew != fbits:
                r = alpha * f_ratio(fnew, fbits)
                o *= r[:, None, [0, 1, 0, 1]]
                vsum *= r[:, [0, 1, 0, 1]]
                fbits = fnew
            f = float(np.array([fbits], np.uint32).view(np.float32)[0])
            s0, s1 = sv0 * f, sv1 * f
            assert (pr[:, :2] * s0[:, None] < 2 ** 15).all() and (pr[:, 2:] * s1[:, None] < 2 ** 15).all()
            rnd = to_f16 if ROUND else (lambda v: v)
            b0 = movmatrix_trans([[rnd(pr[ln, 0] * s0[ln]), rnd(pr[ln, 1] * s0[ln])] for ln in range(32)])
            b1 = movmatrix_trans([[rnd(pr[ln, 2] * s1[ln]), rnd(pr[ln, 3] * s1[ln])] for ln in range(32)])
            bfr = [[b0[ln], b1[ln]] for ln in range(32)]
            ones = [[[1.0, 1.0], [0.0, 0.0], [1.0, 1.0], [0.0, 0.0]] for _ in range(32)]
            vsum = np.array(mma_tc(list(vsum), ones, bfr))
            # O^T += V^T B: ldmatrix.x4.trans; lane L addresses row L % 8 of matrix L / 8 =
            # (tokens 8 (L / 16) .. + 7, chunk 2 b + (L / 8) % 2).
            for blk in range(HD // 32):
                addr = [((ln & 7) + 8 * (ln >> 4)) * kVRow + 16 * ((ln >> 3) & 1) + 32 * blk for ln in range(32)]
                for mi in range(4):
                    assert banks_distinct(addr[8 * mi:8 * mi + 8], 16), "ldmatrix rows conflict-free"
                y = [[0] * 4 for _ in range(32)]
                for mi in range(4):
                    rows = [vb[addr[8 * mi + r]:addr[8 * mi + r] + 16] for r in range(8)]
                    el = [[int.from_bytes(rows[r][2 * c:2 * c + 2], "little") for c in range(8)] for r in range(8)]
                    for ln in range(32):  # .trans: (row 2 (L % 4), col L / 4) low, row + 1 high
                        y[ln][mi] = el[2 * (ln % 4)][ln // 4] | (el[2 * (ln % 4) + 1][ln // 4] << 16)
                for xsel, sel in ((0, SEL02), (1, SEL13)):
                    a = []
                    for ln in range(32):
                        g, t = g_[ln], t_[ln]
                        regs = [code_pair(y[ln][mi] ^ 0x80808080, sel) for mi in range(4)]
                        # Row g: channel 32 blk + 2 g + xsel, row g + 8: + 16; k: tokens 2t, 2t + 1 (+ 8).
                        for r_, (ch, tk) in enumerate([(32 * blk + 2 * g + xsel, 2 * t), (32 * blk + 16 + 2 * g + xsel, 2 * t),
                                                       (32 * blk + 2 * g + xsel, 2 * t + 8), (32 * blk + 16 + 2 * g + xsel, 2 * t + 8)]):
                            want = [1152 + (Vc[t0 + tt, ch] if p_start <= t0 + tt < p_end else 0) for tt in (tk, tk + 1)]
                            assert regs[r_] == want
                        a.append(regs)
                    o[:, 2 * blk + xsel] = mma_tc(list(o[:, 2 * blk + xsel]), a, bfr)
        l = np.array([sum(l[ln] for ln in range(32) if t_[ln] == t_[lane]) for lane in range(32)])
        warp_state.append((m, l, o, vsum, fbits))
    merge_m = np.full((kWarps, 8), np.nan); merge_l = np.full((kWarps, 8), np.nan)
    o_sh = np.full((kWarps, 8, HD), np.nan)
    for w, (m, l, o, vsum, fbits) in enumerate(warp_state):
        for lane in range(4):
            for e in range(2):
                merge_m[w, 2 * t_[lane] + e], merge_l[w, 2 * t_[lane] + e] = m[lane, e], l[lane, e]
    for w, (m, l, o, vsum, fbits) in enumerate(warp_state):
        inv_f = float(np.array([(254 << 23) - fbits], np.uint32).view(np.float32)[0])
        for lane in range(32):
            g, t = g_[lane], t_[lane]
            for e in range(2):
                m_all = merge_m[:, 2 * t + e].max()
                k_ = (0.0 if m[lane, e] == -np.inf else 2 ** (m[lane, e] - m_all)) * inv_f
                off = 1152.0 * vsum[lane, e]
                for blk in range(HD // 32):
                    for hh in range(2):
                        c = 32 * blk + 16 * hh + 2 * g
                        for xs in range(2):
                            assert np.isnan(o_sh[w, 2 * t + e, c + xs]), "each (head, channel) once per warp"
                            o_sh[w, 2 * t + e, c + xs] = (o[lane, 2 * blk + xs, 2 * hh + e] - off) * k_
    assert not np.isnan(o_sh).any() and not np.isnan(merge_m).any()
    out = np.zeros((G, HD)); mg_all = []
    for h in range(G):
        mg = merge_m[:, h].max()
        lg = sum(0 if merge_m[w, h] == -np.inf else merge_l[w, h] * 2 ** (merge_m[w, h] - mg) for w in range(kWarps))
        out[h] = o_sh[:, h].sum(0) / lg
        if OUT_ROUND:
            out[h] = [to_act(v, scalar) for v in out[h]]
        mg_all.append((mg / log2e, lg))
    ref = np.zeros((G, HD))
    for h in range(G):
        lg = (K[p_start:p_end] @ q[h]) * scale
        w = np.exp(lg - lg.max())
        ref[h] = (w / w.sum()) @ V[p_start:p_end]
        if not ROUND:
            assert abs(mg_all[h][0] - lg.max()) < 1e-9 and abs(mg_all[h][1] - w.sum()) < 1e-6 * w.sum()
    return np.abs(out - ref).max() / np.abs(ref).max()


for codes in (False, True):
    for (G, HD, ctx, ps, pe) in [(4, 64, 100, 0, 100), (1, 64, 40, 7, 40), (8, 128, 300, 32, 97), (3, 64, 20, 3, 5), (5, 128, 70, 0, 70)]:
        e = run(G, HD, ctx, ps, pe, 1 / np.sqrt(HD), codes=codes)
        print("codes" if codes else "16-bit", G, HD, ctx, ps, pe, "rel err", e)
        assert e < 1e-9
# int4: every group size kv-quant has (32, 64, 128, one per head) at d 64 / 128; ragged
# partitions (masked tokens in the first and last tiles), a warp without tiles, GQA 1 to 8,
# all-zero tokens, V scales over 8 decades (f lowered mid-stream), q with a large mean (Qsum and
# the codes' offset large), 2, 3 and 4 stages.
worst = 0.0
for scalar in ("bf16", "f16"):
    for (G, HD, GS, ctx, ps, pe, kw) in [
            (4, 128, 32, 100, 0, 100, {}), (1, 64, 32, 40, 7, 40, {"kStages": 2}), (8, 128, 64, 300, 32, 97, {"zero_rows": (40, 41)}),
            (3, 64, 64, 20, 3, 5, {}), (5, 128, 128, 70, 0, 70, {"v_scale": (1e-5, 60.0), "kStages": 3}), (2, 64, 64, 33, 1, 33, {"q_bias": 2.0}),
            (7, 128, 32, 64, 0, 64, {"q_bias": -1.5, "kStages": 2}), (6, 128, 128, 50, 13, 29, {"zero_rows": (13, 20, 28)}),
            (4, 128, 32, 200, 5, 190, {"v_scale": (1e-4, 30.0)})]:
        e = run_int4(G, HD, GS, ctx, ps, pe, 1 / np.sqrt(HD), scalar=scalar, **kw)
        print("int4", scalar, "G", G, "d", HD, "group", GS, ctx, ps, pe, kw, "rel err", e)
        worst = max(worst, e)
        assert e < (2e-2 if ROUND else 1e-9)
print("int4 worst", worst)
# int8: bf16 and fp16 activations, GQA 1 to 8, d 64 / 128, ragged partitions (masked tokens in
# the first and last tiles, a warp without tiles), all-zero tokens, V scales over 12 decades (f
# lowered mid-stream), q with an outlier channel, 2, 3 and 4 stages.
worst8 = 0.0
for scalar in ("bf16", "f16"):
    for (G, HD, ctx, ps, pe, kw) in [
            (4, 128, 100, 0, 100, {}), (1, 64, 40, 7, 40, {"kStages": 2}), (8, 128, 300, 32, 97, {"zero_rows": (40, 41)}),
            (3, 64, 20, 3, 5, {}), (5, 128, 70, 0, 70, {"v_range": (1e-8, 1e4 if scalar == "bf16" else 300.0)}), (2, 64, 33, 1, 33, {"q_outlier": True}),
            (7, 128, 64, 0, 64, {"q_outlier": True, "kStages": 2}), (4, 128, 200, 5, 190, {"kStages": 4}), (6, 64, 50, 13, 29, {"zero_rows": (13, 20, 28)})]:
        e = run_int8(G, HD, ctx, ps, pe, 1 / np.sqrt(HD), scalar=scalar, **kw)
        print("int8", scalar, "G", G, "d", HD, ctx, ps, pe, kw, "rel err", e)
        worst8 = max(worst8, e)
        assert e < (2e-2 if ROUND else 1e-9)
print("int8 worst", worst8)
print("ok")
