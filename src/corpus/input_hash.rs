//! The hash of what determines a document's scores, recorded beside them so a resumed run
//! can tell a document it already scored from one whose prompt or choices were edited under
//! the same id.
//!
//! xxh3-128, 32 lowercase hex digits. Every field is length-prefixed, so moving text from
//! one field to the next ("ab","c" vs "a","bc") changes the hash, and a tag says which form
//! was hashed, so no document hashes like a raw line.

use xxhash_rust::xxh3::Xxh3;

/// Hex digits of every input hash.
pub const INPUT_HASH_LEN: usize = 32;

fn put(h: &mut Xxh3, bytes: &[u8]) {
    h.update(&(bytes.len() as u64).to_le_bytes());
    h.update(bytes);
}

fn hex(h: &Xxh3) -> String {
    format!("{:032x}", h.digest128())
}

/// A document that parsed: its rendered prompt and its choices, in order. The options that
/// change the math for every document (norm, delimiter, model, ...) are the file's identity
/// and are not repeated here.
pub fn document_hash(prompt: &str, choices: &[String]) -> String {
    let mut h = Xxh3::new();
    put(&mut h, b"document");
    put(&mut h, prompt.as_bytes());
    h.update(&(choices.len() as u64).to_le_bytes());
    for c in choices {
        put(&mut h, c.as_bytes());
    }
    hex(&h)
}

/// A line that did not parse into a prompt and choices: its bytes as read.
pub fn raw_line_hash(bytes: &[u8]) -> String {
    let mut h = Xxh3::new();
    put(&mut h, b"raw line");
    put(&mut h, bytes);
    hex(&h)
}

/// Hashes a whole file as it is read (the corpus hash recorded in the results file).
#[derive(Default)]
pub struct FileHasher(Xxh3);

impl FileHasher {
    pub fn update(&mut self, bytes: &[u8]) {
        self.0.update(bytes);
    }

    pub fn finish(&self) -> String {
        hex(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fields_are_length_prefixed_and_forms_apart() {
        let a = document_hash("ab", &["c".into()]);
        assert_eq!(a.len(), INPUT_HASH_LEN);
        assert_ne!(a, document_hash("a", &["bc".into()]));
        assert_ne!(document_hash("p", &["x".into(), "y".into()]), document_hash("p", &["xy".into()]));
        assert_ne!(document_hash("p", &["x".into(), "y".into()]), document_hash("p", &["y".into(), "x".into()]));
        assert_eq!(a, document_hash("ab", &["c".into()]));
        assert_ne!(raw_line_hash(b"ab"), raw_line_hash(b"ab "));
    }
}
