//! RMSNorm folded into the GEMV products, on a GPU: a product's residual epilogue followed by
//! products over the normalized residual (`gemv_with`, `gemv_silu_mul_with`) against the
//! unfused chain (product stored, `rms_norm` adding it, products over the stored norm); the
//! consumers' two variants (rows staged once per CTA in shared memory, or normalized in the
//! product loop: `Gpu::set_staged_norm`) against each other bit for bit, and the staged chain
//! queued back to back (consumers overlapping their producers under PDL) against the same
//! chain synchronized after each launch.
//! Ignored by default (CI has no GPU): `cargo test -p kernels-cuda --test gemv_norm --
//! --include-ignored` on the GPU machine.
#![allow(clippy::unwrap_used, clippy::print_stderr, clippy::needless_range_loop)]

use half::bf16;
use kernels_cuda::cudarc::driver::CudaSlice;
use kernels_cuda::{
    GEMV_MAX_TOKENS, GemvEpilogue, GemvInput, GemvOut, Gpu, KernelError, NormInput, NormPartials,
    fill_uniform, gemv, gemv_silu_mul, gemv_silu_mul_with, gemv_with, rms_norm,
};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

fn gpu() -> Gpu {
    Gpu::new(0).expect("a CUDA device (these tests are for the GPU machine)")
}

/// The fused products may differ from the unfused ones only where `rinv` (the same sum of
/// squares added in another order: ~1e-6 apart) moves a normalized input across a bf16
/// rounding boundary (a few elements of a 4096-wide row), by one bf16 ulp of that input; an
/// output then moves by ~1e-4 of itself, enough to flip its own rounding now and then: one
/// bf16 ulp (3.9e-3 of it). Bound: 1e-2 of the largest output.
const TOLERANCE: f64 = 1e-2;

/// max |a - b| / max |b|.
fn rel_diff(a: &[bf16], b: &[bf16]) -> f64 {
    let scale = b
        .iter()
        .fold(1e-30f64, |m, x| m.max(f64::from(x.to_f32().abs())));
    let err = a.iter().zip(b).fold(0f64, |m, (x, y)| {
        m.max((f64::from(x.to_f32()) - f64::from(y.to_f32())).abs())
    });
    assert!(
        a.iter().all(|x| x.to_f32().is_finite()),
        "non-finite output"
    );
    err / scale
}

fn differing(a: &[bf16], b: &[bf16]) -> usize {
    a.iter()
        .zip(b)
        .filter(|(x, y)| x.to_bits() != y.to_bits())
        .count()
}

fn same_bits(a: &[f32], b: &[f32]) -> bool {
    a.len() == b.len() && a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits())
}

/// A layer's shapes: the residual width, the producer's input width (O: the attention
/// width), the stacked Q/K/V widths, the MLP width.
struct Shape {
    hidden: usize,
    attn: usize,
    qkv: [usize; 3],
    inter: usize,
}

/// Device weights of one shape, uniform random (generated on the device: the 8B shape has
/// 235 M gate/up values).
struct Weights {
    wo: CudaSlice<bf16>,
    bias_o: CudaSlice<bf16>,
    w_qkv: CudaSlice<bf16>,
    bias_qkv: CudaSlice<bf16>,
    w_gate_up: CudaSlice<bf16>,
    w_down: CudaSlice<bf16>,
    attn_norm: CudaSlice<bf16>,
    ffn_norm: CudaSlice<bf16>,
}

fn weights(gpu: &Gpu, s: &Shape, seed: u64) -> Weights {
    let st = gpu.stream();
    let n_qkv: usize = s.qkv.iter().sum();
    let uniform = |n: usize, k: u64, lo: f32, hi: f32| {
        let mut b = st.alloc_zeros::<bf16>(n).unwrap();
        fill_uniform(gpu, &mut b, seed * 16 + k, lo, hi).unwrap();
        b
    };
    // ±1.7 / sqrt(k): outputs of about unit size for inputs of about unit size.
    let a = |k: usize| 1.7 / (k as f32).sqrt();
    Weights {
        wo: uniform(s.hidden * s.attn, 1, -a(s.attn), a(s.attn)),
        bias_o: uniform(s.hidden, 2, -0.5, 0.5),
        w_qkv: uniform(n_qkv * s.hidden, 3, -a(s.hidden), a(s.hidden)),
        bias_qkv: uniform(n_qkv, 4, -0.5, 0.5),
        w_gate_up: uniform(2 * s.inter * s.hidden, 5, -a(s.hidden), a(s.hidden)),
        w_down: uniform(s.hidden * s.inter, 6, -a(s.inter), a(s.inter)),
        attn_norm: uniform(s.hidden, 7, 0.5, 1.5),
        ffn_norm: uniform(s.hidden, 8, 0.5, 1.5),
    }
}

