//! The reference-layer document decoder: never panics; what decodes validates and
//! re-encodes to something that decodes to the same reference.
#![no_main]
use libfuzzer_sys::fuzz_target;
use slacker_core::layer::Reference;

fuzz_target!(|data: &[u8]| {
    let _ = Reference::looks_like(data);
    if let Ok(r) = Reference::decode(data) {
        let again = Reference::decode(&r.encode()).expect("a decoded reference re-encodes");
        assert_eq!(again.encode(), r.encode());
    }
});
