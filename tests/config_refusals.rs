//! The config audit (README "Adding a model family"): every HF config field that changes the
//! math is implemented or refused at convert time with an error naming the file, the field
//! and the value. One test per refusal, and the implemented readings checked against HF.

use falcon_batch::config::{ModelConfig, RopeScaling};
use falcon_batch::model::{self, Part};
use serde_json::{json, Value};

const FILE: &str = "ckpt/config.json";

fn llama(extra: Value) -> Value {
    let mut j = json!({"model_type": "llama", "hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": 2,
        "num_hidden_layers": 1, "intermediate_size": 96, "vocab_size": 32, "max_position_embeddings": 128});
    merge(&mut j, extra);
    j
}

fn falcon(extra: Value) -> Value {
    let mut j = json!({"model_type": "falcon", "hidden_size": 64, "num_attention_heads": 4, "num_hidden_layers": 1,
        "vocab_size": 32, "new_decoder_architecture": false, "multi_query": true});
    merge(&mut j, extra);
    j
}

fn merge(j: &mut Value, extra: Value) {
    for (k, v) in extra.as_object().expect("an object of extra fields") {
        j[k] = v.clone();
    }
}

fn parse(j: &Value) -> ModelConfig {
    model::config_from_hf(j, FILE).unwrap_or_else(|e| panic!("{e}"))
}

/// The error names the file, the field and the offending value.
fn refused(j: Value, field: &str, value: &str) {
    let e = model::config_from_hf(&j, FILE).expect_err("must be refused").to_string();
    assert!(e.contains(FILE) && e.contains(&format!("`{field}`")) && e.contains(value), "{e}");
}

/// A config whose fields parse but break a rule between them: the error names the file once
/// and says the rule with the fields' names.
fn broken_rule(j: Value, rule: &str) {
    let e = model::config_from_hf(&j, FILE).expect_err("must be refused").to_string();
    assert!(e.starts_with(&format!("{FILE}: ")) && e.matches(FILE).count() == 1 && e.contains(rule), "{e}");
}

// ---- refusals ------------------------------------------------------------------------------

