//! The fast CPU ops against plain-loop references (llama2.c style).

use super::*;
use super::attention::decode;
use crate::backend::{KvCache, Ops};
use crate::tensor::DType;
use crate::token_tree::{MicroBatch, TokenizedDoc};

/// Deterministic pseudo-random values in [-1, 1).
fn rand_vec(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
    (0..n)
        .map(|_| {
            s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect()
}

fn weight(shape: &[usize], seed: u64) -> CpuWeight {
    CpuWeight::new(shape.to_vec(), rand_vec(shape.iter().product(), seed))
}

fn mat(rows: usize, cols: usize, seed: u64) -> Mat {
    Mat::new(rows, cols, rand_vec(rows * cols, seed))
}

fn assert_close(a: &[f32], b: &[f32], tol: f32) {
    assert_eq!(a.len(), b.len());
    for (i, (x, y)) in a.iter().zip(b).enumerate() {
        assert!((x - y).abs() <= tol * (1.0 + y.abs()), "index {i}: {x} vs {y}");
    }
}

/// out[t][n] = sum_k x[t][k] w[n][k] + b[n]
fn linear_ref(x: &Mat, w: &CpuWeight, b: Option<&CpuWeight>) -> Vec<f32> {
    let (n, k) = (w.shape[0], w.shape[1]);
    let (w, b) = (w.to_rows(), b.map(CpuWeight::to_rows));
    let mut out = vec![0f32; x.rows * n];
    for t in 0..x.rows {
        for j in 0..n {
            let mut acc = 0f64;
            for i in 0..k {
                acc += x.data[t * k + i] as f64 * w[j * k + i] as f64;
            }
            out[t * n + j] = acc as f32 + b.as_ref().map_or(0.0, |b| b[j]);
        }
    }
    out
}

/// Dense masked attention: the whole (T, S) score matrix, mask from `AttnSpan::attends`.
fn attention_ref(q: &Mat, k: &Mat, v: &Mat, s: AttnShape, spans: &[AttnSpan]) -> Vec<f32> {
    let (h, d) = (s.heads, s.head_dim);
    let group = h / s.kv_heads;
    let mut out = vec![0f32; q.rows * h * d];
    for t in 0..q.rows {
        for hh in 0..h {
            let kv = hh / group;
            let mut scores = vec![f64::NEG_INFINITY; k.rows];
            for key in 0..k.rows {
                if spans[t].attends((t + s.key_offset) as u32, key as u32) {
                    let mut dot = 0f64;
                    for i in 0..d {
                        dot += q.data[t * h * d + hh * d + i] as f64 * k.data[key * s.kv_heads * d + kv * d + i] as f64;
                    }
                    scores[key] = dot / (d as f64).sqrt();
                }
            }
            let max = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let sum: f64 = scores.iter().map(|s| (s - max).exp()).sum();
            for key in 0..k.rows {
                let p = (scores[key] - max).exp() / sum;
                for i in 0..d {
                    out[t * h * d + hh * d + i] += (p * v.data[key * s.kv_heads * d + kv * d + i] as f64) as f32;
                }
            }
        }
    }
    out
}

#[test]
fn linear_matches_loops() {
    let b = CpuBackend::new();
    for (t, k, n) in [(1, 3, 2), (7, 64, 33), (40, 96, 130)] {
        let x = mat(t, k, 1);
        let w = weight(&[n, k], 2);
        let bias = weight(&[n], 3);
        let y = b.linear(&x, &w, Some(&bias)).unwrap();
        assert_close(&y.data, &linear_ref(&x, &w, Some(&bias)), 1e-5);
    }
}

#[test]
fn half_precision_weights_stay_half_and_give_their_f32_widenings_results() {
    let b = CpuBackend::new();
    let (t, k, f) = (9, 70, 45);
    let x = mat(t, k, 80);
    let host = |shape: &[usize], seed| HostTensor::from_f32(shape.to_vec(), &rand_vec(shape.iter().product(), seed));
    let (gate, up, bias, table) = (host(&[f, k], 81), host(&[f, k], 82), host(&[f], 83), host(&[f, k], 84));
    let bits = |m: &Mat| m.data.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
    for dtype in [DType::F16, DType::Bf16] {
        let up_half = |t: &HostTensor| b.upload_weight(&t.to_dtype(dtype)).unwrap();
        // The f32 weight holding the very values the half one stores.
        let up_wide = |t: &HostTensor| b.upload_weight(&HostTensor::from_f32(t.shape.clone(), &t.to_dtype(dtype).to_f32())).unwrap();
        let (g, u, bb, e) = (up_half(&gate), up_half(&up), up_half(&bias), up_half(&table));
        let (gw, uw, bw, ew) = (up_wide(&gate), up_wide(&up), up_wide(&bias), up_wide(&table));
        assert_eq!((g.dtype(), g.bytes()), (dtype, gw.bytes() / 2), "a {dtype:?} matrix is held in {dtype:?}");
        assert_eq!(bb.dtype(), DType::F32, "vectors are widened");
        assert_eq!(g.to_rows(), gw.to_rows());
        let r = mat(t, f, 85);
        assert_eq!(bits(&b.linear(&x, &g, Some(&bb)).unwrap()), bits(&b.linear(&x, &gw, Some(&bw)).unwrap()), "{dtype:?} linear");
        let (got, want) = (b.linear_residual(&x, &g, Some(&bb), r.clone()).unwrap(), b.linear_residual(&x, &gw, Some(&bw), r).unwrap());
        assert_eq!(bits(&got), bits(&want), "{dtype:?} linear_residual");
        let (got, want) = (b.linear_silu_mul(&x, &g, Some(&bb), &u, None).unwrap(), b.linear_silu_mul(&x, &gw, Some(&bw), &uw, None).unwrap());
        assert_eq!(bits(&got), bits(&want), "{dtype:?} linear_silu_mul");
        // A layer mixing dtypes takes the unfused route, with the same values.
        let mixed = b.linear_silu_mul(&x, &g, Some(&bb), &uw, None).unwrap();
        assert_eq!(bits(&mixed), bits(&want), "{dtype:?} gate with an f32 up");
        let ids = [3, 0, 44, 3];
        assert_eq!(bits(&b.embed(&e, &ids).unwrap()), bits(&b.embed(&ew, &ids).unwrap()), "{dtype:?} embed");
    }
}

#[test]
fn attention_matches_dense_masked_reference() {
    let b = CpuBackend::new();
    let docs = [
        TokenizedDoc { index: 0, id: "a".into(), prompt: vec![1, 2, 3, 4], choices: vec![vec![5, 6, 7], vec![8, 9]] },
        TokenizedDoc { index: 1, id: "b".into(), prompt: vec![1, 2], choices: vec![vec![3, 4], vec![5]] },
    ];
    let batch = MicroBatch::build(&docs);
    let t = batch.rows();
    let shape = AttnShape { heads: 4, kv_heads: 2, head_dim: 8, key_offset: 0 };
    let (q, k, v) = (mat(t, 32, 4), mat(t, 16, 5), mat(t, 16, 6));
    let out = b.attention(&q, &k, &v, shape, &batch.spans).unwrap();
    assert_close(&out.data, &attention_ref(&q, &k, &v, shape, &batch.spans), 1e-5);
}

#[test]
fn attention_with_cached_keys() {
    let b = CpuBackend::new();
    // 5 cached rows, 2 new rows, causal from 0
    let shape = AttnShape { heads: 2, kv_heads: 1, head_dim: 4, key_offset: 5 };
    let spans = vec![AttnSpan::causal(0); 2];
    let (q, k, v) = (mat(2, 8, 7), mat(7, 4, 8), mat(7, 4, 9));
    let out = b.attention(&q, &k, &v, shape, &spans).unwrap();
    assert_close(&out.data, &attention_ref(&q, &k, &v, shape, &spans), 1e-5);
}

#[test]
fn norms_match_definitions() {
    let b = CpuBackend::new();
    let x = mat(3, 10, 10);
    let (w, bias) = (weight(&[10], 11), weight(&[10], 12));
    let ln = b.layer_norm(&x, &w, &bias, 1e-5).unwrap();
    let rms = b.rms_norm(&x, &w, 1e-6).unwrap();
    for r in 0..3 {
        let row = x.row(r);
        let mean = row.iter().sum::<f32>() / 10.0;
        let var = row.iter().map(|v| (v - mean).powi(2)).sum::<f32>() / 10.0;
        let ms = row.iter().map(|v| v * v).sum::<f32>() / 10.0;
        for i in 0..10 {
            let want_ln = (row[i] - mean) / (var + 1e-5).sqrt() * w.to_rows()[i] + bias.to_rows()[i];
            let want_rms = row[i] / (ms + 1e-6).sqrt() * w.to_rows()[i];
            assert!((ln.row(r)[i] - want_ln).abs() < 1e-5);
            assert!((rms.row(r)[i] - want_rms).abs() < 1e-5);
        }
    }
}

#[test]
fn rope_rotates_pairs_half_apart() {
    let b = CpuBackend::new();
    let mut x = mat(2, 8, 13);
    let orig = x.clone();
    // theta 10000, D 4: frequencies 10000^(-0/4) and 10000^(-2/4)
    b.rope(&mut x, 0, 2, 4, &[0, 3], &[1.0, 0.01]).unwrap();
    assert_eq!(x.row(0), orig.row(0), "position 0 is the identity");
    // head 1, pair i = 1: frequency 0.01
    let angle = 3.0f32 * 0.01;
    let (a, c) = (orig.row(1)[4 + 1], orig.row(1)[4 + 3]);
    assert!((x.row(1)[5] - (a * angle.cos() - c * angle.sin())).abs() < 1e-6);
    assert!((x.row(1)[7] - (c * angle.cos() + a * angle.sin())).abs() < 1e-6);
}

#[test]
fn rope_tables_kept_between_calls_match_fresh_ones() {
    // One backend rotating many position sets (more than it keeps) and two frequency sets over
    // the same positions, against a fresh backend per call: a kept table is only ever reused for
    // the same positions and frequencies.
    let b = CpuBackend::new();
    let freqs = [vec![1.0, 0.1, 0.01, 0.001], vec![0.5, 0.05, 0.005, 0.0005]];
    let sets: Vec<Vec<u32>> = (0..12).map(|i| (0..5).map(|t| (t * (i + 1)) as u32).collect()).collect();
    for round in 0..2 {
        for (i, positions) in sets.iter().enumerate() {
            let f = &freqs[(i + round) % 2];
            let mut got = mat(5, 24, 80 + i as u64);
            let mut want = got.clone();
            b.rope(&mut got, 8, 2, 8, positions, f).unwrap();
            CpuBackend::new().rope(&mut want, 8, 2, 8, positions, f).unwrap();
            assert_eq!(got, want, "round {round}, position set {i}");
        }
    }
}

/// erf in f64 to ~1e-15: Maclaurin series below 2.5, erfc's continued fraction (Lentz) above.
fn erf_ref(x: f64) -> f64 {
    if x.abs() < 2.5 {
        let (mut sum, mut term, x2) = (x, x, x * x);
        let mut n = 0.0;
        loop {
            n += 1.0;
            term *= -x2 / n;
            let add = term / (2.0 * n + 1.0);
            sum += add;
            if add.abs() <= 1e-17 * sum.abs() {
                break;
            }
        }
        sum * 2.0 / std::f64::consts::PI.sqrt()
    } else {
        let ax = x.abs();
        let (mut f, mut c, mut dd) = (ax, ax, 0.0);
        for i in 1..200 {
            let a = i as f64 / 2.0;
            dd = 1.0 / (ax + a * dd);
            c = ax + a / c;
            let delta = c * dd;
            f *= delta;
            if (delta - 1.0).abs() < 1e-16 {
                break;
            }
        }
        (1.0 - (-ax * ax).exp() / (f * std::f64::consts::PI.sqrt())).copysign(x)
    }
}

fn gelu_ref(x: f64) -> f64 {
    0.5 * x * (1.0 + erf_ref(x / std::f64::consts::SQRT_2))
}

/// x from -lim to lim in n steps, plus the edges of the approximations' intervals.
fn grid(lim: f32, n: usize) -> Vec<f32> {
    let mut xs: Vec<f32> = (0..=n).map(|i| -lim + 2.0 * lim * i as f32 / n as f32).collect();
    xs.extend([0.0, -0.0, 1.0, -1.0, 0.999_999_9, 1.000_000_1, 4.0, -4.0, 4.000_001, std::f32::consts::SQRT_2, 5.656_854]);
    xs
}

#[test]
fn erf_and_reference_known_values() {
    // scipy.special.erf / torch.nn.functional.gelu in float64
    for (x, want) in [(0.1, 0.1124629160), (1.0, 0.8427007929), (2.0, 0.9953222650), (3.0, 0.9999779095), (-2.6, -0.9997639656)] {
        assert!((erf_ref(x) - want).abs() < 1e-9, "erf_ref({x}) = {}", erf_ref(x));
        assert!((erf_f32(x as f32) as f64 - want).abs() < 3e-7, "erf_f32({x}) = {}", erf_f32(x as f32));
    }
    for (x, want) in [(-3.0, -0.0040496941), (-1.0, -0.1586552539), (0.5, 0.3457312306), (1.0, 0.8413447461), (2.7, 2.6906391707)] {
        assert!((gelu_ref(x) - want).abs() < 1e-9, "gelu_ref({x})");
        assert!((gelu_f32(x as f32) as f64 - want).abs() < 1e-6, "gelu_f32({x})");
    }
}

#[test]
fn fast_erf_gelu_exp_match_f64_references() {
    let mut worst = (0f64, 0f64, 0f64);
    for x in grid(12.0, 200_001) {
        let e = (erf_f32(x) as f64 - erf_ref(x as f64)).abs();
        let g = (gelu_f32(x) as f64 - gelu_ref(x as f64)).abs() / (x.abs() as f64).max(1.0);
        worst = (worst.0.max(e), worst.1.max(g), worst.2);
    }
    for x in grid(87.0, 200_001) {
        let want = (x as f64).exp();
        worst.2 = worst.2.max((exp_f32(x) as f64 - want).abs() / want);
    }
    // The slice functions run the copy this CPU dispatches to (AVX-512 or AVX2: fused
    // multiply-adds), the scalar ones above the baseline (separate multiply and add).
    let mut xs = grid(12.0, 200_001);
    vmath::gelu_slice(&mut xs);
    for (x, g) in grid(12.0, 200_001).into_iter().zip(xs) {
        worst.1 = worst.1.max((g as f64 - gelu_ref(x as f64)).abs() / (x.abs() as f64).max(1.0));
    }
    let mut xs = grid(87.0, 200_001);
    vmath::exp_scaled_shift_sum(&mut xs, 1.0, 0.0);
    for (x, e) in grid(87.0, 200_001).into_iter().zip(xs) {
        let want = (x as f64).exp();
        worst.2 = worst.2.max((e as f64 - want).abs() / want);
    }
    assert!(worst.0 < 3e-7, "erf: worst absolute error {:e}", worst.0);
    assert!(worst.1 < 3e-7, "gelu: worst error / max(1, |x|) {:e}", worst.1);
    assert!(worst.2 < 3e-7, "exp: worst relative error {:e}", worst.2);
    assert_eq!(exp_f32(f32::NEG_INFINITY), 0.0);
    assert_eq!(exp_f32(-100.0), 0.0);
    assert!(gelu_f32(f32::NAN).is_nan());
}

#[test]
fn gelu_and_silu_ops_match_plain_loops() {
    let b = CpuBackend::new();
    // Lengths that are not a multiple of the vector width nor of the parallel chunk.
    for (rows, cols) in [(1, 5), (3, 37), (7, 4099)] {
        let mut x = mat(rows, cols, 40);
        x.data.iter_mut().for_each(|v| *v *= 6.0);
        let orig = x.clone();
        b.gelu(&mut x).unwrap();
        for (got, &x0) in x.data.iter().zip(&orig.data) {
            let want = gelu_ref(x0 as f64);
            assert!((*got as f64 - want).abs() <= 3e-7 * (x0.abs() as f64).max(1.0), "gelu({x0}) = {got}, want {want}");
        }
        let mut gate = orig.clone();
        let up = mat(rows, cols, 41);
        b.silu_mul(&mut gate, &up).unwrap();
        for ((got, &g), &u) in gate.data.iter().zip(&orig.data).zip(&up.data) {
            let want = g as f64 / (1.0 + (-(g as f64)).exp()) * u as f64;
            assert!((*got as f64 - want).abs() <= 1e-6 * (1.0 + want.abs()), "silu({g}) * {u} = {got}, want {want}");
        }
    }
}

#[test]
fn fused_gate_up_matches_the_f64_products_and_refuses_unequal_widths() {
    let b = CpuBackend::new();
    // The last depth is over one K block: the unfused route.
    for (t, k, f) in [(1, 8, 5), (30, 64, 100), (300, 96, 70), (3, 2100, 20)] {
        let x = mat(t, k, 60);
        let (gate, up) = (weight(&[f, k], 61), weight(&[f, k], 62));
        let (gb, ub) = (weight(&[f], 63), weight(&[f], 64));
        let got = b.linear_silu_mul(&x, &gate, Some(&gb), &up, Some(&ub)).unwrap();
        assert_eq!((got.rows, got.cols), (t, f));
        // Fused or not, the values of the reference route exactly.
        let unfused = crate::backend::linear_silu_mul_unfused(&b, &x, &gate, Some(&gb), &up, Some(&ub)).unwrap();
        assert!(got.data.iter().zip(&unfused.data).all(|(a, b)| a.to_bits() == b.to_bits()), "{t}x{k}x{f}: fused differs from unfused");
        let (g, u) = (linear_ref(&x, &gate, Some(&gb)), linear_ref(&x, &up, Some(&ub)));
        let want: Vec<f32> = g.iter().zip(&u).map(|(&g, &u)| (g as f64 / (1.0 + (-(g as f64)).exp()) * u as f64) as f32).collect();
        assert_close(&got.data, &want, 1e-5);
    }
    let x = mat(3, 8, 65);
    let err = b.linear_silu_mul(&x, &weight(&[5, 8], 66), None, &weight(&[6, 8], 67), None).unwrap_err();
    assert!(err.to_string().contains("gate of shape [5, 8], up of shape [6, 8]"), "{err}");
}

#[test]
fn fused_linear_residual_matches_its_unfused_reference_on_every_route() {
    // Few rows, many rows, and a depth over one K block (partial sums added to the residual).
    for route in [CpuRoute::F32].into_iter().chain(CpuRoute::available(crate::backend::ComputeDtype::Bf16)) {
        let b = CpuBackend::with_route(KvDtype::F32, route);
        for (t, k, n) in [(1, 8, 5), (30, 64, 100), (300, 96, 70), (3, 2100, 20)] {
            let x = mat(t, k, 70);
            let host = |shape: &[usize], seed| HostTensor::from_f32(shape.to_vec(), &rand_vec(shape.iter().product(), seed));
            let (w, bias) = (b.upload_weight(&host(&[n, k], 71)).unwrap(), b.upload_weight(&host(&[n], 72)).unwrap());
            let r = mat(t, n, 73);
            let fused = b.linear_residual(&x, &w, Some(&bias), r.clone()).unwrap();
            let unfused = crate::backend::linear_residual_unfused(&b, &x, &w, Some(&bias), r).unwrap();
            assert_eq!((fused.rows, fused.cols), (t, n));
            // The sum is rounded once more in the reference (product, then + residual).
            assert_close(&fused.data, &unfused.data, 1e-5);
        }
    }
}

/// q, k and v written straight from the product (blocks whole panels wide) or, where a block
/// is not, through the reference's copies: either way bit for bit `linear` then `cols`.
#[test]
fn linear_split_gives_the_columns_of_linear_on_every_route() {
    for route in [CpuRoute::F32].into_iter().chain(CpuRoute::available(crate::backend::ComputeDtype::Bf16)) {
        let b = CpuBackend::with_route(KvDtype::F32, route);
        // Panel-aligned blocks (SmolLM2's 576 | 192 | 192 and a short last one), then a block
        // that ends inside a panel (the copying route); one row, a few, and many.
        for (t, widths) in [(1, [576, 192, 192]), (13, [64, 32, 7]), (300, [96, 64, 64]), (5, [40, 24, 24]), (29, [1, 30, 2])] {
            let (k, n) = (72, widths.iter().sum::<usize>());
            let host = |shape: &[usize], seed| HostTensor::from_f32(shape.to_vec(), &rand_vec(shape.iter().product(), seed));
            let (w, bias) = (b.upload_weight(&host(&[n, k], 81)).unwrap(), b.upload_weight(&host(&[n], 82)).unwrap());
            let x = mat(t, k, 80);
            let whole = b.linear(&x, &w, Some(&bias)).unwrap();
            let parts = b.linear_split(&x, &w, Some(&bias), widths).unwrap();
            let mut start = 0;
            for (part, width) in parts.iter().zip(widths) {
                assert_eq!((part.rows, part.cols), (t, width), "{route}: {widths:?}");
                for r in 0..t {
                    let want: Vec<u32> = whole.row(r)[start..start + width].iter().map(|v| v.to_bits()).collect();
                    let got: Vec<u32> = part.row(r).iter().map(|v| v.to_bits()).collect();
                    assert_eq!(got, want, "{route}: {widths:?} block at column {start}, row {r}");
                }
                start += width;
            }
        }
        let (w, x) = (weight(&[10, 4], 83), mat(3, 4, 84));
        let e = b.linear_split(&x, &w, None, [4, 4]).err().map(|e| e.to_string()).unwrap_or_default();
        assert!(e.contains("linear_split") && e.contains("[4, 4]") && e.contains("10"), "{e}");
    }
}

#[test]
fn cols_copies_the_column_range() {
    let b = CpuBackend::new();
    let x = mat(5, 12, 50);
    let c = b.cols(&x, 3, 4).unwrap();
    for r in 0..5 {
        assert_eq!(c.row(r), &x.row(r)[3..7]);
    }
    assert_eq!(b.cols(&x, 12, 0).unwrap().data.len(), 0);
    assert!(b.cols(&x, 10, 3).is_err());
}

#[test]
fn log_softmax_at_is_normalised() {
    let b = CpuBackend::new();
    let logits = mat(3, 50, 14);
    let all = b.log_softmax(&logits).unwrap();
    for r in 0..3 {
        let total: f64 = all[r * 50..(r + 1) * 50].iter().map(|&v| (v as f64).exp()).sum();
        assert!((total - 1.0).abs() < 1e-5);
    }
    let at = b.log_softmax_at(&logits, &[0, 49, 7]).unwrap();
    assert!((at[1] - all[50 + 49] as f64).abs() < 1e-6);
}

#[test]
fn log_softmax_at_matches_f64_over_a_vocabulary_row() {
    // A 49 152-wide row (SmolLM2's vocabulary) with logits spread like a model's: the f32
    // exponentials summed in blocks stay within 1e-6 nats of an f64 log-sum-exp.
    let b = CpuBackend::new();
    let logits = Mat::new(2, 49_152, (0..2 * 49_152).map(|i| ((i * 7919) % 2003) as f32 * 0.01 - 12.0).collect());
    let got = b.log_softmax_at(&logits, &[5, 49_151]).unwrap();
    for (r, &t) in [5usize, 49_151].iter().enumerate() {
        let row = logits.row(r);
        let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
        let lse = max + row.iter().map(|&v| (v as f64 - max).exp()).sum::<f64>().ln();
        assert!((got[r] - (row[t] as f64 - lse)).abs() < 1e-6, "row {r}: {} vs {}", got[r], row[t] as f64 - lse);
    }
}

#[test]
fn norms_of_wide_rows_with_an_offset_match_f64() {
    // 577 columns (72 chunks of the 8 f64 partial sums and a tail), values around 100 so the
    // variance is a small difference of large numbers.
    let b = CpuBackend::new();
    let x = Mat::new(2, 577, (0..2 * 577).map(|i| 100.0 + ((i * 37) % 101) as f32 * 0.01).collect());
    let w = CpuWeight::new(vec![577], vec![1.0; 577]);
    let zero = CpuWeight::new(vec![577], vec![0.0; 577]);
    let ln = b.layer_norm(&x, &w, &zero, 1e-5).unwrap();
    let rms = b.rms_norm(&x, &w, 1e-6).unwrap();
    for r in 0..2 {
        let row: Vec<f64> = x.row(r).iter().map(|&v| v as f64).collect();
        let mean = row.iter().sum::<f64>() / 577.0;
        let var = row.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / 577.0;
        let ms = row.iter().map(|v| v * v).sum::<f64>() / 577.0;
        for i in 0..577 {
            let want_ln = (row[i] - mean) / (var + 1e-5).sqrt();
            let want_rms = row[i] / (ms + 1e-6).sqrt();
            assert!((ln.row(r)[i] as f64 - want_ln).abs() < 1e-4, "layer_norm row {r} col {i}");
            assert!((rms.row(r)[i] as f64 - want_rms).abs() < 1e-5, "rms_norm row {r} col {i}");
        }
    }
}

#[test]
fn bad_shapes_are_errors_not_panics() {
    let b = CpuBackend::new();
    assert!(b.linear(&mat(2, 3, 1), &weight(&[4, 5], 2), None).is_err());
    assert!(b.embed(&weight(&[4, 2], 3), &[9]).is_err());
    assert!(b.log_softmax_at(&mat(1, 4, 1), &[4]).is_err());
    assert!(b.linear(&mat(2, 3, 1), &weight(&[4, 3], 2), Some(&weight(&[5], 3))).is_err());
    assert!(b.rms_norm(&mat(2, 3, 1), &weight(&[4], 2), 1e-6).is_err());
}

#[test]
fn query_blocks_stop_at_documents_and_block_size() {
    let docs: Vec<TokenizedDoc> = (0..3)
        .map(|i| TokenizedDoc { index: i, id: format!("{i}"), prompt: (0..70 + i as u32).collect(), choices: vec![vec![1, 2, 3], vec![4]] })
        .collect();
    let batch = MicroBatch::build(&docs);
    let blocks = super::attention::query_blocks(&batch.spans);
    assert_eq!(blocks.first().map(|b| b.0), Some(0));
    assert_eq!(blocks.last().map(|b| b.1), Some(batch.rows()));
    for w in blocks.windows(2) {
        assert_eq!(w[0].1, w[1].0, "blocks are contiguous");
    }
    for &(t0, t1) in &blocks {
        assert!(t1 - t0 <= super::attention::ATTN_BLOCK);
        let first = batch.spans[t0].first_key();
        assert!(batch.spans[t0..t1].iter().all(|sp| sp.first_key() == first), "block {t0}..{t1} crosses a document");
    }
    // 72 rows per document: a full block and a short one each.
    assert_eq!(blocks.len(), 6);
}

#[test]
fn attention_with_overlapping_and_empty_shared_spans() {
    // Spans the packer does not make but the op accepts: shared overlapping own, shared after own.
    let b = CpuBackend::new();
    let t = 6;
    let spans = vec![
        AttnSpan::new(0, 3, 1),
        AttnSpan::new(0, 1, 1),
        AttnSpan::new(0, 0, 0),
        AttnSpan::new(1, 3, 3),
        AttnSpan::new(0, 2, 4),
        AttnSpan::new(2, 4, 0),
    ];
    let shape = AttnShape { heads: 2, kv_heads: 2, head_dim: 8, key_offset: 0 };
    let (q, k, v) = (mat(t, 16, 60), mat(t, 16, 61), mat(t, 16, 62));
    let out = b.attention(&q, &k, &v, shape, &spans).unwrap();
    assert_close(&out.data, &attention_ref(&q, &k, &v, shape, &spans), 1e-5);
}

#[test]
fn attention_across_blocks_matches_reference() {
    // 3 documents, ~170 rows: several 64-row blocks, blocks spanning two documents
    let docs: Vec<TokenizedDoc> = (0..3)
        .map(|i| TokenizedDoc { index: i, id: format!("{i}"), prompt: (0..40 + 10 * i as u32).collect(), choices: vec![(0..9).collect(), (0..5).collect(), vec![1, 2]] })
        .collect();
    let batch = MicroBatch::build(&docs);
    let t = batch.rows();
    assert!(t > 2 * super::attention::ATTN_BLOCK);
    let b = CpuBackend::new();
    let shape = AttnShape { heads: 6, kv_heads: 2, head_dim: 16, key_offset: 0 };
    let (q, k, v) = (mat(t, 96, 21), mat(t, 32, 22), mat(t, 32, 23));
    let out = b.attention(&q, &k, &v, shape, &batch.spans).unwrap();
    assert_close(&out.data, &attention_ref(&q, &k, &v, shape, &batch.spans), 1e-5);
}

#[test]
fn linear_few_rows_path_matches_loops() {
    let b = CpuBackend::new();
    for t in 1..=13 {
        let (x, w, bias) = (mat(t, 203, 31), weight(&[130, 203], 32), weight(&[130], 33));
        assert_close(&b.linear(&x, &w, None).unwrap().data, &linear_ref(&x, &w, None), 1e-5);
        assert_close(&b.linear(&x, &w, Some(&bias)).unwrap().data, &linear_ref(&x, &w, Some(&bias)), 1e-5);
    }
}

#[test]
fn decode_attention_over_a_long_cache_matches_reference() {
    // One and three new rows over 300 cached keys: the few-rows (dot product) path, at D = 40
    // (not a multiple of the vector width) and the head sizes with their own loops (64, 128).
    let b = CpuBackend::new();
    for d in [40, 64, 128] {
        for new in [1, 3] {
            let shape = AttnShape { heads: 4, kv_heads: 2, head_dim: d, key_offset: 300 };
            let spans = vec![AttnSpan::causal(0); new];
            let (q, k, v) = (mat(new, 4 * d, 70), mat(300 + new, 2 * d, 71), mat(300 + new, 2 * d, 72));
            let out = b.attention(&q, &k, &v, shape, &spans).unwrap();
            assert_close(&out.data, &attention_ref(&q, &k, &v, shape, &spans), 1e-5);
        }
    }
}

#[test]
fn decode_by_key_chunks_over_tree_spans_matches_reference() {
    // Decode rows of several sequences over one cache, as `generate` with a token tree steps
    // them: a plain causal row, a row attending a shared prefix and its own new key, and a row
    // of another document (its own block). 700 keys make several chunks, and each chunk serves
    // both KV heads, each with its group of 3 query heads.
    let b = CpuBackend::new();
    let cached = 700;
    let spans = vec![
        AttnSpan::causal(0),
        AttnSpan::new(0, 250, cached as u32 + 1),
        AttnSpan::new(300, 650, cached as u32 + 2),
    ];
    for d in [40, 64] {
        let shape = AttnShape { heads: 6, kv_heads: 2, head_dim: d, key_offset: cached };
        let (q, k, v) = (mat(3, 6 * d, 96), mat(cached + 3, 2 * d, 97), mat(cached + 3, 2 * d, 98));
        let out = b.attention(&q, &k, &v, shape, &spans).unwrap();
        assert_close(&out.data, &attention_ref(&q, &k, &v, shape, &spans), 1e-5);
    }
}

#[test]
fn attention_skips_keys_between_a_kept_prompt_and_its_branches() {
    // An extract pass over kept prompts: three documents' prompts (90, 120, 70 keys) first,
    // then this call's branch rows (key_offset = 280), each document's branches attending its
    // prompt and their own rows: the keys between (other documents') are a gap of whole panels
    // that the products skip. Blocks of many rows (products) and of two (dot products).
    let b = CpuBackend::new();
    let prompts = [(0u32, 90u32), (90, 210), (210, 280)];
    let kept = 280;
    let mut spans = vec![];
    for (d, &(p0, p1)) in prompts.iter().enumerate() {
        // Document d's branches: lengths 7, 12 and 3 rows (the last document has 2 rows only).
        let lens: &[usize] = if d == 2 { &[2] } else { &[7, 12, 3] };
        for &len in lens {
            let own = (kept + spans.len()) as u32;
            spans.extend(std::iter::repeat_n(AttnSpan::new(p0, p1, own), len));
        }
    }
    let t = spans.len();
    for d in [16, 64] {
        let shape = AttnShape { heads: 4, kv_heads: 2, head_dim: d, key_offset: kept };
        let (q, k, v) = (mat(t, 4 * d, 81), mat(kept + t, 2 * d, 82), mat(kept + t, 2 * d, 83));
        let out = b.attention(&q, &k, &v, shape, &spans).unwrap();
        assert_close(&out.data, &attention_ref(&q, &k, &v, shape, &spans), 1e-5);
    }
}

#[test]
fn attention_over_a_kept_prompt_kept_paths_and_own_rows() {
    // An extract pass over kept rows: two documents' kept prompts and their branches' kept paths
    // (each branch its own, some of them wide, so the products skip whole panels between), then
    // this call's rows; each row attends three intervals: its prompt, its path, its own rows.
    // The path interval may also be empty or touch the prompt. Blocks of many rows (products)
    // and of few (dot products), several head sizes.
    let b = CpuBackend::new();
    let (spans, kept) = three_interval_spans();
    let t = spans.len();
    for d in [16, 40, 64] {
        let shape = AttnShape { heads: 4, kv_heads: 2, head_dim: d, key_offset: kept };
        let (q, k, v) = (mat(t, 4 * d, 84), mat(kept + t, 2 * d, 85), mat(kept + t, 2 * d, 86));
        let out = b.attention(&q, &k, &v, shape, &spans).unwrap();
        assert_close(&out.data, &attention_ref(&q, &k, &v, shape, &spans), 1e-5);
        // Rows one at a time (dot products), each over all the keys up to its own.
        for r in [0, 9, 30, t - 1] {
            let one = AttnShape { key_offset: kept + r, ..shape };
            let q1 = Mat::new(1, q.cols, q.row(r).to_vec());
            let out1 = b.attention(&q1, &k, &v, one, &spans[r..r + 1]).unwrap();
            assert_close(&out1.data, out.row(r), 1e-5);
        }
    }
}

#[test]
fn attention_of_no_rows_is_empty() {
    let b = CpuBackend::new();
    let shape = AttnShape { heads: 2, kv_heads: 1, head_dim: 8, key_offset: 0 };
    let out = b.attention(&mat(0, 16, 1), &mat(0, 8, 2), &mat(0, 8, 3), shape, &[]).unwrap();
    assert_eq!((out.rows, out.data.len()), (0, 0));
}

#[test]
fn prefill_attention_through_the_micro_kernel_matches_reference() {
    // Blocks of many rows run both products through gemm.rs's tiles, each tile only as far as
    // its rows attend: row counts not a multiple of the tile's 12, head sizes not a multiple of
    // the panel's 32 (40) and the common ones, over cached keys (a chunked prefill) and over a
    // packed batch of documents with choices (two intervals per row).
    let b = CpuBackend::new();
    for d in [40, 64, 128] {
        for (new, cached) in [(5, 0), (30, 50), (77, 3)] {
            let shape = AttnShape { heads: 3, kv_heads: 1, head_dim: d, key_offset: cached };
            let spans = vec![AttnSpan::causal(0); new];
            let (q, k, v) = (mat(new, 3 * d, 90), mat(cached + new, d, 91), mat(cached + new, d, 92));
            let out = b.attention(&q, &k, &v, shape, &spans).unwrap();
            assert_close(&out.data, &attention_ref(&q, &k, &v, shape, &spans), 1e-5);
        }
        let docs: Vec<TokenizedDoc> = (0..2)
            .map(|i| TokenizedDoc { index: i, id: format!("{i}"), prompt: (0..23 + 31 * i as u32).collect(), choices: vec![(0..13).collect(), (0..6).collect(), vec![1]] })
            .collect();
        let batch = MicroBatch::build(&docs);
        let t = batch.rows();
        let shape = AttnShape { heads: 4, kv_heads: 2, head_dim: d, key_offset: 0 };
        let (q, k, v) = (mat(t, 4 * d, 93), mat(t, 2 * d, 94), mat(t, 2 * d, 95));
        let out = b.attention(&q, &k, &v, shape, &batch.spans).unwrap();
        assert_close(&out.data, &attention_ref(&q, &k, &v, shape, &batch.spans), 1e-5);
    }
}

#[test]
fn rows_and_concat_rows_copy_in_order() {
    // Big enough for several parallel blocks.
    let b = CpuBackend::new();
    let (x, y) = (mat(3000, 24, 80), mat(2, 24, 81));
    let both = b.concat_rows(&x, &y).unwrap();
    assert_eq!((both.rows, both.cols), (3002, 24));
    assert_eq!(&both.data[..x.data.len()], &x.data[..]);
    assert_eq!(both.row(3001), y.row(1));
    let order: Vec<u32> = (0..3002).rev().collect();
    let rev = b.rows(&both, &order).unwrap();
    assert!((0..3002).all(|i| rev.row(i) == both.row(3001 - i)));
    assert!(b.rows(&both, &[3002]).is_err());
    assert!(b.concat_rows(&x, &mat(1, 5, 1)).is_err());
}

/// x with every value rounded to f16 and back: what an f16 cache holds of it.
fn rounded_to_f16(x: &Mat) -> Mat {
    Mat::new(x.rows, x.cols, x.data.iter().map(|&v| half::f16::from_f32(v).to_f32()).collect())
}

/// x with every value rounded to bf16 and back: what a bf16 cache holds of it.
fn rounded_to_bf16(x: &Mat) -> Mat {
    Mat::new(x.rows, x.cols, x.data.iter().map(|&v| half::bf16::from_f32(v).to_f32()).collect())
}

#[test]
fn caches_grow_in_place_to_what_concat_rows_makes_and_regroup_by_rows() {
    for dtype in [KvDtype::F32, KvDtype::F16, KvDtype::Bf16] {
        let b = CpuBackend::with_kv_dtype(dtype);
        let mut cache = b.cache_from(mat(5, 24, 82)).unwrap();
        let mut want = mat(5, 24, 82);
        for step in 0..40u64 {
            let new = mat(1 + (step % 3) as usize, 24, 83 + step);
            want = b.concat_rows(&want, &new).unwrap();
            b.cache_append(&mut cache, &new).unwrap();
        }
        let want = match dtype {
            KvDtype::F32 => want,
            KvDtype::F16 => rounded_to_f16(&want),
            KvDtype::Bf16 => rounded_to_bf16(&want),
        };
        let widened = |c: &CpuCache| match c {
            CpuCache::F32(m) => m.clone(),
            CpuCache::F16(n) => n.view().widen(),
            CpuCache::Bf16(n) => n.view().widen(),
        };
        assert_eq!(widened(&cache), want, "{dtype}");
        assert_eq!(b.cache_len(&cache), want.rows);
        let order: Vec<u32> = (0..want.rows as u32).rev().step_by(2).collect();
        assert_eq!(widened(&b.cache_rows(&cache, &order).unwrap()), b.rows(&want, &order).unwrap(), "{dtype}");
        assert!(b.cache_rows(&cache, &[want.rows as u32]).is_err());
        assert!(b.cache_append(&mut cache, &mat(1, 5, 1)).is_err());
    }
}

#[test]
fn attention_over_an_f16_cache_matches_reference_over_its_rounded_values() {
    // Decode rows (one causal, one over a shared prefix and its own key, one of another
    // document) read the f16 cache through the group kernels, at the head sizes with kernels
    // (64, 128) and one without (40); six rows of one sequence after the cache widen it first.
    let b = CpuBackend::with_kv_dtype(KvDtype::F16);
    let cached = 300;
    for d in [40, 64, 128] {
        let decode = vec![
            AttnSpan::causal(0),
            AttnSpan::new(0, 120, cached as u32 + 1),
            AttnSpan::new(150, 290, cached as u32 + 2),
        ];
        for spans in [decode, vec![AttnSpan::causal(0); 6]] {
            let new = spans.len();
            let shape = AttnShape { heads: 6, kv_heads: 2, head_dim: d, key_offset: cached };
            let (q, k, v) = (mat(new, 6 * d, 90), mat(cached + new, 2 * d, 91), mat(cached + new, 2 * d, 92));
            let head = |m: &Mat| Mat::new(cached, m.cols, m.data[..cached * m.cols].to_vec());
            let tail = |m: &Mat| Mat::new(new, m.cols, m.data[cached * m.cols..].to_vec());
            let (mut ck, mut cv) = (b.cache_from(head(&k)).unwrap(), b.cache_from(head(&v)).unwrap());
            b.cache_append(&mut ck, &tail(&k)).unwrap();
            b.cache_append(&mut cv, &tail(&v)).unwrap();
            let out = b.attention_cached(&q, &ck, &cv, shape, &spans).unwrap();
            assert_close(&out.data, &attention_ref(&q, &rounded_to_f16(&k), &rounded_to_f16(&v), shape, &spans), 1e-5);
        }
    }
    // Keys and values kept as different dtypes are an error, not a guess.
    let f32_cache = CpuBackend::new().cache_from(mat(4, 16, 1)).unwrap();
    let f16_cache = b.cache_from(mat(4, 16, 2)).unwrap();
    let shape = AttnShape { heads: 2, kv_heads: 1, head_dim: 16, key_offset: 3 };
    assert!(b.attention_cached(&mat(1, 32, 3), &f32_cache, &f16_cache, shape, &[AttnSpan::causal(0)]).is_err());
}

#[test]
fn softmax_numerators_and_max_at_every_tail_length() {
    use super::vmath;
    // Lengths around the 16-lane vector: empty, tails only, whole vectors plus a tail.
    for n in 0..50 {
        let x: Vec<f32> = rand_vec(n, 60 + n as u64).iter().map(|v| v * 8.0).collect();
        let want_max = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        assert_eq!(vmath::max(&x), want_max, "max of {n}");
        let (scale, shift) = (0.125f32, 0.3f32);
        let mut got = x.clone();
        let sum = vmath::exp_scaled_shift_sum(&mut got, scale, shift);
        let mut want_sum = 0f64;
        for (g, &v) in got.iter().zip(&x) {
            let want = ((v * scale - shift) as f64).exp();
            assert!((*g as f64 - want).abs() <= 3e-7 * want, "e^({v}·{scale} - {shift}) = {g}, want {want}");
            want_sum += want;
        }
        assert!((sum as f64 - want_sum).abs() <= 1e-6 * want_sum.max(1.0), "sum of {n}: {sum} vs {want_sum}");
    }
}

#[test]
fn dots_and_weighted_sums_at_every_length() {
    // The decode kernels: keys four at a time with a scalar tail, rows two at a time with an odd
    // one left, both asking for rows ahead (past the end near the last ones), at the head sizes
    // with their own kernels (64, 128) and one without (40), rows wider than the head.
    for d in [40, 64, 128] {
        let stride = 3 * d + 8;
        let q = mat(1, d, 5).data;
        for n in 0..40 {
            let rows = mat(n.max(1), stride, 6).data;
            let mut dots = vec![0f32; n];
            vmath::scaled_dots(&q, &rows, stride, 0.125, &mut dots);
            for (j, &got) in dots.iter().enumerate() {
                let want: f64 = (0..d).map(|c| q[c] as f64 * rows[j * stride + c] as f64).sum::<f64>() * 0.125;
                assert!((got as f64 - want).abs() < 1e-5, "dot {j} of {n} at D = {d}: {got} vs {want}");
            }
            let p = mat(1, n.max(1), 7).data[..n].to_vec();
            let mut out = vec![0.5f32; d];
            vmath::weighted_sum(&p, &rows, stride, &mut out);
            for (c, &got) in out.iter().enumerate() {
                let want = 0.5 + (0..n).map(|j| p[j] as f64 * rows[j * stride + c] as f64).sum::<f64>();
                assert!((got as f64 - want).abs() < 1e-5, "weighted sum column {c} over {n} rows at D = {d}: {got} vs {want}");
            }
        }
    }
}

#[test]
fn group_kernels_match_f64_for_every_group_size_and_length() {
    // The decode kernels over one KV head's query heads: groups of 1-7 (tiles of 3 at D = 64,
    // and their remainders), keys four at a time with a tail, at D = 64 and 128 (their own
    // kernels) and 40 (the fallback), over f32 and f16 rows wider than the head, and f32 rows
    // rounded to bf16 as they are loaded (the bf16 routes), outputs strided as decode lays them.
    for d in [40, 64, 128] {
        let stride = 3 * d + 8;
        for g in 1..=7 {
            let q = mat(g, d, 5).data; // (G, D)
            for n in [0, 1, 3, 4, 5, 8, 21, 39] {
                let rows = mat(n.max(1), stride, 6).data;
                let out_stride = n + 3;
                let p = mat(g, out_stride, 7).data; // (G, n + 3)
                let (mut dots, mut sums) = (vec![0f32; g * out_stride], vec![0.5f32; g * (d + 2)]);
                // The cache's f16 form, widened: what the f16 kernels must agree with.
                let rows16: Vec<half::f16> = rows.iter().map(|&x| half::f16::from_f32(x)).collect();
                let (mut dots16, mut sums16) = (dots.clone(), sums.clone());
                let (mut dots_b, mut sums_b) = (dots.clone(), sums.clone());
                decode::group_scaled_dots(&q, d, &rows, stride, 0.125, n, &mut dots, out_stride, false);
                decode::group_weighted_sum(g, &p, out_stride, &rows, stride, n, &mut sums, d, d + 2, false);
                decode::group_scaled_dots(&q, d, &rows16, stride, 0.125, n, &mut dots16, out_stride, false);
                decode::group_weighted_sum(g, &p, out_stride, &rows16, stride, n, &mut sums16, d, d + 2, false);
                decode::group_scaled_dots(&q, d, &rows, stride, 0.125, n, &mut dots_b, out_stride, true);
                decode::group_weighted_sum(g, &p, out_stride, &rows, stride, n, &mut sums_b, d, d + 2, true);
                let rows16: Vec<f32> = rows16.iter().map(|x| x.to_f32()).collect();
                let rows_b: Vec<f32> = rows.iter().map(|&x| round::round_f32(x)).collect();
                for i in 0..g {
                    for j in 0..n {
                        let want: f64 = (0..d).map(|c| q[i * d + c] as f64 * rows_b[j * stride + c] as f64).sum::<f64>() * 0.125;
                        let got = dots_b[i * out_stride + j] as f64;
                        assert!((got - want).abs() < 1e-5, "bf16 dot head {i} key {j} of {n}, G = {g}, D = {d}: {got} vs {want}");
                        let want: f64 = (0..d).map(|c| q[i * d + c] as f64 * rows[j * stride + c] as f64).sum::<f64>() * 0.125;
                        let got = dots[i * out_stride + j] as f64;
                        assert!((got - want).abs() < 1e-5, "dot head {i} key {j} of {n}, G = {g}, D = {d}: {got} vs {want}");
                        let want: f64 = (0..d).map(|c| q[i * d + c] as f64 * rows16[j * stride + c] as f64).sum::<f64>() * 0.125;
                        let got = dots16[i * out_stride + j] as f64;
                        assert!((got - want).abs() < 1e-5, "f16 dot head {i} key {j} of {n}, G = {g}, D = {d}: {got} vs {want}");
                    }
                    for c in 0..d {
                        let want = 0.5 + (0..n).map(|j| p[i * out_stride + j] as f64 * rows[j * stride + c] as f64).sum::<f64>();
                        let got = sums[i * (d + 2) + c] as f64;
                        assert!((got - want).abs() < 1e-5, "sum head {i} column {c} over {n}, G = {g}, D = {d}: {got} vs {want}");
                        let want = 0.5 + (0..n).map(|j| p[i * out_stride + j] as f64 * rows16[j * stride + c] as f64).sum::<f64>();
                        let got = sums16[i * (d + 2) + c] as f64;
                        assert!((got - want).abs() < 1e-5, "f16 sum head {i} column {c} over {n}, G = {g}, D = {d}: {got} vs {want}");
                        let want = 0.5 + (0..n).map(|j| p[i * out_stride + j] as f64 * rows_b[j * stride + c] as f64).sum::<f64>();
                        let got = sums_b[i * (d + 2) + c] as f64;
                        assert!((got - want).abs() < 1e-5, "bf16 sum head {i} column {c} over {n}, G = {g}, D = {d}: {got} vs {want}");
                    }
                }
            }
        }
    }
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[test]
fn glibc_takes_the_heap_settings_that_keep_freed_buffers() {
    assert!(super::keep_freed_buffers());
}

/// The bf16 routes multiply bf16 roundings of the weights and of x, sum in f32, and leave the
/// outputs of the ops whose output only GEMMs read (norms, GELU, SiLU·up, attention) rounded to
/// bf16, as the CUDA backend stores them; every route gives what the others give within f32
/// summation error, and the weights take half the bytes of f32 ones.
#[test]
fn bf16_routes_round_gemm_inputs_where_cuda_does() {
    use crate::backend::{ComputeDtype, KvDtype};
    let (t, k, f) = (19, 131, 45); // odd K: a padded last pair
    let x = mat(t, k, 90);
    let host = |shape: &[usize], seed| HostTensor::from_f32(shape.to_vec(), &rand_vec(shape.iter().product(), seed));
    let (gate, up, bias, table) = (host(&[f, k], 91), host(&[f, k], 92), host(&[f], 93), host(&[f, k], 94));
    let rounded = |v: &[f32]| v.iter().map(|&v| round::round_f32(v)).collect::<Vec<f32>>();
    // f64 sums of the rounded inputs, and the f32 summation bound of each.
    let (xr, gr, br) = (rounded(&x.data), rounded(&gate.to_f32()), bias.to_f32());
    let reference = |w: &[f32], bias: Option<&[f32]>| -> (Vec<f64>, Vec<f64>) {
        let mut out = (vec![0f64; t * f], vec![0f64; t * f]);
        for r in 0..t {
            for j in 0..f {
                let terms = (0..k).map(|i| xr[r * k + i] as f64 * w[j * k + i] as f64);
                out.0[r * f + j] = terms.clone().sum::<f64>() + bias.map_or(0.0, |b| b[j] as f64);
                out.1[r * f + j] = (k as f64 + 2.0) * f32::EPSILON as f64 * (terms.map(f64::abs).sum::<f64>() + bias.map_or(0.0, |b| b[j].abs() as f64));
            }
        }
        out
    };
    let (want, bound) = reference(&gr, Some(&br));
    let is_bf16 = |v: &[f32]| v.iter().all(|&v| round::round_f32(v).to_bits() == v.to_bits());
    let routes = CpuRoute::available(ComputeDtype::Bf16);
    assert!(routes.contains(&CpuRoute::Bf16Widened));
    let mut outputs = vec![];
    for route in routes {
        let b = CpuBackend::with_route(KvDtype::F32, route);
        let (g, u, bb, e) = (b.upload_weight(&gate).unwrap(), b.upload_weight(&up).unwrap(), b.upload_weight(&bias).unwrap(), b.upload_weight(&table).unwrap());
        assert_eq!((g.dtype(), g.bytes() <= (f.div_ceil(32) * 32 * (k + 1)) * 2), (DType::Bf16, true), "{route}: matrices held in bf16");
        assert_eq!(g.to_rows(), gr, "{route}: weights rounded to nearest even at upload");
        assert_eq!(b.embed(&e, &[3, 0, 44]).unwrap().data[..k], rounded(&table.to_f32())[3 * k..4 * k], "{route}: embed reads the rounded table");
        let got = b.linear(&x, &g, Some(&bb)).unwrap();
        for (i, (g, (w, e))) in got.data.iter().zip(want.iter().zip(&bound)).enumerate() {
            assert!((*g as f64 - w).abs() <= *e, "{route}: linear at {i}: {g} vs {w} (bound {e:e})");
        }
        let res = mat(t, f, 95);
        let summed = b.linear_residual(&x, &g, Some(&bb), res.clone()).unwrap();
        for (i, ((s, r), w)) in summed.data.iter().zip(&res.data).zip(&want).enumerate() {
            assert!((*s as f64 - *r as f64 - w).abs() <= 1e-5 * (1.0 + w.abs()), "{route}: linear_residual at {i}");
        }
        let fused = b.linear_silu_mul(&x, &g, Some(&bb), &u, None).unwrap();
        let unfused = crate::backend::linear_silu_mul_unfused(&b, &x, &g, Some(&bb), &u, None).unwrap();
        assert!(is_bf16(&fused.data) && is_bf16(&unfused.data), "{route}: SiLU·up rounded");
        assert_close(&fused.data, &unfused.data, 1e-2);
        // The whole MLP (its activation kept in bf16 rows on Bf16Dot) gives linear_silu_mul's
        // activation through linear_residual bit for bit: the same rounded values, the same
        // products. Down (K, F) to K outputs, F odd: the rows' padded last pair.
        let down = b.upload_weight(&host(&[k, f], 96)).unwrap();
        let down_bias = b.upload_weight(&host(&[k], 97)).unwrap();
        let res = mat(t, k, 98);
        let mlp = crate::backend::Swiglu { gate: (&g, Some(&bb)), up: (&u, None), down: (&down, Some(&down_bias)) };
        let whole = b.swiglu_residual(&x, mlp, res.clone()).unwrap();
        let parts = b.linear_residual(&fused, &down, Some(&down_bias), res).unwrap();
        assert_eq!(whole.data.iter().map(|v| v.to_bits()).collect::<Vec<_>>(), parts.data.iter().map(|v| v.to_bits()).collect::<Vec<_>>(), "{route}: swiglu_residual");
        let ones = CpuWeight::new(vec![k], vec![1.0; k]);
        assert!(is_bf16(&b.rms_norm(&x, &ones, 1e-5).unwrap().values()), "{route}: rms_norm rounded");
        assert!(is_bf16(&b.layer_norm(&x, &ones, &CpuWeight::new(vec![k], vec![0.5; k]), 1e-5).unwrap().values()), "{route}: layer_norm rounded");
        let mut gl = x.clone();
        b.gelu(&mut gl).unwrap();
        assert!(is_bf16(&gl.data), "{route}: gelu rounded");
        let s = AttnShape { heads: 2, kv_heads: 1, head_dim: 8, key_offset: 0 };
        let (q, kk, v) = (mat(6, 16, 96), mat(6, 8, 97), mat(6, 8, 98));
        let att = b.attention(&q, &kk, &v, s, &vec![AttnSpan::causal(0); 6]).unwrap();
        // Its values: `bf16_prefill_attention_rounds_where_cuda_does`.
        assert!(is_bf16(&att.values()) && att.values().len() == 6 * 16, "{route}: attention rounded");
        outputs.push(got);
    }
    for o in &outputs[1..] {
        assert_close(&o.data, &outputs[0].data, 1e-5);
    }
}

/// On `Bf16Dot`, a norm's or attention's output is held as the bf16 rows its GEMM multiplies
/// (`Mat::narrow`): the values the rounding routes give, which `download` widens and every
/// linear reads as it reads those values; the ops that read f32 values refuse it by name.
#[test]
fn bf16_dot_holds_norm_and_attention_outputs_as_gemm_rows() {
    if !CpuRoute::available(crate::backend::ComputeDtype::Bf16).contains(&CpuRoute::Bf16Dot) {
        println!("skipped: no AVX512-BF16");
        return;
    }
    let (dot, widened) = (CpuBackend::with_route(KvDtype::F32, CpuRoute::Bf16Dot), CpuBackend::with_route(KvDtype::F32, CpuRoute::Bf16Widened));
    let (t, c, n) = (37, 131, 70); // odd C: the rows' padded last pair
    let x = mat(t, c, 110);
    let (w, shift) = (weight(&[c], 111), weight(&[c], 112));
    let s = AttnShape { heads: 2, kv_heads: 1, head_dim: 8, key_offset: 0 };
    let (q, k, v) = (mat(t, 16, 113), mat(t, 8, 114), mat(t, 8, 115));
    let spans = vec![AttnSpan::causal(0); t];
    let host = |shape: &[usize], seed| HostTensor::from_f32(shape.to_vec(), &rand_vec(shape.iter().product(), seed));
    let bits = |v: &[f32]| v.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
    let outputs = |b: &CpuBackend| [b.rms_norm(&x, &w, 1e-5).unwrap(), b.layer_norm(&x, &w, &shift, 1e-5).unwrap(), b.attention(&q, &k, &v, s, &spans).unwrap()];
    let (held, plain) = (outputs(&dot), outputs(&widened));
    for (name, (h, p)) in ["rms_norm", "layer_norm", "attention"].iter().zip(held.iter().zip(&plain)) {
        assert!(h.narrow.is_some() && h.data.is_empty() && p.narrow.is_none(), "{name}: held as rows on Bf16Dot only");
        assert_eq!((h.rows, h.cols), (p.rows, p.cols), "{name}");
        if *name != "attention" {
            // The same rounded values (attention's sums differ in order between the routes:
            // `bf16_prefill_attention_rounds_where_cuda_does` checks both against f64).
            assert_eq!(bits(&dot.download(h).unwrap()), bits(&p.data), "{name}: the rounding routes' values");
        }
        // Every GEMM reads the held rows as it reads their values as f32.
        let as_f32 = Mat::new(h.rows, h.cols, dot.download(h).unwrap());
        let wt = dot.upload_weight(&host(&[n, h.cols], 116)).unwrap();
        assert_eq!(bits(&dot.linear(h, &wt, None).unwrap().data), bits(&dot.linear(&as_f32, &wt, None).unwrap().data), "{name}: linear");
        let res = mat(h.rows, n, 117);
        assert_eq!(bits(&dot.linear_residual(h, &wt, None, res.clone()).unwrap().data), bits(&dot.linear_residual(&as_f32, &wt, None, res).unwrap().data), "{name}: linear_residual");
        let [a, _] = dot.linear_split(h, &wt, None, [64, n - 64]).unwrap();
        assert_eq!(bits(&a.data), bits(&dot.linear_split(&as_f32, &wt, None, [64, n - 64]).unwrap()[0].data), "{name}: linear_split");
        let wu = dot.upload_weight(&host(&[n, h.cols], 118)).unwrap();
        assert_eq!(bits(&dot.linear_silu_mul(h, &wt, None, &wu, None).unwrap().data), bits(&dot.linear_silu_mul(&as_f32, &wt, None, &wu, None).unwrap().data), "{name}: linear_silu_mul");
        // Only GEMMs read them.
        let refusals = [
            ("add", dot.add(&mut h.clone(), &as_f32).err()),
            ("add", dot.add(&mut as_f32.clone(), h).err()),
            ("cols", dot.cols(h, 0, 1).err()),
            ("rows", dot.rows(h, &[0]).err()),
            ("gelu", dot.gelu(&mut h.clone()).err()),
            ("rms_norm", dot.rms_norm(h, &weight(&[h.cols], 119), 1e-5).err()),
            ("log_softmax_at", dot.log_softmax_at(h, &vec![0; h.rows]).err()),
        ];
        for (op, e) in refusals {
            let e = e.map(|e| e.to_string()).unwrap_or_default();
            assert!(e.contains(op) && e.contains("bf16 activation"), "{name} into {op}: {e}");
        }
    }
}

/// The bf16 routes' attention in f64, before the op rounds its output: q, k and v rounded to
/// bf16, exact scores s, p = exp((s - m)/√D) rounded to bf16 with m the max of the row's keys in
/// p's chunk (`chunks(row)`: key ranges; the prefill's one range is the whole row), chunks
/// weighted by exp((m - max)/√D), Σ of the unrounded p. With each output, the bound on what
/// the f32 computation may differ by: f32 summation error, and, for each p within f32 error of
/// a bf16 rounding tie (where the f32 p may round the other way), its bf16 step times |v|.
fn bf16_attention_ref(q: &Mat, k: &Mat, v: &Mat, s: AttnShape, spans: &[AttnSpan], chunks: impl Fn(usize) -> Vec<(usize, usize)>) -> (Vec<f64>, Vec<f64>) {
    let (h, d, kvh) = (s.heads, s.head_dim, s.kv_heads);
    let r = |x: f32| round::round_f32(x) as f64;
    let u = f32::EPSILON as f64 / 2.0;
    let scale = 1.0 / (d as f64).sqrt();
    let (mut out, mut bound) = (vec![0f64; q.rows * h * d], vec![0f64; q.rows * h * d]);
    for t in 0..q.rows {
        for hh in 0..h {
            let kv = hh / (h / kvh);
            let qr: Vec<f64> = (0..d).map(|i| r(q.data[t * h * d + hh * d + i])).collect();
            let (kr, vr) = (|j: usize, i: usize| r(k.data[j * kvh * d + kv * d + i]), |j: usize, i: usize| r(v.data[j * kvh * d + kv * d + i]));
            // Per chunk: its attended keys' (key, score, Σ|q·k| terms).
            let per_chunk: Vec<Vec<(usize, f64, f64)>> = chunks(t)
                .into_iter()
                .map(|(c0, c1)| {
                    (c0..c1)
                        .filter(|&j| spans[t].attends((t + s.key_offset) as u32, j as u32))
                        .map(|j| (j, (0..d).map(|i| qr[i] * kr(j, i)).sum::<f64>(), (0..d).map(|i| (qr[i] * kr(j, i)).abs()).sum::<f64>()))
                        .collect()
                })
                .filter(|c: &Vec<_>| !c.is_empty())
                .collect();
            let n = per_chunk.iter().map(Vec::len).sum::<usize>() as f64;
            let max = per_chunk.iter().flatten().map(|c| c.1).fold(f64::NEG_INFINITY, f64::max);
            let abs_max = per_chunk.iter().flatten().map(|c| c.2).fold(0.0, f64::max);
            // Relative error of an f32 exp((s - m)/√D): the scores' f32 sums, the scaling, exp.
            let delta = 2.0 * (d as f64 + 4.0) * u * 2.0 * abs_max * scale + 1e-6;
            let (mut num, mut abs, mut ties, mut den) = (vec![0f64; d], vec![0f64; d], vec![0f64; d], 0f64);
            for chunk in &per_chunk {
                let m = chunk.iter().map(|c| c.1).fold(f64::NEG_INFINITY, f64::max);
                let w = ((m - max) * scale).exp();
                for &(j, sj, _) in chunk {
                    let e = ((sj - m) * scale).exp();
                    let (p, lo, hi) = (r(e as f32), r((e * (1.0 - delta)) as f32), r((e * (1.0 + delta)) as f32));
                    den += w * e;
                    for i in 0..d {
                        num[i] += w * p * vr(j, i);
                        abs[i] += w * (p * vr(j, i)).abs();
                        ties[i] += w * (hi - lo) * vr(j, i).abs();
                    }
                }
            }
            for i in 0..d {
                let at = t * h * d + hh * d + i;
                out[at] = num[i] / den;
                bound[at] = 2.0 * ((2.0 * n + 8.0) * u * abs[i] + 2.0 * delta * abs[i] + ties[i]) / den + 1e-30;
            }
        }
    }
    (out, bound)
}

/// Every bf16 route's attention (prefill blocks through the products, or decode) against
/// `bf16_attention_ref`, and the op's output its rounding to bf16; k and v are f32 or f16
/// (a generation cache's).
fn assert_bf16_attention(q: &Mat, k: &Mat, v: &Mat, s: AttnShape, spans: &[AttnSpan], f16_cache: bool, what: &str) {
    use crate::backend::ComputeDtype;
    let blocks = super::attention::query_blocks(spans);
    let decode = blocks.iter().all(|(t0, t1)| t1 - t0 <= 4);
    let chunks: Vec<(usize, usize, usize)> = match decode {
        true => decode::decode_chunks(spans, s, &blocks).into_iter().map(|c| (c.block, c.c0, c.c1)).collect(),
        false => vec![],
    };
    let chunks_of = |t: usize| match decode {
        true => chunks.iter().filter(|c| (blocks[c.0].0..blocks[c.0].1).contains(&t)).map(|c| (c.1, c.2)).collect(),
        false => vec![(0, k.rows)],
    };
    let (k, v) = if f16_cache { (rounded_to_f16(k), rounded_to_f16(v)) } else { (k.clone(), v.clone()) };
    let (want, bound) = bf16_attention_ref(q, &k, &v, s, spans, chunks_of);
    let narrow = |m: &Mat| m.data.iter().map(|&x| half::f16::from_f32(x)).collect::<Vec<_>>();
    let (k16, v16) = (narrow(&k), narrow(&v));
    for route in CpuRoute::available(ComputeDtype::Bf16) {
        let got = match f16_cache {
            false => super::attention::attention(q, (&k).into(), (&v).into(), s, spans, route, false),
            true => super::attention::attention(q, kv_cache::CacheView { rows: k.rows, cols: k.cols, data: &k16[..] }, kv_cache::CacheView { rows: v.rows, cols: v.cols, data: &v16[..] }, s, spans, route, false),
        };
        let mut worst = 0f64;
        for (i, ((g, w), b)) in got.data.iter().zip(&want).zip(&bound).enumerate() {
            assert!((*g as f64 - w).abs() <= *b, "{what}, {route}: at {i} (row {}): {g} vs {w} (bound {b:e})", i / q.cols);
            worst = worst.max((*g as f64 - w).abs() / b);
        }
        eprintln!("{what}, {route}: worst |error| / bound {worst:.3}");
        if !f16_cache {
            // The op's output (on Bf16Dot the bf16 rows the output projection reads) is those
            // products rounded, bit for bit.
            let op = CpuBackend::with_route(KvDtype::F32, route).attention(q, &k, &v, s, spans).unwrap();
            let rounded: Vec<u32> = got.data.iter().map(|&x| round::round_f32(x).to_bits()).collect();
            assert_eq!(op.values().iter().map(|x| x.to_bits()).collect::<Vec<_>>(), rounded, "{what}, {route}: the op's output is the products' rounded to bf16");
        }
    }
}

/// The kept-prompt, kept-path and own-rows spans of an extract pass (three intervals per row;
/// the paths wide enough that the products skip whole panels between, one path empty) and the
/// kept key count.
fn three_interval_spans() -> (Vec<AttnSpan>, usize) {
    // Per document: its prompt, then per branch (path length, own rows).
    let docs: [(u32, &[(u32, usize)]); 2] = [(70, &[(3, 9), (80, 14), (0, 5), (40, 2)]), (130, &[(5, 3), (66, 20)])];
    let kept: u32 = docs.iter().map(|(p, br)| p + br.iter().map(|b| b.0).sum::<u32>()).sum();
    let (mut spans, mut key) = (vec![], 0u32);
    for (p, branches) in docs {
        let (p0, p1) = (key, key + p);
        key += p;
        for &(path, rows) in branches {
            let own = kept + spans.len() as u32;
            spans.extend(std::iter::repeat_n(AttnSpan::new(p0, p1, own).with_path(key, key + path), rows));
            key += path;
        }
    }
    (spans, kept as usize)
}

/// The bf16 routes' prefill attention rounds q, k, v and p where the CUDA kernel does and sums
/// in f32: causal rows (one interval) in blocks over 64 rows, an odd number of keys, chunked
/// over cached keys; documents with choices (two intervals) and a document of 3 rows (a block
/// that f32 runs as dot products); an extract pass's kept prompt, paths and own rows (three
/// intervals, unattended panels skipped); GQA, and head sizes odd, not a multiple of 32, and
/// the common one.
#[test]
fn bf16_prefill_attention_rounds_where_cuda_does() {
    for d in [9, 40, 64] {
        for (new, cached) in [(77, 0), (30, 51)] {
            let shape = AttnShape { heads: 6, kv_heads: 2, head_dim: d, key_offset: cached };
            let spans = vec![AttnSpan::causal(0); new];
            let (q, k, v) = (mat(new, 6 * d, 100), mat(cached + new, 2 * d, 101), mat(cached + new, 2 * d, 102));
            assert_bf16_attention(&q, &k, &v, shape, &spans, false, &format!("causal {new} rows after {cached}, D = {d}"));
        }
        let mut docs: Vec<TokenizedDoc> = (0..2)
            .map(|i| TokenizedDoc { index: i, id: format!("{i}"), prompt: (0..70 + 9 * i as u32).collect(), choices: vec![(0..13).collect(), (0..6).collect(), vec![1]] })
            .collect();
        docs.push(TokenizedDoc { index: 2, id: "2".into(), prompt: vec![1], choices: vec![vec![2], vec![3]] });
        let batch = MicroBatch::build(&docs);
        let t = batch.rows();
        let shape = AttnShape { heads: 6, kv_heads: 2, head_dim: d, key_offset: 0 };
        let (q, k, v) = (mat(t, 6 * d, 103), mat(t, 2 * d, 104), mat(t, 2 * d, 105));
        assert_bf16_attention(&q, &k, &v, shape, &batch.spans, false, &format!("documents with choices, D = {d}"));
        let (spans, kept) = three_interval_spans();
        let t = spans.len();
        let shape = AttnShape { heads: 4, kv_heads: 2, head_dim: d, key_offset: kept };
        let (q, k, v) = (mat(t, 4 * d, 106), mat(kept + t, 2 * d, 107), mat(kept + t, 2 * d, 108));
        assert_bf16_attention(&q, &k, &v, shape, &spans, false, &format!("kept prompt, paths and own rows, D = {d}"));
    }
}

/// On the bf16 routes a bf16 cache holds what the kernels would round an f32 cache's keys and
/// values to as they read them: attention over it is the f32 cache's, bit for bit (the decode
/// kernels skip the rounding there), for decode rows by key chunks and for prefill rows after
/// the cache; on the f32 route it is the reference over the rounded keys and values.
#[test]
fn a_bf16_cache_changes_no_bit_of_the_bf16_routes() {
    let cached = 700;
    let decode = vec![AttnSpan::causal(0), AttnSpan::new(0, 250, cached as u32 + 1), AttnSpan::new(300, 650, cached as u32 + 2).with_path(660, 690)];
    for d in [40, 64, 128] {
        for spans in [decode.clone(), vec![AttnSpan::causal(0); 6]] {
            let new = spans.len();
            let shape = AttnShape { heads: 6, kv_heads: 2, head_dim: d, key_offset: cached };
            let (q, k, v) = (mat(new, 6 * d, 120), mat(cached + new, 2 * d, 121), mat(cached + new, 2 * d, 122));
            let head = |m: &Mat| Mat::new(cached, m.cols, m.data[..cached * m.cols].to_vec());
            let tail = |m: &Mat| Mat::new(new, m.cols, m.data[cached * m.cols..].to_vec());
            let run = |b: &CpuBackend| {
                let (mut ck, mut cv) = (b.cache_from(head(&k)).unwrap(), b.cache_from(head(&v)).unwrap());
                b.cache_append(&mut ck, &tail(&k)).unwrap();
                b.cache_append(&mut cv, &tail(&v)).unwrap();
                b.attention_cached(&q, &ck, &cv, shape, &spans).unwrap()
            };
            for route in CpuRoute::available(crate::backend::ComputeDtype::Bf16) {
                let (f32_cache, bf16_cache) = (run(&CpuBackend::with_route(KvDtype::F32, route)), run(&CpuBackend::with_route(KvDtype::Bf16, route)));
                let bits = |m: &Mat| m.data.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                assert_eq!(bits(&bf16_cache), bits(&f32_cache), "{route:?}, D = {d}, {new} rows");
            }
            let out = run(&CpuBackend::with_kv_dtype(KvDtype::Bf16));
            assert_close(&out.data, &attention_ref(&q, &rounded_to_bf16(&k), &rounded_to_bf16(&v), shape, &spans), 1e-5);
        }
    }
}

/// The bf16 routes' decode attention (rows of a few per document, by key chunks) rounds as
/// the prefill does, p relative to its chunk's max: tree spans over 700 cached keys (several
/// chunks; one, two and three intervals), GQA, at the group kernels' head sizes (64, 128) and
/// the fallback's (40), over an f32 and an f16 cache.
#[test]
fn bf16_decode_attention_rounds_where_cuda_does() {
    let cached = 700;
    let spans = vec![
        AttnSpan::causal(0),
        AttnSpan::new(0, 250, cached as u32 + 1),
        AttnSpan::new(300, 650, cached as u32 + 2).with_path(660, 690),
    ];
    for d in [40, 64, 128] {
        let shape = AttnShape { heads: 6, kv_heads: 2, head_dim: d, key_offset: cached };
        let (q, k, v) = (mat(3, 6 * d, 110), mat(cached + 3, 2 * d, 111), mat(cached + 3, 2 * d, 112));
        for f16 in [false, true] {
            assert_bf16_attention(&q, &k, &v, shape, &spans, f16, &format!("decode over {cached} keys, D = {d}, f16 cache {f16}"));
        }
    }
}
