//! The synthetic workloads of `kvserve bench`: pure, seeded, deterministic.
//!
//! A [`Workload`] (a [`WorkloadKind`], a request count and a seed) becomes a list of
//! [`BenchRequest`]s (random prompt token ids and an exact output length; the bench sets
//! `ignore_eos`) through [`Workload::requests`]. The same workload and vocabulary give the same
//! requests on every machine. Bad parameters are [`WorkloadError`]s naming the parameter.
//!
//! # The ShareGPT-like workload
//! Benchmarks of LLM servers (vLLM's `benchmark_serving.py`, SGLang's `bench_serving`) replay
//! ShareGPT conversations; their prompt and completion lengths are right-skewed with a long
//! tail and a mean near 200 prompt / 180 completion tokens for Llama tokenizers (issue 8 measured
//! a mean of 204 in / 183 out over 512 requests). No conversation text is shipped here: the
//! lengths are drawn from lognormal distributions with those means and `sigma` = 1.0 (a
//! median about 0.6× the mean, the skew of the real set), then clipped to `[4, cap]`, where
//! `cap` = min(1024, max_model_len / 2) follows vLLM's ShareGPT filter (prompts and
//! completions of fewer than 4 tokens, and prompts over 1024 tokens, are dropped there). The
//! lognormal's `mu` is solved so that the mean *after* clipping is the target. Token ids are
//! uniform random ids: prefix caching finds nothing in this workload.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// Errors in workload parameters. Each names what was wrong.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WorkloadError {
    /// `--workload` names no workload.
    #[error("unknown workload {input:?}: expected one of {}", WorkloadKind::NAMES.join(", "))]
    UnknownName {
        /// What was given.
        input: String,
    },
    /// A parameter out of range.
    #[error("invalid workload parameter {field} = {value}: {reason}")]
    Parameter {
        /// The parameter.
        field: &'static str,
        /// Its value.
        value: String,
        /// Why it is refused.
        reason: String,
    },
    /// A request longer than the engine's `max_model_len`.
    #[error(
        "request {index} of the workload needs {prompt_len} prompt + {output_len} output tokens, more than max_model_len ({max_model_len}); raise --max-model-len / --kv-cache-memory or shorten the workload"
    )]
    TooLong {
        /// The request.
        index: usize,
        /// Its prompt length.
        prompt_len: u32,
        /// Its output length.
        output_len: u32,
        /// The engine's limit.
        max_model_len: u32,
    },
    /// A vocabulary with no token.
    #[error("the model's vocabulary is empty")]
    EmptyVocabulary,
}

/// What kind of requests a workload makes.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum WorkloadKind {
    /// Every request `input_len` prompt tokens and `output_len` output tokens.
    Fixed {
        /// Prompt tokens per request.
        input_len: u32,
        /// Output tokens per request.
        output_len: u32,
    },
    /// Lognormal lengths matched to ShareGPT's (see the [module docs](self)).
    Sharegpt {
        /// Target mean prompt length (after clipping).
        mean_input_len: f64,
        /// Target mean output length (after clipping).
        mean_output_len: f64,
        /// Standard deviation of the lengths' logarithm.
        sigma: f64,
    },
    /// A common prompt prefix (same random ids for every request) and a distinct suffix each.
    SharedPrefix {
        /// Tokens of the shared prefix.
        prefix_len: u32,
        /// Tokens of each request's own suffix.
        suffix_len: u32,
        /// Output tokens per request.
        output_len: u32,
    },
}

impl WorkloadKind {
    /// The names `--workload` accepts.
    pub const NAMES: [&'static str; 6] = [
        "fixed",
        "sharegpt",
        "128/128",
        "2048/128",
        "128/2048",
        "shared-prefix",
    ];

    /// The ShareGPT-like workload with issue 8's means (200 in / 180 out) and `sigma` = 1.0.
    pub const SHAREGPT: Self = Self::Sharegpt {
        mean_input_len: 200.0,
        mean_output_len: 180.0,
        sigma: 1.0,
    };

    /// The workload's name, as `--workload` takes it (fixed sets of a preset shape by their
    /// shape).
    pub fn name(&self) -> String {
        match self {
            Self::Fixed {
                input_len,
                output_len,
            } => format!("{input_len}/{output_len}"),
            Self::Sharegpt { .. } => "sharegpt".to_owned(),
            Self::SharedPrefix { .. } => "shared-prefix".to_owned(),
        }
    }

