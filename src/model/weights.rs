//! A part's weights on a backend and their typed view: each family's layer struct names its
//! tensors as fields, found once when the part is loaded (a tensor the part lacks is an error
//! there, naming it), so the forward pass reads fields instead of looking names up.

use super::table::{EMBED, LM_HEAD, NORM, OUT, QKV};
use super::{falcon, llama, ModelError, Part, Result};
use crate::backend::{Ops, WeightStream};
use crate::config::{Family, ModelConfig};
use crate::tensor::HostTensor;

/// Where a tensor sits among its part's weights; only a `Resolver` over that part makes one.
#[derive(Clone, Copy, Debug)]
pub struct Ix(usize);

/// A weight and, where the checkpoint has one, its bias.
#[derive(Clone, Copy, Debug)]
pub struct WeightBias {
    pub weight: Ix,
    pub bias: Option<Ix>,
}

/// A layer norm's scale and shift.
#[derive(Clone, Copy, Debug)]
pub struct Norm {
    pub weight: Ix,
    pub bias: Ix,
}

/// The attention projections every family shares.
#[derive(Clone, Copy, Debug)]
pub struct Attn {
    /// (H + 2KV) D rows: q, k, v
    pub qkv: WeightBias,
    pub out: WeightBias,
}

impl Attn {
    pub(crate) fn resolve(r: &Resolver) -> Result<Attn> {
        Ok(Attn { qkv: r.linear(QKV)?, out: r.linear(OUT)? })
    }
}

/// A linear layer's weight and bias on a backend, as `Ops::linear` takes them.
pub type LinearRef<'a, W> = (&'a W, Option<&'a W>);

/// The attention projections of one layer, on a backend.
pub struct AttnRef<'a, W> {
    pub qkv: LinearRef<'a, W>,
    pub out: LinearRef<'a, W>,
}

/// The LM head's final norm (a layer norm's shift where the family has one) and projection.
#[derive(Clone, Copy, Debug)]
pub struct End {
    pub norm: WeightBias,
    pub head: Ix,
}

/// What the forward pass knows of a part.
pub(crate) enum View {
    Begin { embed: Ix },
    Falcon(falcon::Layer),
    Llama(llama::Layer),
    End(End),
}

/// Finds a part's tensors by short name, at load.
pub(crate) struct Resolver<'a> {
    part: Part,
    names: &'a [String],
}

impl Resolver<'_> {
    fn find(&self, name: &str) -> Option<Ix> {
        self.names.iter().position(|n| n == name).map(Ix)
    }

    fn get(&self, name: String) -> Result<Ix> {
        self.find(&name).ok_or_else(|| ModelError::MissingTensor { part: self.part.name(), name })
    }

    /// `stem.weight`.
    pub fn weight(&self, stem: &str) -> Result<Ix> {
        self.get(format!("{stem}.weight"))
    }

    /// `stem.weight` and `stem.bias` if the part has it.
    pub fn linear(&self, stem: &str) -> Result<WeightBias> {
        Ok(WeightBias { weight: self.weight(stem)?, bias: self.find(&format!("{stem}.bias")) })
    }

    /// `stem.weight` and `stem.bias`, both required.
    pub fn norm(&self, stem: &str) -> Result<Norm> {
        Ok(Norm { weight: self.weight(stem)?, bias: self.get(format!("{stem}.bias"))? })
    }
}

/// A part's weights on a backend with their short names, and the family's view of them.
pub struct PartWeights<B: Ops> {
    pub part: Part,
    names: Vec<String>,
    weights: Vec<B::Weight>,
    view: View,
}

impl<B: Ops> PartWeights<B> {
    /// Weights already on the backend (streamed uploads, synthetic benchmark layers), by short
    /// name; fails naming the first tensor the family's forward needs and the part lacks.
    pub fn new(cfg: &ModelConfig, part: Part, named: Vec<(String, B::Weight)>) -> Result<PartWeights<B>> {
        let (names, weights): (Vec<String>, Vec<B::Weight>) = named.into_iter().unzip();
        let r = Resolver { part, names: &names };
        let view = match (part, cfg.family) {
            (Part::Begin, _) => View::Begin { embed: r.weight(EMBED)? },
            (Part::Layer(_), Family::Falcon) => View::Falcon(falcon::Layer::resolve(cfg, &r)?),
            (Part::Layer(_), Family::Llama | Family::Qwen2) => View::Llama(llama::Layer::resolve(&r)?),
            (Part::End, Family::Falcon) => {
                let n = r.norm(NORM)?;
                View::End(End { norm: WeightBias { weight: n.weight, bias: Some(n.bias) }, head: r.weight(LM_HEAD)? })
            }
            (Part::End, Family::Llama | Family::Qwen2) => View::End(End { norm: WeightBias { weight: r.weight(NORM)?, bias: None }, head: r.weight(LM_HEAD)? }),
        };
        Ok(PartWeights { part, names, weights, view })
    }

    /// The weights with their names, handing them back (a streamed group's release).
    pub fn into_named(self) -> impl Iterator<Item = (String, B::Weight)> {
        self.names.into_iter().zip(self.weights)
    }

    /// A weight of this part (an `Ix` comes only from resolving this part's names).
    pub fn at(&self, ix: Ix) -> &B::Weight {
        &self.weights[ix.0]
    }

    /// A weight and its bias, as `Ops::linear` takes them.
    pub fn linear(&self, wb: WeightBias) -> LinearRef<'_, B::Weight> {
        (self.at(wb.weight), wb.bias.map(|b| self.at(b)))
    }

    pub fn attn(&self, a: Attn) -> AttnRef<'_, B::Weight> {
        AttnRef { qkv: self.linear(a.qkv), out: self.linear(a.out) }
    }

    pub fn embed(&self) -> Result<Ix> {
        match self.view {
            View::Begin { embed } => Ok(embed),
            _ => Err(self.wrong_part("the embeddings")),
        }
    }

    pub fn end(&self) -> Result<End> {
        match self.view {
            View::End(e) => Ok(e),
            _ => Err(self.wrong_part("the LM head")),
        }
    }

    pub(crate) fn view(&self) -> &View {
        &self.view
    }

    pub(crate) fn wrong_part(&self, wanted: &str) -> ModelError {
        ModelError::Unsupported(format!("part {} used as {wanted}", self.part.name()))
    }
}

impl<B: WeightStream> PartWeights<B> {
    /// A part's tensors uploaded to stay on the backend.
    pub fn upload(backend: &B, cfg: &ModelConfig, part: Part, tensors: &[(String, HostTensor)]) -> Result<PartWeights<B>> {
        let named = tensors.iter().map(|(name, t)| Ok((name.clone(), backend.upload_weight(t)?))).collect::<Result<Vec<_>>>()?;
        PartWeights::new(cfg, part, named)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::cpu::CpuBackend;
    use crate::testing::{falcon_config, llama_config, random_part};

    #[test]
    fn a_missing_tensor_fails_the_load_naming_it() {
        let b = CpuBackend::new();
        for (cfg, gone) in [(llama_config(1).unwrap(), "mlp.gate.weight"), (falcon_config(1, false, false, true).unwrap(), "mlp_norm.bias")] {
            let mut tensors = random_part(&cfg, Part::Layer(0), 1);
            assert!(PartWeights::upload(&b, &cfg, Part::Layer(0), &tensors).is_ok());
            tensors.retain(|(n, _)| n != gone);
            let e = PartWeights::upload(&b, &cfg, Part::Layer(0), &tensors).err().map(|e| e.to_string()).unwrap_or_default();
            assert!(e.contains("layer_000") && e.contains(gone), "{e}");
        }
    }
}
