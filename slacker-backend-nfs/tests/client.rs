//! Integration tests of the NFSv4.2 client against a real Linux knfsd (the
//! project's test VM, see tests/support and server/README.md).

mod support;

use std::time::{Duration, Instant};

use slacker_backend_nfs::client::{ClientOptions, Error, FileType, Nfs4Status, NfsClient};
use support::{guest_exec, pattern, server, unique_dir};

const MIB: usize = 1 << 20;

async fn client(addr: &str) -> NfsClient {
    NfsClient::connect(addr, ClientOptions::default())
        .await
        .unwrap_or_else(|e| panic!("connect to {addr}: {e}"))
}

macro_rules! need_server {
    () => {
        match server() {
            Some(s) => s,
            None => return,
        }
    };
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn write_read_roundtrip_across_max_write() {
    let srv = need_server!();
    let nfs = client(&srv.addr).await;
    let dir = unique_dir("roundtrip");
    nfs.mkdir_all(&dir).await.unwrap();
    let w = nfs.max_write_size() as usize;
    let r = nfs.max_read_size() as usize;
    assert!(w >= 64 << 10 && r >= 64 << 10, "tiny io sizes {r}/{w}");
    let data = pattern(2 * w + 12_345, 1);
    let path = format!("{dir}/a.bin");
    let f = nfs.create(&path).await.unwrap();
    let t = Instant::now();
    f.write_at(0, &data).await.unwrap();
    let wt = t.elapsed();
    assert_eq!(f.size().await.unwrap(), data.len() as u64);
    let t = Instant::now();
    let back = f.read_at(0, data.len()).await.unwrap();
    let rt = t.elapsed();
    assert!(back == data[..], "read back differs");
    println!(
        "roundtrip {} bytes (max_write {w}, max_read {r}): write {wt:?}, read {rt:?}",
        data.len()
    );
    // Unaligned ranges across the RPC boundaries.
    for (off, len) in [(w - 7, 100), (r - 1, r + 2), (1, 2 * w)] {
        let got = f.read_at(off as u64, len).await.unwrap();
        assert!(got[..] == data[off..off + len], "range {off}+{len}");
    }
    // Overwrite across a boundary, then read past the end (short read).
    let patch = pattern(w + 3, 2);
    f.write_at((w / 2) as u64, &patch).await.unwrap();
    let mut want = data.clone();
    want[w / 2..w / 2 + patch.len()].copy_from_slice(&patch);
    let got = f.read_at(0, want.len() + 5000).await.unwrap();
    assert_eq!(got.len(), want.len(), "short read at EOF");
    assert!(got[..] == want[..]);
    assert!(
        f.read_at(want.len() as u64 + 10, 10)
            .await
            .unwrap()
            .is_empty()
    );
    f.close().await.unwrap();
    // Whole-file helpers.
    nfs.write_file(&format!("{dir}/small"), b"hello nfs")
        .await
        .unwrap();
    assert_eq!(
        &nfs.read_file(&format!("{dir}/small")).await.unwrap()[..],
        b"hello nfs"
    );
    let m = nfs.metadata(&path).await.unwrap();
    assert!(m.is_file());
    assert_eq!(m.size, want.len() as u64);
    assert!(m.fileid != 0 && m.space_used > 0, "{m:?}");
    nfs.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clone_is_copy_on_write() {
    let srv = need_server!();
    let nfs = client(&srv.addr).await;
    let dir = unique_dir("clone");
    nfs.mkdir_all(&dir).await.unwrap();
    let data = pattern(4 * MIB, 3);
    let a = nfs.create(&format!("{dir}/a")).await.unwrap();
    a.write_at(0, &data).await.unwrap();
    let b = nfs.create(&format!("{dir}/b")).await.unwrap();
    let t = Instant::now();
    nfs.clone_range(&a, &b, 0, 0, 0).await.unwrap();
    println!("CLONE of 4 MiB: {:?}", t.elapsed());
    assert_eq!(b.size().await.unwrap(), data.len() as u64);
    assert!(b.read_at(0, data.len()).await.unwrap() == data[..]);
    // Write into the clone: the original must not change.
    let patch = vec![0xAB; 4096];
    b.write_at(MIB as u64, &patch).await.unwrap();
    let got_b = b.read_at(0, data.len()).await.unwrap();
    assert!(got_b[MIB..MIB + 4096] == patch[..]);
    assert!(got_b[..MIB] == data[..MIB] && got_b[MIB + 4096..] == data[MIB + 4096..]);
    assert!(
        a.read_at(0, data.len()).await.unwrap() == data[..],
        "original changed"
    );
    // A partial clone at an offset (block aligned).
    let c = nfs.create(&format!("{dir}/c")).await.unwrap();
    nfs.clone_range(&a, &c, 2 * MIB as u64, 4096, MIB as u64)
        .await
        .unwrap();
    let got_c = c.read_at(4096, MIB).await.unwrap();
    assert!(got_c[..] == data[2 * MIB..3 * MIB]);
    assert!(c.read_at(0, 4096).await.unwrap().iter().all(|&x| x == 0));
    for f in [a, b, c] {
        f.close().await.unwrap();
    }
    // Path-based whole-file clone.
    nfs.clone_file(&format!("{dir}/a"), &format!("{dir}/d"))
        .await
        .unwrap();
    assert_eq!(
        nfs.metadata(&format!("{dir}/d")).await.unwrap().size,
        data.len() as u64
    );
    nfs.close().await.unwrap();
}

/// Parses `btrfs filesystem du --raw` output: path suffix -> (total, exclusive).
fn btrfs_du(out: &str, name: &str) -> (u64, u64) {
    for l in out.lines() {
        let f: Vec<&str> = l.split_whitespace().collect();
        if f.len() >= 4 && f[3].ends_with(name) {
            return (f[0].parse().unwrap(), f[1].parse().unwrap());
        }
    }
    panic!("{name} not in btrfs du output:\n{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clone_shares_extents_on_the_server() {
    let srv = need_server!();
    let dir = unique_dir("extents");
    let probe = guest_exec(srv, "echo ok");
    match probe {
        Ok(o) if o.contains("ok") => {}
        other if std::env::var("CI").is_ok_and(|v| v == "true") => {
            panic!("guest shell not available under CI: {other:?}")
        }
        other => {
            println!("SKIPPED: guest shell not available: {other:?}");
            return;
        }
    }
    let nfs = client(&srv.addr).await;
    nfs.mkdir_all(&dir).await.unwrap();
    let data = pattern(3 * MIB, 4);
    nfs.write_file(&format!("{dir}/orig"), &data).await.unwrap();
    nfs.clone_file(&format!("{dir}/orig"), &format!("{dir}/copy"))
        .await
        .unwrap();
    let cmd = format!("sync; btrfs filesystem du --raw /export/{dir}/orig /export/{dir}/copy");
    let out = guest_exec(srv, &cmd).unwrap();
    println!("{out}");
    let (total_o, excl_o) = btrfs_du(&out, "/orig");
    let (total_c, excl_c) = btrfs_du(&out, "/copy");
    assert_eq!(total_o, data.len() as u64);
    assert_eq!(total_c, data.len() as u64);
    assert_eq!((excl_o, excl_c), (0, 0), "clone does not share extents");
    // A 4 KiB write makes 4 KiB of the copy exclusive, the rest stays shared.
    let f = nfs.open(&format!("{dir}/copy")).await.unwrap();
    f.write_at(MIB as u64, &[1u8; 4096]).await.unwrap();
    f.close().await.unwrap();
    let out = guest_exec(srv, &cmd).unwrap();
    println!("{out}");
    let (_, excl_c) = btrfs_du(&out, "/copy");
    assert!(
        excl_c > 0 && excl_c <= 128 << 10,
        "exclusive after COW write: {excl_c}"
    );
    nfs.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_side_copy_loops_over_short_counts() {
    let srv = need_server!();
    let nfs = client(&srv.addr).await;
    let dir = unique_dir("copy");
    nfs.mkdir_all(&dir).await.unwrap();
    // A sparse 10 MiB source (more than knfsd's 4 MiB per COPY) with data at
    // both ends, so the copy needs several calls but little data moves.
    let head = pattern(256 << 10, 5);
    let tail = pattern(100_000, 6);
    let src = nfs.create(&format!("{dir}/src")).await.unwrap();
    src.set_size(10 * MIB as u64).await.unwrap();
    src.write_at(0, &head).await.unwrap();
    let tail_off = 10 * MIB - tail.len();
    src.write_at(tail_off as u64, &tail).await.unwrap();
    let dst = nfs.create(&format!("{dir}/dst")).await.unwrap();
    let t = Instant::now();
    let n = nfs.copy_range(&src, &dst, 0, 0, 0).await.unwrap();
    println!("COPY of a 10 MiB sparse file: {:?}", t.elapsed());
    assert_eq!(n, 10 * MIB as u64);
    assert_eq!(dst.size().await.unwrap(), 10 * MIB as u64);
    assert!(dst.read_at(0, head.len()).await.unwrap() == head[..]);
    assert!(dst.read_at(tail_off as u64, tail.len()).await.unwrap() == tail[..]);
    // A bounded copy to an offset.
    let n = nfs
        .copy_range(&src, &dst, 0, 5 * MIB as u64, 1000)
        .await
        .unwrap();
    assert_eq!(n, 1000);
    assert!(dst.read_at(5 * MIB as u64, 1000).await.unwrap() == head[..1000]);
    src.close().await.unwrap();
    dst.close().await.unwrap();
    nfs.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn seek_allocate_deallocate_set_size() {
    let srv = need_server!();
    let nfs = client(&srv.addr).await;
    let dir = unique_dir("sparse");
    nfs.mkdir_all(&dir).await.unwrap();
    let f = nfs.create(&format!("{dir}/s")).await.unwrap();
    let data = pattern(MIB, 7);
    f.write_at(0, &data).await.unwrap();
    f.set_size(4 * MIB as u64).await.unwrap(); // sparse extension
    assert_eq!(f.size().await.unwrap(), 4 * MIB as u64);
    assert_eq!(f.seek_data(0).await.unwrap(), Some(0));
    assert_eq!(f.seek_hole(0).await.unwrap(), Some(MIB as u64));
    assert_eq!(f.seek_data(MIB as u64).await.unwrap(), None);
    assert_eq!(f.seek_hole(8 * MIB as u64).await.unwrap(), None);
    // Punch a hole at the start.
    f.deallocate(0, 512 << 10).await.unwrap();
    assert_eq!(f.seek_data(0).await.unwrap(), Some(512 << 10));
    assert!(
        f.read_at(0, 512 << 10)
            .await
            .unwrap()
            .iter()
            .all(|&b| b == 0)
    );
    assert!(f.read_at(512 << 10, 512 << 10).await.unwrap() == data[512 << 10..]);
    assert_eq!(f.size().await.unwrap(), 4 * MIB as u64);
    // ALLOCATE turns the tail hole into (zeroed) allocated space.
    let before = f.metadata().await.unwrap().space_used;
    f.allocate(2 * MIB as u64, MIB as u64).await.unwrap();
    let after = f.metadata().await.unwrap().space_used;
    assert!(
        after >= before + MIB as u64 / 2,
        "space_used {before} -> {after}"
    );
    // Truncate.
    f.set_size(1000).await.unwrap();
    assert_eq!(f.size().await.unwrap(), 1000);
    assert_eq!(f.read_at(0, 5000).await.unwrap().len(), 1000);
    f.close().await.unwrap();
    nfs.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rename_remove_readdir_and_not_found() {
    let srv = need_server!();
    let nfs = client(&srv.addr).await;
    let dir = unique_dir("names");
    nfs.mkdir_all(&format!("{dir}/sub/deeper")).await.unwrap();
    nfs.mkdir_all(&format!("{dir}/sub")).await.unwrap(); // idempotent
    let mut want = Vec::new();
    for i in 0..40 {
        let name = format!("file-{i:02}-{}", "x".repeat(40));
        nfs.write_file(&format!("{dir}/{name}"), &[i as u8; 10])
            .await
            .unwrap();
        want.push(name);
    }
    want.push("sub".into());
    want.sort();
    let entries = nfs.read_dir(&dir).await.unwrap();
    let mut names: Vec<String> = entries.iter().map(|e| e.name.clone()).collect();
    names.sort();
    assert_eq!(names, want);
    let sub = entries.iter().find(|e| e.name == "sub").unwrap();
    assert_eq!(sub.file_type, FileType::Directory);
    assert!(
        entries
            .iter()
            .filter(|e| e.name != "sub")
            .all(|e| e.size == 10 && e.file_type == FileType::Regular)
    );
    assert!(
        nfs.read_dir(&format!("{dir}/sub/deeper"))
            .await
            .unwrap()
            .is_empty()
    );

    // RENAME within and across directories.
    let a = format!("{dir}/{}", want[0]);
    let b = format!("{dir}/renamed");
    let c = format!("{dir}/sub/deeper/moved");
    nfs.rename(&a, &b).await.unwrap();
    assert!(!nfs.exists(&a).await.unwrap());
    assert!(nfs.exists(&b).await.unwrap());
    nfs.rename(&b, &c).await.unwrap();
    assert_eq!(&nfs.read_file(&c).await.unwrap()[..], &[0u8; 10]);

    // REMOVE; removing a non-empty directory fails with NOTEMPTY.
    let e = nfs.remove(&format!("{dir}/sub")).await.unwrap_err();
    assert_eq!(e.status(), Some(Nfs4Status::NotEmpty), "{e}");
    nfs.remove(&c).await.unwrap();
    nfs.remove(&format!("{dir}/sub/deeper")).await.unwrap();
    assert!(!nfs.exists(&format!("{dir}/sub/deeper")).await.unwrap());

    // Typed not-found errors that name the operation.
    let e = nfs
        .lookup(&format!("{dir}/no/such/file"))
        .await
        .unwrap_err();
    assert!(
        matches!(
            e,
            Error::Nfs {
                op: "LOOKUP",
                status: Nfs4Status::NoEnt
            }
        ),
        "{e:?}"
    );
    assert!(e.is_not_found());
    let e = nfs.open(&format!("{dir}/missing")).await.unwrap_err();
    assert!(
        matches!(
            e,
            Error::Nfs {
                op: "OPEN",
                status: Nfs4Status::NoEnt
            }
        ),
        "{e:?}"
    );
    let e = nfs.remove(&format!("{dir}/missing")).await.unwrap_err();
    assert!(
        matches!(
            e,
            Error::Nfs {
                op: "REMOVE",
                status: Nfs4Status::NoEnt
            }
        ),
        "{e:?}"
    );
    // GUARDED create of an existing file.
    let e = nfs
        .create_new(&format!("{dir}/{}", want[1]))
        .await
        .unwrap_err();
    assert!(
        matches!(
            e,
            Error::Nfs {
                op: "OPEN",
                status: Nfs4Status::Exist
            }
        ),
        "{e:?}"
    );
    assert!(matches!(
        nfs.lookup("a/../b").await,
        Err(Error::InvalidPath(_))
    ));

    // Paths deeper than one COMPOUND allows are resolved in several trips.
    let deep: Vec<String> = (0..45).map(|i| format!("d{i}")).collect();
    let deep = format!("{dir}/{}", deep.join("/"));
    nfs.mkdir_all(&deep).await.unwrap();
    nfs.write_file(&format!("{deep}/f"), b"deep").await.unwrap();
    nfs.rename(&format!("{deep}/f"), &format!("{dir}/from-deep"))
        .await
        .unwrap();
    assert_eq!(
        &nfs.read_file(&format!("{dir}/from-deep")).await.unwrap()[..],
        b"deep"
    );
    nfs.rename(&format!("{dir}/from-deep"), &format!("{deep}/back"))
        .await
        .unwrap();
    assert!(
        nfs.metadata(&format!("{deep}/back"))
            .await
            .unwrap()
            .is_file()
    );
    nfs.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_concurrent_requests_share_the_slot_table() {
    let srv = need_server!();
    let nfs = client(&srv.addr).await;
    let dir = unique_dir("concurrent");
    nfs.mkdir_all(&dir).await.unwrap();
    let mut tasks = Vec::new();
    for i in 0..24u64 {
        let nfs = nfs.clone();
        let dir = dir.clone();
        tasks.push(tokio::spawn(async move {
            let data = pattern(20_000 + i as usize * 1000, i + 100);
            let p = format!("{dir}/f{i}");
            nfs.write_file(&p, &data).await.unwrap();
            for _ in 0..3 {
                assert!(nfs.read_file(&p).await.unwrap() == data[..]);
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    assert_eq!(nfs.read_dir(&dir).await.unwrap().len(), 24);
    nfs.close().await.unwrap();
    // After close: typed error.
    assert!(matches!(nfs.exists(&dir).await, Err(Error::Closed)));
}

/// A TCP proxy whose connections can be cut, to test reconnection.
struct Proxy {
    addr: String,
    cut: tokio::sync::watch::Sender<u64>,
}

async fn proxy(target: String) -> Proxy {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap().to_string();
    let (cut, rx) = tokio::sync::watch::channel(0u64);
    tokio::spawn(async move {
        loop {
            let Ok((mut inbound, _)) = l.accept().await else {
                return;
            };
            let target = target.clone();
            let mut rx = rx.clone();
            rx.mark_unchanged();
            tokio::spawn(async move {
                let Ok(mut outbound) = tokio::net::TcpStream::connect(&target).await else {
                    return;
                };
                tokio::select! {
                    _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => {}
                    _ = rx.changed() => {}
                }
            });
        }
    });
    Proxy { addr, cut }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconnects_after_the_connection_drops() {
    let srv = need_server!();
    let p = proxy(srv.addr.clone()).await;
    let nfs = client(&p.addr).await;
    let dir = unique_dir("reconnect");
    nfs.mkdir_all(&dir).await.unwrap();
    let f = nfs.create(&format!("{dir}/f")).await.unwrap();
    f.write_at(0, b"before").await.unwrap();
    for round in 1..=3u64 {
        p.cut.send(round).unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
        // Same session on a new connection: the open file keeps working.
        f.write_at(6 * round, b"after!").await.unwrap();
        nfs.mkdir(&format!("{dir}/d{round}")).await.unwrap();
    }
    assert_eq!(
        &f.read_at(0, 24).await.unwrap()[..],
        b"beforeafter!after!after!"
    );
    f.close().await.unwrap();
    nfs.close().await.unwrap();

    // With reconnection disabled, a cut connection is a typed I/O error.
    let opts = ClientOptions {
        reconnect_timeout: Duration::ZERO,
        ..Default::default()
    };
    let nfs = NfsClient::connect(&p.addr, opts).await.unwrap();
    p.cut.send(99).unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    let e = nfs.exists(&dir).await.unwrap_err();
    assert!(matches!(e, Error::Io { op: "LOOKUP", .. }), "{e:?}");
}

#[tokio::test]
async fn unreachable_server_fails_within_the_timeout() {
    // No VM needed. A closed port on 127.0.0.1: refused at once.
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let closed = l.local_addr().unwrap().to_string();
    drop(l);
    let opts = ClientOptions {
        connect_timeout: Duration::from_secs(2),
        ..Default::default()
    };
    let t = Instant::now();
    let e = NfsClient::connect(&closed, opts.clone()).await.unwrap_err();
    assert!(
        t.elapsed() < Duration::from_secs(3),
        "took {:?}",
        t.elapsed()
    );
    assert!(matches!(e, Error::Io { op: "CONNECT", .. }), "{e:?}");
    println!("closed port: {e}");

    // A listener that accepts but never answers (like qemu's NAT forward
    // with no server behind it): a typed timeout.
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let silent = l.local_addr().unwrap().to_string();
    let _srv = tokio::spawn(async move {
        let _conn = l.accept().await;
        tokio::time::sleep(Duration::from_secs(60)).await;
    });
    let t = Instant::now();
    let e = NfsClient::connect(&silent, opts).await.unwrap_err();
    assert!(
        t.elapsed() < Duration::from_secs(3),
        "took {:?}",
        t.elapsed()
    );
    assert!(matches!(e, Error::Timeout { op: "CONNECT", .. }), "{e:?}");
    println!("silent server: {e}");
}
