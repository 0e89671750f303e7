//! manifest.json: what a model directory holds, checked before any weight is read.

use super::st::FileHashes;
use super::{FormatError, Result};
use crate::config::{Family, ModelConfig};
use crate::model::Part;
use crate::tensor::DType;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::path::Path;

pub const MANIFEST_FILE: &str = "manifest.json";
/// Bumped when a reader of the previous version could misread a new directory.
/// 2: the tokenizer is hashed (`tokenizer_hash`) and part of the model id; every part has its
/// xxh3. A version 1 directory is refused with the way to upgrade it (`Manifest::upgrade`).
pub const FORMAT_VERSION: u32 = 2;
const LEGACY_VERSION: u32 = 1;

/// One part file as written by convert.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PartEntry {
    /// `begin`, `layer_NNN` or `end` (model::Part::name).
    pub name: String,
    /// File name inside the model directory.
    pub file: String,
    pub bytes: u64,
    /// Lowercase hex sha256 of the whole file.
    pub sha256: String,
    /// xxh3-128 of the whole file (32 lowercase hex digits), checked by every rank while it
    /// reads the part. Required from format version 2; version 1 directories converted
    /// before it existed lack it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub xxh3: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    pub format_version: u32,
    pub family: Family,
    pub config: ModelConfig,
    /// Storage dtype of every tensor in every part.
    pub dtype: DType,
    /// In model order: begin, layer_000.., end.
    pub parts: Vec<PartEntry>,
    /// The tokenizer.json file name inside the directory.
    pub tokenizer: String,
    /// The tokenizer file's size and hashes: it decides which ids a text becomes, so another
    /// tokenizer is another model, checked where it is read like a part.
    pub tokenizer_hash: FileHashes,
    /// Derived from the config, the parts' hashes and the tokenizer's (see
    /// `compute_model_id`): two directories with the same id hold the same model bit for bit.
    pub model_id: String,
    /// Where the weights came from (checkpoint directory or GGUF file).
    pub source: String,
}

/// hex sha256 over the config's JSON, every part's sha256 in part order, then the
/// tokenizer's sha256 (None: a version 1 manifest's id, which left the tokenizer out).
pub fn compute_model_id(config: &ModelConfig, parts: &[PartEntry], tokenizer_sha256: Option<&str>) -> String {
    let mut h = Sha256::new();
    // serde_json writes struct fields in declaration order, so this is stable across runs.
    h.update(serde_json::to_vec(config).unwrap_or_default());
    for p in parts {
        h.update(b"\n");
        h.update(p.name.as_bytes());
        h.update(b"=");
        h.update(p.sha256.as_bytes());
    }
    if let Some(t) = tokenizer_sha256 {
        h.update(b"\ntokenizer=");
        h.update(t.as_bytes());
    }
    hex::encode(h.finalize())
}

/// Refuses dimensions whose tensor sizes overflow usize: every later shape computation
/// (model::expected_tensors) multiplies them unchecked.
pub(crate) fn check_sizes(cfg: &ModelConfig, path: &Path) -> Result<()> {
    let mul = |a: usize, b: usize| a.checked_mul(b);
    let ok = (|| {
        let qkv = mul(cfg.n_kv_heads, 2)?.checked_add(cfg.n_heads)?;
        mul(mul(qkv, cfg.head_dim)?, cfg.hidden_size)?;
        mul(mul(cfg.n_heads, cfg.head_dim)?, cfg.hidden_size)?;
        mul(mul(cfg.vocab_size, cfg.hidden_size)?, 4)?;
        mul(mul(cfg.intermediate_size, cfg.hidden_size)?, 4)?;
        cfg.n_layers.checked_add(2)
    })();
    match ok {
        Some(_) => Ok(()),
        None => Err(FormatError::Malformed { path: path.display().to_string(), msg: "model dimensions are too large (tensor sizes overflow)".into() }),
    }
}

