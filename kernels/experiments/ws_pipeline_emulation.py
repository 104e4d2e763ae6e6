# Not part of the build: a check of the warp-specialized pipeline of paged_attention_tc.cu
# (`-DKVS_TC_WS=1`, ws_stream_tiles), made without a GPU (2026-12-02).
# `python3 kernels/experiments/ws_pipeline_emulation.py` (standard library only).
#
# 1. The protocol. The producer warp (32 lanes) and kWarps consumer warps run as coroutines
#    under a random scheduler; each producer lane's cp.async of a tile land at random later
#    times, each followed by its cp.async.mbarrier.arrive.noinc; mbarriers are modelled as the
#    hardware keeps them (a phase number and a pending count; a wait by parity P returns once
#    the current phase's parity differs from P, which is also what makes an ambiguous wait
#    wrong, so the check sees it). Checks, for tile counts 0..40, kWarps 2 and 4, kStages
#    multiples of kWarps up to 8 and many schedules: no deadlock; a consumer reads stage s only when
#    all 32 lanes' parts of the stage hold its tile; no copy lands in a stage while its
#    consumer reads it; every copy has landed when the consumers are done (the warp merge
#    reuses the tiles' memory after the barrier that follows).
# 2. The producer's addressing. The row offset each lane gives copy_tile_rows (the block of
#    tile i + 1 looked up one iteration early) against kv_value_offset of the token, for block
#    sizes 1..1024, partitions starting anywhere (windows) and ending anywhere (masked tails).
import random

WARP = 32
TILE = 16


class MBarrier:
    def __init__(self, count):
        self.count, self.pending, self.phase = count, count, 0

    def arrive(self):
        self.pending -= 1
        assert self.pending >= 0
        if self.pending == 0:
            self.phase += 1
            self.pending = self.count

    def done(self, parity):  # mbarrier.try_wait.parity / test_wait.parity
        return (self.phase & 1) != parity


def run_protocol(num_tiles, stages, consumers, rng):
    full = [MBarrier(WARP) for _ in range(stages)]
    empty = [MBarrier(1) for _ in range(stages)]
    parts = [[None] * WARP for _ in range(stages)]  # tile id each lane's copy left there
    reading = [None] * stages  # consumer reading the stage now
    in_flight = []  # (stage, lane, tile) copies issued, not landed
    used = []

    def producer():
        stage, rnd = 0, 0
        for i in range(num_tiles):
            if rnd > 0:
                while not empty[stage].done((rnd - 1) & 1):
                    yield
            for lane in range(WARP):  # copy_tile_rows, then the lane's arrive.noinc
                in_flight.append((stage, lane, i))
            yield
            stage += 1
            if stage == stages:
                stage, rnd = 0, rnd + 1

    def consumer(c):
        stage, rnd = c, 0
        for i in range(c, num_tiles, consumers):
            while not full[stage].done(rnd & 1):
                yield
            assert parts[stage] == [i] * WARP, (i, stage, parts[stage])
            reading[stage] = c
            for _ in range(rng.randrange(1, 4)):  # the tile's math takes a while
                yield
                assert parts[stage] == [i] * WARP, "overwritten while read"
            reading[stage] = None
            used.append(i)
            empty[stage].arrive()  # lane 0, after __syncwarp
            stage += consumers
            if stage >= stages:
                stage, rnd = stage - stages, rnd + 1

    actors = [producer()] + [consumer(c) for c in range(consumers)]
    live = list(actors)
    steps = 0
    while live or in_flight:
        steps += 1
        assert steps < 200000, "deadlock"
        if in_flight and (not live or rng.random() < 0.5):
            stage, lane, i = in_flight.pop(rng.randrange(len(in_flight)))
            assert reading[stage] is None, "a copy landed in a stage being read"
            parts[stage][lane] = i
            full[stage].arrive()
            continue
        a = rng.choice(live)
        try:
            next(a)
        except StopIteration:
            live.remove(a)
            if not live:
                # the consumers and the producer are past the loop: the merge's barrier
                assert not in_flight, "copies still in flight at the warp merge"
    assert sorted(used) == list(range(num_tiles))


def producer_rows(p_start, p_end, table, block_size, head, row_bytes, block_bytes):
    """What each producer lane passes to copy_tile_rows, tile by tile (ws_stream_tiles)."""
    shift = block_size.bit_length() - 1
    num_tiles = (p_end - p_start + TILE - 1) // TILE
    out = []
    blocks = [table[(p_start + lane % TILE) >> shift] if lane % TILE < p_end - p_start else 0
              for lane in range(WARP)]
    for i in range(num_tiles):
        rows = []
        nxt = []
        for lane in range(WARP):
            r = lane % TILE
            tok = p_start + i * TILE + r
            nxt.append(table[(tok + TILE) >> shift] if tok + TILE < p_end else 0)
            slot = head * block_size + (tok & (block_size - 1))
            rows.append(blocks[lane] * block_bytes + slot * row_bytes if tok < p_end else -1)
        out.append(rows)
        blocks = nxt
    return out


def check_addressing(rng):
    for _ in range(3000):
        block_size = 1 << rng.randrange(0, 11)
        heads, head, row_bytes = 8, rng.randrange(8), 256
        block_bytes = heads * block_size * row_bytes
        ctx = rng.randrange(1, 3000)
        table = [rng.randrange(10000) for _ in range((ctx + block_size - 1) // block_size)]
        p_start = rng.randrange(ctx)
        p_end = rng.randrange(p_start + 1, ctx + 1)
        got = producer_rows(p_start, p_end, table, block_size, head, row_bytes, block_bytes)
        for i, rows in enumerate(got):
            for lane, row in enumerate(rows):
                tok = p_start + i * TILE + lane % TILE
                if tok >= p_end:
                    assert row == -1
                    continue
                want = (table[tok // block_size] * block_bytes
                        + (head * block_size + tok % block_size) * row_bytes)
                assert row == want, (block_size, p_start, p_end, i, lane)


def main():
    rng = random.Random(7)
    runs = 0
    for consumers in (2, 4):
        for stages in range(consumers, 9, consumers):  # kStages % kWarps == 0
            for num_tiles in range(0, 41):
                for _ in range(6):
                    run_protocol(num_tiles, stages, consumers, rng)
                    runs += 1
    check_addressing(rng)
    print(f"protocol: {runs} schedules ok; addressing: 3000 partitions ok")
    # The same protocol with kStages not a multiple of kWarps fails (a consumer's wait for
    # round 1 of a stage passes while round 0, another consumer's tile, is still landing):
    # the reason for the kernel's static_assert. Shown here so that the check can fail.
    try:
        for _ in range(50):
            run_protocol(12, 3, 2, rng)
    except AssertionError:
        print("kStages 3, kWarps 2: fails, as expected")
    else:
        raise SystemExit("kStages 3, kWarps 2 passed: the model no longer sees the hazard")


if __name__ == "__main__":
    main()
