//! The prompt template for `{"text", "question"}` documents.
//!
//! Syntax is Python's `str.format` subset that users already know from lm-eval task files:
//! `{text}` and `{question}` are replaced, `{{` and `}}` are literal braces. Anything else
//! in braces is rejected when the template is loaded, so a typo fails the run at start
//! instead of silently producing 100k wrong prompts.

use std::path::Path;

use super::CorpusError;

pub const DEFAULT_TEMPLATE: &str = "Document: {text}\nQuestion: {question}\nAnswer:";

#[derive(Clone, Debug, PartialEq, Eq)]
enum Part {
    Literal(String),
    Text,
    Question,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Template {
    source: String,
    parts: Vec<Part>,
}

impl Default for Template {
    fn default() -> Template {
        // A constant, covered by the tests below: no user input can make this fail.
        Template::parse(DEFAULT_TEMPLATE, "built-in template").expect("the built-in template is valid")
    }
}

impl Template {
    /// Parse a template; `origin` (a file name) is only used in error messages.
    pub fn parse(source: &str, origin: &str) -> Result<Template, CorpusError> {
        let bad = |msg: String| CorpusError::Template { origin: origin.to_string(), msg };
        let mut parts = Vec::new();
        let mut literal = String::new();
        let mut chars = source.char_indices().peekable();
        while let Some((at, c)) = chars.next() {
            match c {
                '{' if matches!(chars.peek(), Some((_, '{'))) => {
                    chars.next();
                    literal.push('{');
                }
                '}' if matches!(chars.peek(), Some((_, '}'))) => {
                    chars.next();
                    literal.push('}');
                }
                '}' => return Err(bad(format!("unmatched '}}' at byte {at}; write '}}}}' for a literal brace"))),
                '{' => {
                    let rest = &source[at + 1..];
                    let Some(len) = rest.find('}') else {
                        return Err(bad(format!("unclosed '{{' at byte {at}; write '{{{{' for a literal brace")));
                    };
                    let name = &rest[..len];
                    let part = match name {
                        "text" => Part::Text,
                        "question" => Part::Question,
                        _ => {
                            return Err(bad(format!(
                                "unknown placeholder {{{name}}} at byte {at}; expected {{text}} or {{question}}"
                            )))
                        }
                    };
                    // skip the name and the closing brace
                    for _ in 0..=name.chars().count() {
                        chars.next();
                    }
                    if !literal.is_empty() {
                        parts.push(Part::Literal(std::mem::take(&mut literal)));
                    }
                    parts.push(part);
                }
                _ => literal.push(c),
            }
        }
        if !literal.is_empty() {
            parts.push(Part::Literal(literal));
        }
        let template = Template { source: source.to_string(), parts };
        if !template.uses_text() && !template.uses_question() {
            return Err(bad("has neither {text} nor {question}: every document would get the same prompt".into()));
        }
        Ok(template)
    }

    pub fn from_file(path: &Path) -> Result<Template, CorpusError> {
        let source = std::fs::read_to_string(path)
            .map_err(|e| CorpusError::Io { path: path.display().to_string(), source: e })?;
        // Editors add a final newline; a prompt ending in "\n" would move it into every
        // choice, which is almost never what the template's author meant.
        let source = source.strip_suffix('\n').unwrap_or(&source);
        let source = source.strip_suffix('\r').unwrap_or(source);
        Template::parse(source, &path.display().to_string())
    }

    /// The template as written, recorded in the results file so a resume can check it.
    pub fn source(&self) -> &str {
        &self.source
    }

    pub fn uses_text(&self) -> bool {
        self.parts.contains(&Part::Text)
    }

    pub fn uses_question(&self) -> bool {
        self.parts.contains(&Part::Question)
    }

    pub fn render(&self, text: &str, question: &str) -> String {
        let mut out = String::with_capacity(self.source.len() + text.len() + question.len());
        for part in &self.parts {
            match part {
                Part::Literal(s) => out.push_str(s),
                Part::Text => out.push_str(text),
                Part::Question => out.push_str(question),
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_renders() {
        let t = Template::default();
        assert_eq!(t.render("Invoice 7", "Total?"), "Document: Invoice 7\nQuestion: Total?\nAnswer:");
    }

    #[test]
    fn escapes_and_unicode() {
        let t = Template::parse("{{é}} {text} — {question}}}", "t").unwrap();
        assert_eq!(t.render("a", "b"), "{é} a — b}");
        let t = Template::parse("only {text}", "t").unwrap();
        assert!(t.uses_text() && !t.uses_question());
    }

    #[test]
    fn rejects_bad_templates() {
        for (src, needle) in [
            ("no placeholder", "neither"),
            ("{text} {answer}", "unknown placeholder {answer}"),
            ("{text", "unclosed"),
            ("{text} }", "unmatched"),
            ("{{text}}", "neither"),
        ] {
            let err = Template::parse(src, "my.tmpl").unwrap_err().to_string();
            assert!(err.contains(needle) && err.contains("my.tmpl"), "{src}: {err}");
        }
    }
}
