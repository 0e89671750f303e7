//! Convert small random HF checkpoints of both families and read them back.

mod common;
mod format_common;

use falcon_batch::config::Family;
use falcon_batch::format::convert::{convert, convert_path};
use falcon_batch::format::hf::HfCheckpoint;
use falcon_batch::format::model_dir::ModelDir;
use falcon_batch::format::Checkpoint;
use falcon_batch::model::{self, Part, TensorSource};
use falcon_batch::tensor::{DType, HostTensor};
use format_common::*;
use common::proc::OutputWithin;
use std::path::Path;
use std::time::Duration;

/// Every launch is killed, with its process group, past this.
const LIMIT: Duration = Duration::from_secs(300);

/// Every part read back equals what the family converter makes from the source, cast.
fn assert_parts_match_source(md: &ModelDir, src: &HfCheckpoint) {
    for part in Part::all(md.config().n_layers) {
        let got = md.read_part(part).unwrap();
        let want = model::convert_part(src.config(), part, src).unwrap();
        assert_eq!(got.len(), want.len(), "{part:?}");
        for ((gn, gt), (wn, wt)) in got.iter().zip(&want) {
            assert_eq!(gn, wn);
            assert_eq!(gt, &wt.to_dtype(md.manifest().dtype), "{part:?} {gn}");
        }
    }
}

#[test]
fn llama_gqa_unsharded_round_trip() {
    let tmp = tempfile::tempdir().unwrap();
    let (src, out) = (tmp.path().join("hf"), tmp.path().join("models/llama"));
    let raw = llama_checkpoint(&src, 3, DType::Bf16, 1);
    std::fs::create_dir_all(tmp.path().join("models")).unwrap();
    let m = convert_path(&src, &out, None).unwrap();
    assert_eq!(m.family, Family::Llama);
    assert_eq!(m.dtype, DType::Bf16, "torch_dtype bfloat16 is the default output");
    assert_eq!(m.parts.len(), 5);
    assert_eq!(m.config.rope_theta, 50000.0);
    assert_eq!((m.config.n_heads, m.config.n_kv_heads, m.config.head_dim), (4, 2, 4));

    let md = ModelDir::open(&out).unwrap();
    assert_eq!(md.manifest(), &m);
    assert!(md.verify().is_empty());
    let ck = HfCheckpoint::open(&src).unwrap();
    assert_parts_match_source(&md, &ck);

    // Independent of the family code: qkv is q, k, v stacked by rows; embed is copied.
    let layer1 = md.read_part(Part::Layer(1)).unwrap();
    let qkv = &layer1.iter().find(|(n, _)| n == "attn.qkv.weight").unwrap().1;
    let p = "model.layers.1.self_attn";
    let stacked = HostTensor::concat_rows(&[raw[&format!("{p}.q_proj.weight")].clone(), raw[&format!("{p}.k_proj.weight")].clone(), raw[&format!("{p}.v_proj.weight")].clone()]);
    assert_eq!(qkv, &stacked);
    assert_eq!(md.read_part(Part::Begin).unwrap()[0].1, raw["model.embed_tokens.weight"]);

    // The copied tokenizer loads.
    let tok = falcon_batch::tokenizer::Tokenizer::from_file(&md.tokenizer_path()).unwrap();
    assert_eq!(tok.encode("t3 t5", false).unwrap(), vec![3, 5]);

    // The model id is derived from content only: the same checkpoint converts to the same id.
    let again = convert(&ck, &tmp.path().join("models/llama2"), None).unwrap();
    assert_eq!(again.model_id, m.model_id);
    assert_eq!(again.model_id.len(), 64);
}

#[test]
fn falcon_new_arch_sharded_round_trip() {
    let tmp = tempfile::tempdir().unwrap();
    let (src, out) = (tmp.path().join("hf"), tmp.path().join("falcon"));
    let raw = falcon_checkpoint(&src, 2, DType::F32, 3);
    assert!(src.join("model.safetensors.index.json").exists());
    let m = convert_path(&src, &out, None).unwrap();
    assert_eq!(m.family, Family::Falcon);
    assert_eq!(m.dtype, DType::F32);
    let md = ModelDir::open(&out).unwrap();
    assert!(md.verify().is_empty());
    let ck = HfCheckpoint::open(&src).unwrap();
    assert_eq!(ck.tensor_names().len(), raw.len());
    assert_parts_match_source(&md, &ck);
    // Tied head: stored in end, equal to the embeddings.
    let end = md.read_part(Part::End).unwrap();
    assert_eq!(end.iter().find(|(n, _)| n == "lm_head.weight").unwrap().1, raw["transformer.word_embeddings.weight"]);
    let names: Vec<_> = md.read_part(Part::Layer(0)).unwrap().into_iter().map(|(n, _)| n).collect();
    assert!(names.contains(&"attn_norm.bias".to_string()) && names.contains(&"mlp_norm.weight".to_string()), "{names:?}");
}

