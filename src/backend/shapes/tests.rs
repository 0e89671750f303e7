//! Each shape rule refuses a mismatch with its one error, which the op returns unchanged.
//!
//! Run on the CPU backend. The CUDA backend goes through the same layer (the blanket `Ops`
//! and `KvCache` impls over `Kernels` in ops.rs and kv_cache.rs), so it returns these same
//! errors by construction; its own parity checks (tests/cuda_parity.rs) need a GPU.

use super::*;
use crate::backend::cpu::{CpuBackend, CpuWeight, Mat};
use crate::backend::{KvCache, Ops};

fn m(rows: usize, cols: usize) -> Mat {
    Mat::new(rows, cols, (0..rows * cols).map(|i| (i % 7) as f32 * 0.125).collect())
}

fn w(shape: &[usize]) -> CpuWeight {
    CpuWeight::new(shape.to_vec(), vec![0.25; shape.iter().product()])
}

/// The op failed with exactly the rule's error, a shape error naming `op`.
#[track_caller]
fn refused<T, U>(op: &str, got: Result<T>, rule: Result<U>) {
    let (Err(got), Err(want)) = (got, rule) else {
        panic!("{op}: the op or its rule let a mismatch through");
    };
    assert!(matches!(got, BackendError::Shape { op: o, .. } if o == op), "{op}: {got}");
    assert_eq!(got.to_string(), want.to_string(), "{op}");
}

fn heads(heads: usize, kv_heads: usize, head_dim: usize, key_offset: usize) -> AttnShape {
    AttnShape { heads, kv_heads, head_dim, key_offset }
}

#[test]
fn compute_ops_refuse_mismatches_with_their_rules_error() {
    let b = CpuBackend::new();
    refused("upload", b.upload(&[1.0; 5], 2, 3), upload(5, 2, 3));
    refused("upload", b.upload(&[], usize::MAX, 2), upload(0, usize::MAX, 2));

    refused("embed", b.embed(&w(&[8]), &[1]), embed(&[8], &[1]));
    refused("embed", b.embed(&w(&[4, 2]), &[1, 4]), embed(&[4, 2], &[1, 4]));

    let x = m(2, 3);
    refused("linear", b.linear(&x, &w(&[4, 5]), None), linear("linear", (2, 3), &[4, 5], None));
    refused("linear", b.linear(&x, &w(&[12]), None), linear("linear", (2, 3), &[12], None));
    refused("linear", b.linear(&x, &w(&[4, 3]), Some(&w(&[5]))), linear("linear", (2, 3), &[4, 3], Some(&[5])));
    refused("linear", b.linear(&x, &w(&[4, 3]), Some(&w(&[1, 4]))), linear("linear", (2, 3), &[4, 3], Some(&[1, 4])));

    refused("linear_residual", b.linear_residual(&x, &w(&[4, 3]), None, m(2, 5)), linear_residual((2, 3), &[4, 3], None, (2, 5)));
    refused("linear_residual", b.linear_residual(&x, &w(&[4, 3]), None, m(4, 2)), linear_residual((2, 3), &[4, 3], None, (4, 2)));
    refused("linear_residual", b.linear_residual(&x, &w(&[4, 5]), None, m(2, 4)), linear_residual((2, 3), &[4, 5], None, (2, 4)));

    let gate = (&[4usize, 3][..], None);
    refused("linear_silu_mul", b.linear_silu_mul(&x, &w(&[4, 3]), None, &w(&[5, 3]), None), linear_silu_mul((2, 3), gate, (&[5, 3], None)));
    refused("linear_silu_mul", b.linear_silu_mul(&x, &w(&[4, 3]), None, &w(&[4, 2]), None), linear_silu_mul((2, 3), gate, (&[4, 2], None)));
    refused("linear_silu_mul", b.linear_silu_mul(&x, &w(&[4, 3]), Some(&w(&[3])), &w(&[4, 3]), None), linear_silu_mul((2, 3), (&[4, 3], Some(&[3])), (&[4, 3], None)));

    refused("layer_norm", b.layer_norm(&x, &w(&[4]), &w(&[3]), 1e-5), norm("layer_norm", (2, 3), &[4]));
    refused("layer_norm", b.layer_norm(&x, &w(&[3]), &w(&[1, 3]), 1e-5), norm("layer_norm", (2, 3), &[1, 3]));
    refused("rms_norm", b.rms_norm(&x, &w(&[4]), 1e-5), norm("rms_norm", (2, 3), &[4]));

    let (pos, freq) = ([0u32, 1], [1.0f32; 2]);
    let mut q = m(2, 8);
    refused("rope", b.rope(&mut q, 0, 2, 4, &pos[..1], &freq), rope((2, 8), 0, 2, 4, 1, 2));
    refused("rope", b.rope(&mut q, 4, 2, 4, &pos, &freq), rope((2, 8), 4, 2, 4, 2, 2));
    refused("rope", b.rope(&mut q, 0, 2, 4, &pos, &freq[..1]), rope((2, 8), 0, 2, 4, 2, 1));
    refused("rope", b.rope(&mut q, 1, usize::MAX, 2, &pos, &freq[..1]), rope((2, 8), 1, usize::MAX, 2, 2, 1));

    let spans = [AttnSpan::causal(0), AttnSpan::causal(0)];
    let (q, k, v) = (m(2, 8), m(3, 4), m(3, 4));
    let attn = |q: &Mat, k: &Mat, v: &Mat, s, spans: &[AttnSpan]| (b.attention(q, k, v, s, spans), attention("attention", (q.rows, q.cols), (k.rows, k.cols), (v.rows, v.cols), s, spans));
    for (q, k, v, s, spans) in [
        (&q, &k, &v, heads(2, 0, 4, 0), &spans[..]),
        (&q, &k, &v, heads(3, 2, 4, 0), &spans[..]),
        (&m(2, 6), &k, &v, heads(2, 1, 4, 0), &spans[..]),
        (&q, &m(3, 5), &v, heads(2, 1, 4, 0), &spans[..]),
        (&q, &k, &m(2, 4), heads(2, 1, 4, 0), &spans[..]),
        (&q, &k, &v, heads(2, 1, 4, 0), &spans[..1]),
        (&q, &k, &v, heads(2, 1, 4, 2), &spans[..]),
        (&q, &k, &v, heads(2, 1, 4, 0), &[AttnSpan::new(0, 4, 0), AttnSpan::causal(0)][..]),
    ] {
        let (got, rule) = attn(q, k, v, s, spans);
        refused("attention", got, rule);
    }

    let (mut a, c) = (m(2, 3), m(3, 2));
    refused("silu_mul", b.silu_mul(&mut a, &c), same("silu_mul", (2, 3), (3, 2)));
    refused("add", b.add(&mut a, &c), same("add", (2, 3), (3, 2)));
    refused("add", b.add(&mut a, &m(1, 3)), same("add", (2, 3), (1, 3)));

    refused("cols", b.cols(&x, 2, 2), cols((2, 3), 2, 2));
    refused("cols", b.cols(&x, 1, usize::MAX), cols((2, 3), 1, usize::MAX));
    refused("rows", b.rows(&x, &[0, 2]), rows("rows", 2, &[0, 2]));
    refused("concat_rows", b.concat_rows(&x, &m(1, 4)), stack("concat_rows", 3, 4));

    refused("log_softmax_at", b.log_softmax_at(&x, &[0]), log_softmax_at((2, 3), &[0]));
    refused("log_softmax_at", b.log_softmax_at(&x, &[0, 3]), log_softmax_at((2, 3), &[0, 3]));
}

