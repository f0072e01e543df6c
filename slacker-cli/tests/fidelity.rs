//! Fidelity on real trees: images of the HelloBench corpus (debootstrap minbase +
//! Debian packages, `hellobench/images.json`), each pushed to a real registry as a
//! standard image of two layers (the minbase tree, then the image's own files) with a
//! config whose Cmd is the image's readiness command, converted by `slacker convert`
//! onto a loop-mounted btrfs; the tree in the converted volume must match the source
//! tree entry by entry (`slacker_testkit::tree::Manifest`: type, mode with set-id and
//! sticky bits, owner, size, content hash, every xattr, link target, rdev, hard-link
//! groups, mtime to the nanosecond), and `slacker run` of the converted image must reach
//! the image's readiness rule.
//!
//! Which images: `SLACKER_FIDELITY=full` runs the whole corpus (`SLACKER_FIDELITY=redis,nginx`
//! names some) (building it takes
//! minutes: `slacker-hellobench corpus --corpus full` caches it under
//! `$SLACKER_CACHE/hellobench`); under `CI=true` (or `SLACKER_FIDELITY=ci`) the minbase
//! tree plus `python3`; otherwise it runs on what is cached and prints `SKIPPED` if nothing
//! is.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use slacker_config::BackendConfig;
use slacker_core::layer::archive::TreeTar;
use slacker_core::layer::ext4::Mounted;
use slacker_core::persist::{DirStore, MetaStore};
use slacker_core::{Backend, LayerStore, LayerStoreOptions};
use slacker_hellobench::corpus::{Store, cache_root};
use slacker_hellobench::spec::{Corpus, Readiness, Spec};
use slacker_oci::spec::{ConfigBuilder, ImageConfigurationBuilder};
use slacker_oci::{ClientOptions, LocalRegistry, PushLayer, RegistryClient, default_config};
use slacker_testkit::skip_or_fail;
use slacker_testkit::tree::{Manifest, diff_layer};

struct Btrfs {
    mnt: PathBuf,
    _dir: tempfile::TempDir,
}

impl Btrfs {
    fn new(under: &Path) -> Option<Self> {
        let dir = tempfile::tempdir_in(under).ok()?;
        let img = dir.path().join("btrfs.img");
        let mnt = dir.path().join("mnt");
        std::fs::create_dir(&mnt).ok()?;
        let run = |c: &mut Command| c.status().is_ok_and(|s| s.success());
        let ok = run(Command::new("truncate").args(["-s", "16G"]).arg(&img))
            && run(Command::new("mkfs.btrfs").args(["-q", "-f"]).arg(&img))
            && run(Command::new("mount")
                .args(["-o", "loop"])
                .arg(&img)
                .arg(&mnt));
        ok.then_some(Self { mnt, _dir: dir })
    }
}

impl Drop for Btrfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.mnt).status();
    }
}