#[test]
fn config_variants() {
    let tmp = tempfile::tempdir().unwrap();
    let shapes_cfg = llama_config(1);
    let tensors = random_tensors(&llama_shapes(&shapes_cfg), DType::F16);
    let variant = |name: &str, edit: &dyn Fn(&mut serde_json::Map<String, serde_json::Value>)| {
        let mut cfg = shapes_cfg.clone();
        edit(cfg.as_object_mut().unwrap());
        let dir = tmp.path().join(name);
        write_checkpoint(&dir, &cfg, &tensors, 1);
        HfCheckpoint::open(&dir).unwrap()
    };
    let nested = variant("nested_rope", &|c| {
        c.remove("rope_theta");
        c.insert("rope_parameters".into(), serde_json::json!({"rope_type": "default", "rope_theta": 1e6}));
    });
    assert_eq!(nested.config().rope_theta, 1e6);
    let dtype_field = variant("dtype_field", &|c| {
        c.remove("torch_dtype");
        c.insert("dtype".into(), "float32".into());
    });
    assert_eq!(dtype_field.native_dtype(), DType::F32);
    let from_tensors = variant("no_dtype", &|c| {
        c.remove("torch_dtype");
    });
    assert_eq!(from_tensors.native_dtype(), DType::F16, "falls back to the tensors' dtype");
    let minimal = variant("minimal", &|c| {
        for k in ["max_position_embeddings", "rms_norm_eps", "rope_theta", "tie_word_embeddings", "bos_token_id", "eos_token_id", "hidden_act", "architectures"] {
            c.remove(k);
        }
    });
    assert_eq!(minimal.config().rope_theta, 10000.0);
    assert_eq!(minimal.config().max_position, 2048);
    let m = convert(&minimal, &tmp.path().join("minimal_out"), None).unwrap();
    assert_eq!(m.dtype, DType::Bf16, "torch_dtype bfloat16 still names the output dtype");
    assert!(ModelDir::open(&tmp.path().join("minimal_out")).unwrap().verify().is_empty());
}

fn converted_llama(tmp: &Path, layers: usize) -> std::path::PathBuf {
    let (src, out) = (tmp.join("hf"), tmp.join("out"));
    llama_checkpoint(&src, layers, DType::F32, 2);
    convert_path(&src, &out, None).unwrap();
    out
}

