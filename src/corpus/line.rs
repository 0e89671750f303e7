//! One corpus line: UTF-8, JSON, fields, tokenisation, context limit, in that order; the
//! first problem found is the document's error.

use std::collections::HashMap;

use serde_json::{Map, Value};

use super::tokenize::split_within;
use super::{CorpusOptions, PreparedDoc, ReadyDoc};
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

impl LineCtx<'_> {
    fn doc(&self, id: String, result: Result<ReadyDoc, String>) -> Option<PreparedDoc> {
        // Failures are recorded in the results file too, under this same id, so a resumed
        // run skips them like any finished document.
        if self.options.skip_ids.contains(&id) {
            return None;
        }
        let result = result.map_err(|msg| format!("{}:{}: {}", self.file, self.line, msg));
        Some(PreparedDoc { index: self.index, line: self.line, id, result })
    }

    fn fallback_id(&self) -> String {
        format!("line:{}", self.line)
    }
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
            Value::String(s) => Ok(s.clone()),
            other => Err(expected(&format!("\"choices\"[{i}]"), "a string", other)),
        })
        .collect()
}

/// The failed document for a line over `--max-line-bytes`, or None when an earlier run
/// recorded it already: it is neither parsed nor kept, so it goes by its line number.
pub(super) fn too_long(ctx: &LineCtx, bytes: usize) -> Option<PreparedDoc> {
    let max = ctx.options.limits.line_bytes;
    ctx.doc(ctx.fallback_id(), Err(format!("line too long: {bytes} bytes, expected at most {max} (--max-line-bytes)")))
}

/// The prepared document for one non-blank line, or None when its id is to be skipped.
pub(super) fn prepare(ctx: &LineCtx, bytes: &[u8], seen: &mut SeenIds) -> Option<PreparedDoc> {
    let bytes = bytes.strip_suffix(b"\n").unwrap_or(bytes);
    let bytes = bytes.strip_suffix(b"\r").unwrap_or(bytes);
    let text = match std::str::from_utf8(bytes) {
        Ok(t) => t,
        Err(e) => return ctx.doc(ctx.fallback_id(), Err(format!("invalid UTF-8 at byte {}", e.valid_up_to()))),
    };
    let value: Value = match serde_json::from_str(text) {
        Ok(v) => v,
        Err(e) => return ctx.doc(ctx.fallback_id(), Err(format!("invalid JSON: {e}"))),
    };
    let Value::Object(obj) = value else {
        return ctx.doc(ctx.fallback_id(), Err(format!("expected a JSON object, found {}", describe(&value))));
    };
    let id = match text_field(&obj, "id") {
        Ok(id) if id.contains('\0') => Err("field \"id\": expected a string without NUL characters".to_string()),
        other => other.map(str::to_string),
    };
    let id = match id {
        Ok(id) => id,
        Err(msg) => return ctx.doc(ctx.fallback_id(), Err(msg)),
    };
    if let Some(&first) = seen.0.get(&id) {
        // The duplicate gets a line id: ids in the results file stay unique, and the
        // first occurrence keeps the id the user will look up.
        let msg = format!("field \"id\": duplicate id {}, first on line {first}", quote(&id));
        return ctx.doc(ctx.fallback_id(), Err(msg));
    }
    seen.0.insert(id.clone(), ctx.line);
    if ctx.options.skip_ids.contains(&id) {
        return None; // done in an earlier run: don't spend time tokenizing it
    }
    let result = ready(ctx, &obj, &id);
    ctx.doc(id, result)
}

fn ready(ctx: &LineCtx, obj: &Map<String, Value>, id: &str) -> Result<ReadyDoc, String> {
    let (prompt, prompt_field) = prompt_of(obj, ctx.options)?;
    let choices = choices_of(obj)?;
    let limits = ctx.options.limits;
    if choices.len() > limits.choices {
        return Err(format!("field \"choices\": {} choices, expected at most {} (--max-choices)", choices.len(), limits.choices));
    }
    let answer = match obj.get("answer") {
        Some(Value::String(s)) => Some(s.clone()),
        _ => None,
    };
    let parts = split_within(ctx.tokenizer, &prompt, &choices, &ctx.options.delimiter, limits.doc_tokens).map_err(|e| {
        let field = match e.choice {
            None => prompt_field.to_string(),
            Some(c) => format!("\"choices\"[{c}]"),
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
        return Err(format!(
            "field \"choices\"[{c}]: expected text that makes at least one token after the prompt, found {}",
            quote(&choices[c])
        ));
    }
    let n_prompt_tokens = parts.prompt.len();
    let doc = TokenizedDoc { index: ctx.index, id: id.to_string(), prompt: parts.prompt, choices: parts.choices };
    let need = doc.context_len();
    if need > ctx.options.max_context {
        return Err(format!(
            "field {prompt_field}: too long: the document needs {need} positions ({n_prompt_tokens} prompt tokens + its longest choice), expected at most the model's context of {}",
            ctx.options.max_context
        ));
    }
    Ok(ReadyDoc { doc, choices, choice_chars: parts.chars, n_prompt_tokens, answer })
}
