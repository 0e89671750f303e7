//! manifest.json as `ModelDir::open` reads it: any bytes give a checked manifest or an
//! error naming the file and the field.
#![no_main]

use falcon_batch::format::manifest::Manifest;
use libfuzzer_sys::fuzz_target;
use std::path::Path;

fuzz_target!(|data: &[u8]| {
    if let Ok(m) = Manifest::parse(data, Path::new("fuzz/manifest.json")) {
        let _ = m.total_bytes();
    }
});
