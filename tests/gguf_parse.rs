//! GGUF parsing on a tiny llama file written here: metadata of every type, the config,
//! the Q/K un-permutation, the tokenizer, and untrusted input (truncation, byte flips,
//! random bytes) that must give errors naming the file, never panics.

use falcon_batch::format::gguf::parse::{parse, Value};
use falcon_batch::format::gguf::GgufCheckpoint;
use falcon_batch::format::{Checkpoint, FormatError};
use falcon_batch::model::{convert_part, Part, TensorSource};
use falcon_batch::tokenizer::Tokenizer;
use half::{bf16, f16};
use proptest::prelude::*;
use std::path::Path;

const HIDDEN: usize = 32;
const HEADS: usize = 2;
const KV_HEADS: usize = 1;
const HEAD_DIM: usize = 16;
const FF: usize = 64;

fn put_str(out: &mut Vec<u8>, s: &str) {
    out.extend((s.len() as u64).to_le_bytes());
    out.extend(s.as_bytes());
}

fn type_id(v: &Value) -> u32 {
    match v {
        Value::U8(_) => 0,
        Value::I8(_) => 1,
        Value::U16(_) => 2,
        Value::I16(_) => 3,
        Value::U32(_) => 4,
        Value::I32(_) => 5,
        Value::F32(_) => 6,
        Value::Bool(_) => 7,
        Value::Str(_) => 8,
        Value::Array(_) => 9,
        Value::U64(_) => 10,
        Value::I64(_) => 11,
        Value::F64(_) => 12,
    }
}

fn put_value(out: &mut Vec<u8>, v: &Value) {
    match v {
        Value::U8(x) => out.push(*x),
        Value::I8(x) => out.extend(x.to_le_bytes()),
        Value::U16(x) => out.extend(x.to_le_bytes()),
        Value::I16(x) => out.extend(x.to_le_bytes()),
        Value::U32(x) => out.extend(x.to_le_bytes()),
        Value::I32(x) => out.extend(x.to_le_bytes()),
        Value::U64(x) => out.extend(x.to_le_bytes()),
        Value::I64(x) => out.extend(x.to_le_bytes()),
        Value::F32(x) => out.extend(x.to_le_bytes()),
        Value::F64(x) => out.extend(x.to_le_bytes()),
        Value::Bool(x) => out.push(*x as u8),
        Value::Str(s) => put_str(out, s),
        Value::Array(items) => {
            out.extend(items.first().map_or(0, type_id).to_le_bytes());
            out.extend((items.len() as u64).to_le_bytes());
            items.iter().for_each(|i| put_value(out, i));
        }
    }
}

/// A GGUF v3 file: metadata, then tensors (name, dims innermost-first, ggml type, bytes).
fn write_gguf(meta: &[(&str, Value)], tensors: &[(&str, Vec<u64>, u32, Vec<u8>)]) -> Vec<u8> {
    let mut out = b"GGUF".to_vec();
    out.extend(3u32.to_le_bytes());
    out.extend((tensors.len() as u64).to_le_bytes());
    out.extend((meta.len() as u64).to_le_bytes());
    for (k, v) in meta {
        put_str(&mut out, k);
        out.extend(type_id(v).to_le_bytes());
        put_value(&mut out, v);
    }
    let mut offset = 0u64;
    for (name, dims, ty, data) in tensors {
        put_str(&mut out, name);
        out.extend((dims.len() as u32).to_le_bytes());
        dims.iter().for_each(|d| out.extend(d.to_le_bytes()));
        out.extend(ty.to_le_bytes());
        out.extend(offset.to_le_bytes());
        offset += (data.len() as u64).div_ceil(32) * 32;
    }
    for (_, _, _, data) in tensors {
        out.resize(out.len().div_ceil(32) * 32, 0);
        out.extend(data);
    }
    out
}

fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

fn f16_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| f16::from_f32(*x).to_le_bytes()).collect()
}

/// Quantized blocks with a small scale and arbitrary quants (their values are tested elsewhere).
fn blocks(n_blocks: usize, block_bytes: usize, scale_slots: &[usize]) -> Vec<u8> {
    let mut out = vec![];
    for b in 0..n_blocks {
        let mut block: Vec<u8> = (0..block_bytes).map(|i| (i * 7 + b * 13) as u8).collect();
        for &s in scale_slots {
            block[s..s + 2].copy_from_slice(&f16::from_f32(0.01).to_le_bytes());
        }
        out.extend(block);
    }
    out
}

