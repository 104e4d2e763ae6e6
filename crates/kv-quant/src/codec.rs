//! CPU codecs over block byte slices: the reference the kernels are checked
//! against, and what CPU attention uses.
//!
//! All four entry points take the [`BlockLayout`] and the bytes of **one** K or
//! V block (`layout.kv_block_bytes()` long, any alignment). Inner loops run
//! over fixed-size chunks with branch-free bodies so LLVM vectorizes them
//! even for the baseline x86-64 target (SSE2; build with
//! `-C target-cpu=native` for AVX2); reductions use 16 independent lanes
//! summed in a fixed order, so results are deterministic (the same on every
//! run and thread count) but may differ in the last bits from a naive
//! left-to-right sum. Quantization divides by the scale (correctly rounded)
//! rather than multiplying by its reciprocal: this is the reference.
//!
//! # Non-finite and extreme inputs
//!
//! * `fp16` / `bf16` store the input rounded to nearest-even, as an
//!   unquantized model would: NaN stays NaN, ±inf stays ±inf, and `fp16`
//!   overflows to ±inf beyond ±65504 (`bf16` has the range of `f32`).
//! * Quantized dtypes never store a NaN or infinite scale: scales are
//!   computed from the **finite** values only. ±inf saturates to the largest
//!   code of its sign (the largest finite value the group can represent),
//!   NaN is encoded as 0 (for int4: as the representable value nearest 0).
//!   A token-head (int8/fp8) or group (int4) whose finite values are all zero,
//!   or that has no finite values, gets scale 0 and decodes exactly to 0.
//! * `fp8_e4m3` and `fp8_e5m2` are saturating: the scale maps the largest
//!   finite `|x|` to 448 (E4M3) or 57344 (E5M2), the codec never writes the
//!   NaN/inf codes.
//! * `int4` stores `(scale, min)` as f16, so values beyond ±65504 saturate
//!   there. f32 subnormal inputs are handled like any other value (the scale
//!   may itself be subnormal; the error bounds below still hold).
//!
//! # Error bounds (checked by property tests)
//!
//! With `scale` the stored scale of the value's token-head (int8, fp8) or
//! group (int4) and `x̂` the decoded value, for finite inputs:
//!
//! * `fp16`/`bf16`: exact for values representable in the format, else the
//!   nearest representable value.
//! * `int8`: `|x − x̂| ≤ scale/2` (+ f32 rounding), `scale = max|x| / 127`.
//! * `int4`: `|x − x̂| ≤ scale/2` (+ f32 rounding), `scale ≈ (max − min)/15`
//!   (rounded up to f16).
//! * `fp8_e4m3`: `|x − x̂| ≤ 2⁻⁴·|x|` when `|x|/scale ≥ 2⁻⁶` (normal range),
//!   `≤ 2⁻¹⁰·scale` below it; `fp8_e5m2`: `2⁻³·|x|`, resp. `2⁻¹⁷·scale`
//!   below `2⁻¹⁴`.

use std::ops::Range;

use half::f16;
use half::slice::HalfFloatSliceExt;

use crate::convert::{
    bf16_to_f32, e4m3_to_f32, e5m2_to_f32, f16_to_f32, f32_to_e4m3, f32_to_e5m2, finite_absmax,
    finite_min_max, int4_params, round_ne_i32, symmetric_scale,
};
use crate::layout::{FP8_E4M3_MAX, FP8_E5M2_MAX, INT4_MAX_CODE, INT8_MAX_CODE};
use crate::{BlockLayout, KvCacheDtype, KvQuantError};

/// Independent accumulators in reductions: four SSE registers (two AVX),
/// enough to hide the add latency; summed in a fixed order at the end.
const LANES: usize = 16;

