//! Rank 0's word, before any rank reads a weight, on whether the job needs the model at
//! all: a score run whose results file already holds every document ends on every rank
//! without reading a part (for Falcon-180B, reading and hashing the parts takes minutes).

use super::Cluster;
use crate::pipeline::PipelineError;

const TAG_GO: i32 = 3;

impl Cluster {
    /// Rank 0 passes `launch` (its decision); every rank returns rank 0's decision.
    pub fn agree_to_launch(&self, launch: bool) -> Result<bool, PipelineError> {
        if self.size == 1 {
            return Ok(launch);
        }
        if self.rank == 0 {
            let mut sends = vec![];
            for peer in 1..self.size {
                sends.push(self.data.isend(vec![u8::from(launch)], peer, TAG_GO)?);
            }
            for s in sends {
                s.wait(&self.waits)?;
            }
            Ok(launch)
        } else {
            let (_, word) = self.data.recv_any_len::<u8>(Some(0), TAG_GO, &self.waits)?;
            match word.as_slice() {
                [w] => Ok(*w != 0),
                other => Err(PipelineError::BadMessage { from: 0, msg: format!("launch decision: expected 1 byte, found {}", other.len()) }),
            }
        }
    }
}
