//! Untrusted bytes never panic: mutated safetensors headers, manifest.json and config.json
//! give errors that name the file (or, when still well-formed, are handled normally).

mod format_common;

use falcon_batch::format::convert::convert;
use falcon_batch::format::hf::HfCheckpoint;
use falcon_batch::format::manifest::{compute_model_id, Manifest};
use falcon_batch::format::model_dir::ModelDir;
use falcon_batch::model::{Part, TensorSource};
use falcon_batch::tensor::DType;
use format_common::*;
use proptest::prelude::*;
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

/// A valid HF checkpoint and its conversion, built once; each case copies what it mutates.
struct Fixture {
    _tmp: tempfile::TempDir,
    hf: PathBuf,
    out: PathBuf,
}

fn fixture() -> &'static Fixture {
    static F: OnceLock<Fixture> = OnceLock::new();
    F.get_or_init(|| {
        let tmp = tempfile::tempdir().unwrap();
        let (hf, out) = (tmp.path().join("hf"), tmp.path().join("out"));
        llama_checkpoint(&hf, 1, DType::F32, 1);
        falcon_batch::format::convert::convert_path(&hf, &out, None).unwrap();
        Fixture { _tmp: tmp, hf, out }
    })
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
    }
}

#[derive(Debug, Clone)]
enum Mutation {
    Truncate(usize),
    FlipBits(Vec<(usize, u8)>),
    Random(Vec<u8>),
    /// Replace the safetensors header (length prefix kept consistent) and data.
    Header(String, Vec<u8>),
}

fn apply(bytes: &[u8], m: &Mutation) -> Vec<u8> {
    match m {
        Mutation::Truncate(n) => bytes[..n % (bytes.len() + 1)].to_vec(),
        Mutation::FlipBits(flips) => {
            let mut b = bytes.to_vec();
            for (pos, bit) in flips {
                let i = pos % b.len();
                b[i] ^= 1 << (bit % 8);
            }
            b
        }
        Mutation::Random(r) => r.clone(),
        Mutation::Header(h, data) => {
            let mut b = (h.len() as u64).to_le_bytes().to_vec();
            b.extend_from_slice(h.as_bytes());
            b.extend_from_slice(data);
            b
        }
    }
}

fn dim() -> impl Strategy<Value = u64> {
    prop_oneof![0u64..5, Just(u32::MAX as u64), Just(u64::MAX / 3), Just(1u64 << 62)]
}

/// Headers that parse as JSON but lie: odd dtypes, overflowing shapes, bad offsets.
fn header() -> impl Strategy<Value = Mutation> {
    let dtype = prop_oneof![Just("F32"), Just("BF16"), Just("F16"), Just("I64"), Just("BOOL"), Just("F4"), Just("X")];
    let tensor = ("[a-z.]{1,12}", dtype, prop::collection::vec(dim(), 0..4), 0u64..64, prop_oneof![0u64..64, Just(u64::MAX)]);
    (prop::collection::vec(tensor, 0..4), prop::collection::vec(any::<u8>(), 0..64), any::<bool>()).prop_map(|(ts, data, meta)| {
        let mut obj = serde_json::Map::new();
        if meta {
            obj.insert("__metadata__".into(), json!({"format": "pt"}));
        }
        for (name, dtype, shape, s, e) in ts {
            obj.insert(name, json!({"dtype": dtype, "shape": shape, "data_offsets": [s, e]}));
        }
        Mutation::Header(Value::Object(obj).to_string(), data)
    })
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        any::<usize>().prop_map(Mutation::Truncate),
        prop::collection::vec((any::<usize>(), any::<u8>()), 1..6).prop_map(Mutation::FlipBits),
        prop::collection::vec(any::<u8>(), 0..300).prop_map(Mutation::Random),
        header(),
    ]
}

/// A JSON value of the kinds a hostile file might put in a field.
fn json_value() -> impl Strategy<Value = Value> {
    prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        prop_oneof![Just(0i64), Just(-1), Just(1), Just(3), Just(i64::MAX), Just(1 << 40)].prop_map(Value::from),
        Just(json!(u64::MAX)),
        Just(json!(1e300)),
        "[a-z0-9./]{0,8}".prop_map(Value::from),
        Just(json!([1, "x"])),
        Just(json!({})),
    ]
}

/// Set one field of a JSON object (or of its nested `config`) to `v`.
fn replace_field(json: &mut Value, pick: usize, nested: bool, v: Value) {
    let target = if nested { json.get_mut("config").filter(|c| c.is_object()) } else { None };
    let obj = match target {
        Some(t) => t,
        None => json,
    };
    if let Some(map) = obj.as_object_mut() {
        let keys: Vec<String> = map.keys().cloned().collect();
        if !keys.is_empty() {
            map.insert(keys[pick % keys.len()].clone(), v);
        }
    }
}

fn assert_names(e: &dyn std::fmt::Display, files: &[&str]) -> Result<(), TestCaseError> {
    let msg = e.to_string();
    prop_assert!(files.iter().any(|f| msg.contains(f)), "error does not name {files:?}: {msg}");
    Ok(())
}