/// HF's q_proj (rows = heads x head_dim): value r * 1000 + c identifies each element.
fn hf_q() -> Vec<f32> {
    (0..HEADS * HEAD_DIM).flat_map(|r| (0..HIDDEN).map(move |c| (r * 1000 + c) as f32)).collect()
}

/// llama.cpp's convert_hf_to_gguf permute, written out: reshape(n_head, 2, D/2, cols).swapaxes(1, 2).
fn llama_cpp_permute(w: &[f32], n_head: usize, cols: usize) -> Vec<f32> {
    let rows = w.len() / cols;
    let half = rows / n_head / 2;
    let mut out = vec![0.0; w.len()];
    for h in 0..n_head {
        for i in 0..2 {
            for j in 0..half {
                let (src, dst) = (h * 2 * half + i * half + j, h * 2 * half + j * 2 + i);
                out[dst * cols..(dst + 1) * cols].copy_from_slice(&w[src * cols..(src + 1) * cols]);
            }
        }
    }
    out
}

fn tiny_meta(arch: &str) -> Vec<(&'static str, Value)> {
    let s = |x: &str| Value::Str(x.into());
    let tokens = ["<|endoftext|>", "a", "b", "ab", "Ġ", "Ġa", "Ġab"];
    vec![
        ("general.architecture", s(arch)),
        ("general.alignment", Value::U32(32)),
        ("llama.context_length", Value::U32(128)),
        ("llama.embedding_length", Value::U32(HIDDEN as u32)),
        ("llama.block_count", Value::U32(1)),
        ("llama.feed_forward_length", Value::U64(FF as u64)),
        ("llama.attention.head_count", Value::U32(HEADS as u32)),
        ("llama.attention.head_count_kv", Value::U32(KV_HEADS as u32)),
        ("llama.rope.freq_base", Value::F32(10000.0)),
        ("llama.attention.layer_norm_rms_epsilon", Value::F32(1e-6)),
        ("tokenizer.ggml.model", s("gpt2")),
        ("tokenizer.ggml.pre", s("smollm")),
        ("tokenizer.ggml.tokens", Value::Array(tokens.iter().map(|t| s(t)).collect())),
        ("tokenizer.ggml.token_type", Value::Array([3, 1, 1, 1, 1, 1, 1].map(Value::I32).to_vec())),
        ("tokenizer.ggml.merges", Value::Array(["Ġ a", "a b", "Ġa b"].map(s).to_vec())),
        ("tokenizer.ggml.bos_token_id", Value::U32(0)),
        ("tokenizer.ggml.eos_token_id", Value::U32(0)),
        ("tokenizer.ggml.add_bos_token", Value::Bool(true)),
        // Every other value type, to read them all back.
        ("test.u8", Value::U8(200)),
        ("test.i8", Value::I8(-5)),
        ("test.u16", Value::U16(60000)),
        ("test.i16", Value::I16(-300)),
        ("test.i64", Value::I64(-1 << 40)),
        ("test.f64", Value::F64(2.5)),
        ("test.nested", Value::Array(vec![Value::Array(vec![Value::U16(1), Value::U16(2)]), Value::Array(vec![Value::U16(3)])])),
    ]
}

fn tiny_tensors() -> Vec<(&'static str, Vec<u64>, u32, Vec<u8>)> {
    let (h, kv, ff) = (HIDDEN as u64, (KV_HEADS * HEAD_DIM) as u64, FF as u64);
    let ones = vec![1.0f32; HIDDEN];
    let k_hf: Vec<f32> = (0..KV_HEADS * HEAD_DIM * HIDDEN).map(|i| i as f32 / 64.0).collect();
    vec![
        ("token_embd.weight", vec![h, 7], 0, f32_bytes(&(0..7 * HIDDEN).map(|i| i as f32).collect::<Vec<_>>())),
        ("output_norm.weight", vec![h], 0, f32_bytes(&ones)),
        ("blk.0.attn_norm.weight", vec![h], 0, f32_bytes(&ones)),
        ("blk.0.ffn_norm.weight", vec![h], 30, ones.iter().flat_map(|x| bf16::from_f32(*x).to_le_bytes()).collect()),
        ("blk.0.attn_q.weight", vec![h, h], 0, f32_bytes(&llama_cpp_permute(&hf_q(), HEADS, HIDDEN))),
        ("blk.0.attn_k.weight", vec![h, kv], 1, f16_bytes(&llama_cpp_permute(&k_hf, KV_HEADS, HIDDEN))),
        ("blk.0.attn_v.weight", vec![h, kv], 8, blocks(16, 34, &[0])),
        ("blk.0.attn_output.weight", vec![h, h], 3, blocks(32, 20, &[0, 2])),
        ("blk.0.ffn_gate.weight", vec![h, ff], 2, blocks(64, 18, &[0])),
        ("blk.0.ffn_up.weight", vec![h, ff], 1, f16_bytes(&vec![0.5; FF * HIDDEN])),
        ("blk.0.ffn_down.weight", vec![ff, h], 1, f16_bytes(&vec![0.25; FF * HIDDEN])),
    ]
}

