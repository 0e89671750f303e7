//! The corpus reader on real files with a tiny byte-level BPE tokenizer built here.

use std::collections::HashSet;
use std::io::Write;
use std::path::PathBuf;

use falcon_batch::corpus::{pack, read_all, CorpusOptions, CorpusReader, PreparedDoc, Template};
use falcon_batch::token_tree::MicroBatch;
use falcon_batch::tokenizer::Tokenizer;
use serde_json::json;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;

const BOS: u32 = 0;
const EOS: u32 = 1;

/// Byte-level BPE: every byte is a token, plus the merges "Ġ"+"P" (space before P) and
/// "x"+"y" (to merge across the prompt/choice boundary).
/// `post` is the post-processor's single-sequence template, e.g. ["<s>", "$A"].
fn tiny_tokenizer(post: &[&str]) -> Tokenizer {
    let mut alphabet: Vec<char> = ByteLevel::alphabet().into_iter().collect();
    alphabet.sort();
    let mut vocab = serde_json::Map::new();
    vocab.insert("<s>".into(), json!(BOS));
    vocab.insert("</s>".into(), json!(EOS));
    for (i, c) in alphabet.iter().enumerate() {
        vocab.insert(c.to_string(), json!(i + 2));
    }
    vocab.insert("ĠP".into(), json!(alphabet.len() + 2));
    vocab.insert("xy".into(), json!(alphabet.len() + 3));
    let single: Vec<serde_json::Value> = post
        .iter()
        .map(|p| match *p {
            "$A" => json!({"Sequence": {"id": "A", "type_id": 0}}),
            tok => json!({"SpecialToken": {"id": tok, "type_id": 0}}),
        })
        .collect();
    let special = |content: &str, id: u32| {
        json!({"id": id, "content": content, "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true})
    };
    let tok = json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": [special("<s>", BOS), special("</s>", EOS)],
        "normalizer": null,
        "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true},
        "post_processor": {
            "type": "TemplateProcessing",
            "single": single,
            "pair": single,
            "special_tokens": {
                "<s>": {"id": "<s>", "ids": [BOS], "tokens": ["<s>"]},
                "</s>": {"id": "</s>", "ids": [EOS], "tokens": ["</s>"]}
            }
        },
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
        "model": {
            "type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
            "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
            "vocab": vocab, "merges": ["Ġ P", "x y"]
        }
    });
    Tokenizer::from_bytes(tok.to_string().as_bytes(), "tiny").unwrap()
}

fn write_corpus(dir: &tempfile::TempDir, name: &str, bytes: &[u8]) -> PathBuf {
    let path = dir.path().join(name);
    std::fs::File::create(&path).unwrap().write_all(bytes).unwrap();
    path
}

fn options(max_context: usize) -> CorpusOptions {
    CorpusOptions::new(Template::default(), max_context)
}