fn field<T: DeserializeOwned>(obj: &serde_json::Map<String, serde_json::Value>, name: &str, path: &Path) -> Result<T> {
    let bad = |msg: String| FormatError::Malformed { path: path.display().to_string(), msg: format!("field `{name}`: {msg}") };
    let v = obj.get(name).ok_or_else(|| bad("required field is missing".into()))?;
    serde_json::from_value(v.clone()).map_err(|source| FormatError::Json { path: path.display().to_string(), what: format!("field `{name}`"), source })
}

impl Manifest {
    /// Read and check `dir/manifest.json`; every error names the file and the field.
    pub fn load(dir: &Path) -> Result<Manifest> {
        let path = dir.join(MANIFEST_FILE);
        let bytes = std::fs::read(&path).map_err(|e| FormatError::io(&path, e))?;
        Manifest::parse(&bytes, &path)
    }

    /// Parse manifest bytes read from `path` (named in errors). A version 1 manifest is
    /// refused, saying how to upgrade it.
    pub fn parse(bytes: &[u8], path: &Path) -> Result<Manifest> {
        let (obj, version) = Manifest::json(bytes, path)?;
        if version == LEGACY_VERSION {
            let dir = path.parent().unwrap_or(Path::new("."));
            return Err(FormatError::Outdated {
                path: path.display().to_string(),
                msg: format!(
                    "field `format_version`: version 1, written by an older falcon-batch, records no hash of the tokenizer \
                     (and may lack the parts' fast hashes), so they cannot be checked; run `falcon-batch inspect {} --upgrade` \
                     (checks every part against its sha256, then records the missing hashes) or convert again",
                    dir.display()
                ),
            });
        }
        let tokenizer_hash: FileHashes = field(&obj, "tokenizer_hash", path)?;
        Manifest::from_fields(&obj, version, tokenizer_hash, path)
    }

    /// The manifest's JSON object and its format version, refusing versions this build
    /// cannot read.
    fn json(bytes: &[u8], path: &Path) -> Result<(serde_json::Map<String, serde_json::Value>, u32)> {
        let json: serde_json::Value =
            serde_json::from_slice(bytes).map_err(|source| FormatError::Json { path: path.display().to_string(), what: "invalid JSON".into(), source })?;
        let serde_json::Value::Object(obj) = json else {
            return Err(FormatError::Malformed { path: path.display().to_string(), msg: "expected a JSON object".into() });
        };
        let format_version: u32 = field(&obj, "format_version", path)?;
        if format_version != FORMAT_VERSION && format_version != LEGACY_VERSION {
            return Err(FormatError::Unsupported {
                path: path.display().to_string(),
                msg: format!("field `format_version`: this build reads version {FORMAT_VERSION} (and upgrades {LEGACY_VERSION}), found {format_version}"),
            });
        }
        Ok((obj, format_version))
    }

