//! A family's tensors, written down once. Each family file has `fn table(cfg) -> Table`: per
//! part, every tensor under its short name (as part files store it), its shape under this
//! config, and where it comes from in an HF checkpoint and in a llama.cpp GGUF. This file walks
//! the table for the converter (`convert_part`), the model directory's check and the planner's
//! byte counts (`expected_tensors`) and the GGUF importer's name look-up (`gguf_source`).
//!
//! Every tensor is a stem plus `.weight` (and `.bias` where the table says the row has one);
//! HF and GGUF names are written as stems too, layer rows with `{i}` for the layer number.

use super::{ModelError, Part, Result, TensorSource};
use crate::config::ModelConfig;
use crate::tensor::HostTensor;

/// Short stems shared by the families (the forward code resolves them once at load).
pub const EMBED: &str = "embed";
pub const NORM: &str = "norm";
pub const LM_HEAD: &str = "lm_head";
pub const ATTN_NORM: &str = "attn_norm";
pub const MLP_NORM: &str = "mlp_norm";
pub const QKV: &str = "attn.qkv";
pub const OUT: &str = "attn.out";
pub const UP: &str = "mlp.up";
pub const DOWN: &str = "mlp.down";

/// How the rows of a GGUF tensor differ from the HF tensor's (format/gguf/rows.rs undoes it).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GgufRows {
    AsStored,
    /// llama.cpp's rotary pair permutation of q/k rows, over this many heads.
    RopePairs(usize),
    /// Falcon's fused qkv written as `[Q; K; V]` instead of HF's per-group order.
    FalconQkv,
}

/// Where a tensor lives in a GGUF.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GgufSource {
    pub name: String,
    pub rows: GgufRows,
}

/// One tensor of a source checkpoint: its HF name and shape there, and its GGUF name (None
/// where llama.cpp's files cannot hold it).
#[derive(Clone, Debug)]
pub struct Src {
    pub hf: String,
    pub shape: Vec<usize>,
    pub gguf: Option<GgufSource>,
}

impl Src {
    /// An HF stem with its weight's shape, stored as-is in GGUF under `gguf` (a stem).
    pub fn new(hf: &str, gguf: Option<&str>, shape: &[usize]) -> Src {
        Src { hf: hf.into(), shape: shape.to_vec(), gguf: gguf.map(|g| GgufSource { name: g.into(), rows: GgufRows::AsStored }) }
    }

    /// The same tensor with its GGUF rows rearranged as `rows` says.
    pub fn gguf_rows(mut self, rows: GgufRows) -> Src {
        if let Some(g) = &mut self.gguf {
            g.rows = rows;
        }
        self
    }

    /// `stem.weight` or `stem.bias` (a bias has the weight's rows only).
    fn suffixed(&self, suffix: &str) -> Src {
        let shape = if suffix == "bias" { self.shape[..1].to_vec() } else { self.shape.clone() };
        let gguf = self.gguf.as_ref().map(|g| GgufSource { name: format!("{}.{suffix}", g.name), rows: g.rows });
        Src { hf: format!("{}.{suffix}", self.hf), shape, gguf }
    }

    fn at_layer(&self, i: usize) -> Src {
        let fill = |s: &str| s.replace("{i}", &i.to_string());
        Src { hf: fill(&self.hf), shape: self.shape.clone(), gguf: self.gguf.as_ref().map(|g| GgufSource { name: fill(&g.name), rows: g.rows }) }
    }
}

/// How a short-named tensor is made from source tensors.
#[derive(Clone, Debug)]
pub enum Origin {
    One(Src),
    /// Several, their rows stacked (llama's q, k, v into qkv).
    Stack(Vec<Src>),
    /// One, its rows taken in this order (Falcon's fused qkv into `[Q; K; V]`).
    Reordered(Src, fn(&ModelConfig) -> Vec<usize>),
    /// The first of these the checkpoint holds, else the last (llama's untied head: the
    /// embeddings when a checkpoint leaves lm_head out).
    FirstOf(Vec<Src>),
}