/// Quantizes one token (`x`: all heads, `[num_kv_heads][head_dim]`, i.e.
/// [`values_per_token`](BlockLayout::values_per_token) floats) into `slot` of
/// `block`, values and scales. Nothing else in the block is touched.
///
/// See the [module docs](self) for rounding, non-finite inputs and error
/// bounds.
///
/// # Errors
/// [`KvQuantError::LengthMismatch`] if `block` is not
/// `layout.kv_block_bytes()` long or `x` is not `values_per_token()` long;
/// [`KvQuantError::SlotOutOfRange`] if `slot >= block_size`.
pub fn encode_token(
    layout: &BlockLayout,
    block: &mut [u8],
    slot: usize,
    x: &[f32],
) -> Result<(), KvQuantError> {
    check_block(layout, block.len())?;
    check_slot(layout, slot)?;
    check_len("x", layout.values_per_token(), x.len())?;
    let (values, scales) = block.split_at_mut(layout.scale_section_offset());
    let d = layout.head_dim();
    for (head, xh) in x.chunks_exact(d).enumerate() {
        let row = layout.row_index(head, slot);
        let vr = layout.value_row_bytes();
        let sr = layout.scale_row_bytes();
        let vals = &mut values[row * vr..(row + 1) * vr];
        let params = &mut scales[row * sr..(row + 1) * sr];
        match layout.dtype() {
            KvCacheDtype::Fp16 => encode_f16(xh, vals),
            KvCacheDtype::Bf16 => encode_bf16(xh, vals),
            KvCacheDtype::Int8 => encode_int8(xh, vals, params),
            KvCacheDtype::Int4 { .. } => encode_int4(xh, layout_group(layout), vals, params),
            KvCacheDtype::Fp8E4m3 => encode_fp8(xh, vals, params, FP8_E4M3_MAX, f32_to_e4m3),
            KvCacheDtype::Fp8E5m2 => encode_fp8(xh, vals, params, FP8_E5M2_MAX, f32_to_e5m2),
        }
    }
    Ok(())
}

/// Dequantizes the slots `slots` of `block` to f32 in `out`, laid out
/// `[slot][head][dim]` (slot-major, i.e. each slot as
/// [`encode_token`] takes it): `out[((s - slots.start) * num_kv_heads + h) * head_dim + i]`.
///
/// Slots that were never written decode to whatever their bytes say (0 for a
/// zeroed block); decoding never panics, whatever the bytes.
///
/// # Errors
/// [`KvQuantError::LengthMismatch`] if `block` is not `kv_block_bytes()`
/// long or `out` is not `slots.len() * values_per_token()` long;
/// [`KvQuantError::SlotRangeOutOfRange`] unless
/// `slots.start <= slots.end <= block_size`.
pub fn decode_slots(
    layout: &BlockLayout,
    block: &[u8],
    slots: Range<usize>,
    out: &mut [f32],
) -> Result<(), KvQuantError> {
    check_block(layout, block.len())?;
    check_slot_range(layout, &slots)?;
    let per_token = layout.values_per_token();
    let expected = slots.len().saturating_mul(per_token);
    check_len("out", expected, out.len())?;
    let d = layout.head_dim();
    for (slot, out_token) in slots.zip(out.chunks_exact_mut(per_token)) {
        for (head, oh) in out_token.chunks_exact_mut(d).enumerate() {
            decode_row(layout, block, head, slot, oh);
        }
    }
    Ok(())
}

/// Dequantizes one KV head of the slots `slots` of `block` to f32 in `out`,
/// laid out `[slot][dim]`: `out[(s - slots.start) * head_dim + i]`. The
/// building block of grouped-query attention on the CPU: a KV head is
/// decoded once for all the query heads that share it.
///
/// # Errors
/// As [`decode_slots`] (with `out` `slots.len() * head_dim` long), and
/// [`KvQuantError::HeadOutOfRange`].
pub fn decode_head(
    layout: &BlockLayout,
    block: &[u8],
    head: usize,
    slots: Range<usize>,
    out: &mut [f32],
) -> Result<(), KvQuantError> {
    check_block(layout, block.len())?;
    check_slot_range(layout, &slots)?;
    layout.check_head(head)?;
    let d = layout.head_dim();
    check_len("out", slots.len().saturating_mul(d), out.len())?;
    for (slot, oh) in slots.zip(out.chunks_exact_mut(d)) {
        decode_row(layout, block, head, slot, oh);
    }
    Ok(())
}

