//! The diverged-bitmap decoder (bytes from metadata documents and the wire): never
//! panics; what decodes round-trips.
#![no_main]
use libfuzzer_sys::fuzz_target;
use slacker_core::BlockBitmap;

fuzz_target!(|data: &[u8]| {
    if let Ok(b) = BlockBitmap::from_bytes(data) {
        let again = BlockBitmap::from_bytes(&b.to_bytes()).expect("re-encoded bitmap decodes");
        assert_eq!(again, b);
    }
});