fn tiny_file() -> Vec<u8> {
    write_gguf(&tiny_meta("llama"), &tiny_tensors())
}

fn open_bytes(bytes: &[u8]) -> (tempfile::TempDir, String, falcon_batch::format::Result<GgufCheckpoint>) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tiny.gguf");
    std::fs::write(&path, bytes).unwrap();
    let ck = GgufCheckpoint::open(&path);
    (dir, path.display().to_string(), ck)
}

const HF_NAMES: &[&str] = &[
    "model.embed_tokens.weight",
    "model.norm.weight",
    "lm_head.weight",
    "model.layers.0.input_layernorm.weight",
    "model.layers.0.post_attention_layernorm.weight",
    "model.layers.0.self_attn.q_proj.weight",
    "model.layers.0.self_attn.k_proj.weight",
    "model.layers.0.self_attn.v_proj.weight",
    "model.layers.0.self_attn.o_proj.weight",
    "model.layers.0.mlp.gate_proj.weight",
    "model.layers.0.mlp.up_proj.weight",
    "model.layers.0.mlp.down_proj.weight",
];

#[test]
fn tiny_llama_reads_back() {
    let (_dir, path, ck) = open_bytes(&tiny_file());
    let ck = ck.unwrap_or_else(|e| panic!("{e}"));
    let m = |k: &str| ck.metadata(k).cloned().unwrap();
    assert_eq!(m("test.u8"), Value::U8(200));
    assert_eq!(m("test.i8"), Value::I8(-5));
    assert_eq!(m("test.u16"), Value::U16(60000));
    assert_eq!(m("test.i16"), Value::I16(-300));
    assert_eq!(m("test.i64"), Value::I64(-1 << 40));
    assert_eq!(m("test.f64"), Value::F64(2.5));
    assert_eq!(m("test.nested").as_array().unwrap()[1], Value::Array(vec![Value::U16(3)]));
    assert_eq!(ck.header().version, 3);
    assert_eq!(ck.header().data_offset % 32, 0);

    let cfg = ck.config();
    assert_eq!((cfg.hidden_size, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim), (HIDDEN, HEADS, KV_HEADS, HEAD_DIM));
    assert_eq!((cfg.intermediate_size, cfg.n_layers, cfg.vocab_size, cfg.max_position), (FF, 1, 7, 128));
    assert_eq!((cfg.rope_theta, cfg.norm_eps), (10000.0, 1e-6));
    assert!(cfg.tied_embeddings);
    assert!(!ck.contains("lm_head.weight"));
    assert_eq!(ck.origin(), path);

    // Reversed dims: GGUF [HIDDEN, 7] is the row-major (7, HIDDEN) embedding.
    assert_eq!(ck.get("model.embed_tokens.weight").unwrap().shape, vec![7, HIDDEN]);
    assert_eq!(ck.get("model.layers.0.mlp.gate_proj.weight").unwrap().shape, vec![FF, HIDDEN]);
    // llama.cpp's permutation is undone exactly.
    assert_eq!(ck.get("model.layers.0.self_attn.q_proj.weight").unwrap().to_f32(), hf_q());
    let k = ck.get("model.layers.0.self_attn.k_proj.weight").unwrap().to_f32();
    assert_eq!(k, (0..KV_HEADS * HEAD_DIM * HIDDEN).map(|i| i as f32 / 64.0).collect::<Vec<_>>());
    for part in Part::all(1) {
        convert_part(cfg, part, &ck).unwrap_or_else(|e| panic!("{}: {e}", part.name()));
    }
}

#[test]
fn tiny_tokenizer_builds_and_adds_bos() {
    let (_dir, _path, ck) = open_bytes(&tiny_file());
    let json = ck.unwrap().tokenizer_json().unwrap();
    let tok = Tokenizer::from_bytes(&json, "tiny").unwrap();
    assert_eq!(tok.encode("ab ab", false).unwrap(), vec![3, 6]);
    assert_eq!(tok.encode("ab ab", true).unwrap(), vec![0, 3, 6]);
    assert_eq!(tok.encode("a<|endoftext|>b", false).unwrap(), vec![1, 0, 2]);
    assert_eq!(tok.decode(&[3, 6], false).unwrap(), "ab ab");
}

