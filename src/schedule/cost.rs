//! What work costs: compute per layer as a function of tokens, copies and network. Either
//! derived from the device's peak FLOP rate or measured by `falcon-batch bench`.

use super::ModelShape;
use serde::Deserialize;
use thiserror::Error;

#[derive(Debug, Error, PartialEq)]
pub enum CostError {
    #[error("{0}")]
    Invalid(String),
}

#[derive(Clone, Debug, PartialEq)]
pub enum LayerCost {
    /// fixed + per_token * T + per_token2 * sum of squared document lengths (attention).
    Linear { fixed_s: f64, per_token_s: f64, per_token2_s: f64 },
    /// Measured (tokens, seconds) points, sorted by tokens; linear in between and beyond.
    Table(Vec<(f64, f64)>),
}

impl LayerCost {
    /// Seconds for one layer over a micro-batch of `docs` documents of `len` tokens each.
    pub fn seconds(&self, docs: usize, len: usize) -> f64 {
        self.micro_seconds(&Micro::documents(docs, len, 0))
    }

    /// Seconds for one layer over a micro-batch: its rows through the matmuls, and each row's
    /// attention over the keys it reads. A measured table knows rows only (it was timed on
    /// whole documents, whose attention it includes).
    pub fn micro_seconds(&self, m: &Micro) -> f64 {
        let t = m.rows as f64;
        match self {
            LayerCost::Linear { fixed_s, per_token_s, per_token2_s } => fixed_s + per_token_s * t + per_token2_s * m.keys_read,
            LayerCost::Table(points) => interpolate(points, t).max(0.0),
        }
    }
}

/// One micro-batch's work, what its cost depends on.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Micro {
    /// Rows through every layer (and over every hop between ranks).
    pub rows: usize,
    /// Keys read by the attention, summed over the rows.
    pub keys_read: f64,
    /// Rows the LM head runs on.
    pub scored: usize,
}

impl Micro {
    /// `docs` whole documents of `len` tokens, each row attending to the document's `len` keys
    /// (no causal saving), `scored` head rows per document.
    pub fn documents(docs: usize, len: usize, scored: usize) -> Micro {
        Micro { rows: docs * len, keys_read: docs as f64 * (len * len) as f64, scored: docs * scored }
    }
}

fn interpolate(points: &[(f64, f64)], t: f64) -> f64 {
    match points {
        [] => 0.0,
        // One measurement: assume time proportional to tokens.
        [(t0, s0)] => s0 * t / t0,
        _ => {
            let i = points.iter().position(|&(x, _)| x >= t).unwrap_or(points.len() - 1).clamp(1, points.len() - 1);
            let ((x0, y0), (x1, y1)) = (points[i - 1], points[i]);
            y0 + (y1 - y0) * (t - x0) / (x1 - x0)
        }
    }
}

/// How hidden states travel between ranks. Compute accumulates in f32 everywhere; only the
/// hop is narrowed, so bf16 halves the bytes of a network-bound plan for a rounding of each
/// value to 8 significant bits (the weights of a bf16 model carry no more than that).
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum WireDtype {
    F32,
    Bf16,
}

impl WireDtype {
    pub fn parse(s: &str) -> Option<WireDtype> {
        match s {
            "f32" => Some(WireDtype::F32),
            "bf16" => Some(WireDtype::Bf16),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            WireDtype::F32 => "f32",
            WireDtype::Bf16 => "bf16",
        }
    }

    /// Bytes per value on the wire.
    pub fn bytes(self) -> usize {
        match self {
            WireDtype::F32 => 4,
            WireDtype::Bf16 => 2,
        }
    }

    /// The default for weights stored with `weight_bytes` per value: bf16 when the weights are
    /// bf16 or narrower (the hop then loses nothing the weights had), f32 otherwise.
    pub fn default_for(weight_bytes: usize) -> WireDtype {
        if weight_bytes <= 2 {
            WireDtype::Bf16
        } else {
            WireDtype::F32
        }
    }
}