#[test]
fn lm_eval_split_with_bos() {
    let tok = tiny_tokenizer(&["<s>", "$A"]);
    let dir = tempfile::tempdir().unwrap();
    let path = write_corpus(&dir, "c.jsonl", br#"{"id": "a", "prompt": "Q: capital? A: ", "choices": ["Paris", "Rome"], "answer": "Paris"}"#);
    let docs = read_all(&path, &tok, options(2048)).unwrap();
    assert_eq!(docs.len(), 1);
    let ready = docs[0].result.as_ref().unwrap();
    // prompt "Q: capital? A:" (trailing space moved): BOS + 14 bytes
    assert_eq!(ready.n_prompt_tokens, 15);
    assert_eq!(ready.doc.prompt[0], BOS);
    assert_eq!(ready.doc.prompt, tok.encode("Q: capital? A:", true).unwrap());
    // " Paris" -> "ĠP" a r i s: the moved space merges with the choice's first letter
    let gp = tok.token_to_id("ĠP").unwrap();
    assert_eq!(ready.doc.choices[0].len(), 5);
    assert_eq!(ready.doc.choices[0][0], gp);
    assert_eq!(ready.doc.choices[1].len(), 5); // " Rome": Ġ R o m e
    assert_eq!(ready.choice_chars, vec![6, 5]);
    assert_eq!(ready.choices, vec!["Paris".to_string(), "Rome".to_string()]);
    assert_eq!(ready.answer_index(), Some(0));
    assert_eq!(docs[0].id, "a");
}

#[test]
fn appended_eos_is_dropped() {
    let with_eos = tiny_tokenizer(&["<s>", "$A", "</s>"]);
    let bos_only = tiny_tokenizer(&["<s>", "$A"]);
    let dir = tempfile::tempdir().unwrap();
    let path = write_corpus(&dir, "c.jsonl", br#"{"id": "a", "prompt": "Total: ", "choices": ["Paid", "$12"]}"#);
    let a = read_all(&path, &with_eos, options(2048)).unwrap();
    let b = read_all(&path, &bos_only, options(2048)).unwrap();
    let (a, b) = (a[0].result.as_ref().unwrap(), b[0].result.as_ref().unwrap());
    assert_eq!(a.doc, b.doc);
    assert!(!a.doc.prompt.contains(&EOS));
    assert!(a.doc.choices.iter().all(|c| !c.contains(&EOS)));
}

#[test]
fn template_renders_text_and_question() {
    let tok = tiny_tokenizer(&["<s>", "$A"]);
    let dir = tempfile::tempdir().unwrap();
    let line = json!({"id": "inv-1", "text": "Invoice 7 due 3 May", "question": "When is it due?", "choices": ["3 May", "7 May"]});
    let path = write_corpus(&dir, "c.jsonl", line.to_string().as_bytes());
    let docs = read_all(&path, &tok, options(2048)).unwrap();
    let ready = docs[0].result.as_ref().unwrap();
    let prompt = "Document: Invoice 7 due 3 May\nQuestion: When is it due?\nAnswer:";
    assert_eq!(ready.doc.prompt, tok.encode(prompt, true).unwrap());
    // the default delimiter joins "Answer:" and "3 May" as " 3 May"
    assert_eq!(ready.choice_chars, vec![6, 6]);
    let whole = tok.encode(&format!("{prompt} 3 May"), true).unwrap();
    assert_eq!(ready.doc.choices[0], whole[ready.n_prompt_tokens..]);

    let mut opts = options(2048);
    opts.delimiter = String::new();
    let docs = read_all(&path, &tok, opts).unwrap();
    assert_eq!(docs[0].result.as_ref().unwrap().choice_chars, vec![5, 5]);
}

/// Every kind of bad line, each a failed document with file, line and field named.
#[test]
fn bad_lines_fail_alone() {
    let tok = tiny_tokenizer(&["<s>", "$A"]);
    let dir = tempfile::tempdir().unwrap();
    let long = "x".repeat(100);
    let mut corpus: Vec<u8> = Vec::new();
    let lines: Vec<Vec<u8>> = vec![
        br#"{"id": "good1", "prompt": "Amount: ", "choices": ["$5", "$7"]}"#.to_vec(), // 1
        b"{not json".to_vec(),                                                            // 2
        b"{\"id\": \"u\xff\", \"prompt\": \"p\", \"choices\": [\"a\"]}".to_vec(),         // 3
        b"".to_vec(),                                                                     // 4 blank
        br#"[1, 2]"#.to_vec(),                                                            // 5
        br#"{"prompt": "p", "choices": ["a"]}"#.to_vec(),                                 // 6
        br#"{"id": "", "prompt": "p", "choices": ["a"]}"#.to_vec(),                       // 7
        br#"{"id": 12, "prompt": "p", "choices": ["a"]}"#.to_vec(),                       // 8
        br#"{"id": "good1", "prompt": "p", "choices": ["a"]}"#.to_vec(),                  // 9 dup
        br#"{"id": "np", "choices": ["a"]}"#.to_vec(),                                    // 10
        br#"{"id": "ep", "prompt": "  ", "choices": ["a"]}"#.to_vec(),                    // 11
        br#"{"id": "nc", "prompt": "p"}"#.to_vec(),                                       // 12
        br#"{"id": "ec", "prompt": "p", "choices": []}"#.to_vec(),                        // 13
        br#"{"id": "ns", "prompt": "p", "choices": ["a", "b", 42]}"#.to_vec(),            // 14
        br#"{"id": "zt", "prompt": "p", "choices": ["a", ""]}"#.to_vec(),                 // 15
        format!(r#"{{"id": "long", "prompt": "{long}", "choices": ["a"]}}"#).into_bytes(), // 16
        br#"{"id": "tq", "text": "Some text", "choices": ["a"]}"#.to_vec(),               // 17
        br#"{"id": "both", "prompt": "p", "text": "t", "question": "q", "choices": ["a"]}"#.to_vec(), // 18
        b"   \t".to_vec(),                                                                // 19 blank
        br#"{"id": "good2", "text": "Paid by Ann", "question": "Who paid?", "choices": ["Ann", "Bob"], "answer": "Ann", "extra": 1}"#.to_vec(), // 20
    ];
    for l in &lines {
        corpus.extend_from_slice(l);
        corpus.extend_from_slice(b"\r\n");
    }
    let path = write_corpus(&dir, "corpus.jsonl", &corpus);
    let name = path.display().to_string();
    let mut reader = CorpusReader::open(&path, &tok, options(64)).unwrap();
    let docs: Vec<PreparedDoc> = reader.by_ref().collect::<Result<_, _>>().unwrap();
    let stats = reader.stats();
    assert_eq!((stats.ok, stats.failed, stats.blank, stats.skipped), (2, 16, 2, 0));

    let expect: Vec<(usize, &str, &str)> = vec![
        (2, "line:2", "invalid JSON"),
        (3, "line:3", "invalid UTF-8 at byte 9"),
        (5, "line:5", "expected a JSON object, found an array"),
        (6, "line:6", "field \"id\": missing"),
        (7, "line:7", "field \"id\": expected a non-empty string, found \"\""),
        (8, "line:8", "field \"id\": expected a non-empty string, found 12"),
        (9, "line:9", "duplicate id \"good1\", first on line 1"),
        (10, "np", "field \"prompt\": missing"),
        (11, "ep", "field \"prompt\": expected a non-empty string"),
        (12, "nc", "field \"choices\": missing"),
        (13, "ec", "field \"choices\": expected a non-empty array of strings, found []"),
        (14, "ns", "field \"choices\"[2]: expected a string, found 42"),
        (15, "zt", "field \"choices\"[1]: expected a non-blank string, found \"\""),
        (16, "long", "needs 103 positions"),
        (17, "tq", "field \"question\": missing"),
        (18, "both", "expected one form, found both"),
    ];
    let failed: Vec<&PreparedDoc> = docs.iter().filter(|d| d.result.is_err()).collect();
    assert_eq!(failed.len(), expect.len());
    for (doc, (line, id, needle)) in failed.iter().zip(&expect) {
        let msg = doc.result.as_ref().unwrap_err();
        assert_eq!((doc.line, doc.id.as_str()), (*line, *id), "{msg}");
        assert!(msg.starts_with(&format!("{name}:{line}: ")), "{msg}");
        assert!(msg.contains(needle), "line {line}: {msg}");
    }
    // indices count non-blank lines in input order
    let indices: Vec<usize> = docs.iter().map(|d| d.index).collect();
    assert_eq!(indices, (0..18).collect::<Vec<_>>());
    let good: Vec<&str> = docs.iter().filter(|d| d.result.is_ok()).map(|d| d.id.as_str()).collect();
    assert_eq!(good, vec!["good1", "good2"]);
    assert_eq!(docs[17].result.as_ref().unwrap().doc.index, 17);
}

/// Without a delimiter, "x" + "y" merges into one token that belongs to the prompt's
/// span: the choice has no tokens of its own.
#[test]
fn choice_merged_into_prompt_fails() {
    let tok = tiny_tokenizer(&["<s>", "$A"]);
    let dir = tempfile::tempdir().unwrap();
    let path = write_corpus(&dir, "c.jsonl", br#"{"id": "m", "prompt": "ax", "choices": ["z", "y"]}"#);
    let mut opts = options(2048);
    opts.delimiter = String::new();
    let docs = read_all(&path, &tok, opts).unwrap();
    let msg = docs[0].result.as_ref().unwrap_err();
    assert!(msg.contains("c.jsonl:1: field \"choices\"[1]: expected text that makes at least one token"), "{msg}");
}

#[test]
fn skip_ids_are_not_yielded_but_still_count() {
    let tok = tiny_tokenizer(&["<s>", "$A"]);
    let dir = tempfile::tempdir().unwrap();
    let path = write_corpus(
        &dir,
        "c.jsonl",
        b"{\"id\": \"a\", \"prompt\": \"p\", \"choices\": [\"x\"]}\nbroken\n{\"id\": \"b\", \"prompt\": \"p\", \"choices\": [\"x\"]}\n{\"id\": \"a\", \"prompt\": \"p\", \"choices\": [\"x\"]}\n",
    );
    let mut opts = options(2048);
    opts.skip_ids = HashSet::from(["a".to_string(), "line:2".to_string()]);
    let mut reader = CorpusReader::open(&path, &tok, opts).unwrap();
    let docs: Vec<PreparedDoc> = reader.by_ref().collect::<Result<_, _>>().unwrap();
    // "b" keeps index 2 as in a fresh run; the duplicate of "a" is still caught
    let got: Vec<(usize, &str, bool)> = docs.iter().map(|d| (d.index, d.id.as_str(), d.result.is_ok())).collect();
    assert_eq!(got, vec![(2, "b", true), (3, "line:4", false)]);
    assert_eq!(reader.stats().skipped, 2);
}

#[test]
fn missing_file_is_fatal_before_work() {
    let tok = tiny_tokenizer(&["<s>", "$A"]);
    let dir = tempfile::tempdir().unwrap();
    let err = CorpusReader::open(&dir.path().join("nope.jsonl"), &tok, options(2048)).err().unwrap().to_string();
    assert!(err.contains("nope.jsonl") && err.contains("cannot read"), "{err}");
    let err = CorpusReader::open(dir.path(), &tok, options(2048)).err().unwrap().to_string();
    assert!(err.contains("directory"), "{err}");
}

#[test]
fn template_file_errors_are_clear() {
    let dir = tempfile::tempdir().unwrap();
    let path = write_corpus(&dir, "t.txt", b"Read {text}\nQ: {query}\nA:\n");
    let err = Template::from_file(&path).unwrap_err().to_string();
    assert!(err.contains("t.txt") && err.contains("{query}"), "{err}");
    let path = write_corpus(&dir, "t2.txt", b"Read {text}\nA:\n");
    let t = Template::from_file(&path).unwrap();
    assert_eq!(t.render("doc", "unused"), "Read doc\nA:");
}

#[test]
fn sample_corpora_read_and_pack() {
    let tok = tiny_tokenizer(&["<s>", "$A"]);
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let docs = read_all(&root.join("inputs/sample.jsonl"), &tok, options(1 << 20)).unwrap();
    assert!(docs.len() >= 24);
    for d in &docs {
        let r = d.result.as_ref().unwrap_or_else(|e| panic!("{e}"));
        assert!((3..=5).contains(&r.choices.len()), "{}", d.id);
        assert!(r.answer_index().is_some(), "{}: answer not among choices", d.id);
    }
    let batches = pack(&docs, 4096);
    let n: usize = batches.iter().map(Vec::len).sum();
    assert_eq!(n, docs.len());
    for b in &batches {
        let mb = falcon_batch::corpus::build_batch(b.iter());
        assert!(mb.rows() <= 4096 || b.len() == 1);
        let direct = MicroBatch::build(&b.iter().map(|d| d.doc.clone()).collect::<Vec<_>>());
        assert_eq!(mb, direct);
    }
    // inputs/bad.jsonl: one line of each bad kind between three good ones
    let bad = read_all(&root.join("inputs/bad.jsonl"), &tok, options(8192)).unwrap();
    let ok: Vec<&str> = bad.iter().filter(|d| d.result.is_ok()).map(|d| d.id.as_str()).collect();
    assert_eq!(ok, ["good-receipt", "good-memo", "good-parcel"]);
    let failed: Vec<(&str, &str)> = bad.iter().filter_map(|d| d.result.as_ref().err().map(|e| (d.id.as_str(), e.as_str()))).collect();
    let expect = [
        ("line:2", "invalid JSON"),
        ("line:3", "invalid UTF-8"),
        ("line:4", "expected a JSON object"),
        ("line:5", "field \"id\": missing"),
        ("line:6", "field \"id\": expected a non-empty string"),
        ("line:7", "found 1234"),
        ("line:9", "duplicate id \"good-receipt\""),
        ("no-prompt", "field \"prompt\": missing"),
        ("empty-prompt", "field \"prompt\": expected a non-empty string"),
        ("missing-choices", "field \"choices\": missing"),
        ("empty-choices", "found []"),
        ("choice-not-string", "field \"choices\"[2]: expected a string, found 42"),
        ("blank-choice", "field \"choices\"[1]: expected a non-blank string"),
        ("too-long", "expected at most the model's context of 8192"),
        ("prompt-and-text", "found both"),
        ("text-without-question", "field \"question\": missing"),
    ];
    assert_eq!(failed.len(), expect.len(), "{failed:?}");
    for ((id, msg), (want_id, needle)) in failed.iter().zip(expect) {
        assert_eq!(*id, want_id, "{msg}");
        assert!(msg.contains("bad.jsonl:") && msg.contains(needle), "{msg}");
    }
}
