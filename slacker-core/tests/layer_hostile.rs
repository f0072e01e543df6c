//! Hostile layers: every named case is refused with a typed error, writes nothing outside
//! the target directory and changes nothing stored; and fuzz-style property tests over
//! arbitrary bytes and mutated valid tars for both decoders.

mod common;

use std::io::Cursor;
use std::path::Path;

use common::*;
use proptest::prelude::*;
use slacker_backend_mem::MemBackend;
use slacker_core::layer::traditional::{self, TarOptions};
use slacker_core::layer::{Reference, decode_reference_layer, reference};
use slacker_core::{ErrorKind, SnapshotStat};

/// Unpacks `layer` (decompressing as the store does) into `outer/root`, next to a victim
/// file and directory, and checks that nothing but `root` changed.
fn unpack_guarded(
    layer: &[u8],
    options: &TarOptions,
) -> slacker_core::Result<traditional::Unpacked> {
    let outer = tempfile::tempdir().unwrap();
    let root = outer.path().join("root");
    std::fs::create_dir(&root).unwrap();
    std::fs::create_dir(outer.path().join("victim")).unwrap();
    std::fs::write(outer.path().join("victim/file"), b"precious").unwrap();
    std::fs::write(outer.path().join("passwd"), b"root:x:0:0").unwrap();
    let before = outside(outer.path());
    let r = (|| {
        let mut cur = Cursor::new(layer.to_vec());
        let head = traditional::read_prefix(&mut cur, 6)?;
        let stream = traditional::decompress(head, cur)?;
        traditional::unpack(stream, &root, options)
    })();
    assert_eq!(
        outside(outer.path()),
        before,
        "something outside the target changed"
    );
    r
}

fn outside(dir: &Path) -> Vec<(std::path::PathBuf, String)> {
    listing(dir)
        .into_iter()
        .filter(|(p, _)| !p.starts_with("root"))
        .collect()
}

fn refused(layer: Vec<u8>) -> slacker_core::Error {
    refused_with(layer, &TarOptions::default())
}

fn refused_with(layer: Vec<u8>, options: &TarOptions) -> slacker_core::Error {
    let err = unpack_guarded(&layer, options).expect_err("hostile layer accepted");
    assert_eq!(err.kind(), ErrorKind::InvalidInput, "{err}");
    err
}

fn tar_of(entries: &[Vec<u8>]) -> Vec<u8> {
    let mut out: Vec<u8> = entries.concat();
    out.extend(end());
    out
}

fn pax(records: &[(&str, &[u8])]) -> Vec<u8> {
    let mut data = Vec::new();
    for (k, v) in records {
        let body_len = k.len() + v.len() + 3; // " " "=" "\n"
        let mut len = body_len + 1;
        while len.to_string().len() + body_len != len {
            len = len.to_string().len() + body_len;
        }
        data.extend_from_slice(format!("{len} {k}=").as_bytes());
        data.extend_from_slice(v);
        data.push(b'\n');
    }
    raw_entry(b"././@PaxHeader", b'x', &data, b"")
}

#[test]
fn hostile_absolute_path() {
    refused(tar_of(&[raw_entry(b"/etc/passwd", b'0', b"pwned", b"")]));
}

#[test]
fn hostile_dotdot_component() {
    refused(tar_of(&[raw_entry(b"a/../../passwd", b'0', b"pwned", b"")]));
    refused(tar_of(&[raw_entry(b"..", b'5', b"", b"")]));
}

#[test]
fn hostile_gnu_long_name_traversal() {
    let name = format!("{}/../../../passwd", "a/".repeat(60));
    refused(tar_of(&[
        raw_entry(b"././@LongLink", b'L', name.as_bytes(), b""),
        raw_entry(b"x", b'0', b"pwned", b""),
    ]));
}

#[test]
fn hostile_pax_path_traversal() {
    refused(tar_of(&[
        pax(&[("path", b"../passwd")]),
        raw_entry(b"innocent", b'0', b"pwned", b""),
    ]));
}

#[test]
fn hostile_pax_path_with_nul() {
    refused(tar_of(&[
        pax(&[("path", b"a\0/../../passwd")]),
        raw_entry(b"innocent", b'0', b"x", b""),
    ]));
}

#[test]
fn hostile_symlink_escaping_the_tree() {
    refused(tar_of(&[raw_entry(b"a/link", b'2', b"", b"../../victim")]));
}

