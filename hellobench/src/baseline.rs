//! The traditional path, measured on this machine: what Docker + AUFS did in the paper.
//!
//! - **push**: `tar` the image tree (one flattened layer) and gzip -6 it (flate2, in memory),
//!   sha256 it, upload layer + config + manifest to the registry (monolithic PUT).
//! - **pull**: download manifest + config + layer (digest-verified) with a fresh client, then
//!   gunzip + untar into the worker's image directory (on the host's filesystem).
//! - **run**: overlayfs with the unpacked image as `lowerdir` and `upperdir`/`workdir` on a
//!   tmpfs, i.e. on a *different* filesystem from the lower one, so a write to an image file
//!   pays a full copy-up as AUFS did (on one btrfs, overlayfs would reflink instead;
//!   COMPONENTS.md §4); then `/proc` + `/dev`, `chroot`, readiness.
//! - **stop**: stop the server, unmount `/dev`, `/proc`, then the overlay.

use std::collections::HashMap;
use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use oci_client::client::{ClientConfig, ClientProtocol, Config, ImageLayer};
use oci_client::manifest::{
    IMAGE_CONFIG_MEDIA_TYPE, IMAGE_LAYER_GZIP_MEDIA_TYPE, OCI_IMAGE_MEDIA_TYPE, OciImageManifest,
};
use oci_client::secrets::RegistryAuth;
use oci_client::{Client, Reference};

use crate::container::{self, Running};
use crate::corpus::BuiltImage;
use crate::error::{Context, Error, Result};
use crate::path::{Path, Step};
use crate::sys::{self, Mounts};
use crate::tarball;

/// Per-image state between phases.
#[derive(Default)]
struct ImageState {
    reference: Option<Reference>,
    pulled_root: Option<PathBuf>,
    image_bytes: u64,
    overlay: Option<Mounts>,
    running: Option<Running>,
    container_dir: Option<PathBuf>,
    /// Clients for this repetition's push and pull, built untimed in `prepare`.
    push_client: Option<Client>,
    pull_client: Option<Client>,
    /// Clients `push` and `pull` used, dropped untimed by `clean` (see `crate::path::Path`).
    spent_clients: Vec<Client>,
}

/// The traditional tar + gzip + overlayfs path.
pub struct Traditional {
    registry: String,
    work: PathBuf,
    upper_fs: PathBuf,
    // Declared after everything that may be mounted on it, so it is unmounted last.
    state: HashMap<String, ImageState>,
    _upper_mount: Mounts,
    timeout: Duration,
    layer_stats: HashMap<String, tarball::TarStats>,
    counter: u64,
    run_tag: String,
}

fn client() -> Client {
    Client::new(ClientConfig {
        protocol: ClientProtocol::Http,
        use_monolithic_push: true,
        connect_timeout: Some(Duration::from_secs(10)),
        read_timeout: Some(Duration::from_secs(120)),
        ..Default::default()
    })
}

impl Traditional {
    /// A path pushing to the registry at `registry` (`host:port`), keeping pulled images under
    /// `work/worker` (the host's filesystem) and container upper layers on a tmpfs mounted at
    /// `work/upper` (`run_containers == false` skips that mount, for runs without root).
    pub fn new(
        registry: &str,
        work: &std::path::Path,
        timeout: Duration,
        run_containers: bool,
    ) -> Result<Self> {
        let upper_fs = work.join("upper");
        for d in [
            work.join("worker"),
            work.join("containers"),
            upper_fs.clone(),
        ] {
            std::fs::create_dir_all(&d).with_context(|| format!("creating {}", d.display()))?;
        }
        let mut upper_mount = Mounts::new();
        if run_containers {
            upper_mount.tmpfs(&upper_fs, 4096)?;
            let (a, b) = (
                std::fs::metadata(work.join("worker"))?.dev(),
                std::fs::metadata(&upper_fs)?.dev(),
            );
            if a == b {
                crate::bail!("overlay upper and lower ended up on the same filesystem");
            }
        }
        let (_, stamp) = sys::now_utc();
        let run_tag = stamp.replace([':', '-'], "").to_lowercase();
        Ok(Self {
            registry: registry.to_owned(),
            work: work.to_path_buf(),
            upper_fs,
            state: HashMap::new(),
            _upper_mount: upper_mount,
            timeout,
            layer_stats: HashMap::new(),
            counter: 0,
            run_tag,
        })
    }

    /// Layer sizes seen by the pushes so far (for the dedup analysis, to avoid a second gzip).
    pub fn layer_stats(&self) -> &HashMap<String, tarball::TarStats> {
        &self.layer_stats
    }

    fn st(&mut self, image: &BuiltImage) -> &mut ImageState {
        self.state.entry(image.spec.name.clone()).or_default()
    }
}

