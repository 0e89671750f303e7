//! The ranks' introduction at start: each tells the others its host, its identity (model,
//! options, wire dtype) and its capabilities, and every rank refuses to start when one
//! rank's identity differs from rank 0's, naming it and the options that differ.

use super::{this_host, Cluster};
use crate::pipeline::transport::Pending;
use crate::pipeline::PipelineError;
use crate::schedule::RankCaps;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use sha2::{Digest, Sha256};

const TAG_HELLO: i32 = 2;

/// What every rank must agree on before any work starts.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Identity {
    /// The manifest's model id (or any string naming the weights).
    pub model_id: String,
    /// The options that shape the schedule and the results (schedule, job options, trace),
    /// as JSON. Compared as values: the order their keys were written in does not matter.
    pub options: Value,
    /// How hidden states travel (f32, bf16): both ends of a hop must read the same bytes.
    pub wire_dtype: String,
}

impl Identity {
    /// A fingerprint of `options` for messages: the first 16 hex digits of SHA-256 over their
    /// canonical JSON (keys sorted, no spaces), the same on every rank and in every build.
    pub fn options_hash(&self) -> String {
        let mut text = String::new();
        canonical_json(&self.options, &mut text);
        hex::encode(Sha256::digest(text.as_bytes()))[..16].to_string()
    }
}

/// `v` as JSON with every object's keys sorted, whatever map type serde_json was built with.
fn canonical_json(v: &Value, out: &mut String) {
    match v {
        Value::Object(map) => {
            let mut keys: Vec<&String> = map.keys().collect();
            keys.sort();
            out.push('{');
            for (i, k) in keys.into_iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                out.push_str(&Value::String(k.clone()).to_string());
                out.push(':');
                canonical_json(&map[k.as_str()], out);
            }
            out.push('}');
        }
        Value::Array(items) => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                canonical_json(item, out);
            }
            out.push(']');
        }
        leaf => out.push_str(&leaf.to_string()),
    }
}

/// The dotted paths where `a` and `b` differ, with both values: `job.norm ("mean" vs "sum")`.
fn differences(a: &Value, b: &Value, path: &str, out: &mut Vec<String>) {
    match (a, b) {
        (Value::Object(x), Value::Object(y)) => {
            let mut keys: Vec<&String> = x.keys().chain(y.keys()).collect();
            keys.sort();
            keys.dedup();
            for k in keys {
                let sub = if path.is_empty() { k.clone() } else { format!("{path}.{k}") };
                differences(x.get(k.as_str()).unwrap_or(&Value::Null), y.get(k.as_str()).unwrap_or(&Value::Null), &sub, out);
            }
        }
        _ if a != b => out.push(format!("{} ({a} vs {b})", if path.is_empty() { "options" } else { path })),
        _ => {}
    }
}

/// One rank's introduction, exchanged at start.
#[derive(Clone, Debug, Serialize, Deserialize)]
struct Hello {
    rank: usize,
    host: String,
    identity: Identity,
    device: String,
    device_bytes: u64,
    host_bytes: Option<u64>,
    speed: f64,
}

impl Hello {
    /// "rank R (host) sees model `m` with options H and --wire-dtype w"
    fn sees(&self) -> String {
        let id = &self.identity;
        format!("rank {} ({}) sees model `{}` with options {} and --wire-dtype {}", self.rank, self.host, id.model_id, id.options_hash(), id.wire_dtype)
    }
}

impl Cluster {
    /// Exchange identities and capabilities with every rank. Every rank gets the same
    /// answer, so when one rank differs every rank refuses, naming it.
    pub fn exchange(&self, identity: &Identity, caps: &RankCaps) -> Result<Vec<RankCaps>, PipelineError> {
        let host = this_host();
        let mine = Hello {
            rank: self.rank,
            host,
            identity: identity.clone(),
            device: caps.device.clone(),
            device_bytes: caps.device_bytes,
            host_bytes: caps.host_bytes,
            speed: caps.speed,
        };
        let bytes = serde_json::to_vec(&mine).map_err(|source| PipelineError::Encode { what: "the rank's introduction", source })?;
        let mut sends: Vec<Pending<u8>> = vec![];
        for peer in (0..self.size).filter(|&p| p != self.rank) {
            sends.push(self.data.isend(bytes.clone(), peer, TAG_HELLO)?);
        }
        let mut hellos: Vec<Option<Hello>> = vec![None; self.size];
        hellos[self.rank] = Some(mine);
        for peer in (0..self.size).filter(|&p| p != self.rank) {
            let (_, b) = self.data.recv_any_len::<u8>(Some(peer), TAG_HELLO, &self.waits)?;
            let h: Hello = serde_json::from_slice(&b).map_err(|e| PipelineError::BadMessage { from: peer, msg: format!("introduction: {e}") })?;
            hellos[peer] = Some(h);
        }
        for s in sends {
            s.wait(&self.waits)?;
        }
        let hellos: Vec<Hello> = hellos.into_iter().flatten().collect();
        let _ = self.hosts.set(hellos.iter().map(|h| h.host.clone()).collect());
        let reference = &hellos[0];
        for h in &hellos[1..] {
            if h.identity != reference.identity {
                let mut differ = vec![];
                differences(&h.identity.options, &reference.identity.options, "", &mut differ);
                let options = if differ.is_empty() { String::new() } else { format!("; options that differ (rank {} vs rank 0): {}", h.rank, differ.join(", ")) };
                return Err(PipelineError::Mismatch { rank: h.rank, msg: format!("{}, {}{options}", h.sees(), reference.sees()) });
            }
        }
        Ok(hellos
            .into_iter()
            .map(|h| RankCaps { device_bytes: h.device_bytes, host_bytes: h.host_bytes, speed: h.speed, device: h.device })
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn identity(options: Value) -> Identity {
        Identity { model_id: "m".into(), options, wire_dtype: "f32".into() }
    }

    #[test]
    fn the_options_hash_ignores_key_order_and_sees_every_value() {
        let a = identity(json!({"job": {"norm": "sum", "batch_tokens": 64}, "trace": false}));
        let mut job = serde_json::Map::new();
        job.insert("batch_tokens".into(), json!(64));
        job.insert("norm".into(), json!("sum"));
        let b = identity(json!({"trace": false, "job": Value::Object(job)}));
        assert_eq!(a, b);
        assert_eq!(a.options_hash(), b.options_hash());
        assert_eq!(a.options_hash().len(), 16);
        let c = identity(json!({"job": {"norm": "mean", "batch_tokens": 64}, "trace": false}));
        assert_ne!(a.options_hash(), c.options_hash());
        // Pinned: a change here changes what every rank prints for the same options.
        let mut text = String::new();
        canonical_json(&a.options, &mut text);
        assert_eq!(text, r#"{"job":{"batch_tokens":64,"norm":"sum"},"trace":false}"#);
    }

    #[test]
    fn differences_name_the_options_that_differ() {
        let mut out = vec![];
        differences(&json!({"job": {"norm": "mean", "x": 1}, "trace": true}), &json!({"job": {"norm": "sum", "x": 1}}), "", &mut out);
        assert_eq!(out, vec![r#"job.norm ("mean" vs "sum")"#.to_string(), "trace (true vs null)".to_string()]);
    }
}