#[test]
fn hostile_write_through_symlink() {
    // An absolute symlink is fine on its own (resolved in the container's root), but
    // writing through it would land on the host.
    let outer_victim = b"/tmp";
    refused(tar_of(&[
        raw_entry(b"d", b'2', b"", outer_victim),
        raw_entry(b"d/evil", b'0', b"pwned", b""),
    ]));
    refused(tar_of(&[
        raw_entry(b"d", b'2', b"", b"."),
        raw_entry(b"d/d/evil", b'0', b"x", b""),
    ]));
}

#[test]
fn hostile_hardlink_to_absolute_path() {
    refused(tar_of(&[raw_entry(b"x", b'1', b"", b"/etc/passwd")]));
}

#[test]
fn hostile_hardlink_outside_the_tree() {
    refused(tar_of(&[raw_entry(b"x", b'1', b"", b"../passwd")]));
}

#[test]
fn hostile_hardlink_to_missing_target() {
    refused(tar_of(&[raw_entry(b"x", b'1', b"", b"nothing/here")]));
}

#[test]
fn hostile_hardlink_through_symlink() {
    refused(tar_of(&[
        raw_entry(b"s", b'2', b"", b"/etc"),
        raw_entry(b"x", b'1', b"", b"s/passwd"),
    ]));
}

#[test]
fn hostile_hardlink_to_directory() {
    refused(tar_of(&[
        raw_entry(b"d/", b'5', b"", b""),
        raw_entry(b"x", b'1', b"", b"d"),
    ]));
}

#[test]
fn hostile_character_device() {
    refused(tar_of(&[raw_entry(b"dev/mem", b'3', b"", b"")]));
}

#[test]
fn hostile_block_device() {
    refused(tar_of(&[raw_entry(b"dev/sda", b'4', b"", b"")]));
}

#[test]
fn devices_allowed_by_option_are_returned_not_created() {
    let u = unpack_guarded(
        &tar_of(&[raw_entry(b"dev/null", b'3', b"", b"")]),
        &TarOptions::default().with_allow_devices(true),
    )
    .unwrap();
    assert_eq!(u.specials.len(), 1);
}

#[test]
fn hostile_too_many_entries() {
    let entries: Vec<Vec<u8>> = (0..20)
        .map(|i| raw_entry(format!("f{i}").as_bytes(), b'0', b"x", b""))
        .collect();
    refused_with(
        tar_of(&entries),
        &TarOptions::default().with_max_entries(10),
    );
}

#[test]
fn hostile_too_large() {
    let big = vec![0x55u8; 64 * 1024];
    refused_with(
        tar_of(&[raw_entry(b"big", b'0', &big, b"")]),
        &TarOptions::default().with_max_bytes(32 * 1024),
    );
}

#[test]
fn hostile_gzip_bomb_stops_at_the_limit() {
    // 64 MiB of zeros compress to ~64 KiB; the limit stops the reader long before.
    let mut tar = raw_entry(b"zeros", b'0', &[], b"");
    let zeros = vec![0u8; 64 << 20];
    tar.extend_from_slice(&zeros);
    let gz = gzip(&tar);
    assert!(gz.len() < 1 << 20);
    refused_with(gz, &TarOptions::default().with_max_bytes(1 << 20));
}

#[test]
fn hostile_huge_pax_header() {
    let mut h = raw_entry(b"././@PaxHeader", b'x', b"", b"");
    // Claim a 1 TiB extension header without sending it.
    let mut header = tar::Header::from_byte_slice(&h[..512]).clone();
    header.set_size(1 << 40);
    header.set_cksum();
    h[..512].copy_from_slice(header.as_bytes());
    h.extend(vec![0u8; 4096]);
    refused(h);
}

#[test]
fn hostile_huge_gnu_long_name() {
    let name = vec![b'a'; 200 * 1024];
    refused(tar_of(&[
        raw_entry(b"././@LongLink", b'L', &name, b""),
        raw_entry(b"x", b'0', b"", b""),
    ]));
}

#[test]
fn hostile_long_component() {
    let name = vec![b'a'; 300];
    refused(tar_of(&[
        raw_entry(b"././@LongLink", b'L', &name, b""),
        raw_entry(b"x", b'0', b"", b""),
    ]));
}