fn host<T: kernels_cuda::cudarc::driver::DeviceRepr + Clone + Default>(
    gpu: &Gpu,
    d: &CudaSlice<T>,
) -> Vec<T> {
    gpu.stream().clone_dtoh(d).unwrap()
}

/// Σ_p partials[t][p] against Σ_j residual[t][j]² (f64).
fn check_sums(gpu: &Gpu, partials: &NormPartials, residual: &[f32], hidden: usize, what: &str) {
    let tokens = residual.len() / hidden;
    assert_eq!(partials.written(), Some((tokens, hidden)), "{what}");
    let (buf, count) = partials.sums().unwrap();
    let sums = host(gpu, buf);
    for t in 0..tokens {
        let got: f64 = sums[t * count..(t + 1) * count]
            .iter()
            .map(|&v| f64::from(v))
            .sum();
        let want: f64 = residual[t * hidden..(t + 1) * hidden]
            .iter()
            .map(|&v| f64::from(v) * f64::from(v))
            .sum();
        assert!(
            (got - want).abs() <= 1e-5 * want,
            "{what}: token {t}: partial sums {got} vs {want} ({count} partials)"
        );
    }
}

/// The Q/K/V outputs of one product, on the host, side by side as `[tokens][n]`.
struct Qkv {
    bufs: Vec<CudaSlice<bf16>>,
}

impl Qkv {
    fn new(gpu: &Gpu, tokens: usize, widths: &[usize]) -> Self {
        Self {
            bufs: widths
                .iter()
                .map(|&w| gpu.stream().alloc_zeros::<bf16>(tokens * w).unwrap())
                .collect(),
        }
    }
    fn outs(&mut self, widths: &[usize]) -> Vec<GemvOut<'_, bf16>> {
        self.bufs
            .iter_mut()
            .zip(widths)
            .map(|(out, &width)| GemvOut { out, width })
            .collect()
    }
    fn host(&self, gpu: &Gpu) -> Vec<bf16> {
        self.bufs.iter().flat_map(|b| host(gpu, b)).collect()
    }
}