#[test]
fn cache_ops_refuse_mismatches_with_their_rules_error() {
    let b = CpuBackend::new();
    let (mut k, v) = (b.cache_from(m(3, 4)).unwrap(), b.cache_from(m(3, 4)).unwrap());
    refused("cache_append", b.cache_append(&mut k, &m(1, 5)), stack("cache_append", 4, 5));
    refused("cache_rows", b.cache_rows(&k, &[3]), rows("cache_rows", 3, &[3]));
    let s = heads(2, 1, 4, 3);
    let past = [AttnSpan::causal(0)];
    refused("attention_cached", b.attention_cached(&m(1, 8), &k, &v, s, &past), attention("attention_cached", (1, 8), (3, 4), (3, 4), s, &past));
    let short = b.cache_from(m(2, 4)).unwrap();
    let s = heads(2, 1, 4, 1);
    refused("attention_cached", b.attention_cached(&m(1, 8), &k, &short, s, &past), attention("attention_cached", (1, 8), (3, 4), (2, 4), s, &past));
    // Nothing refused was applied: the cache is as it was.
    assert_eq!(b.cache_len(&k), 3);
}

#[test]
fn the_rules_pass_what_fits() {
    assert_eq!(linear("linear", (2, 3), &[4, 3], Some(&[4])).unwrap(), 4);
    assert!(upload(6, 2, 3).is_ok() && upload(0, 0, 5).is_ok());
    assert!(embed(&[4, 2], &[0, 3]).is_ok());
    assert!(linear_residual((2, 3), &[4, 3], None, (2, 4)).is_ok());
    assert!(linear_silu_mul((2, 3), (&[4, 3], Some(&[4])), (&[4, 3], None)).is_ok());
    assert!(norm("rms_norm", (2, 3), &[3]).is_ok());
    assert!(rope((2, 8), 4, 1, 4, 2, 2).is_ok());
    let spans = [AttnSpan::new(0, 2, 2), AttnSpan::causal(2)];
    assert!(attention("attention", (2, 8), (4, 4), (4, 4), heads(2, 1, 4, 2), &spans).is_ok());
    assert!(same("add", (2, 3), (2, 3)).is_ok() && cols((2, 3), 3, 0).is_ok() && rows("rows", 2, &[1, 0, 1]).is_ok());
    assert!(stack("concat_rows", 3, 3).is_ok() && log_softmax_at((2, 3), &[2, 0]).is_ok());
}
