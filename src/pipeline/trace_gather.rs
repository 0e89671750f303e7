//! The end of a traced job: every rank's timeline gathered into one on rank 0.

use super::cluster::Cluster;
use super::PipelineError;
use crate::trace::Trace;

const TAG_TRACE: i32 = 12;

/// Every rank sends its recorder to rank 0, which returns all of them merged (one process
/// track per rank; their clocks share the worker's start barrier). Other ranks return None.
pub fn gather_trace(cluster: &Cluster, mine: Trace) -> Result<Option<Trace>, PipelineError> {
    let (comm, waits) = (&cluster.data, &cluster.waits);
    if cluster.rank != 0 {
        let bytes = serde_json::to_vec(&mine).map_err(|source| PipelineError::Encode { what: "the trace", source })?;
        comm.isend(bytes, 0, TAG_TRACE)?.wait(waits)?;
        return Ok(None);
    }
    let mut all = mine;
    for peer in 1..cluster.size {
        let (_, bytes) = comm.recv_any_len::<u8>(Some(peer), TAG_TRACE, waits)?;
        let t: Trace = serde_json::from_slice(&bytes).map_err(|e| PipelineError::BadMessage { from: peer, msg: format!("trace: {e}") })?;
        all.merge(t);
    }
    Ok(Some(all))
}