    fn check(&self) -> Result<(), WorkloadError> {
        let positive = |field: &'static str, v: u32| {
            if v == 0 {
                Err(WorkloadError::Parameter {
                    field,
                    value: v.to_string(),
                    reason: "must be at least 1".to_owned(),
                })
            } else {
                Ok(())
            }
        };
        let mean = |field: &'static str, v: f64| {
            if v.is_finite() && (4.0..=1024.0).contains(&v) {
                Ok(())
            } else {
                Err(WorkloadError::Parameter {
                    field,
                    value: v.to_string(),
                    reason: "must be in [4, 1024] (the lengths are clipped there)".to_owned(),
                })
            }
        };
        match *self {
            Self::Fixed {
                input_len,
                output_len,
            } => {
                positive("input_len", input_len)?;
                positive("output_len", output_len)
            }
            Self::Sharegpt {
                mean_input_len,
                mean_output_len,
                sigma,
            } => {
                mean("mean_input_len", mean_input_len)?;
                mean("mean_output_len", mean_output_len)?;
                if sigma.is_finite() && (0.0..=3.0).contains(&sigma) {
                    Ok(())
                } else {
                    Err(WorkloadError::Parameter {
                        field: "sigma",
                        value: sigma.to_string(),
                        reason: "must be in [0, 3]".to_owned(),
                    })
                }
            }
            Self::SharedPrefix {
                prefix_len,
                suffix_len,
                output_len,
            } => {
                positive("prefix_len", prefix_len)?;
                positive("suffix_len", suffix_len)?;
                positive("output_len", output_len)
            }
        }
    }
}

impl fmt::Display for WorkloadKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Self::Fixed {
                input_len,
                output_len,
            } => write!(f, "fixed {input_len} in / {output_len} out"),
            Self::Sharegpt {
                mean_input_len,
                mean_output_len,
                sigma,
            } => write!(
                f,
                "sharegpt-like lognormal, mean {mean_input_len} in / {mean_output_len} out, sigma {sigma}"
            ),
            Self::SharedPrefix {
                prefix_len,
                suffix_len,
                output_len,
            } => write!(
                f,
                "shared prefix {prefix_len} + suffix {suffix_len} in / {output_len} out"
            ),
        }
    }
}

/// A workload by name, with the defaults of its kind: `fixed` is 128/64 (`--input-len` /
/// `--output-len` change it), `shared-prefix` is a 1024-token prefix, a 32-token suffix and 64
/// output tokens.
impl FromStr for WorkloadKind {
    type Err = WorkloadError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let fixed = |input_len, output_len| Self::Fixed {
            input_len,
            output_len,
        };
        match s.trim().to_ascii_lowercase().as_str() {
            "fixed" => Ok(fixed(128, 64)),
            "sharegpt" => Ok(Self::SHAREGPT),
            "128/128" => Ok(fixed(128, 128)),
            "2048/128" => Ok(fixed(2048, 128)),
            "128/2048" => Ok(fixed(128, 2048)),
            "shared-prefix" => Ok(Self::SharedPrefix {
                prefix_len: 1024,
                suffix_len: 32,
                output_len: 64,
            }),
            _ => Err(WorkloadError::UnknownName {
                input: s.to_owned(),
            }),
        }
    }
}

/// A workload: what kind of requests, how many, and the seed of their random parts.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Workload {
    /// The requests' shape.
    #[serde(flatten)]
    pub kind: WorkloadKind,
    /// Requests, all submitted at once.
    pub num_requests: u32,
    /// Seed of the random lengths and token ids.
    pub seed: u64,
}

/// One request of a workload.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BenchRequest {
    /// Prompt token ids.
    pub prompt: Vec<u32>,
    /// Tokens to generate (EOS ignored).
    pub output_len: u32,
}

