//! Corpus lines as the score job reads them (UTF-8, JSON, fields, the template, the real
//! llama_tied fixture tokenizer, the context limit): every line gives a document or a
//! per-line error naming the file and line, never a panic.
#![no_main]

use falcon_batch::corpus::{CorpusOptions, CorpusReader, Template};
use falcon_batch::tokenizer::Tokenizer;
use libfuzzer_sys::fuzz_target;
use std::sync::OnceLock;

fn tokenizer() -> &'static Tokenizer {
    static TOK: OnceLock<Tokenizer> = OnceLock::new();
    TOK.get_or_init(|| {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/fixtures/llama_tied/tokenizer.json");
        Tokenizer::from_file(std::path::Path::new(path)).expect("the fixture tokenizer loads")
    })
}

fuzz_target!(|data: &[u8]| {
    let template = Template::parse("Document: {text}\nQuestion: {question}\nAnswer:", "fuzz template").expect("the template parses");
    // A small context, so the too-long check is reached by short inputs too.
    let options = CorpusOptions::new(template, 48);
    let reader = CorpusReader::from_reader("fuzz.jsonl", data, tokenizer(), options);
    for doc in reader {
        let doc = doc.expect("an in-memory reader cannot fail to read");
        if let Err(msg) = &doc.result {
            assert!(msg.starts_with(&format!("fuzz.jsonl:{}: ", doc.line)), "error without file and line: {msg}");
        }
    }
});
