//! Bad input over the real socket: unknown parent, a key used twice, removing a parent,
//! hostile and truncated reference documents, a reference to a snapshot the storage
//! does not have. Each gets the gRPC status containerd expects, and nothing is
//! half-created: afterwards Walk lists exactly what succeeded and the storage holds
//! exactly the volumes those snapshots own.

mod support;

use support::*;

/// Prepares an extract- key, writes `doc` as the unpacked reference document into the
/// upper directory it hands out, and commits it as `name`.
async fn commit_reference(c: &mut Client, key: &str, name: &str, doc: &[u8]) -> Result<(), Status> {
    let m = prepare(c, key, "").await.unwrap();
    assert_eq!(m[0].r#type, "overlay", "{m:?}");
    let upper = m[0]
        .options
        .iter()
        .find_map(|o| o.strip_prefix("upperdir="))
        .unwrap()
        .to_owned();
    std::fs::create_dir_all(format!("{upper}/slacker")).unwrap();
    std::fs::write(format!("{upper}/slacker/reference.json"), doc).unwrap();
    commit(c, name, key).await
}

#[test]
fn bad_input_gets_typed_statuses_and_leaves_nothing_behind() {
    if let Some(why) = missing(&["mkfs.btrfs", "mkfs.ext4", "debugfs", "fsfreeze"]) {
        skip_or_fail::<()>(why);
        return;
    }
    let Some((_fs, dir, data)) = btrfs_run("4G") else {
        return;
    };
    let cfg = write_config(&dir, &btrfs_toml(&data), "");
    let snap = snapshotter(&cfg);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let mut c = connect(snap.socket.clone()).await;
        // Unknown parent.
        assert_eq!(code(prepare(&mut c, "a", "no-such-parent").await), Code::NotFound);
        // A key used twice.
        prepare(&mut c, "a", "").await.unwrap();
        assert_eq!(code(prepare(&mut c, "a", "").await), Code::AlreadyExists);
        assert_eq!(code(view(&mut c, "a", "").await), Code::AlreadyExists);
        commit(&mut c, "base", "a").await.unwrap();
        prepare(&mut c, "b", "base").await.unwrap();
        assert_eq!(code(commit(&mut c, "base", "b").await), Code::AlreadyExists);
        // Removing a parent.
        assert_eq!(code(remove(&mut c, "base").await), Code::FailedPrecondition);
        // Unknown keys.
        assert_eq!(code(remove(&mut c, "nope").await), Code::NotFound);
        assert_eq!(code(commit(&mut c, "x", "nope").await), Code::NotFound);
        // Hostile, truncated and dangling reference documents.
        let hostile = br#"{"version":1,"scheme":"btrfs","snapshot":"../../etc/passwd","size":4096,"block_size":4096,"digest":"blake3:00"}"#;
        assert_eq!(code(commit_reference(&mut c, "ns/1/extract-1-a", "l1", hostile).await), Code::InvalidArgument);
        let valid = format!(
            r#"{{"version":1,"scheme":"btrfs","snapshot":"btrfs:not-on-this-storage","size":1073741824,"block_size":4096,"digest":"blake3:{}"}}"#,
            "0".repeat(64)
        );
        let truncated = &valid.as_bytes()[..valid.len() / 2];
        assert_eq!(code(commit_reference(&mut c, "ns/1/extract-2-b", "l2", truncated).await), Code::InvalidArgument);
        assert_eq!(code(commit_reference(&mut c, "ns/1/extract-3-c", "l3", valid.as_bytes()).await), Code::NotFound);
        let extra = br#"{"version":2,"scheme":"btrfs","snapshot":"btrfs:x","size":4096,"block_size":4096,"digest":"blake3:00","more":1}"#;
        assert_eq!(code(commit_reference(&mut c, "ns/1/extract-4-d", "l4", extra).await), Code::InvalidArgument);
        // What containerd does after a failed unpack: remove the extract keys.
        for k in ["ns/1/extract-1-a", "ns/1/extract-2-b", "ns/1/extract-3-c", "ns/1/extract-4-d"] {
            remove(&mut c, k).await.unwrap();
        }
        // Nothing half-created: exactly the snapshots that succeeded, exactly their volumes.
        assert_eq!(walk(&mut c).await, vec![("b".to_owned(), 2), ("base".to_owned(), 3)]);
        let vols = btrfs_volumes(&data);
        assert_eq!(vols.len(), 1, "only b's volume: {vols:?}");
        let staged = std::fs::read_dir(dir.join("root/staging")).unwrap().count();
        assert_eq!(staged, 0, "staging directories left behind");
    });
}