impl Workload {
    /// The workload's requests for a model of `vocab_size` tokens and `max_model_len`.
    ///
    /// # Errors
    /// A [`WorkloadError`] naming the bad parameter, or the first request longer than
    /// `max_model_len`.
    pub fn requests(
        &self,
        vocab_size: u32,
        max_model_len: u32,
    ) -> Result<Vec<BenchRequest>, WorkloadError> {
        if self.num_requests == 0 {
            return Err(WorkloadError::Parameter {
                field: "num_requests",
                value: "0".to_owned(),
                reason: "must be at least 1".to_owned(),
            });
        }
        if vocab_size == 0 {
            return Err(WorkloadError::EmptyVocabulary);
        }
        self.kind.check()?;
        let mut rng = SplitMix64(self.seed);
        let ids = |n: u32, rng: &mut SplitMix64| -> Vec<u32> {
            (0..n)
                .map(|_| (rng.next_u64() % u64::from(vocab_size)) as u32)
                .collect()
        };
        let n = self.num_requests as usize;
        let requests: Vec<BenchRequest> = match self.kind {
            WorkloadKind::Fixed {
                input_len,
                output_len,
            } => (0..n)
                .map(|_| BenchRequest {
                    prompt: ids(input_len, &mut rng),
                    output_len,
                })
                .collect(),
            WorkloadKind::Sharegpt {
                mean_input_len,
                mean_output_len,
                sigma,
            } => {
                let cap = (max_model_len / 2).min(1024);
                if cap < 4 {
                    return Err(WorkloadError::Parameter {
                        field: "max_model_len",
                        value: max_model_len.to_string(),
                        reason: "the sharegpt workload needs at least 8".to_owned(),
                    });
                }
                let input = ClippedLognormal::new(mean_input_len, sigma, 4, cap)?;
                let output = ClippedLognormal::new(mean_output_len, sigma, 4, cap)?;
                (0..n)
                    .map(|_| {
                        let input_len = input.sample(&mut rng);
                        let output_len = output.sample(&mut rng);
                        BenchRequest {
                            prompt: ids(input_len, &mut rng),
                            output_len,
                        }
                    })
                    .collect()
            }
            WorkloadKind::SharedPrefix {
                prefix_len,
                suffix_len,
                output_len,
            } => {
                let prefix = ids(prefix_len, &mut rng);
                (0..n)
                    .map(|_| {
                        let mut prompt = prefix.clone();
                        prompt.extend(ids(suffix_len, &mut rng));
                        BenchRequest { prompt, output_len }
                    })
                    .collect()
            }
        };
        for (index, r) in requests.iter().enumerate() {
            let prompt_len = u32::try_from(r.prompt.len()).unwrap_or(u32::MAX);
            if u64::from(prompt_len) + u64::from(r.output_len) > u64::from(max_model_len) {
                return Err(WorkloadError::TooLong {
                    index,
                    prompt_len,
                    output_len: r.output_len,
                    max_model_len,
                });
            }
        }
        Ok(requests)
    }
}

/// SplitMix64: a tiny, well-distributed generator for reproducible workloads (and the
/// arrival times of `bench-serve`).
#[derive(Debug, Clone)]
pub(super) struct SplitMix64(pub(super) u64);

impl SplitMix64 {
    pub(super) fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in (0, 1): never 0, so its logarithm is finite.
    pub(super) fn open01(&mut self) -> f64 {
        ((self.next_u64() >> 11) as f64 + 0.5) / (1u64 << 53) as f64
    }

    /// Standard normal (Box-Muller, one of the pair).
    fn normal(&mut self) -> f64 {
        let (u1, u2) = (self.open01(), self.open01());
        (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
    }
}

/// A lognormal length rounded and clipped to `[lo, hi]`, its `mu` solved so that the clipped
/// mean is the target.
#[derive(Debug, Clone, Copy)]
struct ClippedLognormal {
    mu: f64,
    sigma: f64,
    lo: u32,
    hi: u32,
}

impl ClippedLognormal {
    fn new(mean: f64, sigma: f64, lo: u32, hi: u32) -> Result<Self, WorkloadError> {
        let (flo, fhi) = (f64::from(lo), f64::from(hi));
        if !(flo..=fhi).contains(&mean) {
            return Err(WorkloadError::Parameter {
                field: "mean length",
                value: mean.to_string(),
                reason: format!("must be within the clip range [{lo}, {hi}] (max_model_len / 2)"),
            });
        }
        // The clipped mean grows with mu: bisect.
        let (mut a, mut b) = (flo.ln() - 10.0, fhi.ln() + 10.0);
        for _ in 0..200 {
            let mid = 0.5 * (a + b);
            if clipped_mean(mid, sigma, flo, fhi) < mean {
                a = mid;
            } else {
                b = mid;
            }
        }
        Ok(Self {
            mu: 0.5 * (a + b),
            sigma,
            lo,
            hi,
        })
    }