/// Whatever opens must also read and convert without panicking.
fn exercise_checkpoint(ck: &HfCheckpoint, out: &Path) {
    for name in ck.tensor_names() {
        let _ = ck.get(name);
    }
    let _ = convert(ck, out, None);
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 96, ..ProptestConfig::default() })]

    #[test]
    fn hf_safetensors_bytes(m in mutation()) {
        let f = fixture();
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("hf");
        copy_dir(&f.hf, &dir);
        let file = dir.join("model.safetensors");
        let bytes = std::fs::read(&file).unwrap();
        std::fs::write(&file, apply(&bytes, &m)).unwrap();
        match HfCheckpoint::open(&dir) {
            Err(e) => assert_names(&e, &["model.safetensors"])?,
            Ok(ck) => exercise_checkpoint(&ck, &tmp.path().join("out")),
        }
    }

    #[test]
    fn model_dir_part_bytes(m in mutation(), part in 0usize..3) {
        let f = fixture();
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("m");
        copy_dir(&f.out, &dir);
        let part = [Part::Begin, Part::Layer(0), Part::End][part];
        let file = dir.join(part.file_name());
        let bytes = apply(&std::fs::read(&file).unwrap(), &m);
        std::fs::write(&file, &bytes).unwrap();
        // Record the new size so the header checks, not the size check, meet the bytes.
        let mut manifest = Manifest::load(&dir).unwrap();
        let entry = manifest.parts.iter_mut().find(|p| p.name == part.name()).unwrap();
        entry.bytes = bytes.len() as u64;
        manifest.save(&dir).unwrap();
        let md = ModelDir::open(&dir).unwrap();
        if let Err(e) = md.check_parts(&[part]) {
            assert_names(&e, &[&part.file_name()])?;
        }
        if let Err(e) = md.read_part(part) {
            assert_names(&e, &[&part.file_name()])?;
        }
        let bad = md.verify();
        prop_assert!(bad.iter().all(|(name, _)| name == &part.name()));
    }

    #[test]
    fn manifest_bytes(m in mutation()) {
        let f = fixture();
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("m");
        copy_dir(&f.out, &dir);
        let file = dir.join("manifest.json");
        std::fs::write(&file, apply(&std::fs::read(&file).unwrap(), &m)).unwrap();
        match ModelDir::open(&dir) {
            Err(e) => assert_names(&e, &["manifest.json", ".safetensors"])?,
            Ok(md) => { let _ = md.verify(); }
        }
        if let Err(e) = Manifest::load(&dir) {
            assert_names(&e, &["manifest.json"])?;
        }
    }

    /// Fields replaced with hostile values; the model id is recomputed so the checks past
    /// it (sizes, shapes, reading parts) meet the values too.
    #[test]
    fn manifest_fields(pick in any::<usize>(), nested in any::<bool>(), v in json_value(), fix_id in any::<bool>()) {
        let f = fixture();
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("m");
        copy_dir(&f.out, &dir);
        let file = dir.join("manifest.json");
        let mut json: Value = serde_json::from_slice(&std::fs::read(&file).unwrap()).unwrap();
        replace_field(&mut json, pick, nested, v);
        if fix_id {
            let config = serde_json::from_value(json["config"].clone());
            let parts = serde_json::from_value::<Vec<falcon_batch::format::manifest::PartEntry>>(json["parts"].clone());
            if let (Ok(c), Ok(p)) = (config, parts) {
                json["model_id"] = json!(compute_model_id(&c, &p, json["tokenizer_hash"]["sha256"].as_str()));
            }
        }
        std::fs::write(&file, json.to_string()).unwrap();
        match ModelDir::open_for(&dir, &[Part::Begin, Part::Layer(0), Part::End]) {
            Err(e) => assert_names(&e, &["manifest.json", ".safetensors"])?,
            Ok(md) => {
                for part in [Part::Begin, Part::Layer(0), Part::End] {
                    let _ = md.read_part(part);
                }
            }
        }
    }

    #[test]
    fn config_bytes(m in mutation()) {
        let f = fixture();
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("hf");
        copy_dir(&f.hf, &dir);
        let file = dir.join("config.json");
        std::fs::write(&file, apply(&std::fs::read(&file).unwrap(), &m)).unwrap();
        match HfCheckpoint::open(&dir) {
            Err(e) => assert_names(&e, &["config.json"])?,
            Ok(ck) => exercise_checkpoint(&ck, &tmp.path().join("out")),
        }
    }

    #[test]
    fn config_fields(pick in any::<usize>(), v in json_value()) {
        let f = fixture();
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("hf");
        copy_dir(&f.hf, &dir);
        let file = dir.join("config.json");
        let mut json: Value = serde_json::from_slice(&std::fs::read(&file).unwrap()).unwrap();
        replace_field(&mut json, pick, false, v);
        std::fs::write(&file, json.to_string()).unwrap();
        match HfCheckpoint::open(&dir) {
            Err(e) => assert_names(&e, &["config.json"])?,
            Ok(ck) => exercise_checkpoint(&ck, &tmp.path().join("out")),
        }
    }
}