fn b64(data: &[u8]) -> String {
    const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for c in data.chunks(3) {
        let n = (u32::from(c[0]) << 16)
            | (u32::from(*c.get(1).unwrap_or(&0)) << 8)
            | u32::from(*c.get(2).unwrap_or(&0));
        for i in 0..4 {
            if i <= c.len() {
                out.push(T[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

fn sq(s: &str) -> String {
    format!("'{}'", s.replace('\'', "'\\''"))
}

/// A bash script that performs the readiness rule inside the container and prints
/// `SLACKER-READY` once it is met.
fn readiness_script(r: &Readiness, port: u16) -> String {
    let p = |s: &str| s.replace("{port}", &port.to_string());
    let mut s = String::from("set -u\n");
    let files = match r {
        Readiness::Command { files, .. } | Readiness::Serve { files, .. } => files,
    };
    for f in files {
        s.push_str(&format!(
            "echo {} | base64 -d > {}\n",
            b64(p(&f.content).as_bytes()),
            sq(&f.path)
        ));
    }
    match r {
        Readiness::Command { argv, expect, .. } => {
            let cmd: Vec<String> = argv.iter().map(|a| sq(&p(a))).collect();
            s.push_str(&format!(
                "out=$({} 2>&1) && case \"$out\" in *{}*) echo SLACKER-READY;; *) echo \"$out\";; esac\n",
                cmd.join(" "),
                sq(expect)
            ));
        }
        Readiness::Serve {
            argv, send, expect, ..
        } => {
            let cmd: Vec<String> = argv.iter().map(|a| sq(&p(a))).collect();
            s.push_str(&format!(
                "{} >/tmp/server.log 2>&1 &\npid=$!\n",
                cmd.join(" ")
            ));
            s.push_str(&format!(
                "for i in $(seq 1 300); do\n  reply=$(timeout 2 bash -c 'exec 3<>/dev/tcp/127.0.0.1/{port}; printf %s \"$1\" >&3; timeout 1 cat <&3' _ {} 2>/dev/null || true)\n  case \"$reply\" in *{}*) echo SLACKER-READY; kill $pid; wait $pid 2>/dev/null; exit 0;; esac\n  sleep 0.1\ndone\ncat /tmp/server.log; kill $pid\n",
                sq(&p(send)),
                sq(expect)
            ));
        }
    }
    s
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

#[test]
fn corpus_images_round_trip_through_convert_and_reach_readiness() {
    let mode = std::env::var("SLACKER_FIDELITY").unwrap_or_default();
    let ci = std::env::var("CI").is_ok_and(|v| v == "true" || v == "1");
    let spec = Spec::builtin();
    let all = spec.select(Corpus::Full, None).unwrap();
    let store = Store::new(&cache_root());
    let wanted: Vec<_> = match mode.as_str() {
        "full" => all.clone(),
        m if m.contains(',') || all.iter().any(|i| i.name == m) => {
            let names: Vec<&str> = m.split(',').collect();
            all.iter()
                .filter(|i| names.contains(&i.name.as_str()))
                .cloned()
                .collect()
        }
        _ if ci || mode == "ci" => all
            .iter()
            .filter(|i| i.name == "python3")
            .cloned()
            .collect(),
        _ => {
            // Whatever is cached (debootstrap trees only).
            let cached = store.cached(&all);
            all.iter()
                .zip(cached)
                .filter(|(_, c)| {
                    c.as_ref().is_some_and(|c| {
                        c.record.source.is_some() && store.dir().join("base").is_dir()
                    })
                })
                .map(|(s, _)| s.clone())
                .collect()
        }
    };
    if wanted.is_empty() {
        eprintln!(
            "SKIPPED: no HelloBench corpus tree is cached under {}; run \
             `slacker-hellobench corpus --corpus full` or set SLACKER_FIDELITY=ci|full",
            store.dir().display()
        );
        return;
    }
    if !rustix::process::geteuid().is_root() {
        skip_or_fail::<()>("the fidelity test needs root (loop mounts)");
        return;
    }
    let built = match store.ensure(&wanted, true) {
        Ok(r) => r,
        Err(e) => {
            skip_or_fail::<()>(format!("cannot build the corpus (debootstrap): {e}"));
            return;
        }
    };
    let base = store.dir().join("base");
    let reg = match LocalRegistry::start() {
        Ok(r) => r,
        Err(e) => {
            skip_or_fail::<()>(format!("no docker-registry: {e}"));
            return;
        }
    };
    let work = tempfile::tempdir_in(cache_root()).unwrap();
    let Some(btrfs) = Btrfs::new(work.path()) else {
        skip_or_fail::<()>("cannot make a loop-mounted btrfs");
        return;
    };
    let data = btrfs.mnt.join("slacker");
    std::fs::create_dir(&data).unwrap();
    let state = work.path().join("state");
    let config = work.path().join("config.toml");
    std::fs::write(
        &config,
        format!(
            "[backend]\nkind = \"btrfs\"\npath = \"{}\"\n\n[cli]\nstate = \"{}\"\n",
            data.display(),
            state.display()
        ),
    )
    .unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let client = RegistryClient::new(ClientOptions::plain_http());
    let mut t = TreeTar::new(Vec::new());
    t.append_tree(&base, &[]).unwrap();
    let l1 = PushLayer::tar(t.finish().unwrap());
    let want_base = Manifest::of(&base).unwrap();
    let mut summary = Vec::new();
    for img in &built.images {
        let name = &img.spec.name;
        let t0 = std::time::Instant::now();
        let l2 = diff_layer(&base, &img.root).unwrap();
        let t_layer = t0.elapsed().as_secs_f64();
        let port = free_port();
        let script = readiness_script(&img.spec.readiness, port);
        let d = default_config();
        let cfg = ImageConfigurationBuilder::default()
            .architecture(d.architecture().clone())
            .os(d.os().clone())
            .config(
                ConfigBuilder::default()
                    .cmd(vec!["/bin/bash".to_owned(), "-c".to_owned(), script])
                    .env(vec![format!(
                        "PATH={}",
                        slacker_hellobench::corpus::CHROOT_PATH
                    )])
                    .build()
                    .unwrap(),
            )
            .build()
            .unwrap();
        let src = format!("{}/std/{name}:v1", reg.addr());
        let dst = format!("{}/slacker/{name}:v1", reg.addr());
        rt.block_on(client.push_layers(
            &src,
            vec![l1.clone(), PushLayer::tar_gzip(&l2, 1)],
            Some(&cfg),
        ))
        .unwrap();
        let t_src = t0.elapsed().as_secs_f64();
        let out = Command::new(env!("CARGO_BIN_EXE_slacker"))
            .arg("--config")
            .arg(&config)
            .args(["--json", "convert", "--plain-http", &src, &dst])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "convert {name}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let t_convert = t0.elapsed().as_secs_f64();
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        let top = v["pull"]["top_layer"].as_str().unwrap().to_owned();
        let bottom = v["pull"]["layers"][0]["id"].as_str().unwrap().to_owned();
        // The trees in the volumes (read through the library, as the CLI left them).
        let (got_base, got) = rt.block_on(async {
            let backend = BackendConfig::btrfs(&data).open().await.unwrap();
            let meta: Arc<dyn MetaStore> = Arc::new(DirStore::open(state.join("layers")).unwrap());
            let s = LayerStore::open(backend, meta, LayerStoreOptions::new("cli"))
                .await
                .unwrap();
            let mut out = Vec::new();
            for (i, layer) in [&bottom, &top].into_iter().enumerate() {
                let c = format!("fid-{name}-{i}");
                s.create(&c, Some(layer)).await.unwrap();
                let vol = s.get(&c).await.unwrap();
                let path = s.backend().local_path(&vol).await.unwrap();
                let mnt = work.path().join(&c);
                std::fs::create_dir(&mnt).unwrap();
                let m = Mounted::mount(&path, &mnt).unwrap();
                out.push(Manifest::of(m.root()).unwrap());
                m.unmount().unwrap();
                s.put(&c).await.unwrap();
                s.remove(&c).await.unwrap();
            }
            (out.remove(0), out.remove(0))
        });
        want_base.assert_same(&got_base);
        let want = Manifest::of(&img.root).unwrap();
        want.assert_same(&got);
        let t_compare = t0.elapsed().as_secs_f64();
        // slacker run of the converted image reaches its readiness rule.
        let run = Command::new(env!("CARGO_BIN_EXE_slacker"))
            .arg("--config")
            .arg(&config)
            .args(["run", &dst])
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&run.stdout);
        assert!(
            stdout.contains("SLACKER-READY"),
            "{name} did not reach readiness: {stdout}{}",
            String::from_utf8_lossy(&run.stderr)
        );
        let t_run = t0.elapsed().as_secs_f64();
        summary.push(format!(
            "{name}: {} entries identical, ready, {t_run:.1} s (diff layer {t_layer:.1}, \
             push source {:.1}, convert {:.1} [pull {:.1}, push {:.1}], compare {:.1}, run {:.1})",
            want.entries.len(),
            t_src - t_layer,
            t_convert - t_src,
            v["pull"]["seconds"].as_f64().unwrap_or(f64::NAN),
            v["push"]["seconds"].as_f64().unwrap_or(f64::NAN),
            t_compare - t_convert,
            t_run - t_compare,
        ));
        eprintln!("{}", summary.last().unwrap());
    }
    eprintln!("fidelity:\n  {}", summary.join("\n  "));
}