impl Origin {
    fn srcs(&self) -> &[Src] {
        match self {
            Origin::One(s) | Origin::Reordered(s, _) => std::slice::from_ref(s),
            Origin::Stack(v) | Origin::FirstOf(v) => v,
        }
    }

    fn map(&self, f: impl Fn(&Src) -> Src) -> Origin {
        match self {
            Origin::One(s) => Origin::One(f(s)),
            Origin::Reordered(s, order) => Origin::Reordered(f(s), *order),
            Origin::Stack(v) => Origin::Stack(v.iter().map(f).collect()),
            Origin::FirstOf(v) => Origin::FirstOf(v.iter().map(f).collect()),
        }
    }

    /// The tensor read from `src`, each source tensor's shape checked.
    fn read(&self, cfg: &ModelConfig, src: &dyn TensorSource) -> Result<HostTensor> {
        match self {
            Origin::One(s) => get_checked(src, s),
            Origin::Reordered(s, order) => Ok(get_checked(src, s)?.select_rows(&order(cfg))),
            Origin::Stack(v) => Ok(HostTensor::concat_rows(&v.iter().map(|s| get_checked(src, s)).collect::<Result<Vec<_>>>()?)),
            Origin::FirstOf(v) => match v.iter().find(|s| src.contains(&s.hf)).or(v.last()) {
                Some(s) => get_checked(src, s),
                None => Err(ModelError::Source("a table row names no source tensor".into())),
            },
        }
    }
}

/// Read a source tensor and check its shape.
fn get_checked(src: &dyn TensorSource, s: &Src) -> Result<HostTensor> {
    let t = src.get(&s.hf)?;
    if t.shape != s.shape {
        return Err(ModelError::BadShape { name: s.hf.clone(), expected: s.shape.clone(), found: t.shape });
    }
    Ok(t)
}

/// One tensor of a part: short name, shape, sources.
#[derive(Clone, Debug)]
pub struct Entry {
    pub short: String,
    pub shape: Vec<usize>,
    pub from: Origin,
}

/// A family's tensors under one config, part by part (layer rows with `{i}` in their names).
#[derive(Default)]
pub struct Table {
    begin: Vec<Entry>,
    layer: Vec<Entry>,
    end: Vec<Entry>,
}

impl Table {
    pub fn begin(&mut self, stem: &str, shape: &[usize], bias: bool, from: Origin) {
        push(&mut self.begin, stem, shape, bias, from)
    }

    pub fn layer(&mut self, stem: &str, shape: &[usize], bias: bool, from: Origin) {
        push(&mut self.layer, stem, shape, bias, from)
    }

    pub fn end(&mut self, stem: &str, shape: &[usize], bias: bool, from: Origin) {
        push(&mut self.end, stem, shape, bias, from)
    }

    /// The entries of one part, layer numbers filled in, in the table's order.
    pub fn part(&self, part: Part) -> Vec<Entry> {
        match part {
            Part::Begin => self.begin.clone(),
            Part::End => self.end.clone(),
            Part::Layer(i) => self.layer.iter().map(|e| Entry { short: e.short.clone(), shape: e.shape.clone(), from: e.from.map(|s| s.at_layer(i)) }).collect(),
        }
    }

    /// The GGUF tensor holding the HF tensor `hf`, or None when no row of this table reads it.
    pub fn gguf_source(&self, hf: &str) -> Option<GgufSource> {
        let fixed = self.begin.iter().chain(&self.end).flat_map(|e| e.from.srcs()).find(|s| s.hf == hf);
        if let Some(s) = fixed {
            return s.gguf.clone();
        }
        self.layer.iter().flat_map(|e| e.from.srcs()).find_map(|s| layer_of(&s.hf, hf).and_then(|i| s.at_layer(i).gguf))
    }
}

/// `stem.weight`, and `stem.bias` when `bias`, each read from the same-suffixed sources.
fn push(entries: &mut Vec<Entry>, stem: &str, shape: &[usize], bias: bool, from: Origin) {
    let suffixes: &[&str] = if bias { &["weight", "bias"] } else { &["weight"] };
    for &suffix in suffixes {
        let shape = if suffix == "bias" { shape[..1].to_vec() } else { shape.to_vec() };
        entries.push(Entry { short: format!("{stem}.{suffix}"), shape, from: from.map(|s| s.suffixed(suffix)) });
    }
}

