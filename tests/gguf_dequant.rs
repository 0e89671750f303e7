//! Dequantization against the `gguf` python package (tests/fixtures/smollm2/dequant.json,
//! made by tests/fixtures/make_smollm2_reference.py).

use falcon_batch::format::gguf::dequant::{dequantize, GgmlType};

fn hex_bytes(s: &str) -> Vec<u8> {
    (0..s.len()).step_by(2).map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap()).collect()
}

#[test]
fn matches_python_gguf_dequantize() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/smollm2/dequant.json");
    let json: serde_json::Value = serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap();
    let cases = json["cases"].as_array().unwrap();
    assert!(cases.len() >= 9);
    let mut seen = std::collections::HashSet::new();
    for case in cases {
        let name = case["type"].as_str().unwrap();
        let ty = GgmlType::from_id(case["type_id"].as_u64().unwrap() as u32).unwrap();
        assert_eq!(ty.name(), name);
        seen.insert(name.to_string());
        let data = hex_bytes(case["data_hex"].as_str().unwrap());
        let got = dequantize(ty, &data).unwrap_or_else(|| panic!("{name} should be supported"));
        let want: Vec<f32> = case["values"].as_array().unwrap().iter().map(|v| v.as_f64().unwrap() as f32).collect();
        let numel: u64 = case["shape"].as_array().unwrap().iter().map(|d| d.as_u64().unwrap()).product();
        assert_eq!(got.len() as u64, numel, "{name}");
        for (i, (g, w)) in got.iter().zip(&want).enumerate() {
            // Same f32 arithmetic as ggml/numpy: equal bits, or within 1e-6 at worst.
            assert!(g.to_bits() == w.to_bits() || (g - w).abs() <= 1e-6, "{name}[{i}]: {g} vs {w}");
        }
    }
    for t in ["F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1"] {
        assert!(seen.contains(t), "no reference case for {t}");
    }
}

#[test]
fn unsupported_types_are_refused() {
    let q4k = GgmlType::from_id(12).unwrap();
    assert_eq!(q4k.name(), "Q4_K");
    assert!(!q4k.is_supported());
    assert!(dequantize(q4k, &[0u8; 144]).is_none());
    assert!(GgmlType::from_id(4).is_none(), "ids 4 and 5 were removed from ggml");
}
