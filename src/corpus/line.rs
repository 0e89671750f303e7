//! One corpus line: UTF-8, JSON, fields, tokenisation, context limit, in that order; the
//! first problem found is the document's error.

use std::collections::HashMap;

use serde_json::{Map, Value};

use super::input_hash::{document_hash, raw_line_hash};
use super::tokenize::{split_within, SplitError};
use super::{CorpusOptions, DocForm, PreparedDoc, ReadyDoc};
use crate::token_tree::TokenizedDoc;
use crate::tokenizer::Tokenizer;

/// First line of every id seen so far, for duplicate messages.
#[derive(Debug, Default)]
pub(super) struct SeenIds(HashMap<String, usize>);

pub(super) struct LineCtx<'a> {
    pub file: &'a str,
    pub line: usize,
    pub index: usize,
    pub tokenizer: &'a Tokenizer,
    pub options: &'a CorpusOptions,
}

/// The id a line gets when it has no usable one (bad JSON, a missing or duplicate id).
/// Real ids of this form are refused (see [`is_line_id`]), so it names this line alone.
pub fn line_id(line: usize) -> String {
    format!("line:{line}")
}

/// True for `line:` followed by digits only: the form of [`line_id`], which a corpus id
/// may not take, or a failed line's record and a document's record would share an id.
pub fn is_line_id(id: &str) -> bool {
    id.strip_prefix("line:").is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
}

/// What a line says before any tokenizing: the document's id, the hash of what determines
/// its scores, and its prompt and choices (or why it has none). Cheap enough for a pass over
/// the whole corpus before a resumed run reads any weight.
pub(super) struct Identified {
    pub id: String,
    pub input_hash: String,
    pub parsed: Result<Parsed, String>,
}

pub(super) struct Parsed {
    prompt: String,
    prompt_field: &'static str,
    choices: Vec<String>,
    answer: Option<String>,
}

/// What a JSON value is, for "expected X, found Y" messages.
fn describe(v: &Value) -> String {
    match v {
        Value::Null => "null".into(),
        Value::Bool(b) => b.to_string(),
        Value::Number(n) => n.to_string(),
        Value::String(s) => quote(s),
        Value::Array(a) if a.is_empty() => "[]".into(),
        Value::Array(_) => "an array".into(),
        Value::Object(_) => "an object".into(),
    }
}

/// A string as JSON would show it, cut short: messages must stay one readable line.
fn quote(s: &str) -> String {
    const MAX: usize = 40;
    if s.chars().count() <= MAX {
        format!("{s:?}")
    } else {
        let head: String = s.chars().take(MAX).collect();
        format!("{head:?}...")
    }
}

fn expected(field: &str, what: &str, found: &Value) -> String {
    format!("field {field}: expected {what}, found {}", describe(found))
}

/// A required non-blank string field.
fn text_field<'v>(obj: &'v Map<String, Value>, name: &str) -> Result<&'v str, String> {
    let field = format!("{name:?}");
    match obj.get(name) {
        None => Err(format!("field {field}: missing, expected a non-empty string")),
        Some(Value::String(s)) if s.trim().is_empty() => Err(expected(&field, "a non-empty string", &Value::String(s.clone()))),
        Some(Value::String(s)) => Ok(s),
        Some(other) => Err(expected(&field, "a non-empty string", other)),
    }
}

/// The document's prompt and the name of the field it came from (for later messages).
fn prompt_of(obj: &Map<String, Value>, options: &CorpusOptions) -> Result<(String, &'static str), String> {
    let has_prompt = obj.contains_key("prompt");
    let has_parts = obj.contains_key("text") || obj.contains_key("question");
    if has_prompt && has_parts {
        // Silently preferring one would score a different prompt than the author meant.
        return Err("fields \"prompt\" and \"text\"/\"question\": expected one form, found both".into());
    }
    if has_prompt {
        return Ok((text_field(obj, "prompt")?.to_string(), "\"prompt\""));
    }
    if !has_parts {
        return Err("field \"prompt\": missing; expected \"prompt\", or \"text\" and \"question\"".into());
    }
    let template = &options.template;
    let text = if template.uses_text() { text_field(obj, "text")? } else { "" };
    let question = if template.uses_question() { text_field(obj, "question")? } else { "" };
    let field = if template.uses_text() { "\"text\"" } else { "\"question\"" };
    Ok((template.render(text, question), field))
}

