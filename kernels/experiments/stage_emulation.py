# Not part of the build: a check of gemv.cu's stage_normalized (the *_snorm_M entries' staged
# rows) made without a GPU (2026-12-02). `python3 kernels/experiments/stage_emulation.py`
# (numpy) plays the 256 threads of one CTA through the function as written: each thread's
# slices i = tid + j * 256, its cp.async copies into slot j % 2 (halves at
# ((2p + q) * 256 + tid) * 16 bytes), the commit groups and cp.async.wait_group 1 (a group is
# complete once at most one newer group is pending; a copy lands when its group completes,
# here as late as allowed), the normalization from the slot and the row store at
# m * stride + 8 s. It checks, for token counts 1-8 and widths from 8 to 16,384, that every
# value of the M staged rows is written exactly once, from the right residual values (bf16
# rounding of w * (r * rinv) as normalize8 does it), that a slot is never refilled while its
# slice is unread, that the padding between rows is never written, that the slots stay within
# kStageSlotBytes and that their 16-byte accesses of one quarter-warp phase hit 8 distinct
# 4-bank groups (no conflicts); and gemv.rs's stage_stride / stage_bytes against the kernel's.
import numpy as np

THREADS, SLOTS = 256, 2
SLOT_BYTES = SLOTS * THREADS * 32


def stage_stride(k):
    return k + ((192 - (2 * k) % 128) % 128) // 2


def bf16(x):
    # Round-to-nearest-even to bfloat16, returned as float32 (as __float2bfloat16_rn).
    b = np.asarray(x, dtype=np.float32).view(np.uint32).astype(np.uint64)
    b = (b + 0x7FFF + ((b >> 16) & 1)) & 0xFFFF0000
    return b.astype(np.uint32).view(np.float32)


def emulate(m_tokens, k, rng):
    slices, items = k // 8, m_tokens * (k // 8)
    per_thread = (items + THREADS - 1) // THREADS
    stride = stage_stride(k)
    res = rng.standard_normal((m_tokens, k)).astype(np.float32)
    nw = bf16(rng.uniform(0.5, 1.5, k))
    rinv = rng.uniform(0.5, 2.0, m_tokens).astype(np.float32)
    rows = np.full(m_tokens * stride, np.nan, dtype=np.float32)
    writes = np.zeros(m_tokens * stride, dtype=int)
    slot_mem = {}  # byte address -> (token, slice, half) the slot holds
    slot_addrs = set()
    for tid in range(THREADS):
        groups = []  # per committed group: list of (addr, token, slice, half)
        landed = 0  # groups whose copies have landed

        def where(j):
            i = tid + j * THREADS
            m = 0 if m_tokens == 1 else i // slices
            return i < items, m, i - m * slices

        def half(p, q):
            return ((p * 2 + q) * THREADS + tid) * 16

        def fetch(j):
            ok, m, s = where(j)
            g = []
            if ok:
                p = j % SLOTS
                for q in range(2):
                    g.append((half(p, q), m, s, q))
                    slot_addrs.add(half(p, q))
            groups.append(g)

        def wait(pending):
            nonlocal landed
            while len(groups) - landed > pending:
                for addr, m, s, q in groups[landed]:
                    slot_mem[addr] = (m, s, q)
                landed += 1

        for j in range(SLOTS):
            fetch(j)
        for j0 in range(0, per_thread, SLOTS):
            for p in range(SLOTS):
                j = j0 + p
                wait(SLOTS - 1)
                ok, m, s = where(j)
                if ok:
                    vals = []
                    for q in range(2):
                        held = slot_mem.get(half(p, q))
                        assert held == (m, s, q), (m_tokens, k, tid, j, held)
                        vals.append(res[held[0], 8 * held[1] + 4 * q: 8 * held[1] + 4 * q + 4])
                    r = np.concatenate(vals)
                    w = nw[8 * s: 8 * s + 8]
                    # normalize8: two f32 products, rounded once to bf16.
                    out = bf16(w * (r * rinv[m]))
                    base = m * stride + 8 * s
                    rows[base: base + 8] = out
                    writes[base: base + 8] += 1
                    # The slot is read: mark it consumed so a stale read would be caught.
                    for q in range(2):
                        slot_mem[half(p, q)] = None
                fetch(j + SLOTS)
        wait(0)
    # Every value of every row written once, padding never.
    for m in range(m_tokens):
        assert (writes[m * stride: m * stride + k] == 1).all(), (m_tokens, k, m)
        assert (writes[m * stride + k: (m + 1) * stride] == 0).all(), (m_tokens, k, m)
        want = bf16(nw * (res[m] * rinv[m]))
        assert np.array_equal(rows[m * stride: m * stride + k], want), (m_tokens, k, m)
    assert max(slot_addrs, default=0) + 16 <= SLOT_BYTES
    # Bank groups of one phase (8 consecutive threads, one 16-byte access each).
    for p in range(SLOTS):
        for q in range(2):
            for t0 in range(0, THREADS, 8):
                banks = {(((p * 2 + q) * THREADS + t) * 16 // 16) % 8 for t in range(t0, t0 + 8)}
                assert len(banks) == 8
    return per_thread


def main():
    rng = np.random.default_rng(0)
    for k in range(8, 16385, 8):
        s = stage_stride(k)
        assert s % 8 == 0 and (2 * s) % 128 == 64 and 0 <= s - k < 64, k
    rounds = set()
    for m_tokens in range(1, 9):
        for k in [8, 64, 520, 576, 584, 1000, 1024, 2048, 4096, 4104, 8192, 14336]:
            if k % 8:
                continue
            rounds.add(emulate(m_tokens, k, rng))
    # gemv.rs: stage_bytes(tokens, k) = tokens * stride * 2 + 16 KiB.
    assert 1 * stage_stride(4096) * 2 + SLOT_BYTES == 8256 + 16384
    print(f"stage_normalized: ok (slices per thread seen: {sorted(rounds)})")


if __name__ == "__main__":
    main()
