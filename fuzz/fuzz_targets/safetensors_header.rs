//! A safetensors part as `StFile::open` parses it: any bytes give an index or an error
//! naming the file, and every indexed range can be sliced.
#![no_main]

use falcon_batch::format::st::parse_bytes;
use libfuzzer_sys::fuzz_target;
use std::path::Path;

fuzz_target!(|data: &[u8]| {
    if let Ok(entries) = parse_bytes(data, Path::new("fuzz.safetensors")) {
        for (name, e) in &entries {
            assert!(data.get(e.start..e.end).is_some(), "tensor {name}: range {}..{} outside {} bytes", e.start, e.end, data.len());
        }
    }
});