#[test]
fn hostile_two_long_names() {
    refused(tar_of(&[
        raw_entry(b"././@LongLink", b'L', b"a", b""),
        raw_entry(b"././@LongLink", b'L', b"b", b""),
        raw_entry(b"x", b'0', b"", b""),
    ]));
}

#[test]
fn hostile_dangling_extension_header() {
    refused(tar_of(&[pax(&[("path", b"a")])]));
}

#[test]
fn hostile_pax_size_override() {
    refused(tar_of(&[
        pax(&[("size", b"1")]),
        raw_entry(b"x", b'0', b"", b""),
    ]));
}

#[test]
fn hostile_gnu_sparse() {
    refused(tar_of(&[raw_entry(b"sparse", b'S', b"", b"")]));
    refused(tar_of(&[
        pax(&[("GNU.sparse.map", b"0,1")]),
        raw_entry(b"x", b'0', b"", b""),
    ]));
}

#[test]
fn hostile_unknown_entry_type() {
    refused(tar_of(&[raw_entry(b"label", b'V', b"", b"")]));
}

#[test]
fn hostile_truncated_data() {
    let mut t = raw_entry(b"f", b'0', &[1u8; 5000], b"");
    t.truncate(512 + 1000);
    refused(t);
}

#[test]
fn hostile_truncated_header() {
    let mut t = raw_entry(b"f", b'0', b"", b"");
    t.truncate(300);
    refused(t);
}

#[test]
fn hostile_bad_checksum() {
    let mut t = tar_of(&[raw_entry(b"f", b'0', b"data", b"")]);
    t[0] = b'g';
    refused(t);
}

#[test]
fn hostile_corrupt_gzip() {
    let mut gz = gzip(&tar_of(&[raw_entry(b"f", b'0', &[9u8; 10000], b"")]));
    let n = gz.len();
    gz[n / 2] ^= 0xff;
    gz[n - 5] ^= 0xff; // the CRC too
    refused(gz);
}

#[test]
fn hostile_corrupt_zstd() {
    refused(vec![0x28, 0xb5, 0x2f, 0xfd, 0xff, 0xff, 0xff, 0, 1, 2, 3]);
}

#[test]
fn hostile_whiteout_of_dotdot() {
    refused(tar_of(&[raw_entry(b"a/.wh..", b'0', b"", b"")]));
}

#[test]
fn hostile_whiteout_through_symlink() {
    refused(tar_of(&[
        raw_entry(b"s", b'2', b"", b"/"),
        raw_entry(b"s/victim/.wh.file", b'0', b"", b""),
    ]));
}

#[test]
fn hostile_bzip2_and_xz() {
    refused(b"BZh91AY&SY".to_vec());
    refused(vec![0xfd, b'7', b'z', b'X', b'Z', 0, 0, 0]);
}

#[test]
fn hostile_empty_layer() {
    refused(Vec::new());
}

#[test]
fn whiteouts_and_opaque_dirs_apply_to_lower_entries() {
    let outer = tempfile::tempdir().unwrap();
    let root = outer.path().join("root");
    base_tree(&root, "h");
    std::fs::create_dir_all(root.join("opq/lowerdir")).unwrap();
    std::fs::write(root.join("opq/lowerdir/x"), b"x").unwrap();
    std::fs::write(root.join("opq/lower"), b"l").unwrap();
    let layer = TarBuilder::new()
        .file("opq/lowerdir/y", b"new y")
        .file("opq/.wh..wh..opq", b"")
        .file("opq/mine", b"m")
        .file("dir/.wh.old", b"")
        .file("dir/.wh.sub", b"")
        .file("dir/.wh..wh.plnk", b"")
        .finish();
    let u = traditional::unpack(&layer[..], &root, &TarOptions::default()).unwrap();
    assert_eq!(u.whiteouts, 4);
    let l = listing(&root);
    let has = |p: &str| l.contains_key(Path::new(p));
    assert!(has("opq/lowerdir/y") && has("opq/mine"));
    assert!(!has("opq/lower") && !has("opq/lowerdir/x"));
    assert!(!has("dir/old") && !has("dir/sub") && has("dir/keep"));
    assert!(!l.keys().any(|p| p.to_string_lossy().contains(".wh.")));
}

// ---- store level: a refused layer changes nothing stored ---------------------------