    fn sample(&self, rng: &mut SplitMix64) -> u32 {
        let x = (self.mu + self.sigma * rng.normal()).exp().round();
        if x.is_nan() {
            return self.lo;
        }
        x.clamp(f64::from(self.lo), f64::from(self.hi)) as u32
    }
}

/// E[clamp(X, lo, hi)] for X lognormal(mu, sigma).
fn clipped_mean(mu: f64, sigma: f64, lo: f64, hi: f64) -> f64 {
    if sigma == 0.0 {
        return mu.exp().clamp(lo, hi);
    }
    let z = |c: f64| (c.ln() - mu) / sigma;
    let (zl, zh) = (z(lo), z(hi));
    // E[X; lo < X < hi] = e^(mu + sigma²/2) (Φ(zh - sigma) - Φ(zl - sigma)).
    let middle = (mu + 0.5 * sigma * sigma).exp() * (phi(zh - sigma) - phi(zl - sigma));
    lo * phi(zl) + middle + hi * (1.0 - phi(zh))
}

/// The standard normal CDF, through erfc (Numerical Recipes' Chebyshev fit, |error| < 1.2e-7).
fn phi(x: f64) -> f64 {
    0.5 * erfc(-x / std::f64::consts::SQRT_2)
}

fn erfc(x: f64) -> f64 {
    let z = x.abs();
    let t = 1.0 / (1.0 + 0.5 * z);
    let poly = -z * z - 1.265_512_23
        + t * (1.000_023_68
            + t * (0.374_091_96
                + t * (0.096_784_18
                    + t * (-0.186_288_06
                        + t * (0.278_868_07
                            + t * (-1.135_203_98
                                + t * (1.488_515_87 + t * (-0.822_152_23 + t * 0.170_872_77))))))));
    let r = t * poly.exp();
    if x >= 0.0 { r } else { 2.0 - r }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn workload(kind: WorkloadKind, num_requests: u32) -> Workload {
        Workload {
            kind,
            num_requests,
            seed: 7,
        }
    }

    fn mean(v: impl Iterator<Item = u32>) -> f64 {
        let v: Vec<u32> = v.collect();
        v.iter().map(|&x| f64::from(x)).sum::<f64>() / v.len() as f64
    }

    #[test]
    fn names_parse_and_unknown_ones_are_listed_in_the_error() {
        for name in WorkloadKind::NAMES {
            let kind: WorkloadKind = name.parse().unwrap();
            if name != "fixed" {
                assert_eq!(kind.name(), name);
            }
        }
        assert_eq!(
            "2048/128".parse::<WorkloadKind>(),
            Ok(WorkloadKind::Fixed {
                input_len: 2048,
                output_len: 128
            })
        );
        let err = "sharegtp".parse::<WorkloadKind>().unwrap_err();
        let text = err.to_string();
        assert!(
            text.contains("sharegtp") && text.contains("shared-prefix"),
            "{text}"
        );
    }

    #[test]
    fn requests_are_reproducible_in_vocabulary_and_exact_in_length() {
        let w = workload(
            WorkloadKind::Fixed {
                input_len: 50,
                output_len: 3,
            },
            4,
        );
        let a = w.requests(100, 4096).unwrap();
        assert_eq!(a, w.requests(100, 4096).unwrap());
        assert_eq!(a.len(), 4);
        assert!(a.iter().all(|r| r.prompt.len() == 50
            && r.output_len == 3
            && r.prompt.iter().all(|&t| t < 100)));
        assert_ne!(a[0].prompt, a[1].prompt);
        let other = Workload { seed: 8, ..w };
        assert_ne!(a, other.requests(100, 4096).unwrap());
        // A vocabulary of one token.
        assert!(
            w.requests(1, 4096)
                .unwrap()
                .iter()
                .flat_map(|r| &r.prompt)
                .all(|&t| t == 0)
        );
    }

    #[test]
    fn sharegpt_lengths_match_the_target_means_and_clip_range() {
        let w = workload(WorkloadKind::SHAREGPT, 20_000);
        let r = w.requests(50_000, 8192).unwrap();
        let input = mean(r.iter().map(|r| r.prompt.len() as u32));
        let output = mean(r.iter().map(|r| r.output_len));
        assert!((input - 200.0).abs() < 200.0 * 0.04, "mean input {input}");
        assert!(
            (output - 180.0).abs() < 180.0 * 0.04,
            "mean output {output}"
        );
        assert!(r.iter().all(|r| (4..=1024).contains(&r.prompt.len())
            && (4..=1024).contains(&r.output_len)));
        // Right-skewed: the median is well below the mean.
        let mut lens: Vec<usize> = r.iter().map(|r| r.prompt.len()).collect();
        lens.sort_unstable();
        assert!((lens[lens.len() / 2] as f64) < 0.8 * input);
        // A short max_model_len lowers the cap (to max_model_len / 2).
        let short = workload(WorkloadKind::SHAREGPT, 500)
            .requests(100, 512)
            .unwrap();
        assert!(
            short
                .iter()
                .all(|r| r.prompt.len() <= 256 && r.output_len <= 256)
        );
    }

    #[test]
    fn clipped_mean_is_solved_exactly() {
        let d = ClippedLognormal::new(200.0, 1.0, 4, 1024).unwrap();
        assert!((clipped_mean(d.mu, 1.0, 4.0, 1024.0) - 200.0).abs() < 1e-6);
        // Without clipping the mean would be e^(mu + 1/2): the clip pulls it down, so mu is
        // above ln(200) - 1/2.
        assert!(d.mu > 200f64.ln() - 0.5);
        assert!((phi(0.0) - 0.5).abs() < 1e-7);
        assert!((phi(1.96) - 0.975).abs() < 1e-4);
    }

    #[test]
    fn shared_prefix_requests_share_exactly_the_prefix() {
        let kind = WorkloadKind::SharedPrefix {
            prefix_len: 64,
            suffix_len: 8,
            output_len: 5,
        };
        let r = workload(kind, 5).requests(1000, 4096).unwrap();
        assert!(r.iter().all(|r| r.prompt.len() == 72 && r.output_len == 5));
        assert!(r.iter().all(|x| x.prompt[..64] == r[0].prompt[..64]));
        assert!(r.windows(2).all(|w| w[0].prompt[64..] != w[1].prompt[64..]));
    }

    #[test]
    fn bad_parameters_are_errors_naming_the_parameter() {
        let fixed = |input_len, output_len| WorkloadKind::Fixed {
            input_len,
            output_len,
        };
        let cases: [(Workload, &str); 8] = [
            (workload(fixed(8, 8), 0), "num_requests"),
            (workload(fixed(0, 8), 1), "input_len"),
            (workload(fixed(8, 0), 1), "output_len"),
            (
                workload(
                    WorkloadKind::SharedPrefix {
                        prefix_len: 0,
                        suffix_len: 1,
                        output_len: 1,
                    },
                    1,
                ),
                "prefix_len",
            ),
            (
                workload(
                    WorkloadKind::Sharegpt {
                        mean_input_len: f64::NAN,
                        mean_output_len: 100.0,
                        sigma: 1.0,
                    },
                    1,
                ),
                "mean_input_len",
            ),
            (
                workload(
                    WorkloadKind::Sharegpt {
                        mean_input_len: 100.0,
                        mean_output_len: 100.0,
                        sigma: -1.0,
                    },
                    1,
                ),
                "sigma",
            ),
            (workload(fixed(2048, 128), 3), "max_model_len (1024)"),
            (workload(WorkloadKind::SHAREGPT, 3), "max_model_len"),
        ];
        for (w, field) in cases {
            let max_model_len =
                if matches!(w.kind, WorkloadKind::Sharegpt { .. }) && field == "max_model_len" {
                    300
                } else {
                    1024
                };
            let err = w.requests(100, max_model_len).unwrap_err().to_string();
            assert!(err.contains(field), "{w:?}: {err}");
        }
        assert_eq!(
            workload(fixed(1, 1), 1).requests(0, 10),
            Err(WorkloadError::EmptyVocabulary)
        );
    }

    #[test]
    fn workloads_round_trip_through_json() {
        for name in WorkloadKind::NAMES {
            let w = workload(name.parse().unwrap(), 3);
            let json = serde_json::to_string(&w).unwrap();
            assert_eq!(
                serde_json::from_str::<Workload>(&json).unwrap(),
                w,
                "{json}"
            );
        }
    }
}
