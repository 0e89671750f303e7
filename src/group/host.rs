//! A group's weights in host memory, part by part, as read from the model directory, and the
//! names of its tensors in the flat order a backend pins them in.

use crate::model::Part;
use crate::tensor::HostTensor;
use std::ops::Range;

/// The parts of a layer range: begin goes with layer 0, end with the last layer.
pub fn parts_of(layers: &Range<usize>, n_layers: usize) -> Vec<Part> {
    let mut parts = vec![];
    if layers.start == 0 {
        parts.push(Part::Begin);
    }
    parts.extend(layers.clone().map(Part::Layer));
    if layers.end == n_layers {
        parts.push(Part::End);
    }
    parts
}

/// A group's weights in host memory, part by part.
pub struct HostGroup {
    pub layers: Range<usize>,
    pub parts: Vec<(Part, Vec<(String, HostTensor)>)>,
}

impl HostGroup {
    /// Read every part of `layers` with `read` (a model directory's reader).
    pub fn read<E>(layers: Range<usize>, n_layers: usize, mut read: impl FnMut(Part) -> Result<Vec<(String, HostTensor)>, E>) -> Result<HostGroup, E> {
        let mut parts = vec![];
        for part in parts_of(&layers, n_layers) {
            parts.push((part, read(part)?));
        }
        Ok(HostGroup { layers, parts })
    }

    /// Read the parts of `layers` from a model directory (only those files are opened).
    pub fn from_dir(dir: &crate::format::model_dir::ModelDir, layers: Range<usize>) -> crate::format::Result<HostGroup> {
        let n_layers = dir.config().n_layers;
        HostGroup::read(layers, n_layers, |p| dir.read_part(p))
    }

    pub fn bytes(&self) -> usize {
        self.parts.iter().flat_map(|(_, ts)| ts.iter().map(|(_, t)| t.data.len())).sum()
    }

    /// The tensors in one flat order (what a backend pins), and their names in that order.
    pub fn split(self) -> (GroupTensorNames, Vec<HostTensor>) {
        let mut parts = vec![];
        let mut tensors = vec![];
        for (part, ts) in self.parts {
            let (names, ts): (Vec<String>, Vec<HostTensor>) = ts.into_iter().unzip();
            parts.push((part, names));
            tensors.extend(ts);
        }
        (GroupTensorNames { layers: self.layers, parts }, tensors)
    }
}

/// Names of a group's tensors in their flat (pinned) order, part by part.
#[derive(Clone, Debug, PartialEq)]
pub struct GroupTensorNames {
    pub layers: Range<usize>,
    pub parts: Vec<(Part, Vec<String>)>,
}

impl GroupTensorNames {
    pub fn len(&self) -> usize {
        self.parts.iter().map(|(_, n)| n.len()).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}