/// Run blocking work (compression, unpacking, mounts, child processes) off the async threads.
async fn blocking<T: Send + 'static>(f: impl FnOnce() -> Result<T> + Send + 'static) -> Result<T> {
    tokio::task::spawn_blocking(f).await.map_err(Error::from)?
}

#[async_trait]
impl Path for Traditional {
    fn name(&self) -> &str {
        "baseline"
    }

    async fn prepare(&mut self, image: &BuiltImage) -> Result<Step> {
        // Fresh clients, built untimed (see `Path::prepare`).
        let st = self.st(image);
        st.push_client = Some(client());
        st.pull_client = Some(client());
        Ok(Step::default())
    }

    async fn push(&mut self, image: &BuiltImage) -> Result<Step> {
        self.counter += 1;
        let reference: Reference = format!(
            "{}/hellobench/{}:{}-{}",
            self.registry, image.spec.name, self.run_tag, self.counter
        )
        .parse()?;
        let root = image.root.clone();
        let t = Instant::now();
        let (gz, stats) = blocking(move || tarball::pack_gz(&root))
            .await
            .context("tar + gzip")?;
        if stats.skipped_unreadable > 0 {
            crate::progress!(
                "{}: {} root-only files left out of the layer (not root): numbers are not comparable",
                image.spec.name,
                stats.skipped_unreadable
            );
        }
        let t_pack = t.elapsed().as_secs_f64();
        let config_json = serde_json::to_vec(&serde_json::json!({
            "architecture": "amd64",
            "os": "linux",
            "config": { "Env": [format!("PATH={}", crate::corpus::CHROOT_PATH)] },
            "rootfs": { "type": "layers", "diff_ids": [] },
        }))?;
        let t = Instant::now();
        let gz_len = gz.len() as u64;
        let layer = ImageLayer::new(gz, IMAGE_LAYER_GZIP_MEDIA_TYPE.to_string(), None);
        let config = Config::new(config_json, IMAGE_CONFIG_MEDIA_TYPE.to_string(), None);
        let layers = [layer];
        // sha256 of the layer happens here, as in `docker push`.
        let (mut manifest, layers) = blocking(move || {
            let m = OciImageManifest::build(&layers, &config, None);
            Ok((m, (layers, config)))
        })
        .await?;
        manifest.media_type = Some(OCI_IMAGE_MEDIA_TYPE.to_string());
        let t_digest = t.elapsed().as_secs_f64();
        let (layers, config) = layers;
        let config_len = config.data.len() as u64;
        let manifest_len = serde_json::to_vec(&manifest)?.len() as u64;
        let digest = manifest.layers[0].digest.clone();
        let push_client = self
            .st(image)
            .push_client
            .take()
            .ok_or_else(|| Error::msg("push before prepare"))?;
        let t = Instant::now();
        push_client
            .push(
                &reference,
                &layers,
                config,
                &RegistryAuth::Anonymous,
                Some(manifest),
            )
            .await
            .with_context(|| format!("pushing {reference}"))?;
        let t_up = t.elapsed().as_secs_f64();
        drop(layers);
        let st = self.st(image);
        st.spent_clients.push(push_client);
        st.reference = Some(reference);
        self.layer_stats.insert(image.spec.name.clone(), stats);
        Ok(Step {
            network_bytes: gz_len + config_len + manifest_len,
            layer_bytes: Some(gz_len),
            read_bytes: None,
            parts: vec![
                ("tar+gzip".into(), t_pack),
                ("sha256".into(), t_digest),
                ("upload".into(), t_up),
            ],
            notes: vec![
                format!(
                    "layer {digest}: {} entries, tar {} B, gzip -6 {} B",
                    stats.entries, stats.tar_bytes, stats.gz_bytes
                ),
                format!(
                    "skipped {} device nodes/fifos/sockets, {} unreadable files",
                    stats.skipped_special, stats.skipped_unreadable
                ),
            ],
            ..Step::default()
        })
    }

