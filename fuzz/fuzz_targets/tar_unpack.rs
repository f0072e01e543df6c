//! The traditional-layer unpacker (after decompression) into a scratch directory, with
//! small limits: never panics, never writes outside the directory.
#![no_main]
use libfuzzer_sys::fuzz_target;
use slacker_core::layer::traditional::{TarOptions, decompress, read_prefix, unpack};

fuzz_target!(|data: &[u8]| {
    let base = tempfile::Builder::new()
        .prefix("slacker-fuzz-")
        .tempdir_in(std::env::temp_dir())
        .unwrap();
    let root = base.path().join("root");
    std::fs::create_dir(&root).unwrap();
    let mut reader = std::io::Cursor::new(data.to_vec());
    let Ok(prefix) = read_prefix(&mut reader, 6) else { return };
    let Ok(tar) = decompress(prefix, reader) else { return };
    let options = TarOptions::default()
        .with_max_entries(64)
        .with_max_bytes(4 << 20);
    let _ = unpack(tar, &root, &options);
    // Nothing escaped: the scratch directory holds only `root`.
    let names: Vec<_> = std::fs::read_dir(base.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names, vec![std::ffi::OsString::from("root")], "a layer wrote outside its root");
});