    /// Every field but the tokenizer's hash, checked against each other; the model id is
    /// checked by `version`'s rule (version 1 left the tokenizer out of it).
    fn from_fields(obj: &serde_json::Map<String, serde_json::Value>, version: u32, tokenizer_hash: FileHashes, path: &Path) -> Result<Manifest> {
        let bad = |field: &str, msg: String| FormatError::Malformed { path: path.display().to_string(), msg: format!("field `{field}`: {msg}") };
        let m = Manifest {
            format_version: version,
            family: field(obj, "family", path)?,
            config: field(obj, "config", path)?,
            dtype: field(obj, "dtype", path)?,
            parts: field(obj, "parts", path)?,
            tokenizer: field(obj, "tokenizer", path)?,
            tokenizer_hash,
            model_id: field(obj, "model_id", path)?,
            source: field(obj, "source", path)?,
        };
        m.config.validate(&path.display().to_string())?;
        check_sizes(&m.config, path)?;
        if m.family != m.config.family {
            return Err(bad("family", format!("`{}` but the config is `{}`", m.family.name(), m.config.family.name())));
        }
        m.check_parts(path)?;
        if !is_plain_file_name(&m.tokenizer) {
            return Err(bad("tokenizer", format!("`{}` must be a file name inside the directory", m.tokenizer)));
        }
        let id = if version == LEGACY_VERSION {
            compute_model_id(&m.config, &m.parts, None)
        } else {
            let t = &m.tokenizer_hash;
            if !is_hex(&t.sha256, 64) || !is_hex(&t.xxh3, 32) {
                return Err(bad("tokenizer_hash", "expected sha256 of 64 and xxh3 of 32 lowercase hex digits".into()));
            }
            if let Some(p) = m.parts.iter().find(|p| p.xxh3.is_none()) {
                return Err(bad("parts", format!("part `{}`: xxh3 is missing (format version {version} records it for every part)", p.name)));
            }
            compute_model_id(&m.config, &m.parts, Some(&t.sha256))
        };
        if id != m.model_id {
            return Err(bad("model_id", format!("recorded {} but the config, part and tokenizer hashes give {id}", m.model_id)));
        }
        Ok(m)
    }

    /// A version 1 manifest read for `upgrade`: its own id rule checked; the tokenizer hash
    /// is a placeholder for the caller to fill once it has hashed the file.
    pub(crate) fn parse_legacy(bytes: &[u8], path: &Path) -> Result<Option<Manifest>> {
        let (obj, version) = Manifest::json(bytes, path)?;
        if version != LEGACY_VERSION {
            return Ok(None);
        }
        let none = FileHashes { bytes: 0, sha256: String::new(), xxh3: String::new() };
        Manifest::from_fields(&obj, version, none, path).map(Some)
    }

    /// Parts must be exactly begin, layer_000.., end with their standard file names.
    fn check_parts(&self, path: &Path) -> Result<()> {
        let bad = |msg: String| FormatError::Malformed { path: path.display().to_string(), msg: format!("field `parts`: {msg}") };
        // Compared before building the expected list, so a huge n_layers allocates nothing.
        if self.parts.len() != self.config.n_layers + 2 {
            return Err(bad(format!("expected {} parts (begin, {} layers, end), found {}", self.config.n_layers + 2, self.config.n_layers, self.parts.len())));
        }
        for (entry, part) in self.parts.iter().zip(Part::all(self.config.n_layers)) {
            if entry.name != part.name() || entry.file != part.file_name() {
                return Err(bad(format!("expected part `{}` in `{}`, found `{}` in `{}`", part.name(), part.file_name(), entry.name, entry.file)));
            }
            if !is_hex(&entry.sha256, 64) {
                return Err(bad(format!("part `{}`: sha256 must be 64 lowercase hex digits", entry.name)));
            }
            if entry.xxh3.as_deref().is_some_and(|h| !is_hex(h, 32)) {
                return Err(bad(format!("part `{}`: xxh3 must be 32 lowercase hex digits", entry.name)));
            }
        }
        Ok(())
    }

    /// The recorded entry of one part.
    pub fn part(&self, part: Part) -> Option<&PartEntry> {
        let name = part.name();
        self.parts.iter().find(|p| p.name == name)
    }

    pub fn total_bytes(&self) -> u64 {
        self.parts.iter().map(|p| p.bytes).sum()
    }

    /// Write `dir/manifest.json` (pretty, for people reading it) through a temporary file
    /// renamed over it, so a crash leaves the old manifest or the new, never half of one.
    pub fn save(&self, dir: &Path) -> Result<()> {
        let path = dir.join(MANIFEST_FILE);
        let text = serde_json::to_string_pretty(self)
            .map_err(|source| FormatError::Json { path: path.display().to_string(), what: "cannot serialise".into(), source })?;
        let tmp = dir.join(format!(".{MANIFEST_FILE}.{}", std::process::id()));
        let written = std::fs::write(&tmp, text + "\n")
            .and_then(|_| std::fs::File::open(&tmp)?.sync_all())
            .map_err(|e| FormatError::io(&tmp, e))
            .and_then(|_| std::fs::rename(&tmp, &path).map_err(|e| FormatError::io(&path, e)));
        if written.is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
        written
    }
}