fn choices_of(obj: &Map<String, Value>) -> Result<Vec<String>, String> {
    let what = "a non-empty array of strings";
    let items = match obj.get("choices") {
        None => return Err(format!("field \"choices\": missing, expected {what}")),
        Some(Value::Array(a)) if !a.is_empty() => a,
        Some(other) => return Err(expected("\"choices\"", what, other)),
    };
    items
        .iter()
        .enumerate()
        .map(|(i, v)| match v {
            // A blank choice would score only the delimiter: no answer at all.
            Value::String(s) if s.trim().is_empty() => Err(expected(&format!("\"choices\"[{i}]"), "a non-blank string", v)),
            // The choice texts are stored in the results file, where a NUL would end them.
            Value::String(s) if s.contains('\0') => Err(format!("field \"choices\"[{i}]: expected a string without NUL characters")),
            Value::String(s) => Ok(s.clone()),
            other => Err(expected(&format!("\"choices\"[{i}]"), "a string", other)),
        })
        .collect()
}

/// The failed document for a line over `--max-line-bytes`, or None when its id is to be
/// skipped: it is neither parsed nor kept whole, so it goes by its line number and its
/// input hash by its length (`scan` gives the same).
pub(super) fn too_long(ctx: &LineCtx, bytes: usize) -> Option<PreparedDoc> {
    let id = line_id(ctx.line);
    if ctx.options.skip_ids.contains(&id) {
        return None;
    }
    let max = ctx.options.limits.line_bytes;
    let msg = format!("{}:{}: line too long: {bytes} bytes, expected at most {max} (--max-line-bytes)", ctx.file, ctx.line);
    Some(PreparedDoc { index: ctx.index, line: ctx.line, id, input_hash: too_long_hash(bytes), result: Err(msg) })
}

/// The input hash of a line over the byte limit, by its length alone.
pub(super) fn too_long_hash(bytes: usize) -> String {
    raw_line_hash(format!("a line over --max-line-bytes, {bytes} bytes long").as_bytes())
}

/// The id, input hash and fields of one non-blank line (`bytes` without its newline is
/// fine too); `line` is its 1-based number.
pub(super) fn identify(line: usize, options: &CorpusOptions, bytes: &[u8], seen: &mut SeenIds) -> Identified {
    let bytes = bytes.strip_suffix(b"\n").unwrap_or(bytes);
    let bytes = bytes.strip_suffix(b"\r").unwrap_or(bytes);
    let failed = |msg: String| Identified { id: line_id(line), input_hash: raw_line_hash(bytes), parsed: Err(msg) };
    let text = match std::str::from_utf8(bytes) {
        Ok(t) => t,
        Err(e) => return failed(format!("invalid UTF-8 at byte {}", e.valid_up_to())),
    };
    let value: Value = match serde_json::from_str(text) {
        Ok(v) => v,
        Err(e) => return failed(format!("invalid JSON: {e}")),
    };
    let Value::Object(obj) = value else {
        return failed(format!("expected a JSON object, found {}", describe(&value)));
    };
    let id = match text_field(&obj, "id") {
        // HDF5 strings end at a NUL: the id would be stored cut short.
        Ok(id) if id.contains('\0') => Err("field \"id\": expected a string without NUL characters".to_string()),
        Ok(id) if is_line_id(id) => Err(format!(
            "field \"id\": expected an id not of the form line:N (kept for lines without a usable id), found {}",
            quote(id)
        )),
        other => other.map(str::to_string),
    };
    let id = match id {
        Ok(id) => id,
        Err(msg) => return failed(msg),
    };
    if let Some(&first) = seen.0.get(&id) {
        // The duplicate gets a line id: ids in the results file stay unique, and the
        // first occurrence keeps the id the user will look up.
        return failed(format!("field \"id\": duplicate id {}, first on line {first}", quote(&id)));
    }
    seen.0.insert(id.clone(), line);
    let parsed = parse(&obj, options);
    let input_hash = match &parsed {
        Ok(p) => document_hash(&p.prompt, &p.choices),
        Err(_) => raw_line_hash(bytes),
    };
    Identified { id, input_hash, parsed }
}

/// The source extract takes its spans from: "source" beside "prompt", else "text" (the
/// template's document), as one choice (so the input hash covers it).
fn source_of(obj: &Map<String, Value>) -> Result<Vec<String>, String> {
    let name = if obj.contains_key("prompt") { "source" } else { "text" };
    let s = text_field(obj, name)?;
    if s.contains('\0') {
        // Its spans are stored in the results file, where a NUL would end them.
        return Err(format!("field {name:?}: expected a string without NUL characters"));
    }
    Ok(vec![s.to_string()])
}