impl std::str::FromStr for WireDtype {
    type Err = String;
    fn from_str(s: &str) -> Result<WireDtype, String> {
        WireDtype::parse(s).ok_or_else(|| format!("expected f32 or bf16, got `{s}`"))
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct CostModel {
    pub layer: LayerCost,
    /// LM head seconds per scored position (it runs only where a log-prob is needed).
    pub head_row_s: f64,
    pub h2d_bytes_per_s: f64,
    /// The link's rate, framing included (see TCP_PAYLOAD_SHARE).
    pub net_bytes_per_s: f64,
    pub net_latency_s: f64,
    /// Bytes per hidden value on the wire: 4 sends the f32 activations as they are.
    pub wire_bytes: usize,
}

/// Share of an Ethernet link's rate that a TCP stream's payload gets: of each 1538 bytes a
/// full frame takes on the wire (1500 MTU + Ethernet header, FCS, preamble and gap), 1448 are
/// payload (IP and TCP headers with timestamps take 52): the familiar 941 Mbit/s on 1 GbE.
/// Rates given to the planner (`--net`, a cost file's `net_bytes_per_s`) are link rates.
pub const TCP_PAYLOAD_SHARE: f64 = 1448.0 / 1538.0;

/// Fraction of peak the FLOP-derived cost model assumes large GEMMs reach.
pub const DEFAULT_EFFICIENCY: f64 = 0.5;

impl CostModel {
    /// Compute from FLOPs at `efficiency` of `tflops` peak: a layer costs 2 * params FLOPs
    /// per token for its matmuls plus 4 * L^2 * C per document of L tokens for attention
    /// (scores and weighted sum, no causal saving), plus ~0.2 ms of kernel launches.
    pub fn from_flops(shape: &ModelShape, tflops: f64, efficiency: f64, h2d: f64, net: f64, latency: f64) -> CostModel {
        let rate = tflops * 1e12 * efficiency;
        CostModel {
            layer: LayerCost::Linear {
                fixed_s: 2e-4,
                per_token_s: 2.0 * shape.layer_params as f64 / rate,
                per_token2_s: 4.0 * shape.hidden as f64 / rate,
            },
            head_row_s: 2.0 * (shape.hidden * shape.vocab) as f64 / rate,
            h2d_bytes_per_s: h2d,
            net_bytes_per_s: net,
            net_latency_s: latency,
            wire_bytes: 4,
        }
    }

    pub fn check(&self) -> Result<(), CostError> {
        for (name, v) in [("h2d bandwidth", self.h2d_bytes_per_s), ("network bandwidth", self.net_bytes_per_s)] {
            if !(v.is_finite() && v > 0.0) {
                return Err(CostError::Invalid(format!("{name} must be positive, got {v}")));
            }
        }
        if !(self.net_latency_s.is_finite() && self.net_latency_s >= 0.0) {
            return Err(CostError::Invalid(format!("network latency must not be negative, got {}", self.net_latency_s)));
        }
        Ok(())
    }
}

/// `falcon-batch bench` output: {"layer_seconds": [[tokens, seconds], ...], "h2d_bytes_per_s": ...,
/// "net_bytes_per_s": ..., "net_latency_s": ...}; the three rates are optional.
#[derive(Clone, Debug, PartialEq, Deserialize)]
// Other fields (a `falcon-batch bench` report carries many) are ignored, so its JSON is a cost file as is.
pub struct MeasuredCosts {
    pub layer_seconds: Vec<(f64, f64)>,
    pub h2d_bytes_per_s: Option<f64>,
    pub net_bytes_per_s: Option<f64>,
    pub net_latency_s: Option<f64>,
    /// LM head seconds per scored position, when measured.
    #[serde(default)]
    pub head_row_s: Option<f64>,
}

impl MeasuredCosts {
    pub fn parse(json: &str) -> Result<MeasuredCosts, CostError> {
        let mut m: MeasuredCosts = serde_json::from_str(json).map_err(|e| CostError::Invalid(e.to_string()))?;
        if m.layer_seconds.is_empty() {
            return Err(CostError::Invalid("layer_seconds is empty".into()));
        }
        if let Some(&(t, s)) = m.layer_seconds.iter().find(|&&(t, s)| !(t > 0.0 && t.is_finite() && s >= 0.0 && s.is_finite())) {
            return Err(CostError::Invalid(format!("layer_seconds: bad point [{t}, {s}]")));
        }
        m.layer_seconds.sort_by(|a, b| a.0.total_cmp(&b.0));
        if m.layer_seconds.windows(2).any(|w| w[0].0 == w[1].0) {
            return Err(CostError::Invalid("layer_seconds: two points with the same token count".into()));
        }
        Ok(m)
    }
}

/// Extract's search per document (README "Extract"): pass 1 runs the prompt alone, its last
/// row giving every candidate's first term; each later pass runs only the branch rows of a
/// token tree, attending to the prompt's keys and values each rank kept from pass 1.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ExtractWork {
    /// Rows run beyond the prompt over all passes (the results' `/docs/tree_tokens`).
    pub tree_rows: usize,
    /// Passes over the document, the prompt's included (`/docs/passes`); at least 2.
    pub passes: usize,
}

/// Keys a tree row reads beyond the prompt's: the rows of its own branch before it. A branch
/// is one candidate's ids, at most --max-span-units (16) units of about a token each; a row
/// sits on average half-way down its branch, so 16 bounds it from above.
pub const BRANCH_KEYS: usize = 16;

impl ExtractWork {
    /// Tree rows of one document in one later pass (the rows spread evenly over the passes).
    pub fn rows_per_pass(&self) -> usize {
        self.tree_rows.div_ceil(self.passes.saturating_sub(1).max(1))
    }
}

/// The documents to score, or to extract from.
#[derive(Clone, Debug, PartialEq)]
pub struct Workload {
    pub docs: usize,
    /// Prompt tokens per document.
    pub doc_tokens: usize,
    pub choices: usize,
    pub choice_tokens: usize,
    /// Token budget of a micro-batch; whole documents only (one pass scores all choices).
    pub batch_tokens: usize,
    /// Extract instead of score: the choices are then unused.
    pub extract: Option<ExtractWork>,
}

impl Workload {
    /// Tokens of one document packed with all its choices (one-pass scoring); extract's
    /// longest sequence, the prompt and one branch.
    pub fn seq_tokens(&self) -> usize {
        match self.extract {
            None => self.doc_tokens + self.choices * self.choice_tokens,
            Some(_) => self.doc_tokens + BRANCH_KEYS,
        }
    }

