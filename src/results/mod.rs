//! HDF5 results (in progress).