fn parse(obj: &Map<String, Value>, options: &CorpusOptions) -> Result<Parsed, String> {
    let (prompt, prompt_field) = prompt_of(obj, options)?;
    let choices = match options.form {
        DocForm::Choices => choices_of(obj)?,
        DocForm::Source { .. } => source_of(obj)?,
    };
    let limits = options.limits;
    if options.form == DocForm::Choices && choices.len() > limits.choices {
        return Err(format!("field \"choices\": {} choices, expected at most {} (--max-choices)", choices.len(), limits.choices));
    }
    let answer = match obj.get("answer") {
        Some(Value::String(s)) => Some(s.clone()),
        _ => None,
    };
    Ok(Parsed { prompt, prompt_field, choices, answer })
}

/// The prepared document for one non-blank line, or None when its id is to be skipped.
pub(super) fn prepare(ctx: &LineCtx, bytes: &[u8], seen: &mut SeenIds) -> Option<PreparedDoc> {
    let Identified { id, input_hash, parsed } = identify(ctx.line, ctx.options, bytes, seen);
    // Failures are recorded in the results file too, under this same id, so a resumed run
    // skips them like any finished document (unless the resume plan retries them).
    if ctx.options.skip_ids.contains(&id) {
        return None; // done in an earlier run: don't spend time tokenizing it
    }
    let result = parsed
        .and_then(|p| ready(ctx, p, &id, &input_hash))
        .map_err(|msg| format!("{}:{}: {}", ctx.file, ctx.line, msg));
    Some(PreparedDoc { index: ctx.index, line: ctx.line, id, input_hash, result })
}

fn ready(ctx: &LineCtx, parsed: Parsed, id: &str, input_hash: &str) -> Result<ReadyDoc, String> {
    let Parsed { prompt, prompt_field, choices, answer } = parsed;
    let limits = ctx.options.limits;
    // Extract: the choices are the source's spans, each joined to the prompt as a choice.
    let (choices, spans, end, budget, choice_field) = match &ctx.options.form {
        DocForm::Choices => (choices, vec![], 0, limits.doc_tokens, "\"choices\""),
        DocForm::Source { max_units, end } => {
            let cands = crate::extract::candidates(&choices[0], *max_units);
            let spans = cands.iter().map(|c| (c.start, c.end)).collect();
            // The limit bounds the prompt here: the spans are bounded by the line's length.
            let prompt_only = split_within(ctx.tokenizer, &prompt, &[], &ctx.options.delimiter, limits.doc_tokens);
            if let Err(SplitError { over: Some(n), .. }) = prompt_only {
                return Err(format!("field {prompt_field}: too many tokens: {n}, expected at most {} for the prompt (--max-doc-tokens)", limits.doc_tokens));
            }
            (cands.into_iter().map(|c| c.text).collect(), spans, end.len(), usize::MAX, "\"source\" span")
        }
    };
    let quote_choice = |c: usize| format!("{choice_field} {}", quote(&choices[c]));
    let parts = split_within(ctx.tokenizer, &prompt, &choices, &ctx.options.delimiter, budget).map_err(|e| {
        let field = match e.choice {
            None => prompt_field.to_string(),
            Some(c) if spans.is_empty() => format!("\"choices\"[{c}]"),
            Some(c) => quote_choice(c),
        };
        match e.over {
            Some(n) => format!("field {field}: too many tokens: the document makes {n} by here, expected at most {} for its prompt and all its choices (--max-doc-tokens)", limits.doc_tokens),
            None => format!("field {field}: cannot tokenize: {}", e.msg),
        }
    })?;
    if parts.prompt.is_empty() {
        return Err(format!("field {prompt_field}: expected text that makes at least one token, found none"));
    }
    if let Some(c) = parts.choices.iter().position(Vec::is_empty) {
        let field = if spans.is_empty() { format!("field \"choices\"[{c}]") } else { format!("field {}", quote_choice(c)) };
        return Err(format!("{field}: expected text that makes at least one token after the prompt, found {}", quote(&choices[c])));
    }
    let n_prompt_tokens = parts.prompt.len();
    let doc = TokenizedDoc { index: ctx.index, id: id.to_string(), prompt: parts.prompt, choices: parts.choices };
    let need = doc.context_len() + end;
    if need > ctx.options.max_context {
        let what = if spans.is_empty() { "its longest choice" } else { "its longest span and the span end" };
        return Err(format!(
            "field {prompt_field}: too long: the document needs {need} positions ({n_prompt_tokens} prompt tokens + {what}), expected at most the model's context of {}",
            ctx.options.max_context
        ));
    }
    Ok(ReadyDoc { doc, choices, choice_chars: parts.chars, n_prompt_tokens, answer, input_hash: input_hash.to_string(), spans })
}
