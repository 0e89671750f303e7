//! Next-token choice: greedy, temperature, top-k, top-p, repetition penalty, seeded.
//!
//! The order of the transforms is HF transformers' (repetition penalty, temperature, top-k,
//! top-p), so a seed-free greedy run matches HF's greedy generate token for token.

use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SamplingOptions {
    /// 0 = greedy.
    pub temperature: f32,
    /// 0 = no limit.
    pub top_k: usize,
    /// 1.0 = no nucleus cut.
    pub top_p: f32,
    /// 1.0 = none; HF's CTRL-style penalty on every token already in the sequence.
    pub repetition_penalty: f32,
    pub seed: u64,
}

impl Default for SamplingOptions {
    fn default() -> Self {
        SamplingOptions { temperature: 0.0, top_k: 0, top_p: 1.0, repetition_penalty: 1.0, seed: 0 }
    }
}

/// SplitMix64: tiny, seedable and identical on every platform, so a seed means the same text
/// on any number of ranks.
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E3779B97F4A7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58476D1CE4E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D049BB133111EB);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    pub fn uniform(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// One sequence's sampler: its own stream of random numbers.
pub struct Sampler {
    opts: SamplingOptions,
    rng: Rng,
}

impl Sampler {
    /// `stream` separates the sequences of one batch (their index in the prompts file).
    pub fn new(opts: &SamplingOptions, stream: u64) -> Sampler {
        let seed = opts.seed ^ stream.wrapping_mul(0xD1B54A32D192ED03);
        Sampler { opts: opts.clone(), rng: Rng::new(seed) }
    }

    /// logits (V,) of the next token; history: the sequence so far (prompt and generated).
    pub fn next(&mut self, logits: &[f32], history: &[u32]) -> u32 {
        let mut logits = logits.to_vec();
        apply_repetition_penalty(&mut logits, history, self.opts.repetition_penalty);
        if self.opts.temperature <= 0.0 {
            return argmax(&logits) as u32;
        }
        let probs = filtered_probs(&logits, &self.opts);
        let u = self.rng.uniform();
        let mut acc = 0.0;
        let mut last = 0;
        for (i, p) in probs.iter().enumerate() {
            if *p > 0.0 {
                acc += p;
                last = i;
                if u < acc {
                    return i as u32;
                }
            }
        }
        last as u32 // rounding left u just above the total
    }
}

/// First maximum, as torch.argmax.
pub fn argmax(v: &[f32]) -> usize {
    v.iter().enumerate().fold(0, |b, (i, x)| if *x > v[b] { i } else { b })
}

fn apply_repetition_penalty(logits: &mut [f32], history: &[u32], penalty: f32) {
    if penalty == 1.0 {
        return;
    }
    let mut seen = vec![false; logits.len()];
    for &t in history {
        let t = t as usize;
        if t < logits.len() && !seen[t] {
            seen[t] = true;
            logits[t] = if logits[t] < 0.0 { logits[t] * penalty } else { logits[t] / penalty };
        }
    }
}

/// The sampling distribution (V,) after temperature, top-k and top-p; zeros outside.
pub fn filtered_probs(logits: &[f32], opts: &SamplingOptions) -> Vec<f64> {
    let scaled: Vec<f64> = logits.iter().map(|&l| l as f64 / opts.temperature as f64).collect();
    let mut order: Vec<usize> = (0..scaled.len()).collect();
    order.sort_by(|&a, &b| scaled[b].total_cmp(&scaled[a]).then(a.cmp(&b)));
    let mut keep = order.len();
    if opts.top_k > 0 {
        keep = keep.min(opts.top_k);
    }
    let max = scaled[order[0]];
    let weights: Vec<f64> = order[..keep].iter().map(|&i| (scaled[i] - max).exp()).collect();
    let total: f64 = weights.iter().sum();
    if opts.top_p < 1.0 {
        // smallest prefix whose mass reaches top_p (the token that crosses it stays)
        let mut acc = 0.0;
        for (n, w) in weights.iter().enumerate() {
            acc += w / total;
            if acc >= opts.top_p as f64 {
                keep = n + 1;
                break;
            }
        }
    }
    let kept_total: f64 = weights[..keep].iter().sum();
    let mut probs = vec![0.0; logits.len()];
    for (n, &i) in order[..keep].iter().enumerate() {
        probs[i] = weights[n] / kept_total;
    }
    probs
}

#[cfg(test)]
mod tests {
    use super::*;

    fn logits() -> Vec<f32> {
        vec![2.0, 1.0, 0.5, 3.0, -1.0, 0.0, 1.5, -2.0]
    }

    fn draw(opts: &SamplingOptions, n: usize) -> Vec<usize> {
        let mut s = Sampler::new(opts, 0);
        let mut counts = vec![0; logits().len()];
        for _ in 0..n {
            counts[s.next(&logits(), &[]) as usize] += 1;
        }
        counts
    }

    #[test]
    fn greedy_is_argmax() {
        let mut s = Sampler::new(&SamplingOptions::default(), 3);
        assert_eq!(s.next(&logits(), &[]), 3);
        // a penalty on token 3 (positive logit divided by 2) hands the lead to token 0
        let opts = SamplingOptions { repetition_penalty: 2.0, ..Default::default() };
        assert_eq!(Sampler::new(&opts, 0).next(&logits(), &[3]), 0);
    }

    #[test]
    fn top_k_never_leaves_the_top_k() {
        let opts = SamplingOptions { temperature: 1.5, top_k: 3, seed: 11, ..Default::default() };
        let counts = draw(&opts, 5000);
        for (i, c) in counts.iter().enumerate() {
            if ![3, 0, 6].contains(&i) {
                assert_eq!(*c, 0, "token {i} is outside the top 3");
            }
        }
        assert!(counts[3] > 0 && counts[0] > 0 && counts[6] > 0);
    }

    #[test]
    fn top_p_stays_in_the_nucleus() {
        let opts = SamplingOptions { temperature: 1.0, top_p: 0.8, seed: 5, ..Default::default() };
        let probs = filtered_probs(&logits(), &opts);
        // softmax: token 3 ≈ 0.531, token 0 ≈ 0.195, token 6 ≈ 0.118, token 1 ≈ 0.072:
        // 0.531 + 0.195 < 0.8 <= 0.531 + 0.195 + 0.118, so the nucleus is {3, 0, 6}
        let nucleus: Vec<usize> = (0..8).filter(|&i| probs[i] > 0.0).collect();
        assert_eq!(nucleus, vec![0, 3, 6]);
        let counts = draw(&opts, 3000);
        assert_eq!(counts.iter().enumerate().filter(|(i, c)| **c > 0 && !nucleus.contains(i)).count(), 0);
    }

    #[test]
    fn empirical_distribution_matches_softmax_at_temperature() {
        let opts = SamplingOptions { temperature: 0.8, seed: 1234, ..Default::default() };
        let n = 40_000;
        let counts = draw(&opts, n);
        let l = logits();
        let max = l.iter().cloned().fold(f32::MIN, f32::max) as f64;
        let w: Vec<f64> = l.iter().map(|&x| ((x as f64 - max) / 0.8).exp()).collect();
        let z: f64 = w.iter().sum();
        // Pearson chi-square, 7 degrees of freedom: P(chi2 > 24.3) = 0.001
        let chi2: f64 = counts.iter().zip(&w).map(|(&c, wi)| {
            let e = n as f64 * wi / z;
            (c as f64 - e).powi(2) / e
        }).sum();
        assert!(chi2 < 24.3, "chi-square {chi2}: samples do not follow softmax(logits / T)");
        // and a wrong temperature is detected by the same test
        let wrong: f64 = counts.iter().zip(l.iter()).map(|(&c, &x)| {
            let e = n as f64 * ((x as f64 - max).exp()) / l.iter().map(|&y| (y as f64 - max).exp()).sum::<f64>();
            (c as f64 - e).powi(2) / e
        }).sum();
        assert!(wrong > 24.3, "the test cannot tell T=0.8 from T=1 (chi-square {wrong})");
    }

    #[test]
    fn same_seed_same_draws_other_stream_differs() {
        let opts = SamplingOptions { temperature: 1.0, seed: 99, ..Default::default() };
        let run = |stream| {
            let mut s = Sampler::new(&opts, stream);
            (0..50).map(|_| s.next(&logits(), &[])).collect::<Vec<_>>()
        };
        assert_eq!(run(0), run(0));
        assert_ne!(run(0), run(1));
    }
}