#[tokio::test]
async fn hostile_layers_change_nothing_stored() {
    let b = MemBackend::new();
    let d = tempfile::tempdir().unwrap();
    let s = open_store(b.reopen(), d.path(), "w", None).await.unwrap();
    let v = s.create("base", None).await.unwrap();
    slacker_core::Backend::write_at(&b, &v, 0, b"x")
        .await
        .unwrap();
    let good = s.diff("base").await.unwrap().tar;
    let before = store_state(&s).await;
    let mut two = good.clone();
    two.truncate(1024);
    two.extend(raw_entry(b"extra", b'0', b"x", b""));
    two.extend(end());
    let cases: Vec<(&str, Vec<u8>)> = vec![
        (
            "absolute",
            tar_of(&[raw_entry(b"/etc/passwd", b'0', b"x", b"")]),
        ),
        ("escape", tar_of(&[raw_entry(b"a", b'2', b"", b"../..")])),
        ("reference with a second entry", two),
        ("truncated reference", good[..1536].to_vec()),
        ("empty", Vec::new()),
    ];
    for (name, layer) in cases {
        let err = s
            .apply_diff("l", Some("base"), Cursor::new(layer))
            .await
            .expect_err(name);
        assert_eq!(err.kind(), ErrorKind::InvalidInput, "{name}: {err}");
        assert_eq!(store_state(&s).await, before, "{name}");
    }
}

// ---- reference decoder ------------------------------------------------------------

fn valid_reference() -> Vec<u8> {
    let mut d = slacker_core::BlockBitmap::new();
    d.insert(slacker_core::BlockIndex(3));
    Reference::from_stat(&SnapshotStat::new(
        "mem:s-1".parse().unwrap(),
        1 << 20,
        slacker_core::BlockSize::DEFAULT,
        None,
        d,
        vec![],
    ))
    .encode()
}

fn ref_with_doc(doc: &[u8], name: &[u8], typeflag: u8) -> Vec<u8> {
    let mut t = raw_entry(name, typeflag, doc, b"");
    t.extend(end());
    t
}

#[test]
fn reference_decoder_refuses_hostile_documents() {
    let good = valid_reference();
    let doc = &good[512..512 + good[512..].iter().position(|&b| b == 0).unwrap()];
    Reference::decode(&ref_with_doc(doc, reference::ENTRY_NAME.as_bytes(), b'0')).unwrap();
    let text = String::from_utf8(doc.to_vec()).unwrap();
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("wrong name", ref_with_doc(doc, b"slacker/other.json", b'0')),
        (
            "traversal name",
            ref_with_doc(doc, b"../slacker/reference.json", b'0'),
        ),
        (
            "symlink",
            ref_with_doc(b"", reference::ENTRY_NAME.as_bytes(), b'2'),
        ),
        (
            "hard link",
            ref_with_doc(b"", reference::ENTRY_NAME.as_bytes(), b'1'),
        ),
        (
            "device",
            ref_with_doc(b"", reference::ENTRY_NAME.as_bytes(), b'3'),
        ),
        (
            "directory",
            ref_with_doc(b"", reference::ENTRY_NAME.as_bytes(), b'5'),
        ),
        (
            "pax header",
            ref_with_doc(b"10 path=a\n", reference::ENTRY_NAME.as_bytes(), b'x'),
        ),
        (
            "unknown field",
            ref_with_doc(
                text.replace("}", ",\"x\":1}").as_bytes(),
                reference::ENTRY_NAME.as_bytes(),
                b'0',
            ),
        ),
        (
            "bad snapshot id",
            ref_with_doc(
                text.replace("mem:s-1", "mem:../x").as_bytes(),
                reference::ENTRY_NAME.as_bytes(),
                b'0',
            ),
        ),
        (
            "version 2",
            ref_with_doc(
                text.replace("\"version\":1", "\"version\":2").as_bytes(),
                reference::ENTRY_NAME.as_bytes(),
                b'0',
            ),
        ),
        (
            "not json",
            ref_with_doc(b"{{{{", reference::ENTRY_NAME.as_bytes(), b'0'),
        ),
        (
            "huge document",
            ref_with_doc(
                &vec![b' '; 20 * 1024],
                reference::ENTRY_NAME.as_bytes(),
                b'0',
            ),
        ),
        ("too large", {
            let mut t = good.clone();
            t.extend(vec![0u8; 64 * 1024]);
            t
        }),
        ("truncated", good[..1024].to_vec()),
        ("no end blocks", good[..1024].to_vec()),
        ("trailing garbage", {
            let mut t = good.clone();
            t[1800] = 1;
            t
        }),
        ("second entry", {
            let mut t = good[..1024].to_vec();
            t.extend(raw_entry(b"x", b'0', b"", b""));
            t.extend(end());
            t
        }),
        ("not a tar", b"hello".to_vec()),
    ];
    for (name, bytes) in cases {
        let err = Reference::decode(&bytes).expect_err(name);
        assert_eq!(err.kind(), ErrorKind::InvalidInput, "{name}: {err}");
    }
}

