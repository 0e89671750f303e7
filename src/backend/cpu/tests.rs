//! The fast CPU ops against plain-loop references (llama2.c style).

use super::*;
use crate::layout::{MicroBatch, TokenizedDoc};

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
    CpuWeight { shape: shape.to_vec(), data: rand_vec(shape.iter().product(), seed) }
}

fn mat(rows: usize, cols: usize, seed: u64) -> Mat {
    Mat { rows, cols, data: rand_vec(rows * cols, seed) }
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
    let mut out = vec![0f32; x.rows * n];
    for t in 0..x.rows {
        for j in 0..n {
            let mut acc = 0f64;
            for i in 0..k {
                acc += x.data[t * k + i] as f64 * w.data[j * k + i] as f64;
            }
            out[t * n + j] = acc as f32 + b.map_or(0.0, |b| b.data[j]);
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
            let want_ln = (row[i] - mean) / (var + 1e-5).sqrt() * w.data[i] + bias.data[i];
            let want_rms = row[i] / (ms + 1e-6).sqrt() * w.data[i];
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
fn gelu_and_erf_known_values() {
    // torch.nn.functional.gelu(torch.tensor([...], dtype=torch.float64))
    for (x, want) in [(-3.0, -0.0040496941), (-1.0, -0.1586552539), (0.5, 0.3457312306), (1.0, 0.8413447461), (2.7, 2.6906391707)] {
        assert!((gelu_exact(x) as f64 - want).abs() < 1e-6, "gelu({x})");
    }
    for (x, want) in [(0.1, 0.1124629160), (1.0, 0.8427007929), (2.0, 0.9953222650), (3.0, 0.9999779095), (-2.6, -0.9997639656)] {
        assert!((erf(x) - want).abs() < 1e-9, "erf({x}) = {}", erf(x));
    }
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
fn bad_shapes_are_errors_not_panics() {
    let b = CpuBackend::new();
    assert!(b.linear(&mat(2, 3, 1), &weight(&[4, 5], 2), None).is_err());
    assert!(b.embed(&weight(&[4, 2], 3), &[9]).is_err());
    assert!(b.log_softmax_at(&mat(1, 4, 1), &[4]).is_err());
}

#[test]
fn attention_across_blocks_matches_reference() {
    // 3 documents, ~170 rows: several 64-row blocks, blocks spanning two documents
    let docs: Vec<TokenizedDoc> = (0..3)
        .map(|i| TokenizedDoc { index: i, id: format!("{i}"), prompt: (0..40 + 10 * i as u32).collect(), choices: vec![(0..9).collect(), (0..5).collect(), vec![1, 2]] })
        .collect();
    let batch = MicroBatch::build(&docs);
    let t = batch.rows();
    assert!(t > 2 * super::ATTN_BLOCK);
    let b = CpuBackend::new();
    let shape = AttnShape { heads: 6, kv_heads: 2, head_dim: 16, key_offset: 0 };
    let (q, k, v) = (mat(t, 96, 21), mat(t, 32, 22), mat(t, 32, 23));
    let out = b.attention(&q, &k, &v, shape, &batch.spans).unwrap();
    assert_close(&out.data, &attention_ref(&q, &k, &v, shape, &batch.spans), 1e-5);
}

#[test]
fn linear_few_rows_path_matches_loops() {
    let b = CpuBackend::new();
    for t in 1..=super::GEMV_MAX_ROWS + 1 {
        let (x, w) = (mat(t, 203, 31), weight(&[130, 203], 32));
        assert_close(&b.linear(&x, &w, None).unwrap().data, &linear_ref(&x, &w, None), 1e-5);
    }
}