/// One transformer layer's norm/product chain and the final norm, unfused and fused, for
/// `tokens` tokens: O product (+ bias when `bias`) → ffn norm → gate/up; down → attention
/// norm → Q/K/V (split outputs, + bias when `bias`); then the final norm of the residual.
fn run_chain(gpu: &Gpu, s: &Shape, w: &Weights, tokens: usize, bias: bool, seed: u64) {
    let st = gpu.stream();
    let (h, inter) = (s.hidden, s.inter);
    let eps = 1e-5f32;
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let residual0: Vec<f32> = (0..tokens * h)
        .map(|_| rng.random_range(-2.0f32..2.0))
        .collect();
    let attn: Vec<bf16> = (0..tokens * s.attn)
        .map(|_| bf16::from_f32(rng.random_range(-1.0f32..1.0)))
        .collect();
    let attn_d = st.clone_htod(&attn).unwrap();
    let bias_o = bias.then_some(&w.bias_o);
    let bias_qkv = bias.then_some(&w.bias_qkv);
    let what = format!("{h} x {tokens} tokens, bias {bias}");

    // Unfused: the products stored, rms_norm adding them.
    let mut res_u = st.clone_htod(&residual0).unwrap();
    let mut proj = st.alloc_zeros::<bf16>(tokens * h).unwrap();
    let mut normed = st.alloc_zeros::<bf16>(tokens * h).unwrap();
    let mut act_u = st.alloc_zeros::<bf16>(tokens * inter).unwrap();
    let mut qkv_u = Qkv::new(gpu, tokens, &s.qkv);
    gemv(
        gpu,
        &attn_d,
        &w.wo,
        s.attn,
        bias_o,
        &mut [GemvOut {
            out: &mut proj,
            width: h,
        }],
    )
    .unwrap();
    rms_norm(gpu, &mut res_u, Some(&proj), &w.ffn_norm, eps, &mut normed).unwrap();
    let res_u1 = host(gpu, &res_u);
    gemv_silu_mul(gpu, &normed, &w.w_gate_up, inter, h, &mut act_u).unwrap();
    gemv(
        gpu,
        &act_u,
        &w.w_down,
        inter,
        None,
        &mut [GemvOut {
            out: &mut proj,
            width: h,
        }],
    )
    .unwrap();
    rms_norm(gpu, &mut res_u, Some(&proj), &w.attn_norm, eps, &mut normed).unwrap();
    let res_u2 = host(gpu, &res_u);
    gemv(gpu, &normed, &w.w_qkv, h, bias_qkv, &mut qkv_u.outs(&s.qkv)).unwrap();
    // Final norm: no delta (the residual already holds everything).
    rms_norm(gpu, &mut res_u, None, &w.attn_norm, eps, &mut normed).unwrap();
    let final_u = host(gpu, &normed);

    // Fused: the residual epilogues and the normalized inputs, with the rows staged in shared
    // memory (the default) and synchronized after each producer to check its residual.
    let inputs = ChainInputs {
        residual0: &residual0,
        attn: &attn_d,
        act: &act_u,
        bias_o,
        bias_qkv,
        eps,
    };
    gpu.set_staged_norm(true);
    let fused = fused_chain(gpu, s, w, tokens, &inputs, true);
    let [res_f1, res_f2] = fused.residuals.as_ref().unwrap();
    assert!(same_bits(res_f1, &res_u1), "{what}: O epilogue residual");
    assert!(same_bits(res_f2, &res_u2), "{what}: down epilogue residual");
    let (a_f, a_u) = (&fused.act, host(gpu, &act_u));
    let (q_f, q_u) = (&fused.qkv, qkv_u.host(gpu));
    let (e_act, e_qkv) = (rel_diff(a_f, &a_u), rel_diff(q_f, &q_u));
    eprintln!(
        "{what}: gate/up {e_act:.2e} ({} of {} differ), q/k/v {e_qkv:.2e} ({} of {} differ)",
        differing(a_f, &a_u),
        a_u.len(),
        differing(q_f, &q_u),
        q_u.len()
    );
    assert!(e_act < TOLERANCE, "{what}: gate/up {e_act}");
    assert!(e_qkv < TOLERANCE, "{what}: q/k/v {e_qkv}");
    // The final norm reads the same residual through the same kernel: bit for bit.
    assert_eq!(
        differing(&fused.final_norm, &final_u),
        0,
        "{what}: final norm"
    );

    // The consumers normalizing in their loops instead (no shared-memory rows): the same
    // launch shapes, rinv and roundings, so the same bits.
    gpu.set_staged_norm(false);
    let in_loop = fused_chain(gpu, s, w, tokens, &inputs, true);
    gpu.set_staged_norm(true);
    for (name, got, want) in [("gate/up", &in_loop.act, a_f), ("q/k/v", &in_loop.qkv, q_f)] {
        assert_eq!(differing(got, want), 0, "{what}: {name}, in-loop vs staged");
    }

    // Staged again, every launch queued back to back (no host copy in between): with PDL
    // each consumer's CTAs start while its producer drains and load weights before their
    // wait; anything they read of the residual or the sums before it would be stale.
    let queued = fused_chain(gpu, s, w, tokens, &inputs, false);
    for (name, got, want) in [
        ("gate/up", &queued.act, a_f),
        ("q/k/v", &queued.qkv, q_f),
        ("final norm", &queued.final_norm, &fused.final_norm),
    ] {
        assert_eq!(differing(got, want), 0, "{what}: {name}, back to back");
    }
}

/// What the fused chain starts from: the residual, the attention output (the O product's
/// input), the unfused chain's activations (the down product's input, so that the residual
/// stays comparable bit for bit), the biases and eps.
struct ChainInputs<'a> {
    residual0: &'a [f32],
    attn: &'a CudaSlice<bf16>,
    act: &'a CudaSlice<bf16>,
    bias_o: Option<&'a CudaSlice<bf16>>,
    bias_qkv: Option<&'a CudaSlice<bf16>>,
    eps: f32,
}

/// The fused chain's results on the host: the gate/up activations, Q/K/V, the final norm, and
/// (when checked) the residual after the O and the down products.
struct Fused {
    act: Vec<bf16>,
    qkv: Vec<bf16>,
    final_norm: Vec<bf16>,
    residuals: Option<[Vec<f32>; 2]>,
}