/// The layer number at which `pattern` (with `{i}`) spells `name`.
fn layer_of(pattern: &str, name: &str) -> Option<usize> {
    let (pre, post) = pattern.split_once("{i}")?;
    let digits = name.strip_prefix(pre)?.strip_suffix(post)?;
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

/// The family's table under `cfg`.
pub fn table(cfg: &ModelConfig) -> Table {
    use crate::config::Family;
    match cfg.family {
        Family::Falcon => super::falcon::table(cfg),
        Family::Llama => super::llama::table(cfg),
        Family::Qwen2 => super::qwen2::table(cfg),
    }
}

/// The short names and shapes of one part, in the table's order.
pub fn expected_tensors(cfg: &ModelConfig, part: Part) -> Vec<(String, Vec<usize>)> {
    table(cfg).part(part).into_iter().map(|e| (e.short, e.shape)).collect()
}

/// The tensors of one part under their short names, read from a checkpoint by HF name.
pub fn convert_part(cfg: &ModelConfig, part: Part, src: &dyn TensorSource) -> Result<Vec<(String, HostTensor)>> {
    let mut out = vec![];
    for e in table(cfg).part(part) {
        let t = e.from.read(cfg, src)?;
        // The sources were checked; a mismatch here is the table disagreeing with itself.
        if t.shape != e.shape {
            return Err(ModelError::BadShape { name: e.short, expected: e.shape, found: t.shape });
        }
        out.push((e.short, t));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layer_patterns_match_whole_numbers_only() {
        assert_eq!(layer_of("model.layers.{i}.mlp.up_proj.weight", "model.layers.12.mlp.up_proj.weight"), Some(12));
        assert_eq!(layer_of("model.layers.{i}.mlp.up_proj.weight", "model.layers..mlp.up_proj.weight"), None);
        assert_eq!(layer_of("model.layers.{i}.mlp.up_proj.weight", "model.layers.1.x.mlp.up_proj.weight"), None);
        assert_eq!(layer_of("model.norm.weight", "model.norm.weight"), None);
    }

    #[test]
    fn gguf_names_come_from_the_table() {
        let cfg = crate::testing::falcon_config(2, true, true, false).unwrap();
        let t = table(&cfg);
        let g = t.gguf_source("transformer.h.1.self_attention.query_key_value.weight").unwrap();
        assert_eq!((g.name.as_str(), g.rows), ("blk.1.attn_qkv.weight", GgufRows::FalconQkv));
        assert_eq!(t.gguf_source("transformer.h.0.ln_attn.bias").unwrap().name, "blk.0.attn_norm_2.bias");
        assert_eq!(t.gguf_source("transformer.ln_f.weight").unwrap().name, "output_norm.weight");
        assert!(t.gguf_source("transformer.h.0.rotary_emb.inv_freq").is_none());
    }

    #[test]
    fn llama_files_permute_q_and_k_rows_and_qwen2_files_do_not() {
        let llama = crate::testing::llama_config(1).unwrap();
        let rows = |cfg: &ModelConfig, hf: &str| table(cfg).gguf_source(hf).map(|g| g.rows);
        assert_eq!(rows(&llama, "model.layers.0.self_attn.q_proj.weight"), Some(GgufRows::RopePairs(4)));
        assert_eq!(rows(&llama, "model.layers.0.self_attn.k_proj.weight"), Some(GgufRows::RopePairs(2)));
        assert_eq!(rows(&llama, "model.layers.0.self_attn.v_proj.weight"), Some(GgufRows::AsStored));
        let qwen2 = ModelConfig { family: crate::config::Family::Qwen2, attention_bias: true, ..llama };
        assert_eq!(rows(&qwen2, "model.layers.0.self_attn.q_proj.bias"), Some(GgufRows::AsStored));
        assert_eq!(table(&qwen2).gguf_source("model.layers.0.self_attn.q_proj.bias").unwrap().name, "blk.0.attn_q.bias");
    }
}
