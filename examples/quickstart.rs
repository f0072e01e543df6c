//! A tour of the slacker model on the mem backend: write a volume, snapshot it, clone the
//! snapshot, write the clone, and show what diverged and what is shared.
//!
//! `cargo run --release -p slacker-examples --example quickstart [-- --json]`

use slacker_backend_mem::MemBackend;
use slacker_core::{Backend, BackendExt, VolumeId, VolumeOptions};
use slacker_examples::{human_bytes, print_table};

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), slacker_core::Error> {
    let json = std::env::args().any(|a| a == "--json");
    let backend = MemBackend::new();

    // An image: a 1 GiB sparse volume with 8 MiB of "files" written into it.
    let base = VolumeId::new("image-base")?;
    backend
        .create_volume(&base, &VolumeOptions::new(1 << 30))
        .await?;
    let files: Vec<u8> = (0..8u32 << 20).map(|i| (i % 251) as u8).collect();
    backend.write_at(&base, 0, &files).await?;
    backend
        .write_at(&base, 512 << 20, b"/etc/hostname: base")
        .await?;

    // Push = snapshot: a few dozen bytes name the whole image.
    let snap = backend.snapshot(&base).await?;

    // Two containers from the image: clones, O(blocks written) and sharing every block.
    let (web, db) = (VolumeId::new("web-1")?, VolumeId::new("db-1")?);
    backend.clone_snapshot(&snap, &web).await?;
    backend.clone_snapshot(&snap, &db).await?;
    backend
        .write_at(&web, 512 << 20, b"/etc/hostname: web-1")
        .await?;
    backend.write_at(&db, 100_000, &vec![7u8; 3 * 4096]).await?;

    assert_eq!(
        &backend.read_at(&web, 512 << 20, 20).await?[..],
        b"/etc/hostname: web-1"
    );
    assert_eq!(
        &backend.read_snapshot_at(&snap, 512 << 20, 19).await?[..],
        b"/etc/hostname: base"
    );
    assert!(
        backend.read_at(&db, 2 << 20, 1 << 20).await?
            == backend.read_snapshot_at(&snap, 2 << 20, 1 << 20).await?,
        "an unwritten region of a clone must read as the snapshot"
    );

    let mut rows = Vec::new();
    let mut report = Vec::new();
    for v in [&base, &web, &db] {
        let st = backend.stat_volume(v).await?;
        let runs: Vec<String> = st
            .diverged
            .runs()
            .take(4)
            .map(|r| format!("{}..{}", r.start, r.end))
            .collect();
        rows.push(vec![
            v.to_string(),
            human_bytes(st.size),
            st.origin.as_ref().map_or("-".into(), |s| s.to_string()),
            format!("{} blocks [{}]", st.diverged.len(), runs.join(", ")),
            human_bytes(st.usage.exclusive_bytes.unwrap_or(0)),
            human_bytes(st.usage.shared_bytes.unwrap_or(0)),
        ]);
        report.push(serde_json::json!({
            "volume": v.as_str(), "size": st.size, "origin": st.origin.as_ref().map(|s| s.to_string()),
            "diverged_blocks": st.diverged.len(),
            "exclusive_bytes": st.usage.exclusive_bytes, "shared_bytes": st.usage.shared_bytes,
        }));
    }
    if json {
        println!(
            "{}",
            serde_json::json!({ "snapshot": snap.to_string(), "volumes": report })
        );
        return Ok(());
    }
    println!(
        "snapshot taken: {snap} ({} bytes to name 1 GiB)\n",
        snap.as_str().len()
    );
    print_table(
        &[
            "volume",
            "size",
            "origin",
            "diverged",
            "exclusive",
            "shared",
        ],
        &rows,
    );
    println!(
        "\nThe clones read as the snapshot except where they wrote; the snapshot still reads \
         as the base did ({} digest {}).",
        snap,
        &backend.snapshot_digest(&snap).await?.to_hex()[..16]
    );
    Ok(())
}
