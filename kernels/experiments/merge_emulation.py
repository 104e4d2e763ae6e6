# Not part of the build: a check of GroupMerge (kernels/decode_reduce.cuh), the split-KV merge
# the last CTA of a (sequence, KV head) runs inside paged_decode_tc, made without a GPU
# (2026-12-03). `python3 kernels/experiments/merge_emulation.py` (numpy) follows run() thread
# by thread, phase by phase (the phases between two __syncthreads in order), for every GQA
# group 1-8, head_dim 64 / 128, kLoads 8 / 16 and partition counts around the chunk and unroll
# boundaries, from partial results of real softmax attention laid out as the kernel writes
# them ([num_heads][max_parts][HEAD_DIM] inside a larger buffer, max_parts > num_parts).
# Checks: the output equals f64 attention over all partitions; every output element is
# written once and only the group's outputs; every global read is inside the group's rows and
# below num_parts; every shared read was written in the same chunk (and the padded weight rows
# never alias); both stats and column phases see a consistent alpha.
import numpy as np

rng = np.random.default_rng(1)


class Merge:
    def __init__(self, threads, group, loads, head_dim):
        self.T, self.G, self.D, self.L = threads, group, head_dim, loads
        self.W = threads // 32
        self.per_lane = 4
        self.chunk = 32 * self.per_lane
        self.wstride = self.chunk + 1
        self.heads_per_warp = (group + self.W - 1) // self.W
        self.quads = head_dim // 4
        self.cols = group * self.quads
        self.slices = 1 if self.cols >= threads else threads // self.cols
        self.col_threads = threads // self.slices
        self.cols_per_thread = (self.cols + self.col_threads - 1) // self.col_threads
        self.unroll = 1 if self.cols_per_thread >= loads else loads // self.cols_per_thread
        self.smem_red = 4 * threads
        assert self.slices == 1 or self.cols_per_thread == 1
        assert self.slices * self.col_threads == threads

    def run(self, out, tmp, ml, es, qh0, num_parts, max_parts, num_heads):
        T, G, D = self.T, self.G, self.D
        reads = []  # (array, index) of every global load issued

        def gload(arr, name, idx, live, otherwise):
            if not live:
                return otherwise
            reads.append((name, idx))
            return arr[idx]

        # shared memory: floats, with a "written in chunk" tag per slot
        smem = np.full(self.smem_red + G * self.wstride + 2 * G, np.nan)
        tag = np.full(smem.shape, -1)
        w_off, a_off = self.smem_red, self.smem_red + G * self.wstride
        t_off = a_off + G

        def swrite(i, v, c):
            smem[i] = v
            tag[i] = c

        def sread(i, c):
            assert 0 <= i < len(smem) and tag[i] == c, (i, tag[i], c)
            return smem[i]

        # per-thread state
        st = []
        for tid in range(T):
            slice_, ct = tid // self.col_threads, tid % self.col_threads
            cols = []
            for k in range(self.cols_per_thread):
                c = ct + k * self.col_threads
                live = c < self.cols
                h = c // self.quads if live else 0
                # float4 pointer as a float index into tmp: (qh0 + h) * max_parts * D + 4 (c % quads)
                cols.append(dict(live=live, head=h, base=(qh0 + h) * max_parts * D + 4 * (c % self.quads), c=c))
            st.append(dict(slice=slice_, ct=ct, cols=cols, acc=[np.zeros(4) for _ in cols]))
        run_max = [[-np.inf] * self.heads_per_warp for _ in range(self.W)]
        run_total = [[0.0] * self.heads_per_warp for _ in range(self.W)]

        chunk_id = 0
        for base in range(0, num_parts, self.chunk):
            n = min(self.chunk, num_parts - base)
            # stats phase, per warp (lanes together)
            for w in range(self.W):
                for i in range(self.heads_per_warp):
                    g = w + self.W * i
                    row = (qh0 + (g if g < G else 0)) * max_parts + base
                    m = np.zeros((32, self.per_lane))
                    s = np.zeros((32, self.per_lane))
                    for lane in range(32):
                        for k in range(self.per_lane):
                            p = lane + 32 * k
                            live = g < G and p < n
                            m[lane, k] = gload(ml, "m", row + p, live, -np.inf)
                            s[lane, k] = gload(es, "s", row + p, live, 0.0)
                    if g >= G:
                        continue
                    cmax = m.max()
                    new_max = max(run_max[w][i], cmax)
                    weight = lambda x: 0.0 if new_max == -np.inf else np.exp(x - new_max)
                    alpha = weight(run_max[w][i])
                    part = 0.0
                    for lane in range(32):
                        for k in range(self.per_lane):
                            wt = weight(m[lane, k])
                            part += wt * s[lane, k]
                            swrite(w_off + g * self.wstride + lane + 32 * k, wt, chunk_id)
                    run_total[w][i] = run_total[w][i] * alpha + part
                    run_max[w][i] = new_max
                    swrite(a_off + g, alpha, chunk_id)
                    swrite(t_off + g, run_total[w][i], chunk_id)
            # __syncthreads; column phase
            for tid in range(T):
                t = st[tid]
                for k, col in enumerate(t["cols"]):
                    t["acc"][k] = t["acc"][k] * sread(a_off + col["head"], chunk_id)
                j0 = t["slice"]
                while j0 < n:
                    v = {}
                    for k, col in enumerate(t["cols"]):
                        for u in range(self.unroll):
                            p = j0 + u * self.slices
                            live = col["live"] and p < n
                            idx = col["base"] + (base + p) * D
                            v[k, u] = np.array([gload(tmp, "t", idx + e, live, 0.0) for e in range(4)])
                    for k, col in enumerate(t["cols"]):
                        for u in range(self.unroll):
                            p = j0 + u * self.slices
                            wt = sread(w_off + col["head"] * self.wstride + p, chunk_id) if p < n else 0.0
                            t["acc"][k] = t["acc"][k] + wt * v[k, u]
                    j0 += self.slices * self.unroll
            chunk_id += 1
        # slices
        if self.slices > 1:
            for tid in range(T):
                if st[tid]["slice"] > 0:
                    for e in range(4):
                        swrite(4 * tid + e, st[tid]["acc"][0][e], -2)
            for tid in range(T):
                t = st[tid]
                if t["slice"] == 0:
                    for x in range(1, self.slices):
                        src = t["ct"] + x * self.col_threads
                        t["acc"][0] = t["acc"][0] + np.array([sread(4 * src + e, -2) for e in range(4)])
        written = np.zeros(out.shape, dtype=int)
        for tid in range(T):
            t = st[tid]
            if t["slice"] != 0:
                continue
            for k, col in enumerate(t["cols"]):
                if not col["live"]:
                    continue
                total = sread(t_off + col["head"], chunk_id - 1)
                inv = 1.0 / total if total > 0 else 0.0
                o = (qh0 + col["head"]) * D + 4 * ((t["ct"] + k * self.col_threads) % self.quads)
                for e in range(4):
                    out[o + e] = t["acc"][k][e] * inv
                    written[o + e] += 1
        return reads, written


