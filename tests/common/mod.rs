//! Shared test helpers: small random models built in memory; launching processes with a
//! hard limit (proc); test hosts on network namespaces (hosts); the converted SmolLM2 and
//! sample corpus the process-launching tests score (smol); the tiny fixture model and the
//! processes of a running job (tiny); test directories removed at exit (tmp).
#![allow(dead_code, unused_imports)]

pub mod hosts;
pub mod proc;
pub mod smol;
pub mod tiny;
pub mod tmp;

use falcon_batch::config::ModelConfig;
pub use falcon_batch::testing::{rand_values, random_group, random_part};

pub mod docs;

pub fn falcon_config(new_arch: bool, parallel: bool, bias: bool) -> ModelConfig {
    falcon_batch::testing::falcon_config(3, new_arch, parallel, bias).unwrap()
}

pub fn llama_config() -> ModelConfig {
    falcon_batch::testing::llama_config(3).unwrap()
}

/// A word-level tokenizer over "t0" .. "t{n-1}" (ids = indices), split on whitespace.
pub fn word_tokenizer(n: usize) -> falcon_batch::tokenizer::Tokenizer {
    falcon_batch::testing::word_tokenizer(n).unwrap()
}

/// An HF fixture of tests/fixtures (made by make_fixtures.py): its config, all its layers
/// converted from its safetensors, and its golden.json.
pub struct HfFixture {
    pub dir: std::path::PathBuf,
    pub cfg: ModelConfig,
    pub host: falcon_batch::group::HostGroup,
    pub golden: serde_json::Value,
}

/// Minimal reader of an HF checkpoint's safetensors (sharded or not), test-only.
pub struct Shards(std::collections::HashMap<String, falcon_batch::tensor::HostTensor>);

impl falcon_batch::model::TensorSource for Shards {
    fn get(&self, name: &str) -> Result<falcon_batch::tensor::HostTensor, falcon_batch::model::ModelError> {
        self.0.get(name).cloned().ok_or_else(|| falcon_batch::model::ModelError::Source(format!("no tensor {name}")))
    }
    fn contains(&self, name: &str) -> bool {
        self.0.contains_key(name)
    }
}

pub fn read_shards(dir: &std::path::Path) -> Shards {
    use falcon_batch::tensor::{DType, HostTensor};
    let mut map = std::collections::HashMap::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.extension().is_some_and(|x| x == "safetensors") {
            let bytes = std::fs::read(&p).unwrap();
            let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
            for (name, view) in st.tensors() {
                assert_eq!(view.dtype(), safetensors::Dtype::F32);
                map.insert(name.to_string(), HostTensor { dtype: DType::F32, shape: view.shape().to_vec(), data: view.data().to_vec().into() });
            }
        }
    }
    Shards(map)
}

pub fn hf_fixture(name: &str) -> HfFixture {
    use falcon_batch::model::{self, Part};
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(name);
    let read = |f: &str| -> serde_json::Value { serde_json::from_str(&std::fs::read_to_string(dir.join(f)).unwrap()).unwrap() };
    let cfg = model::config_from_hf(&read("config.json"), "config.json").unwrap();
    let src = read_shards(&dir);
    let host = falcon_batch::group::HostGroup::read(0..cfg.n_layers, cfg.n_layers, |p: Part| model::convert_part(&cfg, p, &src)).unwrap();
    let golden = read("golden.json");
    HfFixture { dir, cfg, host, golden }
}

/// A valid manifest.json (no part files) of a small llama with `layers` layers: what `plan
/// --model` reads, as `convert` would write it.
pub fn fake_manifest(dir: &std::path::Path, layers: usize) {
    use falcon_batch::format::manifest::{compute_model_id, Manifest, PartEntry, FORMAT_VERSION};
    use falcon_batch::format::st::FileHashes;
    let cfg: ModelConfig = serde_json::from_value(serde_json::json!({
        "family": "llama", "vocab_size": 64, "hidden_size": 16, "n_layers": layers, "n_heads": 4, "n_kv_heads": 2,
        "head_dim": 4, "intermediate_size": 32, "max_position": 128, "sliding_window": null, "rope_theta": 10000.0,
        "norm_eps": 1e-5, "tied_embeddings": false, "attention_bias": false, "mlp_bias": false, "falcon": null,
        "bos_token_id": 1, "eos_token_ids": [2]
    }))
    .unwrap();
    let (sha, xxh) = ("0".repeat(64), "0".repeat(32));
    let parts: Vec<PartEntry> = falcon_batch::model::Part::all(layers)
        .into_iter()
        .map(|p| PartEntry { name: p.name(), file: p.file_name(), bytes: 1, sha256: sha.clone(), xxh3: Some(xxh.clone()) })
        .collect();
    let tokenizer_hash = FileHashes { bytes: 2, sha256: sha.clone(), xxh3: xxh };
    let model_id = compute_model_id(&cfg, &parts, Some(&sha));
    let m = Manifest {
        format_version: FORMAT_VERSION,
        family: cfg.family,
        config: cfg,
        dtype: falcon_batch::tensor::DType::F32,
        parts,
        tokenizer: "tokenizer.json".into(),
        tokenizer_hash,
        model_id,
        source: "test".into(),
    };
    m.save(dir).unwrap();
}