#[test]
fn rope_scaling_types_other_than_linear_dynamic_llama3_are_refused() {
    let yarn = json!({"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768});
    refused(llama(json!({"rope_theta": 1e6, "rope_scaling": yarn})), "rope_scaling.rope_type", "yarn");
    refused(llama(json!({"rope_parameters": {"rope_type": "longrope", "rope_theta": 1e4, "factor": 2.0}})), "rope_parameters.rope_type", "longrope");
    // Phi-3's old name and Llama-2-era key
    refused(llama(json!({"rope_scaling": {"type": "su", "factor": 2.0}})), "rope_scaling.type", "su");
    refused(llama(json!({"rope_scaling": {"type": "ntk-by-parts", "factor": 2.0}})), "rope_scaling.type", "ntk-by-parts");
    refused(falcon(json!({"rope_scaling": {"rope_type": "yarn", "factor": 2.0}})), "rope_scaling.rope_type", "yarn");
    refused(llama(json!({"rope_scaling": {"rope_type": 3}})), "rope_scaling.rope_type", "3");
    refused(llama(json!({"rope_scaling": "linear"})), "rope_scaling", "linear");
}

#[test]
fn rope_scaling_without_its_parameters_is_refused() {
    refused(llama(json!({"rope_scaling": {"type": "linear"}})), "rope_scaling.factor", "linear");
    refused(llama(json!({"rope_scaling": {"type": "dynamic"}})), "rope_scaling.factor", "dynamic");
    let no_low = json!({"rope_type": "llama3", "factor": 8.0, "high_freq_factor": 4.0});
    refused(llama(json!({"rope_scaling": no_low})), "rope_scaling.low_freq_factor", "llama3");
    let crossed = json!({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 4.0, "high_freq_factor": 1.0});
    broken_rule(llama(json!({"rope_scaling": crossed})), "high_freq_factor > low_freq_factor, got 1 and 4");
    broken_rule(llama(json!({"rope_scaling": {"type": "linear", "factor": 0.0}})), "factor");
    refused(llama(json!({"rope_scaling": {"type": "linear", "factor": "4"}})), "rope_scaling.factor", "\"4\"");
}

#[test]
fn partial_rotary_factor_is_refused() {
    refused(llama(json!({"partial_rotary_factor": 0.5})), "partial_rotary_factor", "0.5");
    refused(llama(json!({"rope_parameters": {"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 0.25}})), "rope_parameters.partial_rotary_factor", "0.25");
    // 1.0 rotates the whole head: what the families do
    parse(&llama(json!({"partial_rotary_factor": 1.0})));
}

#[test]
fn activations_other_than_the_families_own_are_refused() {
    refused(llama(json!({"hidden_act": "gelu"})), "hidden_act", "gelu");
    refused(llama(json!({"model_type": "mistral", "hidden_act": "relu"})), "hidden_act", "relu");
    refused(falcon(json!({"activation": "relu"})), "activation", "relu");
    // HF's ACT2FN maps both names to SiLU
    parse(&llama(json!({"hidden_act": "swish"})));
}

#[test]
fn falcon_layouts_hf_cannot_run_or_we_do_not_implement_are_refused() {
    refused(falcon(json!({"alibi": true})), "alibi", "alibi=true");
    refused(falcon(json!({"new_decoder_architecture": true, "num_kv_heads": 2, "parallel_attn": false})), "parallel_attn", "parallel_attn=true");
    refused(falcon(json!({"new_decoder_architecture": true, "num_kv_heads": 2, "num_ln_in_parallel_attn": 3})), "num_ln_in_parallel_attn", "1 or 2");
}

#[test]
fn unknown_model_types_are_refused() {
    refused(json!({"model_type": "gemma2", "hidden_size": 8}), "model_type", "gemma2");
}

// ---- implemented readings ----------------------------------------------------------------------

/// The config of issue 8, as meta-llama/Llama-3.1-8B carries it.
#[test]
fn hub_llama31_config_reads_rope_theta_and_its_scaling() {
    let scaling = json!({"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192, "rope_type": "llama3"});
    let c = parse(&llama(json!({"rope_theta": 500000.0, "rope_scaling": scaling, "max_position_embeddings": 131072})));
    assert_eq!(c.rope_theta, 500000.0);
    assert_eq!(
        c.rope_scaling,
        RopeScaling::Llama3 { factor: 8.0, low_freq_factor: 1.0, high_freq_factor: 4.0, original_max_position: 8192 }
    );
}

#[test]
fn llama3_original_context_follows_hf_precedence() {
    let scaling = json!({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0});
    let original = |c: ModelConfig| match c.rope_scaling {
        RopeScaling::Llama3 { original_max_position, .. } => original_max_position,
        other => panic!("{other:?}"),
    };
    // absent: max_position_embeddings
    assert_eq!(original(parse(&llama(json!({"rope_scaling": scaling.clone()})))), 128);
    // a top-level original_max_position_embeddings wins over the dict's
    let mut inside = scaling.clone();
    inside["original_max_position_embeddings"] = json!(64);
    assert_eq!(original(parse(&llama(json!({"rope_scaling": inside.clone()})))), 64);
    assert_eq!(original(parse(&llama(json!({"rope_scaling": inside, "original_max_position_embeddings": 32})))), 32);
}

#[test]
fn both_config_forms_and_both_type_keys_are_read() {
    let c = parse(&llama(json!({"rope_theta": 10000.0, "rope_scaling": {"type": "linear", "factor": 2.0}})));
    assert_eq!((c.rope_theta, c.rope_scaling), (10000.0, RopeScaling::Linear { factor: 2.0 }));
    let c = parse(&llama(json!({"rope_parameters": {"rope_type": "linear", "rope_theta": 20000.0, "factor": 4}})));
    assert_eq!((c.rope_theta, c.rope_scaling), (20000.0, RopeScaling::Linear { factor: 4.0 }));
    // rope_scaling: null (Llama-2 checkpoints) and a default rope_parameters are no scaling
    let c = parse(&llama(json!({"rope_theta": 10000.0, "rope_scaling": null})));
    assert_eq!((c.rope_theta, c.rope_scaling), (10000.0, RopeScaling::None));
    let c = parse(&llama(json!({"rope_parameters": {"rope_type": "default", "rope_theta": 1e5}})));
    assert_eq!((c.rope_theta, c.rope_scaling), (1e5, RopeScaling::None));
    // Falcon reads the same fields (HF FalconRotaryEmbedding uses the same rope init)
    let c = parse(&falcon(json!({"rope_scaling": {"type": "linear", "factor": 2.0}})));
    assert_eq!(c.rope_scaling, RopeScaling::Linear { factor: 2.0 });
}

/// HF's own inv_freq buffers (tests/fixtures/make_rope_tables.py) for real-size configs.
#[test]
fn inv_freq_tables_match_hf() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/rope_tables.json");
    let tables: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    for case in tables["cases"].as_array().unwrap() {
        let name = case["name"].as_str().unwrap();
        let cfg = parse(&case["config"]);
        let want: Vec<f32> = case["inv_freq"].as_array().unwrap().iter().map(|v| v.as_f64().unwrap() as f32).collect();
        let got = cfg.rope_inv_freq();
        assert_eq!(got.len(), want.len(), "{name}");
        for (i, (g, w)) in got.iter().zip(&want).enumerate() {
            // powf may differ from torch's pow by an ulp; nothing else may differ
            assert!((g - w).abs() <= 2.5e-7 * w.abs(), "{name}: inv_freq[{i}] = {g}, HF {w}");
        }
    }
}

#[test]
fn dynamic_ntk_is_the_unscaled_table_within_the_context() {
    let c = parse(&llama(json!({"rope_scaling": {"type": "dynamic", "factor": 2.0}})));
    assert_eq!(c.rope_scaling, RopeScaling::Dynamic { factor: 2.0 });
    assert_eq!(c.context_limit(), 128);
    let plain = parse(&llama(json!({})));
    assert_eq!(c.rope_inv_freq(), plain.rope_inv_freq());
}

#[test]
fn llama_attention_bias_puts_a_bias_on_o_proj_too() {
    let c = parse(&llama(json!({"attention_bias": true})));
    let names: Vec<String> = model::expected_tensors(&c, Part::Layer(0)).into_iter().map(|(n, _)| n).collect();
    assert!(names.contains(&"attn.qkv.bias".to_string()) && names.contains(&"attn.out.bias".to_string()), "{names:?}");
}

#[test]
fn mistral_reads_what_hf_mistral_reads() {
    // MistralConfig's default window when the key is absent; null turns it off
    assert_eq!(parse(&llama(json!({"model_type": "mistral"}))).sliding_window, Some(4096));
    assert_eq!(parse(&llama(json!({"model_type": "mistral", "sliding_window": null}))).sliding_window, None);
    // HF Mistral builds no biases whatever these say
    let c = parse(&llama(json!({"model_type": "mistral", "attention_bias": true, "mlp_bias": true})));
    assert!(!c.attention_bias && !c.mlp_bias);
    // HF Llama has no sliding window
    assert_eq!(parse(&llama(json!({"sliding_window": 64}))).sliding_window, None);
    // MistralConfig's default context when max_position_embeddings is absent
    let mut bare = llama(json!({"model_type": "mistral"}));
    bare.as_object_mut().unwrap().remove("max_position_embeddings");
    assert_eq!(parse(&bare).max_position, 4096 * 32);
}

#[test]
fn manifests_without_rope_scaling_still_load_and_default_rope_writes_none() {
    let c = parse(&llama(json!({})));
    let written = serde_json::to_value(&c).unwrap();
    assert!(written.get("rope_scaling").is_none(), "default rope keeps the old manifest form (and model id)");
    let back: ModelConfig = serde_json::from_value(written).unwrap();
    assert_eq!(back, c);
    let scaled = parse(&llama(json!({"rope_scaling": {"type": "linear", "factor": 2.0}})));
    let back: ModelConfig = serde_json::from_value(serde_json::to_value(&scaled).unwrap()).unwrap();
    assert_eq!(back.rope_scaling, RopeScaling::Linear { factor: 2.0 });
}