    /// Documents in one micro-batch (extract: in one of its first passes).
    pub fn docs_per_micro(&self) -> usize {
        match self.extract {
            None => self.batch_tokens / self.seq_tokens().max(1),
            Some(_) => self.batch_tokens / self.doc_tokens.max(1),
        }
    }

    /// Extract's later passes, as the driver packs them: a document's pass is cut into
    /// `cut` pieces of at most --batch-tokens rows, and a micro-batch packs as many pieces
    /// as --batch-tokens holds. (rows per piece, pieces per micro-batch, micro-batches).
    pub fn tree_packing(&self) -> (usize, usize, usize) {
        let Some(x) = self.extract else { return (0, 0, 0) };
        let r = x.rows_per_pass().max(1);
        let cut = r.div_ceil(self.batch_tokens.max(1));
        let piece = r.div_ceil(cut);
        let per_micro = (self.batch_tokens / piece).max(1);
        (piece, per_micro, (self.docs * (x.passes - 1) * cut).div_ceil(per_micro))
    }

    fn tree_micro_batches(&self) -> usize {
        self.tree_packing().2
    }

    pub fn micro_batches(&self) -> usize {
        self.docs.div_ceil(self.docs_per_micro().max(1)) + self.tree_micro_batches()
    }

    /// Micro-batch `index` of the run. Extract's are prompt and tree micro-batches spread
    /// evenly over the run: its driver mixes passes of several documents in every wave, so
    /// past the first waves each wave carries both in the run's proportion.
    pub fn micro(&self, index: usize) -> Micro {
        let per = self.docs_per_micro().max(1);
        if self.extract.is_none() {
            let docs = per.min(self.docs.saturating_sub(index * per)).max(1);
            return Micro::documents(docs, self.seq_tokens(), self.scored_rows());
        }
        let (all, tree) = (self.micro_batches() as u128, self.tree_micro_batches() as u128);
        let i = index as u128;
        if (i + 1) * tree / all > i * tree / all {
            let (piece, per_micro, _) = self.tree_packing();
            let rows = piece * per_micro;
            Micro { rows, keys_read: rows as f64 * (self.doc_tokens + BRANCH_KEYS) as f64, scored: rows }
        } else {
            // The head runs once per document, at the prompt's last row.
            Micro::documents(per, self.doc_tokens, 1)
        }
    }

    /// Rows one document sends over each hop between ranks, over all its passes.
    pub fn rows_per_doc(&self) -> usize {
        match self.extract {
            None => self.seq_tokens(),
            Some(x) => self.doc_tokens + x.tree_rows,
        }
    }

    /// Positions per document whose next-token log-prob is needed: one per choice token.
    pub fn scored_rows(&self) -> usize {
        self.choices * self.choice_tokens
    }

    pub fn check(&self, context: usize) -> Result<(), CostError> {
        if self.docs == 0 || self.doc_tokens == 0 {
            return Err(CostError::Invalid("need at least one document of at least one token".into()));
        }
        if let Some(x) = self.extract {
            if x.passes < 2 || x.tree_rows < x.passes - 1 {
                return Err(CostError::Invalid(format!(
                    "extract needs at least 2 passes and a tree row per pass after the first, got {} passes and {} tree rows",
                    x.passes, x.tree_rows
                )));
            }
        }
        if self.seq_tokens() > context {
            return Err(CostError::Invalid(format!(
                "a document with its choices is {} tokens, beyond the model's context of {context}",
                self.seq_tokens()
            )));
        }
        if self.docs_per_micro() == 0 {
            let (what, tokens) = match self.extract {
                None => ("one document with its choices", self.seq_tokens()),
                Some(_) => ("one document's prompt", self.doc_tokens),
            };
            return Err(CostError::Invalid(format!("--batch-tokens {} cannot hold {what} ({tokens} tokens)", self.batch_tokens)));
        }
        Ok(())
    }
}
