//! An HF tokenizer.json rebuilt from a GGUF's `tokenizer.ggml.*` metadata.
//!
//! A GGUF carries the vocabulary, merges, token types and special ids but not the
//! normalizer / pre-tokenizer / decoder; those follow from `tokenizer.ggml.model` and
//! `tokenizer.ggml.pre`, which name the recipe llama.cpp uses for the model. Only byte-level
//! BPE ("gpt2") is built; sentencepiece vocabularies get a clear error.

use super::TokenizerError;
use serde_json::{json, Value};
use std::collections::HashSet;

/// llama.cpp token types (llama_token_type).
const TOKEN_TYPE_CONTROL: i32 = 3;
const TOKEN_TYPE_USER_DEFINED: i32 = 4;

/// Llama-3's split (llama.cpp "llama-bpe"), as in Meta's tokenizer.json.
const LLAMA3_SPLIT: &str =
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// Qwen2's split (llama.cpp "qwen2"), as in the Qwen2 / Qwen2.5 tokenizer.json: Llama-3's
/// with one digit per piece.
const QWEN2_SPLIT: &str =
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// Falcon's digit grouping (tiiuae/falcon-* tokenizer.json; llama.cpp "falcon").
const FALCON_DIGIT_TRIPLES: &str = "[0-9][0-9][0-9]";

/// The vocabulary part of a GGUF's metadata, as the format module reads it.
#[derive(Clone, Debug, Default)]
pub struct GgufVocab {
    /// tokenizer.ggml.model
    pub model: String,
    /// tokenizer.ggml.pre; absent in old files, which meant GPT-2's split
    pub pre: Option<String>,
    pub tokens: Vec<String>,
    /// One per token when present (llama_token_type values).
    pub token_types: Vec<i32>,
    /// "a b" pairs, best first.
    pub merges: Vec<String>,
    pub bos: Option<u32>,
    pub eos: Option<u32>,
    pub unk: Option<u32>,
    pub pad: Option<u32>,
    pub add_bos: bool,
    pub add_eos: bool,
}

/// The pre-tokenizer llama.cpp applies for a `tokenizer.ggml.pre` value, in HF's terms.
fn pre_tokenizer(pre: Option<&str>, origin: &str) -> Result<Value, TokenizerError> {
    let byte_level_regex = json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true});
    let split_then_bytes = |regex: &str| {
        json!({"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": regex}, "behavior": "Isolated", "invert": false},
            {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": false},
        ]})
    };
    Ok(match pre.unwrap_or("default") {
        "default" | "gpt2" | "gpt-2" => byte_level_regex,
        // StarCoder-style vocabularies (SmolLM's among them) put every digit on its own
        // before GPT-2's split: llama.cpp's regex list starts with \p{N}, HF's original
        // tokenizer.json with Digits(individual_digits).
        "smollm" | "starcoder" | "refact" | "codeshell" => json!({"type": "Sequence", "pretokenizers": [
            {"type": "Digits", "individual_digits": true},
            byte_level_regex,
        ]}),
        "llama-bpe" | "llama3" | "llama-v3" | "smaug-bpe" | "dbrx" | "falcon3" => split_then_bytes(LLAMA3_SPLIT),
        "qwen2" => split_then_bytes(QWEN2_SPLIT),
        // Falcon's HF pipeline: punctuation runs apart, GPT-2's split, digit runs apart from
        // what precedes them, then every three digits isolated. llama.cpp's regex list for
        // "falcon" approximates the same.
        "falcon" => json!({"type": "Sequence", "pretokenizers": [
            {"type": "Punctuation", "behavior": "Contiguous"},
            byte_level_regex,
            {"type": "Digits", "individual_digits": false},
            {"type": "Split", "pattern": {"Regex": FALCON_DIGIT_TRIPLES}, "behavior": "Isolated", "invert": false},
        ]}),
        other => {
            return Err(TokenizerError::Load {
                path: origin.into(),
                msg: format!("tokenizer.ggml.pre `{other}` is not supported (supported: gpt2, smollm, starcoder, llama-bpe, qwen2, falcon)"),
            })
        }
    })
}

