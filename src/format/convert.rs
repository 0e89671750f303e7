//! See format/mod.rs.