fn mutate(base: &[u8], edits: &[(usize, u8)], cut: Option<usize>) -> Vec<u8> {
    let mut v = base.to_vec();
    for &(pos, byte) in edits {
        if !v.is_empty() {
            let i = pos % v.len();
            v[i] = byte;
        }
    }
    if let Some(c) = cut {
        if !v.is_empty() {
            v.truncate(c % (v.len() + 1));
        }
    }
    v
}

fn valid_traditional() -> Vec<u8> {
    TarBuilder::new()
        .dir("etc")
        .file("etc/hostname", b"h\n")
        .symlink("etc/link", "hostname")
        .hardlink("etc/hard", "etc/hostname")
        .file("dir/.wh.old", b"")
        .file("opq/.wh..wh..opq", b"")
        .raw(&pax(&[("path", b"long/pax/name")]))
        .raw(&raw_entry(b"ignored", b'0', b"pax", b""))
        .finish()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn reference_decoder_never_panics_on_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..4096)) {
        let _ = Reference::decode(&bytes);
        let _ = decode_reference_layer(&bytes);
        let _ = Reference::looks_like(&bytes);
    }

    #[test]
    fn reference_decoder_never_panics_on_mutations(
        edits in proptest::collection::vec((0usize..4096, any::<u8>()), 0..8),
        cut in proptest::option::of(0usize..4096),
    ) {
        let v = mutate(&valid_reference(), &edits, cut);
        if let Err(e) = Reference::decode(&v) {
            prop_assert!(matches!(e.kind(), ErrorKind::InvalidInput));
        }
    }

    #[test]
    fn tar_reader_never_panics_or_escapes_on_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..4096)) {
        let _ = unpack_guarded(&bytes, &TarOptions::default());
    }

    #[test]
    fn tar_reader_never_panics_or_escapes_on_mutations(
        edits in proptest::collection::vec((0usize..8192, any::<u8>()), 1..8),
        cut in proptest::option::of(0usize..8192),
        compress in any::<bool>(),
    ) {
        let v = mutate(&valid_traditional(), &edits, cut);
        let v = if compress { gzip(&v) } else { v };
        if let Err(e) = unpack_guarded(&v, &TarOptions::default()) {
            prop_assert!(matches!(e.kind(), ErrorKind::InvalidInput | ErrorKind::Backend), "{}", e);
        }
    }
}

proptest! {
    // Each accepted layer runs mke2fs: fewer cases.
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    #[test]
    fn store_apply_diff_of_mutated_layers_changes_nothing_on_error(
        edits in proptest::collection::vec((0usize..8192, any::<u8>()), 1..6),
        cut in proptest::option::of(0usize..8192),
        reference_layer in any::<bool>(),
    ) {
        if !e2fsprogs() {
            return Ok(());
        }
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
        rt.block_on(async {
            let b = MemBackend::new();
            let d = tempfile::tempdir().unwrap();
            let s = open_store(b.reopen(), d.path(), "w", None).await.unwrap();
            let v = s.create("base", None).await.unwrap();
            slacker_core::Backend::write_at(&b, &v, 0, b"x").await.unwrap();
            let good = s.diff("base").await.unwrap().tar;
            let base = if reference_layer { good } else { valid_traditional() };
            let layer = mutate(&base, &edits, cut);
            let before = store_state(&s).await;
            if let Err(e) = s.apply_diff("l", None, Cursor::new(layer)).await {
                assert!(
                    matches!(e.kind(), ErrorKind::InvalidInput | ErrorKind::Integrity | ErrorKind::NotFound),
                    "{e}"
                );
                assert_eq!(store_state(&s).await, before);
            }
        });
    }
}
