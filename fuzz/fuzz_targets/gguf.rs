//! A GGUF file as `convert --from x.gguf` reads it: the container, the config and the
//! vocabulary from its metadata, the tokenizer.json rebuilt from that vocabulary, and every
//! tensor's bytes dequantized.
#![no_main]

use falcon_batch::format::gguf::{dequant, header_config, header_vocab, parse};
use falcon_batch::tokenizer::gguf::tokenizer_json;
use falcon_batch::tokenizer::Tokenizer;
use libfuzzer_sys::fuzz_target;

const ORIGIN: &str = "fuzz.gguf";

fuzz_target!(|data: &[u8]| {
    let Ok(header) = parse::parse(data, ORIGIN) else { return };
    let _ = header_config(&header, data, ORIGIN);
    for t in &header.tensors {
        let bytes = data.get(t.start..t.end).expect("the parser checked every tensor range");
        let _ = dequant::dequantize(t.ggml_type, bytes);
    }
    let Ok(vocab) = header_vocab(&header, ORIGIN) else { return };
    if let Ok(json) = tokenizer_json(&vocab, ORIGIN) {
        let _ = Tokenizer::from_bytes(&json, ORIGIN);
    }
});