fn err_text(r: falcon_batch::format::Result<GgufCheckpoint>) -> (FormatError, String) {
    match r {
        Ok(_) => panic!("expected an error"),
        Err(e) => {
            let s = e.to_string();
            (e, s)
        }
    }
}

#[test]
fn clear_errors_name_the_file_and_problem() {
    let (_d, path, r) = open_bytes(&write_gguf(&tiny_meta("gptneox"), &tiny_tensors()));
    let (e, s) = err_text(r);
    assert!(matches!(e, FormatError::Unsupported { .. }) && s.contains(&path) && s.contains("general.architecture `gptneox`"), "{s}");

    let mut tensors = tiny_tensors();
    tensors[7] = ("blk.0.attn_output.weight", vec![256, 32], 12, vec![0; 32 * 144]);
    let (_d, _p, r) = open_bytes(&write_gguf(&tiny_meta("llama"), &tensors));
    let err = r.unwrap().get("model.layers.0.self_attn.o_proj.weight").unwrap_err().to_string();
    assert!(err.contains("blk.0.attn_output.weight") && err.contains("Q4_K") && err.contains("tiny.gguf"), "{err}");

    let mut bytes = tiny_file();
    bytes.truncate(bytes.len() - 10);
    let (_d, path, r) = open_bytes(&bytes);
    let (e, s) = err_text(r);
    assert!(matches!(e, FormatError::Malformed { .. }), "{s}");
    let want = "tensor blk.0.ffn_down.weight: data range";
    assert!(s.starts_with(&path) && s.contains(want) && s.contains(&format!("outside file of {} bytes", bytes.len())), "{s}");

    let mut bytes = tiny_file();
    bytes[4] = 1;
    let (_d, _p, r) = open_bytes(&bytes);
    assert!(err_text(r).1.contains("GGUF version 1 is not supported"));
    let (_d, _p, r) = open_bytes(b"GGML\x03\0\0\0");
    assert!(err_text(r).1.contains("not a GGUF file"));
    let (_d, _p, r) = open_bytes(b"");
    assert!(err_text(r).1.contains("truncated"));
}