/// The normalizer HF's tokenizer.json carries for a `tokenizer.ggml.pre` value: Qwen2's
/// composes to NFC before splitting (llama.cpp does not, so HF's ids are the reference).
fn normalizer(pre: Option<&str>) -> Value {
    match pre {
        Some("qwen2") => json!({"type": "NFC"}),
        _ => Value::Null,
    }
}

/// GPT-2's byte-to-character table: printable bytes stand for themselves, the rest are
/// shifted to U+0100 and up so every byte has a visible, non-space character.
fn byte_alphabet() -> [char; 256] {
    let mut table = ['\0'; 256];
    let mut shifted = 0u32;
    for b in 0..256u32 {
        let printable = (0x21..=0x7e).contains(&b) || (0xa1..=0xac).contains(&b) || (0xae..=0xff).contains(&b);
        let code = if printable {
            b
        } else {
            shifted += 1;
            255 + shifted
        };
        table[b as usize] = char::from_u32(code).unwrap_or('\0');
    }
    table
}

/// tokenizer.json bytes for `vocab`; `origin` names the file in errors.
pub fn tokenizer_json(vocab: &GgufVocab, origin: &str) -> Result<Vec<u8>, TokenizerError> {
    let err = |msg: String| TokenizerError::Load { path: origin.into(), msg };
    if vocab.model != "gpt2" {
        return Err(err(format!("tokenizer.ggml.model `{}` is not supported (only byte-level BPE \"gpt2\")", vocab.model)));
    }
    if vocab.tokens.is_empty() {
        return Err(err("tokenizer.ggml.tokens is empty".into()));
    }
    if !vocab.token_types.is_empty() && vocab.token_types.len() != vocab.tokens.len() {
        return Err(err(format!(
            "tokenizer.ggml.token_type has {} entries for {} tokens",
            vocab.token_types.len(),
            vocab.tokens.len()
        )));
    }
    let n = vocab.tokens.len();
    for (field, id) in [("bos", vocab.bos), ("eos", vocab.eos), ("unknown", vocab.unk), ("padding", vocab.pad)] {
        if let Some(id) = id.filter(|&id| id as usize >= n) {
            return Err(err(format!("tokenizer.ggml.{field}_token_id {id} is outside the {n}-token vocabulary")));
        }
    }

    let alphabet = byte_alphabet();
    let in_alphabet: HashSet<char> = alphabet.iter().copied().collect();
    // A byte-level vocabulary spells every token in the byte alphabet; a token that is not
    // (a raw-text special token) is respelled so BPE can still reach it from bytes.
    let spell = |t: &str| -> String {
        if t.chars().all(|c| in_alphabet.contains(&c)) {
            t.to_string()
        } else {
            t.bytes().map(|b| alphabet[b as usize]).collect()
        }
    };
    let mut vocab_map = serde_json::Map::with_capacity(n);
    for (id, t) in vocab.tokens.iter().enumerate() {
        // A later duplicate must not steal an earlier id: HF keeps the first.
        vocab_map.entry(spell(t)).or_insert(json!(id));
    }

    let mut added = Vec::new();
    for (id, (t, &ty)) in vocab.tokens.iter().zip(&vocab.token_types).enumerate() {
        let special = match ty {
            TOKEN_TYPE_CONTROL => true,
            TOKEN_TYPE_USER_DEFINED => false,
            _ => continue,
        };
        // A control token outside the alphabet is a llama.cpp mislabel that no text can produce.
        if special && !t.chars().all(|c| in_alphabet.contains(&c)) {
            continue;
        }
        added.push(json!({"id": id, "content": t, "single_word": false, "lstrip": false, "rstrip": false,
                          "normalized": false, "special": special}));
    }

    let merges: Vec<Value> = vocab
        .merges
        .iter()
        .map(|m| match m.split_once(' ') {
            Some((a, b)) if !a.is_empty() && !b.is_empty() && !b.contains(' ') => Ok(json!([a, b])),
            _ => Err(err(format!("merge `{m}` is not two tokens separated by one space"))),
        })
        .collect::<Result<_, _>>()?;

    let name = |id: Option<u32>| id.map(|i| vocab.tokens[i as usize].clone());
    let mut specials = serde_json::Map::new();
    let mut wrap = vec![];
    for (id, on) in [(vocab.bos, vocab.add_bos), (vocab.eos, vocab.add_eos)] {
        let tok = name(id).filter(|_| on);
        if let (Some(tok), Some(id)) = (&tok, id) {
            specials.insert(tok.clone(), json!({"id": tok, "ids": [id], "tokens": [tok]}));
        }
        wrap.push(tok.map(|t| json!({"SpecialToken": {"id": t, "type_id": 0}})));
    }
    let template = |seq: &str, type_id: u32| -> Vec<Value> {
        let body = Some(json!({"Sequence": {"id": seq, "type_id": type_id}}));
        [wrap[0].clone(), body, wrap[1].clone()].into_iter().flatten().collect()
    };
    let single = template("A", 0);
    let pair: Vec<Value> = single.iter().cloned().chain(template("B", 1)).collect();

    let doc = json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": normalizer(vocab.pre.as_deref()),
        "pre_tokenizer": pre_tokenizer(vocab.pre.as_deref(), origin)?,
        "post_processor": {"type": "TemplateProcessing", "single": single, "pair": pair, "special_tokens": specials},
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
        "model": {
            // Byte-level BPE reaches every byte, so it never needs an unknown token.
            "type": "BPE", "dropout": null, "unk_token": null,
            "continuing_subword_prefix": "", "end_of_word_suffix": "", "fuse_unk": false,
            "byte_fallback": false, "ignore_merges": false, "vocab": vocab_map, "merges": merges,
        },
    });
    serde_json::to_vec(&doc).map_err(|e| err(format!("cannot serialise tokenizer.json: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_alphabet_matches_gpt2() {
        let a = byte_alphabet();
        assert_eq!(a[b' ' as usize], 'Ġ');
        assert_eq!(a[b'\n' as usize], 'Ċ');
        assert_eq!(a[b'A' as usize], 'A');
        assert_eq!(a.iter().collect::<HashSet<_>>().len(), 256);
    }

    #[test]
    fn regex_constants_compile() {
        for r in [LLAMA3_SPLIT, QWEN2_SPLIT, FALCON_DIGIT_TRIPLES] {
            let j = json!({"type": "Split", "pattern": {"Regex": r}, "behavior": "Isolated", "invert": false});
            let p: Result<tokenizers::PreTokenizerWrapper, _> = serde_json::from_value(j);
            assert!(p.is_ok(), "{r}");
        }
    }

    fn splits(pre: &str, text: &str) -> Vec<String> {
        use tokenizers::tokenizer::{OffsetReferential, OffsetType, PreTokenizedString, PreTokenizer};
        let p: tokenizers::PreTokenizerWrapper = serde_json::from_value(pre_tokenizer(Some(pre), "t").unwrap()).unwrap();
        let mut s = PreTokenizedString::from(text);
        p.pre_tokenize(&mut s).unwrap();
        s.get_splits(OffsetReferential::Original, OffsetType::Byte).into_iter().map(|(t, _, _)| t.to_string()).collect()
    }

    #[test]
    fn pre_tokenizers_split_numbers_their_own_way() {
        let text = "Hello 12345 world";
        assert_eq!(splits("gpt2", text), ["Hello", "Ġ12345", "Ġworld"]);
        assert_eq!(splits("smollm", text), ["Hello", "Ġ", "1", "2", "3", "4", "5", "Ġworld"]);
        assert_eq!(splits("llama-bpe", text), ["Hello", "Ġ", "123", "45", "Ġworld"]);
        assert_eq!(splits("qwen2", text), ["Hello", "Ġ", "1", "2", "3", "4", "5", "Ġworld"]);
        assert_eq!(splits("falcon", "Hello 12345, world!!"), ["Hello", "Ġ", "123", "45", ",", "Ġworld", "!!"]);
        let err = pre_tokenizer(Some("deepseek-llm"), "m.gguf").unwrap_err().to_string();
        assert!(err.contains("m.gguf") && err.contains("deepseek-llm"), "{err}");
    }

    #[test]
    fn sentencepiece_vocab_is_refused_by_name() {
        let v = GgufVocab { model: "llama".into(), tokens: vec!["a".into()], ..GgufVocab::default() };
        let err = tokenizer_json(&v, "sp.gguf").unwrap_err().to_string();
        assert!(err.contains("sp.gguf") && err.contains("tokenizer.ggml.model `llama`"), "{err}");
    }
}
