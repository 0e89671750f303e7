//! Timelines in Chrome's trace-event JSON ({"traceEvents": [...]}, open in Perfetto or
//! chrome://tracing). One process per rank, one thread per track. Spans are kept in memory
//! and written once at the end, so recording costs a push and nothing when disabled; a
//! multi-rank job sends every rank's recorder to rank 0, which merges them into one file.

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use std::path::Path;

/// The lanes of a rank's timeline.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Track {
    Compute,
    Copy,
    Send,
    Recv,
    Wait,
}

impl Track {
    pub const ALL: [Track; 5] = [Track::Compute, Track::Copy, Track::Send, Track::Recv, Track::Wait];

    pub fn name(self) -> &'static str {
        match self {
            Track::Compute => "compute",
            Track::Copy => "weight copy",
            Track::Send => "send",
            Track::Recv => "receive",
            Track::Wait => "wait",
        }
    }

    fn tid(self) -> usize {
        self as usize
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
struct Span {
    pid: usize,
    track: Track,
    name: String,
    start_s: f64,
    end_s: f64,
    args: Vec<(String, f64)>,
}

/// A recorder of spans. Times are seconds from the start of the run.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Trace {
    enabled: bool,
    rank: usize,
    spans: Vec<Span>,
    ranks_seen: Vec<usize>,
}

impl Trace {
    /// A recorder that drops everything.
    pub fn disabled() -> Trace {
        Trace::default()
    }

    /// A recorder for `rank`'s own spans (the pipeline: one per process).
    pub fn for_rank(rank: usize) -> Trace {
        Trace { enabled: true, rank, spans: vec![], ranks_seen: vec![rank] }
    }

    /// Callers that build names with format! can skip that work when this is false.
    pub fn is_enabled(&self) -> bool {
        self.enabled
    }

    pub fn len(&self) -> usize {
        self.spans.len()
    }

    pub fn is_empty(&self) -> bool {
        self.spans.is_empty()
    }

    /// Record a span of this recorder's rank.
    pub fn span(&mut self, track: Track, name: &str, start_s: f64, end_s: f64, args: &[(&'static str, f64)]) {
        let rank = self.rank;
        self.span_on(rank, track, name, start_s, end_s, args);
    }

    /// Record a span of any rank (the simulator keeps all ranks in one recorder).
    pub fn span_on(&mut self, rank: usize, track: Track, name: &str, start_s: f64, end_s: f64, args: &[(&'static str, f64)]) {
        if !self.enabled {
            return;
        }
        if !self.ranks_seen.contains(&rank) {
            self.ranks_seen.push(rank);
        }
        self.spans.push(Span { pid: rank, track, name: name.to_string(), start_s, end_s: end_s.max(start_s), args: args.iter().map(|(k, v)| (k.to_string(), *v)).collect() });
    }

    /// Take another rank's spans (gathered to one rank before writing).
    pub fn merge(&mut self, other: Trace) {
        for r in other.ranks_seen {
            if !self.ranks_seen.contains(&r) {
                self.ranks_seen.push(r);
            }
        }
        self.spans.extend(other.spans);
    }

    pub fn to_json(&self) -> Value {
        let mut ranks = self.ranks_seen.clone();
        ranks.sort_unstable();
        let mut events = vec![];
        for &r in &ranks {
            events.push(json!({"name": "process_name", "ph": "M", "pid": r, "tid": 0, "args": {"name": format!("rank {r}")}}));
            for t in Track::ALL {
                events.push(json!({"name": "thread_name", "ph": "M", "pid": r, "tid": t.tid(), "args": {"name": t.name()}}));
            }
        }
        for s in &self.spans {
            let args: serde_json::Map<String, Value> = s.args.iter().map(|(k, v)| (k.clone(), json!(v))).collect();
            events.push(json!({
                "name": s.name,
                "cat": s.track.name(),
                "ph": "X",
                "pid": s.pid,
                "tid": s.track.tid(),
                "ts": s.start_s * 1e6,
                "dur": (s.end_s - s.start_s) * 1e6,
                "args": args,
            }));
        }
        json!({"traceEvents": events, "displayTimeUnit": "ms"})
    }

    pub fn write(&self, path: &Path) -> std::io::Result<()> {
        let text = serde_json::to_string(&self.to_json()).map_err(std::io::Error::other)?;
        std::fs::write(path, text)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn disabled_records_nothing() {
        let mut t = Trace::disabled();
        t.span(Track::Compute, "x", 0.0, 1.0, &[]);
        assert!(t.is_empty());
    }

    #[test]
    fn json_has_complete_events_and_metadata() {
        let mut t = Trace::for_rank(1);
        t.span(Track::Compute, "g1 mb0", 0.5, 0.75, &[("tokens", 1516.0)]);
        let mut other = Trace::for_rank(0);
        other.span(Track::Copy, "load g0", 0.0, 0.25, &[]);
        t.merge(other);
        let text = serde_json::to_string(&t.to_json()).unwrap();
        let v: Value = serde_json::from_str(&text).unwrap();
        let ev = v["traceEvents"].as_array().unwrap();
        let x: Vec<&Value> = ev.iter().filter(|e| e["ph"] == "X").collect();
        assert_eq!(x.len(), 2);
        let c = x.iter().find(|e| e["name"] == "g1 mb0").unwrap();
        assert_eq!(c["pid"], 1);
        assert_eq!(c["tid"], Track::Compute.tid());
        assert_eq!(c["ts"].as_f64(), Some(500000.0));
        assert_eq!(c["dur"].as_f64(), Some(250000.0));
        assert_eq!(c["args"]["tokens"].as_f64(), Some(1516.0));
        let names: Vec<&Value> = ev.iter().filter(|e| e["name"] == "process_name").map(|e| &e["args"]["name"]).collect();
        assert_eq!(names, vec!["rank 0", "rank 1"]);
        assert_eq!(ev.iter().filter(|e| e["name"] == "thread_name").count(), 10);
    }
}