#[test]
fn flipped_byte_is_named_by_verify_and_inspect() {
    let tmp = tempfile::tempdir().unwrap();
    let out = converted_llama(tmp.path(), 3);
    let victim = out.join("layer_001.safetensors");
    let mut bytes = std::fs::read(&victim).unwrap();
    let last = bytes.len() - 3;
    bytes[last] ^= 0x40;
    std::fs::write(&victim, bytes).unwrap();
    let md = ModelDir::open(&out).unwrap();
    let bad = md.verify();
    assert_eq!(bad.len(), 1, "{bad:?}");
    assert_eq!(bad[0].0, "layer_001");
    assert!(bad[0].1.contains("layer_001.safetensors"), "{}", bad[0].1);

    let run = std::process::Command::new(env!("CARGO_BIN_EXE_falcon-batch")).args(["inspect", "--verify"]).arg(&out).output_within(LIMIT).unwrap();
    assert_eq!(run.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(stderr.contains("layer_001"), "{stderr}");
    let stdout = String::from_utf8_lossy(&run.stdout);
    assert!(stdout.contains("family     llama") && stdout.contains("layer_002.safetensors"), "{stdout}");
}

#[test]
fn a_rank_needs_only_its_own_parts() {
    let tmp = tempfile::tempdir().unwrap();
    let out = converted_llama(tmp.path(), 4);
    for gone in ["layer_002.safetensors", "layer_003.safetensors", "end.safetensors"] {
        std::fs::remove_file(out.join(gone)).unwrap();
    }
    let mine = [Part::Begin, Part::Layer(0), Part::Layer(1)];
    let md = ModelDir::open_for(&out, &mine).unwrap();
    md.check_parts(&mine).unwrap();
    assert_eq!(md.read_part(Part::Layer(1)).unwrap().len(), 7);
    let e = md.check_parts(&[Part::Layer(3)]).unwrap_err().to_string();
    assert!(e.contains("layer_003.safetensors"), "{e}");
    let e = md.read_part(Part::Layer(9)).unwrap_err().to_string();
    assert!(e.contains("manifest.json") && e.contains("layer_009"), "{e}");
    let e = ModelDir::open(&out).err().unwrap().to_string();
    assert!(e.contains("layer_002.safetensors"), "{e}");
}

#[test]
fn short_part_and_foreign_tensors_are_named() {
    let tmp = tempfile::tempdir().unwrap();
    let out = converted_llama(tmp.path(), 1);
    let md = ModelDir::open(&out).unwrap();

    // A part with one extra tensor, written with the recorded size kept out of the way.
    let layer = out.join("layer_000.safetensors");
    let mut tensors = md.read_part(Part::Layer(0)).unwrap();
    tensors.push(("attn.sneaky".into(), random_tensor(&[2], DType::F32, 9)));
    let refs: Vec<(&String, &HostTensor)> = tensors.iter().map(|(n, t)| (n, t)).collect();
    write_safetensors(&layer, &refs);
    let e = md.read_part(Part::Layer(0)).unwrap_err().to_string();
    assert!(e.contains("layer_000.safetensors") && e.contains("bytes"), "size is checked first: {e}");

    // Same size, wrong shape: the header check names file and tensor.
    let mut tensors = md.read_part(Part::End).unwrap();
    let end = out.join("end.safetensors");
    tensors[0].1.shape = vec![4, 4];
    let refs: Vec<(&String, &HostTensor)> = tensors.iter().map(|(n, t)| (n, t)).collect();
    write_safetensors(&end, &refs);
    let e = md.check_parts(&[Part::End]).unwrap_err().to_string();
    assert!(e.contains("end.safetensors") && e.contains("norm.weight") && e.contains("[16]"), "{e}");
}

#[test]
fn source_errors_name_file_tensor_and_field() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = llama_config(1);
    let mut tensors = random_tensors(&llama_shapes(&cfg), DType::F32);

    // A wrong shape names the tensor and both shapes.
    let src = tmp.path().join("bad_shape");
    let mut bad = tensors.clone();
    bad.insert("model.norm.weight".into(), random_tensor(&[15], DType::F32, 3));
    write_checkpoint(&src, &cfg, &bad, 1);
    let e = convert_path(&src, &tmp.path().join("o1"), None).unwrap_err().to_string();
    assert!(e.contains("model.norm.weight") && e.contains("[16]") && e.contains("[15]"), "{e}");
    assert!(!tmp.path().join("o1").exists());
    let leftovers: Vec<_> = std::fs::read_dir(tmp.path()).unwrap().filter_map(|e| e.ok()).filter(|e| e.file_name().to_string_lossy().contains("partial")).collect();
    assert!(leftovers.is_empty(), "staging directory removed on failure");

    // A missing tensor is named.
    let src = tmp.path().join("missing");
    let mut gone = tensors.clone();
    gone.remove("model.layers.0.mlp.up_proj.weight");
    write_checkpoint(&src, &cfg, &gone, 1);
    let e = convert_path(&src, &tmp.path().join("o2"), None).unwrap_err().to_string();
    assert!(e.contains("model.layers.0.mlp.up_proj.weight"), "{e}");

    // An unsupported dtype names the tensor and the file.
    let src = tmp.path().join("int");
    write_checkpoint(&src, &cfg, &tensors, 1);
    let mut all: Vec<(String, safetensors::tensor::TensorView)> =
        tensors.iter().map(|(n, t)| (n.clone(), safetensors::tensor::TensorView::new(safetensors::Dtype::F32, t.shape.clone(), &t.data).unwrap())).collect();
    let ints = [0u8; 8];
    all.push(("model.layers.0.input_layernorm.weight".into(), safetensors::tensor::TensorView::new(safetensors::Dtype::I32, vec![2], &ints).unwrap()));
    all.retain(|(n, v)| n != "model.layers.0.input_layernorm.weight" || v.dtype() == safetensors::Dtype::I32);
    safetensors::serialize_to_file(all, None, &src.join("model.safetensors")).unwrap();
    let ck = HfCheckpoint::open(&src).unwrap();
    let e = ck.get("model.layers.0.input_layernorm.weight").unwrap_err().to_string();
    assert!(e.contains("model.layers.0.input_layernorm.weight") && e.contains("model.safetensors") && e.contains("I32"), "{e}");

    // A missing tokenizer fails before any part is written.
    let src = tmp.path().join("no_tok");
    tensors.remove("lm_head.weight");
    write_checkpoint(&src, &cfg, &tensors, 1);
    std::fs::remove_file(src.join("tokenizer.json")).unwrap();
    let e = convert_path(&src, &tmp.path().join("o3"), None).unwrap_err().to_string();
    assert!(e.contains("tokenizer.json"), "{e}");

    // A bad config field is named with its file.
    let src = tmp.path().join("bad_cfg");
    let mut c = cfg.clone();
    c["num_attention_heads"] = serde_json::json!("four");
    write_checkpoint(&src, &c, &tensors, 1);
    let e = HfCheckpoint::open(&src).err().unwrap().to_string();
    assert!(e.contains("config.json") && e.contains("num_attention_heads"), "{e}");

    // An existing output is never overwritten.
    let src = tmp.path().join("int");
    let e = convert_path(&src, tmp.path(), None).unwrap_err().to_string();
    assert!(e.contains("already exists"), "{e}");
}

