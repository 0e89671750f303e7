//! A group: consecutive layers that run together on one rank, with begin (the embeddings)
//! when it holds layer 0 and end (final norm, LM head) when it holds the last layer
//! (docs/DESIGN.md, "Schedule and planner"). The schedule plans groups (`schedule::Group`);
//! their weights live in host memory as a HostGroup and on a backend as a DeviceGroup, which
//! runs the forward.
//!
//! Files: host.rs (HostGroup, the names of its tensors in pinned order), device.rs
//! (DeviceGroup, the forward pass through consecutive groups).

mod device;
mod host;

pub use device::{score_keeping, score_through, DeviceGroup};
pub use host::{parts_of, GroupTensorNames, HostGroup};
