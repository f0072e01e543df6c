//! The layer sniffer as `apply_diff` runs it (compression detection, gzip/zstd frames,
//! the tar around a reference document): never panics, typed errors only.
#![no_main]
use libfuzzer_sys::fuzz_target;
use slacker_core::layer::decode_reference_layer;
use slacker_core::layer::traditional::detect_compression;

fuzz_target!(|data: &[u8]| {
    let _ = detect_compression(data);
    let _ = decode_reference_layer(data);
});