/// Dequantizes the row of `(head, slot)` into `out` (`head_dim` long; all
/// checked by the caller).
fn decode_row(layout: &BlockLayout, block: &[u8], head: usize, slot: usize, out: &mut [f32]) {
    let (vals, params) = rows(layout, block, head, slot);
    match layout.dtype() {
        KvCacheDtype::Fp16 => map_codes::<2>(vals, out, |c| f16_to_f32(u16::from_le_bytes(c))),
        KvCacheDtype::Bf16 => map_codes::<2>(vals, out, |c| bf16_to_f32(u16::from_le_bytes(c))),
        KvCacheDtype::Int8 => {
            let s = read_f32(params);
            map_codes::<1>(vals, out, |[c]| f32::from(c as i8) * s);
        }
        KvCacheDtype::Int4 { .. } => decode_int4(vals, params, layout_group(layout), out),
        KvCacheDtype::Fp8E4m3 => {
            let s = read_f32(params);
            map_codes::<1>(vals, out, |[c]| e4m3_to_f32(c) * s);
        }
        KvCacheDtype::Fp8E5m2 => {
            let s = read_f32(params);
            map_codes::<1>(vals, out, |[c]| e5m2_to_f32(c) * s);
        }
    }
}

/// `q · dequant(k)` for the K row of `(slot, head)`, computed directly from
/// the stored codes without materializing the f32 row, as the fused
/// attention kernels do: int8/fp8 accumulate `Σ qᵢ·codeᵢ` and apply the
/// row's scale once; int4 dequantizes each code in registers
/// (`code·scale + min`) and accumulates; fp16/bf16 convert in registers.
///
/// Apply the softmax scale `1/√head_dim` to `q` or to the result, as you
/// prefer.
///
/// # Errors
/// [`KvQuantError::LengthMismatch`] if `block` is not `kv_block_bytes()`
/// long or `q` is not `head_dim` long; [`KvQuantError::SlotOutOfRange`] /
/// [`KvQuantError::HeadOutOfRange`].
pub fn dot_k(
    layout: &BlockLayout,
    block: &[u8],
    slot: usize,
    head: usize,
    q: &[f32],
) -> Result<f32, KvQuantError> {
    check_block(layout, block.len())?;
    layout.check_head_slot(head, slot)?;
    check_len("q", layout.head_dim(), q.len())?;
    let (vals, params) = rows(layout, block, head, slot);
    Ok(match layout.dtype() {
        KvCacheDtype::Fp16 => dot_codes::<2>(q, vals, |c| f16_to_f32(u16::from_le_bytes(c))),
        KvCacheDtype::Bf16 => dot_codes::<2>(q, vals, |c| bf16_to_f32(u16::from_le_bytes(c))),
        KvCacheDtype::Int8 => read_f32(params) * dot_codes::<1>(q, vals, |[c]| f32::from(c as i8)),
        KvCacheDtype::Int4 { .. } => dot_int4(q, vals, params, layout_group(layout)),
        KvCacheDtype::Fp8E4m3 => read_f32(params) * dot_codes::<1>(q, vals, |[c]| e4m3_to_f32(c)),
        KvCacheDtype::Fp8E5m2 => read_f32(params) * dot_codes::<1>(q, vals, |[c]| e5m2_to_f32(c)),
    })
}