    async fn pull(&mut self, image: &BuiltImage) -> Result<Step> {
        let reference = self
            .st(image)
            .reference
            .clone()
            .ok_or_else(|| Error::msg("pull before push"))?;
        let dst = self.work.join("worker").join(&image.spec.name);
        sys::remove_tree(&dst)?;
        // A fresh client (built in `prepare`, never used): a new worker has no connection or
        // token to reuse.
        let pull_client = self
            .st(image)
            .pull_client
            .take()
            .ok_or_else(|| Error::msg("pull before prepare"))?;
        let t = Instant::now();
        let data = pull_client
            .pull(
                &reference,
                &RegistryAuth::Anonymous,
                vec![IMAGE_LAYER_GZIP_MEDIA_TYPE],
            )
            .await
            .with_context(|| format!("pulling {reference}"))?;
        let t_down = t.elapsed().as_secs_f64();
        self.st(image).spent_clients.push(pull_client);
        let manifest_len = data
            .manifest
            .as_ref()
            .map_or(0, |m| serde_json::to_vec(m).map_or(0, |v| v.len() as u64));
        let mut net = manifest_len + data.config.data.len() as u64;
        let mut layer_bytes = 0;
        let layers: Vec<_> = data
            .layers
            .into_iter()
            .map(|l| {
                layer_bytes += l.data.len() as u64;
                l.data
            })
            .collect();
        net += layer_bytes;
        let t = Instant::now();
        let d = dst.clone();
        let stats = blocking(move || {
            let mut total = tarball::TarStats::default();
            for l in layers {
                let s = tarball::unpack_gz(&l, &d)?;
                total.entries += s.entries;
                total.tar_bytes += s.tar_bytes;
                total.gz_bytes += s.gz_bytes;
            }
            Ok(total)
        })
        .await
        .context("gunzip + untar")?;
        let t_unpack = t.elapsed().as_secs_f64();
        let st = self.st(image);
        st.pulled_root = Some(dst);
        st.image_bytes = image.record.stats.file_bytes;
        Ok(Step {
            network_bytes: net,
            layer_bytes: Some(layer_bytes),
            read_bytes: None,
            parts: vec![
                ("download".into(), t_down),
                ("gunzip+untar".into(), t_unpack),
            ],
            notes: vec![format!(
                "unpacked {} entries, {} tar bytes",
                stats.entries, stats.tar_bytes
            )],
            ..Step::default()
        })
    }

    async fn run(&mut self, image: &BuiltImage) -> Result<Step> {
        self.counter += 1;
        let name = image.spec.name.clone();
        let lower = self
            .st(image)
            .pulled_root
            .clone()
            .ok_or_else(|| Error::msg("run before pull"))?;
        let cdir = self.upper_fs.join(format!("{name}-{}", self.counter));
        let merged = self
            .work
            .join("containers")
            .join(format!("{name}-{}", self.counter));
        let log = self.work.join(format!("{name}-{}.log", self.counter));
        self.st(image).container_dir = Some(merged.clone());
        let readiness = image.spec.readiness.clone();
        let timeout = self.timeout;
        let t = Instant::now();
        // Mounts and the container start block; the overlay guard comes back so `stop` can
        // unmount in order. If anything fails, the guards unmount on drop.
        let (overlay, running, t_mount) = blocking(move || {
            let (upper, work) = (cdir.join("upper"), cdir.join("work"));
            for d in [&upper, &work, &merged] {
                std::fs::create_dir_all(d)?;
            }
            let t = Instant::now();
            let mut overlay = Mounts::new();
            overlay.overlay(&lower, &upper, &work, &merged)?;
            let t_mount = t.elapsed().as_secs_f64();
            let running = container::start_and_wait(&merged, &readiness, timeout, &log)?;
            Ok((overlay, running, t_mount))
        })
        .await
        .with_context(|| format!("running {name}"))?;
        let total = t.elapsed().as_secs_f64();
        let answer = running.answer.clone();
        let st = self.st(image);
        st.overlay = Some(overlay);
        st.running = Some(running);
        Ok(Step {
            network_bytes: 0,
            read_bytes: Some(st.image_bytes),
            parts: vec![
                ("overlay mount".into(), t_mount),
                ("start+ready".into(), total - t_mount),
            ],
            notes: vec![format!("ready: {answer}")],
            ..Step::default()
        })
    }

    async fn stop(&mut self, image: &BuiltImage) -> Result<Step> {
        let st = self.st(image);
        let running = st.running.take();
        let overlay = st.overlay.take();
        blocking(move || {
            let r = running.map_or(Ok(()), Running::stop);
            if let Some(mut o) = overlay {
                o.unmount_all()?;
            }
            r
        })
        .await?;
        Ok(Step::default())
    }

    async fn clean(&mut self, image: &BuiltImage) -> Result<()> {
        let st = self.state.remove(&image.spec.name).unwrap_or_default();
        let ImageState {
            pulled_root,
            running,
            overlay,
            container_dir,
            ..
        } = st;
        let upper = self.upper_fs.clone();
        let name = image.spec.name.clone();
        blocking(move || {
            drop(running);
            drop(overlay);
            if let Some(c) = container_dir {
                sys::remove_tree(&c)?;
            }
            for e in std::fs::read_dir(&upper)?.flatten() {
                if e.file_name()
                    .to_string_lossy()
                    .starts_with(&format!("{name}-"))
                {
                    sys::remove_tree(&e.path())?;
                }
            }
            if let Some(p) = pulled_root {
                sys::remove_tree(&p)?;
            }
            Ok(())
        })
        .await
    }
}