def check(threads, group, loads, head_dim, num_parts, extra_parts=3, seq=1, num_seqs=3, kv_head=1, kv_heads=2):
    mg = Merge(threads, group, loads, head_dim)
    num_heads = kv_heads * group
    max_parts = num_parts + extra_parts
    D = head_dim
    tmp = np.full(num_seqs * num_heads * max_parts * D, np.nan)
    ml = np.full(num_seqs * num_heads * max_parts, np.nan)
    es = np.full(num_seqs * num_heads * max_parts, np.nan)
    qh0 = seq * num_heads + kv_head * group
    want = {}
    for g in range(group):
        qh = qh0 + g
        # logits and values of num_parts partitions of varying length (scale: some partitions
        # dominate, others underflow relative to the max)
        lens = rng.integers(1, 40, num_parts)
        logits = [rng.standard_normal(L) * 4 + rng.standard_normal() * 6 for L in lens]
        vals = [rng.standard_normal((L, D)) for L in lens]
        allx = np.concatenate(logits)
        allv = np.concatenate(vals)
        pw = np.exp(allx - allx.max())
        want[qh] = pw @ allv / pw.sum()
        for p in range(num_parts):
            mp = logits[p].max()
            e = np.exp(logits[p] - mp)
            ml[qh * max_parts + p] = mp
            es[qh * max_parts + p] = e.sum()
            tmp[(qh * max_parts + p) * D:(qh * max_parts + p + 1) * D] = e @ vals[p]
    out = np.full(num_seqs * num_heads * D, np.nan)
    reads, written = mg.run(out, tmp, ml, es, qh0, num_parts, max_parts, num_heads)
    # reads: inside the group's rows and below num_parts
    for name, idx in reads:
        if name == "t":
            row, _ = divmod(idx, D)
        else:
            row = idx
        qh, p = divmod(row, max_parts)
        assert qh0 <= qh < qh0 + group and p < num_parts, (name, idx, qh, p)
    # every element read exactly once per (head, partition, channel)
    t_reads = sorted(i for n_, i in reads if n_ == "t")
    assert len(t_reads) == len(set(t_reads)) == group * num_parts * D, (len(t_reads), group * num_parts * D)
    for qh in range(qh0, qh0 + group):
        assert (written[qh * D:(qh + 1) * D] == 1).all()
    assert written.sum() == group * D, "only the group's outputs"
    err = max(np.abs(out[qh * D:(qh + 1) * D] - want[qh]).max() / np.abs(want[qh]).max() for qh in want)
    assert err < 1e-12, err
    return err, mg


if __name__ == "__main__":
    worst = 0.0
    n = 0
    for head_dim, loads in [(64, 8), (128, 16), (128, 8)]:
        for group in range(1, 9):
            for num_parts in [2, 3, 17, 33, 127, 128, 129, 300]:
                err, mg = check(64, group, loads, head_dim, num_parts)
                worst = max(worst, err)
                n += 1
            print(f"d={head_dim} loads={loads} G={group}: slices {mg.slices}, cols/thread "
                  f"{mg.cols_per_thread}, unroll {mg.unroll}, smem {4 * (mg.smem_red + group * mg.wstride + 2 * group)} B")
    print(f"{n} cases, worst relative error {worst:.1e}")