/// The RMSNorm of `res` with `weight` as a GEMV input, from the sums in `partials`.
fn norm_input<'a>(
    res: &'a CudaSlice<f32>,
    weight: &'a CudaSlice<bf16>,
    partials: &'a NormPartials,
    eps: f32,
) -> GemvInput<'a, bf16> {
    GemvInput::Normalized(NormInput {
        residual: res,
        weight,
        partials,
        eps,
    })
}

/// The chain with the residual epilogues and the normalized inputs: O (+ residual) →
/// gate/up over the normalized residual; down (+ residual) → Q/K/V over it; the final norm.
/// With `check`, the residual and the partial sums are read back after each producer (a
/// host synchronization); without, every launch is queued back to back.
fn fused_chain(
    gpu: &Gpu,
    s: &Shape,
    w: &Weights,
    tokens: usize,
    inputs: &ChainInputs<'_>,
    check: bool,
) -> Fused {
    let st = gpu.stream();
    let (h, inter) = (s.hidden, s.inter);
    let what = format!("{h} x {tokens} tokens, staged {}", gpu.staged_norm());
    let mut res_f = st.clone_htod(inputs.residual0).unwrap();
    let mut partials = NormPartials::new();
    let mut act_f = st.alloc_zeros::<bf16>(tokens * inter).unwrap();
    let mut qkv_f = Qkv::new(gpu, tokens, &s.qkv);
    let mut normed = st.alloc_zeros::<bf16>(tokens * h).unwrap();
    let residual = |res: &CudaSlice<f32>, partials: &NormPartials| {
        let after = check.then(|| host(gpu, res));
        if let Some(r) = &after {
            check_sums(gpu, partials, r, h, &what);
        }
        after
    };
    gemv_with(
        gpu,
        GemvInput::Plain(inputs.attn),
        &w.wo,
        s.attn,
        inputs.bias_o,
        GemvEpilogue::Residual {
            residual: &mut res_f,
            partials: &mut partials,
        },
    )
    .unwrap();
    let res_f1 = residual(&res_f, &partials);
    let input = norm_input(&res_f, &w.ffn_norm, &partials, inputs.eps);
    gemv_silu_mul_with(gpu, input, &w.w_gate_up, inter, h, &mut act_f).unwrap();
    gemv_with(
        gpu,
        GemvInput::Plain(inputs.act),
        &w.w_down,
        inter,
        None,
        GemvEpilogue::Residual {
            residual: &mut res_f,
            partials: &mut partials,
        },
    )
    .unwrap();
    let res_f2 = residual(&res_f, &partials);
    let input = norm_input(&res_f, &w.attn_norm, &partials, inputs.eps);
    let outs = GemvEpilogue::Store(&mut qkv_f.outs(&s.qkv));
    gemv_with(gpu, input, &w.w_qkv, h, inputs.bias_qkv, outs).unwrap();
    rms_norm(gpu, &mut res_f, None, &w.attn_norm, inputs.eps, &mut normed).unwrap();
    Fused {
        act: host(gpu, &act_f),
        qkv: qkv_f.host(gpu),
        final_norm: host(gpu, &normed),
        residuals: res_f1.zip(res_f2).map(|(a, b)| [a, b]),
    }
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn fused_norm_chain_matches_the_unfused_chain() {
    let gpu = gpu();
    let shapes = [
        // Llama-3-8B: the f32-FMA kernels at 1–2 tokens, tensor cores from 3; the O product
        // splits K in 2 warps (FMA) or 8 (tensor cores), down in 4 or 8.
        Shape {
            hidden: 4096,
            attn: 4096,
            qkv: [4096, 1024, 1024],
            inter: 14336,
        },
        // Tensor-core consumers from 3 tokens with a gate/up tile cut short (1000 rows: 62.5
        // tiles); the down product (k = 1000) on the FMA kernels.
        Shape {
            hidden: 1024,
            attn: 1024,
            qkv: [1024, 256, 256],
            inter: 1000,
        },
        // A hidden size that is not a multiple of 32: the consumers and the down product on
        // the FMA kernels at every token count (no K split), the O product (k = 512) on
        // tensor cores from 3 tokens (K split in 2) with a last tile cut short (584 rows:
        // 36.5 tiles).
        Shape {
            hidden: 584,
            attn: 512,
            qkv: [512, 128, 128],
            inter: 1544,
        },
        // Llama-3-70B's hidden size: staged rows of 4 to 20 slices per thread (the residual
        // slots refilled several times) up to 5 tokens; from 6 tokens two CTAs' rows no
        // longer fit on an SM (H200), and the consumers normalize in their loops.
        Shape {
            hidden: 8192,
            attn: 1024,
            qkv: [1024, 256, 256],
            inter: 512,
        },
    ];
    for (i, s) in shapes.iter().enumerate() {
        let w = weights(&gpu, s, i as u64);
        for tokens in 1..=GEMV_MAX_TOKENS {
            for bias in [false, true] {
                run_chain(&gpu, s, &w, tokens, bias, (i * 100 + tokens) as u64);
            }
        }
    }
}

/// `out = rmsnorm(res) W^T` through the normalized input, W square.
fn normalized(
    gpu: &Gpu,
    w: &CudaSlice<bf16>,
    res: &CudaSlice<f32>,
    norm_w: &CudaSlice<bf16>,
    partials: &NormPartials,
    out: &mut CudaSlice<bf16>,
) -> kernels_cuda::Result<()> {
    let h = norm_w.len();
    gemv_with(
        gpu,
        norm_input(res, norm_w, partials, 1e-5),
        w,
        h,
        None,
        GemvEpilogue::Store(&mut [GemvOut { out, width: h }]),
    )
}

/// `res += x W^T` through the residual epilogue, W `[h][h]`.
fn add_to_residual(
    gpu: &Gpu,
    h: usize,
    w: &CudaSlice<bf16>,
    x: &CudaSlice<bf16>,
    res: &mut CudaSlice<f32>,
    partials: &mut NormPartials,
) -> kernels_cuda::Result<()> {
    gemv_with(
        gpu,
        GemvInput::Plain(x),
        w,
        h,
        None,
        GemvEpilogue::Residual {
            residual: res,
            partials,
        },
    )
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn normalized_inputs_need_matching_partials() {
    let gpu = gpu();
    let st = gpu.stream();
    let (h, tokens) = (256, 2);
    let is_bad = |r: kernels_cuda::Result<()>| matches!(r, Err(KernelError::BadArgument { .. }));
    let w = st.alloc_zeros::<bf16>(h * h).unwrap();
    let norm_w = st.alloc_zeros::<bf16>(h).unwrap();
    let mut res = st.alloc_zeros::<f32>(tokens * h).unwrap();
    let mut out = st.alloc_zeros::<bf16>(tokens * h).unwrap();
    let mut partials = NormPartials::new();
    // No sums yet.
    let r = normalized(&gpu, &w, &res, &norm_w, &partials, &mut out);
    assert!(is_bad(r));
    // Sums of 2 tokens do not serve a residual of 1.
    let x = st.alloc_zeros::<bf16>(tokens * h).unwrap();
    add_to_residual(&gpu, h, &w, &x, &mut res, &mut partials).unwrap();
    assert_eq!(partials.written(), Some((tokens, h)));
    let one = st.alloc_zeros::<f32>(h).unwrap();
    let mut out1 = st.alloc_zeros::<bf16>(h / 2).unwrap();
    let r = gemv_silu_mul_with(
        &gpu,
        norm_input(&one, &norm_w, &partials, 1e-5),
        &w,
        h / 2,
        h,
        &mut out1,
    );
    assert!(is_bad(r));
    // A residual of the wrong size is refused; the sums stay as they were.
    let r = gemv_with(
        &gpu,
        GemvInput::Plain(&x),
        &w,
        h,
        None,
        GemvEpilogue::Residual {
            residual: &mut st.alloc_zeros::<f32>(tokens * h + 1).unwrap(),
            partials: &mut partials,
        },
    );
    assert!(is_bad(r));
    assert_eq!(partials.written(), Some((tokens, h)));
    // All zeros with eps: the products are zeros, not NaN (rows staged or not).
    add_to_residual(&gpu, h, &w, &x, &mut res, &mut partials).unwrap();
    for staged in [true, false] {
        gpu.set_staged_norm(staged);
        fill_uniform(&gpu, &mut out, 1, 1.0, 2.0).unwrap();
        normalized(&gpu, &w, &res, &norm_w, &partials, &mut out).unwrap();
        assert!(
            host(&gpu, &out).iter().all(|v| v.to_f32() == 0.0),
            "staged {staged}"
        );
    }
}