fn is_hex(s: &str, len: usize) -> bool {
    s.len() == len && s.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// A name that cannot leave the directory it is joined to.
pub(crate) fn is_plain_file_name(name: &str) -> bool {
    let p = Path::new(name);
    !name.is_empty() && p.components().count() == 1 && p.file_name().is_some_and(|f| f == p.as_os_str())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> ModelConfig {
        let json = serde_json::json!({"model_type": "llama", "hidden_size": 8, "num_attention_heads": 2,
            "num_hidden_layers": 1, "intermediate_size": 16, "vocab_size": 4});
        crate::model::config_from_hf(&json, "config.json").unwrap()
    }

    fn entry(name: &str, sha: char) -> PartEntry {
        PartEntry { name: name.into(), file: format!("{name}.safetensors"), bytes: 1, sha256: sha.to_string().repeat(64), xxh3: Some(sha.to_string().repeat(32)) }
    }

    fn tok_hash() -> FileHashes {
        FileHashes { bytes: 5, sha256: "e".repeat(64), xxh3: "f".repeat(32) }
    }

    #[test]
    fn model_id_depends_on_config_and_every_hash() {
        let parts = vec![entry("begin", 'a'), entry("layer_000", 'b'), entry("end", 'c')];
        let t = "e".repeat(64);
        let id = compute_model_id(&cfg(), &parts, Some(&t));
        assert_eq!(id, compute_model_id(&cfg(), &parts.clone(), Some(&t)));
        let mut other = parts.clone();
        other[1].sha256 = "d".repeat(64);
        assert_ne!(id, compute_model_id(&cfg(), &other, Some(&t)));
        let mut c = cfg();
        c.rope_theta = 1.0;
        assert_ne!(id, compute_model_id(&c, &parts, Some(&t)));
        assert_ne!(id, compute_model_id(&cfg(), &parts, Some(&"9".repeat(64))));
        assert_ne!(id, compute_model_id(&cfg(), &parts, None));
    }

    #[test]
    fn save_then_parse_round_trips_and_checks_the_id() {
        let dir = tempfile::tempdir().unwrap();
        let parts = vec![entry("begin", 'a'), entry("layer_000", 'b'), entry("end", 'c')];
        let mut m = Manifest {
            format_version: FORMAT_VERSION,
            family: Family::Llama,
            config: cfg(),
            dtype: DType::Bf16,
            model_id: compute_model_id(&cfg(), &parts, Some(&tok_hash().sha256)),
            parts,
            tokenizer: "tokenizer.json".into(),
            tokenizer_hash: tok_hash(),
            source: "test".into(),
        };
        m.save(dir.path()).unwrap();
        assert_eq!(Manifest::load(dir.path()).unwrap(), m);
        m.model_id = "0".repeat(64);
        m.save(dir.path()).unwrap();
        let e = Manifest::load(dir.path()).unwrap_err().to_string();
        assert!(e.contains("manifest.json") && e.contains("model_id"), "{e}");
    }

    #[test]
    fn file_names_stay_inside_the_directory() {
        assert!(is_plain_file_name("layer_000.safetensors"));
        for bad in ["", "..", ".", "../x", "a/b", "/etc/passwd"] {
            assert!(!is_plain_file_name(bad), "{bad}");
        }
    }

    #[test]
    fn overflowing_dimensions_are_refused() {
        let mut c = cfg();
        c.vocab_size = usize::MAX / 2;
        let e = check_sizes(&c, Path::new("m/manifest.json")).unwrap_err().to_string();
        assert!(e.contains("m/manifest.json"), "{e}");
    }
}