#[test]
fn cli_convert_prints_one_line_per_part() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("hf");
    falcon_checkpoint(&src, 2, DType::F32, 1);
    let out = tmp.path().join("m");
    let run = std::process::Command::new(env!("CARGO_BIN_EXE_falcon-batch"))
        .args(["convert", "--dtype", "bf16", "--from"])
        .arg(&src)
        .arg("--to")
        .arg(&out)
        .output_within(LIMIT)
        .unwrap();
    let stdout = String::from_utf8_lossy(&run.stdout);
    assert!(run.status.success(), "{stdout}{}", String::from_utf8_lossy(&run.stderr));
    for part in ["begin", "layer_000", "layer_001", "end"] {
        assert_eq!(stdout.lines().filter(|l| l.contains(part)).count(), 1, "{stdout}");
    }
    assert_eq!(ModelDir::open(&out).unwrap().manifest().dtype, DType::Bf16);
    let run = std::process::Command::new(env!("CARGO_BIN_EXE_falcon-batch")).args(["inspect", "--verify"]).arg(&out).output_within(LIMIT).unwrap();
    assert!(run.status.success());
    let run = std::process::Command::new(env!("CARGO_BIN_EXE_falcon-batch"))
        .args(["convert", "--dtype", "int8", "--from"])
        .arg(&src)
        .arg("--to")
        .arg(tmp.path().join("m2"))
        .output_within(LIMIT)
        .unwrap();
    assert_eq!(run.status.code(), Some(2), "a usage error");
    assert!(String::from_utf8_lossy(&run.stderr).contains("--dtype"));
}

/// Issue 8: a Llama-3.1 config.json in the Hub form converts with its llama3 scaling, which the
/// manifest keeps; a rope type we do not run stops the conversion naming the file and value.
#[test]
fn hub_rope_scaling_survives_conversion_and_unknown_types_stop_it() {
    use falcon_batch::config::RopeScaling;
    let tmp = tempfile::tempdir().unwrap();
    let mut cfg = llama_config(1);
    let tensors = random_tensors(&llama_shapes(&cfg), DType::F32);
    cfg["rope_theta"] = serde_json::json!(500000.0);
    cfg["rope_scaling"] = serde_json::json!({"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192, "rope_type": "llama3"});
    let src = tmp.path().join("hf31");
    write_checkpoint(&src, &cfg, &tensors, 1);
    let out = tmp.path().join("out31");
    convert_path(&src, &out, None).unwrap();
    let md = ModelDir::open(&out).unwrap();
    let want = RopeScaling::Llama3 { factor: 8.0, low_freq_factor: 1.0, high_freq_factor: 4.0, original_max_position: 8192 };
    assert_eq!((md.config().rope_theta, &md.config().rope_scaling), (500000.0, &want));
    assert!(md.verify().is_empty());

    cfg["rope_scaling"] = serde_json::json!({"rope_type": "yarn", "factor": 4.0});
    let src = tmp.path().join("hf_yarn");
    write_checkpoint(&src, &cfg, &tensors, 1);
    let e = convert_path(&src, &tmp.path().join("out_yarn"), None).unwrap_err().to_string();
    assert!(e.contains("config.json") && e.contains("rope_scaling.rope_type") && e.contains("yarn"), "{e}");
}