/// The tiny file with metadata added (or replaced) and extra tensors.
fn open_with(meta: &[(&'static str, Value)], extra: Vec<(&'static str, Vec<u64>, u32, Vec<u8>)>) -> (tempfile::TempDir, String, falcon_batch::format::Result<GgufCheckpoint>) {
    let mut m = tiny_meta("llama");
    m.retain(|(k, _)| !meta.iter().any(|(k2, _)| k2 == k));
    m.extend(meta.iter().cloned());
    let mut tensors = tiny_tensors();
    tensors.extend(extra);
    open_bytes(&write_gguf(&m, &tensors))
}

#[test]
fn rope_scaling_is_read_as_llama_cpp_reads_it() {
    use falcon_batch::config::RopeScaling;
    let scaling = |meta: &[(&'static str, Value)], extra| {
        let (_d, _p, r) = open_with(meta, extra);
        r.unwrap_or_else(|e| panic!("{e}")).config().rope_scaling.clone()
    };
    let s = |x: &str| Value::Str(x.into());
    assert_eq!(scaling(&[], vec![]), RopeScaling::None);
    let linear = [("llama.rope.scaling.type", s("linear")), ("llama.rope.scaling.factor", Value::F32(4.0))];
    assert_eq!(scaling(&linear, vec![]), RopeScaling::Linear { factor: 4.0 });
    // no type key means linear; the factor may sit under the older key
    assert_eq!(scaling(&[("llama.rope.scale_linear", Value::F32(2.0))], vec![]), RopeScaling::Linear { factor: 2.0 });
    // type none switches a factor off
    assert_eq!(scaling(&[("llama.rope.scaling.type", s("none")), ("llama.rope.scaling.factor", Value::F32(4.0))], vec![]), RopeScaling::None);
    // Llama-3.x: rope_freqs.weight (D/2) divides each frequency
    let factors: Vec<f32> = (0..HEAD_DIM / 2).map(|i| 1.0 + i as f32).collect();
    let freqs = vec![("rope_freqs.weight", vec![(HEAD_DIM / 2) as u64], 0, f32_bytes(&factors))];
    assert_eq!(scaling(&[], freqs), RopeScaling::Freqs { factors });
}

#[test]
fn rope_and_bias_layouts_we_do_not_run_are_refused_by_name() {
    let refused = |meta: &[(&'static str, Value)], extra, want: &[&str]| {
        let (_d, path, r) = open_with(meta, extra);
        let (e, s) = err_text(r);
        assert!(matches!(e, FormatError::Unsupported { .. } | FormatError::Malformed { .. }) && s.contains(&path), "{s}");
        for w in want {
            assert!(s.contains(w), "{s} lacks {w}");
        }
    };
    let yarn = [("llama.rope.scaling.type", Value::Str("yarn".into())), ("llama.rope.scaling.factor", Value::F32(4.0))];
    refused(&yarn, vec![], &["llama.rope.scaling.type", "`yarn`"]);
    refused(&[("llama.rope.dimension_count", Value::U32(8))], vec![], &["llama.rope.dimension_count", "8", "partial rotary"]);
    let short = vec![("rope_freqs.weight", vec![3], 0, f32_bytes(&[1.0, 2.0, 3.0]))];
    refused(&[], short, &["rope frequency factors", "expected head_dim / 2 = 8", "got 3"]);
    let q_bias = vec![("blk.0.attn_q.bias", vec![HIDDEN as u64], 0, f32_bytes(&[0.0; HIDDEN]))];
    refused(&[], q_bias, &["blk.0.attn_q.bias", "blk.0.attn_output.bias"]);
}

#[test]
fn every_truncation_is_an_error_naming_the_file() {
    let bytes = tiny_file();
    for n in 0..bytes.len() {
        match parse(&bytes[..n], "cut.gguf") {
            Ok(_) => panic!("prefix of {n} bytes parsed"),
            Err(e) => assert!(e.to_string().starts_with("cut.gguf: "), "{e}"),
        }
    }
    assert!(parse(&bytes, "whole.gguf").is_ok());
}

/// Everything a converter does with a file: no panic whatever the bytes, errors name the file.
fn exercise(bytes: &[u8]) {
    let (_dir, path, ck) = open_bytes(bytes);
    let ck = match ck {
        Ok(ck) => ck,
        Err(e) => {
            assert!(e.to_string().contains(&path), "{e}");
            return;
        }
    };
    for name in HF_NAMES {
        if let Err(e) = ck.get(name) {
            assert!(e.to_string().contains(&path), "{e}");
        }
    }
    match ck.tokenizer_json() {
        Ok(json) => {
            if let Ok(tok) = Tokenizer::from_bytes(&json, "flipped") {
                let _ = tok.encode("ab a b<|endoftext|>", true);
            }
        }
        Err(e) => assert!(e.to_string().contains(&path), "{e}"),
    }
    if ck.config().validate("x").is_ok() {
        for part in Part::all(ck.config().n_layers.min(2)) {
            let _ = convert_part(ck.config(), part, &ck);
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 96, ..ProptestConfig::default() })]

    #[test]
    fn byte_flips_never_panic(flips in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..8)) {
        let mut bytes = tiny_file();
        // Most of the file is tensor data; flip within the header half the time.
        let header_len = parse(&bytes, "x").unwrap().data_offset;
        for (i, (at, v)) in flips.iter().enumerate() {
            let n = if i % 2 == 0 { header_len } else { bytes.len() };
            let k = at.index(n);
            bytes[k] ^= v | 1;
        }
        exercise(&bytes);
    }

    #[test]
    fn random_bytes_never_panic(tail in prop::collection::vec(any::<u8>(), 0..512), magic in any::<bool>()) {
        let mut bytes = if magic { b"GGUF\x03\0\0\0".to_vec() } else { vec![] };
        bytes.extend(tail);
        if let Err(e) = parse(&bytes, "random.gguf") {
            prop_assert!(e.to_string().starts_with("random.gguf: "));
        }
        exercise(&bytes);
    }
}

#[test]
fn missing_file_names_it() {
    let err = GgufCheckpoint::open(Path::new("/nonexistent/x.gguf")).err().unwrap().to_string();
    assert!(err.contains("/nonexistent/x.gguf"), "{err}");
}

/// Found by the fuzzer's review: F32 dims of 2^31 x 2^31 fit isize but their 2^64 bytes wrapped
/// to 0, so a tensor with no data passed the range check.
#[test]
fn tensor_bytes_that_overflow_are_refused() {
    let bytes = write_gguf(&[], &[("huge", vec![1 << 31, 1 << 31], 0, vec![])]);
    let e = parse(&bytes, "huge.gguf").unwrap_err().to_string();
    assert!(e.starts_with("huge.gguf: tensor huge: data range") && e.contains("outside file"), "{e}");
}