/// `acc += weight · dequant(v)` for the V row of `(slot, head)`, folding
/// `weight` into the row's (or int4 group's) scale first, as the fused
/// attention kernels do: `acc[i] += (weight·scale)·codeᵢ (+ weight·min)`.
///
/// # Errors
/// [`KvQuantError::LengthMismatch`] if `block` is not `kv_block_bytes()`
/// long or `acc` is not `head_dim` long; [`KvQuantError::SlotOutOfRange`] /
/// [`KvQuantError::HeadOutOfRange`].
pub fn axpy_v(
    layout: &BlockLayout,
    block: &[u8],
    slot: usize,
    head: usize,
    weight: f32,
    acc: &mut [f32],
) -> Result<(), KvQuantError> {
    check_block(layout, block.len())?;
    layout.check_head_slot(head, slot)?;
    check_len("acc", layout.head_dim(), acc.len())?;
    let (vals, params) = rows(layout, block, head, slot);
    let w = weight;
    match layout.dtype() {
        KvCacheDtype::Fp16 => {
            acc_codes::<2>(vals, acc, |c| w * f16_to_f32(u16::from_le_bytes(c)));
        }
        KvCacheDtype::Bf16 => {
            acc_codes::<2>(vals, acc, |c| w * bf16_to_f32(u16::from_le_bytes(c)));
        }
        KvCacheDtype::Int8 => {
            let ws = w * read_f32(params);
            acc_codes::<1>(vals, acc, |[c]| ws * f32::from(c as i8));
        }
        KvCacheDtype::Int4 { .. } => axpy_int4(vals, params, layout_group(layout), w, acc),
        KvCacheDtype::Fp8E4m3 => {
            let ws = w * read_f32(params);
            acc_codes::<1>(vals, acc, |[c]| ws * e4m3_to_f32(c));
        }
        KvCacheDtype::Fp8E5m2 => {
            let ws = w * read_f32(params);
            acc_codes::<1>(vals, acc, |[c]| ws * e5m2_to_f32(c));
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// Validation and addressing.

fn check_len(what: &'static str, expected: usize, got: usize) -> Result<(), KvQuantError> {
    if expected == got {
        Ok(())
    } else {
        Err(KvQuantError::LengthMismatch {
            what,
            expected,
            got,
        })
    }
}

fn check_block(layout: &BlockLayout, len: usize) -> Result<(), KvQuantError> {
    check_len("block", layout.kv_block_bytes(), len)
}

fn check_slot_range(layout: &BlockLayout, slots: &Range<usize>) -> Result<(), KvQuantError> {
    if slots.start > slots.end || slots.end > layout.block_size() {
        return Err(KvQuantError::SlotRangeOutOfRange {
            start: slots.start,
            end: slots.end,
            block_size: layout.block_size(),
        });
    }
    Ok(())
}

fn check_slot(layout: &BlockLayout, slot: usize) -> Result<(), KvQuantError> {
    if slot < layout.block_size() {
        Ok(())
    } else {
        Err(KvQuantError::SlotOutOfRange {
            slot,
            block_size: layout.block_size(),
        })
    }
}

/// The resolved group size (int4) — `head_dim` for other dtypes.
fn layout_group(layout: &BlockLayout) -> usize {
    layout.group_size().unwrap_or(layout.head_dim())
}

/// The value row and scale row of `(head, slot)`; the caller has validated
/// the block length, `head` and `slot`.
fn rows<'b>(
    layout: &BlockLayout,
    block: &'b [u8],
    head: usize,
    slot: usize,
) -> (&'b [u8], &'b [u8]) {
    let row = layout.row_index(head, slot);
    let vr = layout.value_row_bytes();
    let sr = layout.scale_row_bytes();
    let so = layout.scale_section_offset() + row * sr;
    (&block[row * vr..(row + 1) * vr], &block[so..so + sr])
}

/// The little-endian f32 at the start of `bytes` (4 bytes long here).
fn read_f32(bytes: &[u8]) -> f32 {
    let (words, _) = bytes.as_chunks::<4>();
    words.first().map_or(0.0, |&w| f32::from_le_bytes(w))
}

// ---------------------------------------------------------------------------
// Generic row kernels: `B` bytes per code, the per-code decoder inlined.

#[inline(always)]
fn map_codes<const B: usize>(vals: &[u8], out: &mut [f32], f: impl Fn([u8; B]) -> f32) {
    let (codes, _) = vals.as_chunks::<B>();
    for (o, &c) in out.iter_mut().zip(codes) {
        *o = f(c);
    }
}

#[inline(always)]
fn acc_codes<const B: usize>(vals: &[u8], acc: &mut [f32], f: impl Fn([u8; B]) -> f32) {
    let (codes, _) = vals.as_chunks::<B>();
    for (a, &c) in acc.iter_mut().zip(codes) {
        *a += f(c);
    }
}

/// Sum of `LANES` partial sums in a fixed (pairwise) order.
#[inline(always)]
fn hsum(a: [f32; LANES]) -> f32 {
    let (lo, hi) = a.split_at(LANES / 2);
    let mut s8 = [0.0f32; LANES / 2];
    for ((s, &x), &y) in s8.iter_mut().zip(lo).zip(hi) {
        *s = x + y;
    }
    ((s8[0] + s8[4]) + (s8[2] + s8[6])) + ((s8[1] + s8[5]) + (s8[3] + s8[7]))
}

/// `Σ qᵢ·f(codeᵢ)`: each chunk of `LANES` codes is decoded into registers
/// (a map LLVM vectorizes) and multiplied into `LANES` accumulators.
#[inline(always)]
fn dot_codes<const B: usize>(q: &[f32], vals: &[u8], f: impl Fn([u8; B]) -> f32) -> f32 {
    let (codes, _) = vals.as_chunks::<B>();
    let (q_chunks, q_tail) = q.as_chunks::<LANES>();
    let (c_chunks, c_tail) = codes.as_chunks::<LANES>();
    let mut acc = [0.0f32; LANES];
    for (qs, cs) in q_chunks.iter().zip(c_chunks) {
        let k: [f32; LANES] = std::array::from_fn(|i| f(cs[i]));
        for ((a, &qv), &kv) in acc.iter_mut().zip(qs).zip(&k) {
            *a += qv * kv;
        }
    }
    let mut sum = hsum(acc);
    for (&qv, &c) in q_tail.iter().zip(c_tail) {
        sum += qv * f(c);
    }
    sum
}

// ---------------------------------------------------------------------------
// Per-dtype encoders (one head of one token).

fn encode_f16(x: &[f32], vals: &mut [u8]) {
    const CHUNK: usize = 64;
    let mut buf = [f16::ZERO; CHUNK];
    for (xc, vc) in x.chunks(CHUNK).zip(vals.chunks_mut(2 * CHUNK)) {
        let halves = &mut buf[..xc.len()];
        // Hardware (F16C) conversion when the CPU has it, else software RNE.
        halves.convert_from_f32_slice(xc);
        for (dst, h) in vc.as_chunks_mut::<2>().0.iter_mut().zip(halves.iter()) {
            *dst = h.to_le_bytes();
        }
    }
}

fn encode_bf16(x: &[f32], vals: &mut [u8]) {
    for (dst, &v) in vals.as_chunks_mut::<2>().0.iter_mut().zip(x) {
        *dst = half::bf16::from_f32(v).to_le_bytes();
    }
}

fn encode_int8(x: &[f32], vals: &mut [u8], params: &mut [u8]) {
    let qmax = INT8_MAX_CODE as f32;
    let scale = symmetric_scale(finite_absmax(x), qmax);
    params.copy_from_slice(&scale.to_le_bytes());
    if scale == 0.0 {
        vals.fill(0);
        return;
    }
    for (c, &v) in vals.iter_mut().zip(x) {
        let t = v / scale;
        let t = if t.is_nan() {
            0.0
        } else {
            t.clamp(-qmax, qmax)
        };
        *c = round_ne_i32(t) as u8; // two's complement of the i8 code
    }
}

fn encode_fp8(
    x: &[f32],
    vals: &mut [u8],
    params: &mut [u8],
    fmax: f32,
    to_fp8: impl Fn(f32) -> u8,
) {
    let scale = symmetric_scale(finite_absmax(x), fmax);
    params.copy_from_slice(&scale.to_le_bytes());
    if scale == 0.0 {
        vals.fill(0);
        return;
    }
    // `to_fp8` saturates (±inf included) and maps NaN to 0.
    for (c, &v) in vals.iter_mut().zip(x) {
        *c = to_fp8(v / scale);
    }
}

fn encode_int4(x: &[f32], group: usize, vals: &mut [u8], params: &mut [u8]) {
    let qmax = INT4_MAX_CODE as f32;
    let groups = x
        .chunks_exact(group)
        .zip(vals.chunks_exact_mut(group / 2))
        .zip(params.as_chunks_mut::<4>().0);
    for ((xg, vg), pg) in groups {
        let (scale16, min16) = int4_params(finite_min_max(xg));
        let [s0, s1] = scale16.to_le_bytes();
        let [m0, m1] = min16.to_le_bytes();
        *pg = [s0, s1, m0, m1];
        let (scale, min) = (scale16.to_f32(), min16.to_f32());
        if scale == 0.0 {
            vg.fill(0);
            continue;
        }
        let code = |v: f32| {
            let v = if v.is_nan() { 0.0 } else { v };
            let t = ((v - min) / scale).clamp(0.0, qmax);
            round_ne_i32(t) as u8
        };
        // Quantize LANES channels at a time (a vectorized map), then pack.
        let (x_chunks, x_tail) = xg.as_chunks::<LANES>();
        let (b_chunks, b_tail) = vg.as_chunks_mut::<{ LANES / 2 }>();
        for (xs, bs) in x_chunks.iter().zip(b_chunks) {
            let c: [u8; LANES] = std::array::from_fn(|i| code(xs[i]));
            *bs = std::array::from_fn(|j| c[2 * j] | (c[2 * j + 1] << 4));
        }
        for (b, &[lo, hi]) in b_tail.iter_mut().zip(x_tail.as_chunks::<2>().0) {
            *b = code(lo) | (code(hi) << 4);
        }
    }
}

// ---------------------------------------------------------------------------
// int4 decoders (one head of one token).

/// `(scale, min)` of each group, from the 4-byte pairs.
fn int4_group_params(params: &[u8]) -> impl Iterator<Item = (f32, f32)> + '_ {
    params.as_chunks::<4>().0.iter().map(|&[s0, s1, m0, m1]| {
        (
            f16_to_f32(u16::from_le_bytes([s0, s1])),
            f16_to_f32(u16::from_le_bytes([m0, m1])),
        )
    })
}

fn decode_int4(vals: &[u8], params: &[u8], group: usize, out: &mut [f32]) {
    let groups = out
        .chunks_exact_mut(group)
        .zip(vals.chunks_exact(group / 2))
        .zip(int4_group_params(params));
    for ((og, vg), (scale, min)) in groups {
        for (o, &b) in og.as_chunks_mut::<2>().0.iter_mut().zip(vg) {
            *o = [
                f32::from(b & 0x0F) * scale + min,
                f32::from(b >> 4) * scale + min,
            ];
        }
    }
}

fn dot_int4(q: &[f32], vals: &[u8], params: &[u8], group: usize) -> f32 {
    let groups = q
        .chunks_exact(group)
        .zip(vals.chunks_exact(group / 2))
        .zip(int4_group_params(params));
    let mut acc = [0.0f32; LANES];
    let mut tail = 0.0f32;
    for ((qg, vg), (scale, min)) in groups {
        let (q_chunks, q_tail) = qg.as_chunks::<LANES>();
        let (b_chunks, b_tail) = vg.as_chunks::<{ LANES / 2 }>();
        for (qs, bs) in q_chunks.iter().zip(b_chunks) {
            // Dequantize in registers: channel i is nibble i % 2 of byte i / 2.
            let k: [f32; LANES] = std::array::from_fn(|i| {
                f32::from((bs[i / 2] >> (4 * (i % 2))) & 0x0F) * scale + min
            });
            for ((a, &qv), &kv) in acc.iter_mut().zip(qs).zip(&k) {
                *a += qv * kv;
            }
        }
        for (&[q0, q1], &b) in q_tail.as_chunks::<2>().0.iter().zip(b_tail) {
            tail += q0 * (f32::from(b & 0x0F) * scale + min);
            tail += q1 * (f32::from(b >> 4) * scale + min);
        }
    }
    hsum(acc) + tail
}

fn axpy_int4(vals: &[u8], params: &[u8], group: usize, weight: f32, acc: &mut [f32]) {
    let groups = acc
        .chunks_exact_mut(group)
        .zip(vals.chunks_exact(group / 2))
        .zip(int4_group_params(params));
    for ((ag, vg), (scale, min)) in groups {
        let (ws, wm) = (weight * scale, weight * min);
        for (a, &b) in ag.as_chunks_mut::<2>().0.iter_mut().zip(vg) {
            a[0] += f32::from(b & 0x0F) * ws + wm;
            a[1] += f32::from(b >> 4) * ws + wm;
        }
    }
}
