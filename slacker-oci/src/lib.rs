//! Push and pull slacker images through an OCI distribution registry.
//!
//! ```text
//!  LayerStore::diff ─▶ reference tar (2 KiB, application/vnd.slacker.reference.v1.tar)
//!        │                      + config + manifest ──push──▶ registry
//!        │ plain export (optional): tar+gzip of the ext4 tree ──┘ (same tag, OCI index)
//!  registry ──pull: manifest, config, reference──▶ LayerStore::apply_diff (lazy: no data)
//! ```
//!
//! A slacker image is an ordinary OCI image manifest whose layers are either
//! [reference layers](slacker_core::layer::reference) (media type
//! [`REFERENCE_MEDIA_TYPE`]) or traditional layers (`application/vnd.oci.image.layer.v1.tar`,
//! `+gzip`, `+zstd`), in order from the bottom. Pulling applies each layer with
//! [`LayerStore::apply_diff`] under its OCI chain id (so a layer pulled before is reused
//! without downloading it), which records reference layers lazily and unpacks traditional
//! ones: mixed images pull.
//!
//! **Plain-OCI export.** With [`PushOptions::plain_export`], a push also uploads an
//! ordinary OCI image of the same content (one tar+gzip layer of the ext4 volume's file
//! tree) and tags an OCI image index that lists both manifests, plain first:
//!
//! | index entry | `platform` | annotation [`KIND_ANNOTATION`] | `artifactType` |
//! |---|---|---|---|
//! | plain image | linux/amd64 | `plain` | – |
//! | slacker image | linux/amd64 | `reference` | [`REFERENCE_ARTIFACT_TYPE`] |
//!
//! How a consumer picks: slacker ([`RegistryClient::pull_image`]) takes the entry
//! annotated `reference` (or with that `artifactType`), and falls back to the plain entry
//! when the storage of the reference is not wanted. Docker, containerd and other OCI
//! clients select by platform and take the **first** match, the plain image, whose
//! layers they understand; they never see the reference layer.
//!
//! Blobs the registry already has (`HEAD` → 200) are not uploaded again; reports count
//! the bytes that actually moved.

#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod local;
pub mod referrers;

use std::collections::BTreeMap;
use std::io::Write;
use std::path::Path;

use oci_client::client::{ClientConfig, ClientProtocol};
use oci_client::manifest::{
    IMAGE_CONFIG_MEDIA_TYPE, IMAGE_DOCKER_LAYER_GZIP_MEDIA_TYPE, IMAGE_DOCKER_LAYER_TAR_MEDIA_TYPE,
    IMAGE_LAYER_GZIP_MEDIA_TYPE, IMAGE_LAYER_MEDIA_TYPE, IMAGE_MANIFEST_LIST_MEDIA_TYPE,
    IMAGE_MANIFEST_MEDIA_TYPE, OCI_IMAGE_INDEX_MEDIA_TYPE, OCI_IMAGE_MEDIA_TYPE, OciDescriptor,
};
use oci_client::secrets::RegistryAuth;
use oci_client::{Client, Reference};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use slacker_core::layer::{LayerDiff, LayerKind};
use slacker_core::{Backend, Error, LayerStore, Result};

pub use local::LocalRegistry;

/// Media type of a slacker reference layer.
pub const REFERENCE_MEDIA_TYPE: &str = slacker_core::layer::reference::MEDIA_TYPE;
/// Media type of a zstd-compressed traditional layer.
pub const IMAGE_LAYER_ZSTD_MEDIA_TYPE: &str = "application/vnd.oci.image.layer.v1.tar+zstd";
/// `artifactType` of the slacker manifest in an image index.
pub const REFERENCE_ARTIFACT_TYPE: &str = "application/vnd.slacker.image.v1";
/// Annotation on index entries and manifests: `reference` or `plain`.
pub const KIND_ANNOTATION: &str = "dev.slacker.image.kind";

/// Media types [`RegistryClient::pull_image`] accepts for layers.
pub const LAYER_MEDIA_TYPES: [&str; 6] = [
    REFERENCE_MEDIA_TYPE,
    IMAGE_LAYER_MEDIA_TYPE,
    IMAGE_LAYER_GZIP_MEDIA_TYPE,
    IMAGE_LAYER_ZSTD_MEDIA_TYPE,
    IMAGE_DOCKER_LAYER_TAR_MEDIA_TYPE,
    IMAGE_DOCKER_LAYER_GZIP_MEDIA_TYPE,
];

const MANIFEST_TYPES: [&str; 4] = [
    OCI_IMAGE_MEDIA_TYPE,
    OCI_IMAGE_INDEX_MEDIA_TYPE,
    IMAGE_MANIFEST_MEDIA_TYPE,
    IMAGE_MANIFEST_LIST_MEDIA_TYPE,
];

/// Layers bigger than this are spooled to a temporary file when pulled.
const SPOOL_ABOVE: u64 = 64 << 20;

fn oci_error(e: impl std::fmt::Display) -> Error {
    Error::backend("oci", e.to_string())
}

/// `sha256:<hex>` of `data`.
pub fn sha256_digest(data: &[u8]) -> String {
    let h = Sha256::digest(data);
    let mut s = String::with_capacity(71);
    s.push_str("sha256:");
    for b in h {
        s.push_str(&format!("{b:02x}"));
    }
    s
}

fn parse_ref(image: &str) -> Result<Reference> {
    image
        .parse()
        .map_err(|e| Error::invalid(format!("image reference {image:?}: {e}")))
}

fn by_digest(r: &Reference, digest: &str) -> Reference {
    Reference::with_digest(
        r.registry().to_owned(),
        r.repository().to_owned(),
        digest.to_owned(),
    )
}

/// How to reach registries.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct ClientOptions {
    /// Speak plain HTTP (for a registry on 127.0.0.1); HTTPS otherwise.
    pub plain_http: bool,
}

impl ClientOptions {
    /// Plain HTTP to every registry (loopback test registries).
    pub fn plain_http() -> Self {
        Self { plain_http: true }
    }
}

/// What [`RegistryClient::push_image`] should do besides the slacker manifest.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct PushOptions {
    /// Also push an ordinary OCI image (tar+gzip of the ext4 tree) and tag an index of
    /// both (see the [crate docs](crate)).
    pub plain_export: bool,
}

impl PushOptions {
    /// Sets [`plain_export`](Self::plain_export).
    pub fn with_plain_export(mut self, on: bool) -> Self {
        self.plain_export = on;
        self
    }
}

/// One layer to push.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct PushLayer {
    /// Its media type.
    pub media_type: String,
    /// The blob.
    pub data: Vec<u8>,
    /// `sha256:` of the uncompressed tar (the config's `diff_ids` entry).
    pub diff_id: String,
}

impl PushLayer {
    /// A layer from its parts: media type, blob, and the `sha256:` of its uncompressed
    /// tar.
    pub fn new(media_type: impl Into<String>, data: Vec<u8>, diff_id: impl Into<String>) -> Self {
        Self {
            media_type: media_type.into(),
            data,
            diff_id: diff_id.into(),
        }
    }

    /// A reference layer from [`LayerStore::diff`].
    pub fn reference(diff: &LayerDiff) -> Self {
        Self {
            media_type: REFERENCE_MEDIA_TYPE.to_owned(),
            diff_id: sha256_digest(&diff.tar),
            data: diff.tar.clone(),
        }
    }

    /// A traditional layer: `tar` compressed with gzip at `level` (0–9).
    pub fn tar_gzip(tar: &[u8], level: u32) -> Self {
        let mut e = flate2::write::GzEncoder::new(
            Vec::with_capacity(tar.len() / 2),
            flate2::Compression::new(level),
        );
        e.write_all(tar).expect("writing to a Vec cannot fail");
        Self {
            media_type: IMAGE_LAYER_GZIP_MEDIA_TYPE.to_owned(),
            diff_id: sha256_digest(tar),
            data: e.finish().expect("writing to a Vec cannot fail"),
        }
    }

    /// An uncompressed traditional layer.
    pub fn tar(tar: Vec<u8>) -> Self {
        Self {
            media_type: IMAGE_LAYER_MEDIA_TYPE.to_owned(),
            diff_id: sha256_digest(&tar),
            data: tar,
        }
    }
}

/// One blob of a push or pull.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct BlobTransfer {
    /// `sha256:…`.
    pub digest: String,
    /// Media type.
    pub media_type: String,
    /// Size in bytes, as the registry stores it.
    pub size: u64,
    /// Whether it crossed the wire (false: the registry, or the local store, had it).
    pub transferred: bool,
}

/// What a push did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct PushReport {
    /// Digest of the slacker (or plain, for [`RegistryClient::push_layers`]) manifest.
    pub manifest_digest: String,
    /// Digest of the tagged index, with a plain export.
    pub index_digest: Option<String>,
    /// Digest of the plain manifest, with a plain export.
    pub plain_manifest_digest: Option<String>,
    /// Layers, then configs, in push order.
    pub blobs: Vec<BlobTransfer>,
    /// Bytes of manifests and index uploaded.
    pub manifest_bytes: u64,
}

impl PushReport {
    /// Layer bytes uploaded (blobs the registry lacked).
    pub fn layer_bytes_uploaded(&self) -> u64 {
        self.blobs
            .iter()
            .filter(|b| b.transferred && b.media_type != IMAGE_CONFIG_MEDIA_TYPE)
            .map(|b| b.size)
            .sum()
    }

    /// All bytes uploaded: blobs plus manifests.
    pub fn bytes_uploaded(&self) -> u64 {
        self.blobs
            .iter()
            .filter(|b| b.transferred)
            .map(|b| b.size)
            .sum::<u64>()
            + self.manifest_bytes
    }
}

/// One pulled layer.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct PulledLayer {
    /// The layer id in the store (the OCI chain id, hex).
    pub id: String,
    /// The blob.
    pub blob: BlobTransfer,
    /// Lazy (reference) or unpacked (traditional).
    pub kind: LayerKind,
}

/// What a pull did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct PullReport {
    /// The top layer: what a runtime `get`s (or `create`s a container layer on).
    pub top_layer: String,
    /// Digest of the image manifest used.
    pub manifest_digest: String,
    /// Whether it came from an index, and which entry kind was picked.
    pub picked_from_index: Option<String>,
    /// The layers, bottom first.
    pub layers: Vec<PulledLayer>,
    /// Bytes of the index and manifest downloaded.
    pub manifest_bytes: u64,
    /// Bytes of the config downloaded.
    pub config_bytes: u64,
}

impl PullReport {
    /// Layer bytes downloaded.
    pub fn layer_bytes_downloaded(&self) -> u64 {
        self.layers
            .iter()
            .filter(|l| l.blob.transferred)
            .map(|l| l.blob.size)
            .sum()
    }

    /// All bytes downloaded.
    pub fn bytes_downloaded(&self) -> u64 {
        self.layer_bytes_downloaded() + self.manifest_bytes + self.config_bytes
    }
}

/// An image manifest as pulled.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct PulledManifest {
    /// Its digest.
    pub digest: String,
    /// The config descriptor.
    pub config: OciDescriptor,
    /// The layer descriptors, bottom first (sizes as the registry stores them).
    pub layers: Vec<OciDescriptor>,
    /// Bytes downloaded for it (and for the index it was picked from).
    pub bytes: u64,
    /// Which index entry kind was picked, if the tag named an index.
    pub picked_from_index: Option<String>,
}

/// A registry client for slacker images (anonymous access).
pub struct RegistryClient {
    client: Client,
    auth: RegistryAuth,
}

impl std::fmt::Debug for RegistryClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RegistryClient").finish_non_exhaustive()
    }
}

impl RegistryClient {
    /// A client with monolithic blob uploads (one PUT per blob; about twice as fast as
    /// chunked uploads against distribution 2.8).
    pub fn new(options: ClientOptions) -> Self {
        let config = ClientConfig {
            protocol: if options.plain_http {
                ClientProtocol::Http
            } else {
                ClientProtocol::Https
            },
            use_monolithic_push: true,
            ..Default::default()
        };
        Self {
            client: Client::new(config),
            auth: RegistryAuth::Anonymous,
        }
    }

    /// The underlying `oci-client` client.
    pub fn inner(&self) -> &Client {
        &self.client
    }

    async fn upload(&self, r: &Reference, media_type: &str, data: Vec<u8>) -> Result<BlobTransfer> {
        let digest = sha256_digest(&data);
        let size = data.len() as u64;
        let exists = self
            .client
            .blob_exists(r, &digest)
            .await
            .map_err(oci_error)?;
        if !exists {
            self.client
                .push_blob(r, data, &digest)
                .await
                .map_err(oci_error)?;
        }
        Ok(BlobTransfer {
            digest,
            media_type: media_type.to_owned(),
            size,
            transferred: !exists,
        })
    }

    async fn put_manifest(
        &self,
        r: &Reference,
        media_type: &str,
        body: Vec<u8>,
    ) -> Result<(String, u64)> {
        let digest = sha256_digest(&body);
        let n = body.len() as u64;
        let ct = media_type
            .parse()
            .map_err(|_| Error::invalid(format!("media type {media_type:?}")))?;
        self.client
            .push_manifest_raw(r, body, ct)
            .await
            .map_err(oci_error)?;
        Ok((digest, n))
    }

    /// Pushes an image made of `layers` (bottom first) as an OCI image manifest tagged
    /// `image`, with a deterministic config; blobs the registry has are skipped.
    ///
    /// # Errors
    /// `InvalidInput` for a bad reference; `Backend` for registry failures.
    pub async fn push_layers(&self, image: &str, layers: Vec<PushLayer>) -> Result<PushReport> {
        let r = parse_ref(image)?;
        let (mut report, body, _) = self.push_parts(&r, layers, "plain").await?;
        let (digest, n) = self.put_manifest(&r, OCI_IMAGE_MEDIA_TYPE, body).await?;
        report.manifest_digest = digest;
        report.manifest_bytes += n;
        Ok(report)
    }

    /// Uploads layers and config; returns the report so far and the manifest body.
    async fn push_parts(
        &self,
        r: &Reference,
        layers: Vec<PushLayer>,
        kind: &str,
    ) -> Result<(PushReport, Vec<u8>, BlobTransfer)> {
        let mut report = PushReport::default();
        let diff_ids: Vec<String> = layers.iter().map(|l| l.diff_id.clone()).collect();
        let config = serde_json::to_vec(&json!({
            "architecture": "amd64",
            "os": "linux",
            "config": {"Labels": {KIND_ANNOTATION: kind}},
            "rootfs": {"type": "layers", "diff_ids": diff_ids},
        }))
        .expect("json serializes");
        // Layers one after the other, the config beside them.
        let layers_up = async {
            let mut out = Vec::new();
            for l in layers {
                out.push(self.upload(r, &l.media_type, l.data).await?);
            }
            Ok::<_, Error>(out)
        };
        let (layers_up, cfg) =
            tokio::join!(layers_up, self.upload(r, IMAGE_CONFIG_MEDIA_TYPE, config));
        let (layers_up, cfg) = (layers_up?, cfg?);
        let descs: Vec<Value> = layers_up
            .iter()
            .map(|t| json!({"mediaType": t.media_type, "digest": t.digest, "size": t.size}))
            .collect();
        report.blobs.extend(layers_up);
        report.blobs.push(cfg.clone());
        let mut manifest = json!({
            "schemaVersion": 2,
            "mediaType": OCI_IMAGE_MEDIA_TYPE,
            "config": {"mediaType": IMAGE_CONFIG_MEDIA_TYPE, "digest": cfg.digest, "size": cfg.size},
            "layers": descs,
            "annotations": {KIND_ANNOTATION: kind},
        });
        if kind == "reference" {
            manifest["artifactType"] = json!(REFERENCE_ARTIFACT_TYPE);
        }
        let body = serde_json::to_vec(&manifest).expect("json serializes");
        Ok((report, body, cfg))
    }

    /// Pushes layer `top` of `store` as image `image`: [`LayerStore::diff`] (a snapshot,
    /// O(1)) and a 2 KiB reference layer. With [`PushOptions::plain_export`], also the
    /// plain image and an index of both under the tag.
    ///
    /// # Errors
    /// Store errors from `diff`/`export_tree`; `Backend` for registry failures.
    pub async fn push_image<B: Backend>(
        &self,
        store: &LayerStore<B>,
        top: &str,
        image: &str,
        options: &PushOptions,
    ) -> Result<PushReport> {
        let r = parse_ref(image)?;
        let diff = store.diff(top).await?;
        let (mut report, body, _) = self
            .push_parts(&r, vec![PushLayer::reference(&diff)], "reference")
            .await?;
        if !options.plain_export {
            let (digest, n) = self.put_manifest(&r, OCI_IMAGE_MEDIA_TYPE, body).await?;
            report.manifest_digest = digest;
            report.manifest_bytes += n;
            return Ok(report);
        }
        let ref_digest = sha256_digest(&body);
        let ref_size = body.len();
        let (_, n) = self
            .put_manifest(&by_digest(&r, &ref_digest), OCI_IMAGE_MEDIA_TYPE, body)
            .await?;
        report.manifest_digest = ref_digest.clone();
        report.manifest_bytes += n;

        // The plain image: the volume's file tree as one tar+gzip layer.
        let scratch = tempfile::tempdir()
            .map_err(|e| Error::backend("oci", format!("scratch directory: {e}")))?;
        let tree = scratch.path().join("tree");
        std::fs::create_dir(&tree).map_err(|e| Error::backend("oci", e.to_string()))?;
        store.export_tree(top, &tree).await?;
        let layer = tokio::task::spawn_blocking(move || -> Result<PushLayer> {
            let tar = tar_tree(&tree)?;
            Ok(PushLayer::tar_gzip(&tar, 6))
        })
        .await
        .map_err(oci_error)??;
        let (plain, plain_body, _) = self.push_parts(&r, vec![layer], "plain").await?;
        report.blobs.extend(plain.blobs);
        let plain_digest = sha256_digest(&plain_body);
        let plain_size = plain_body.len();
        let (_, n) = self
            .put_manifest(
                &by_digest(&r, &plain_digest),
                OCI_IMAGE_MEDIA_TYPE,
                plain_body,
            )
            .await?;
        report.manifest_bytes += n;
        let platform = json!({"architecture": "amd64", "os": "linux"});
        let index = json!({
            "schemaVersion": 2,
            "mediaType": OCI_IMAGE_INDEX_MEDIA_TYPE,
            "manifests": [
                {"mediaType": OCI_IMAGE_MEDIA_TYPE, "digest": plain_digest, "size": plain_size,
                 "platform": platform, "annotations": {KIND_ANNOTATION: "plain"}},
                {"mediaType": OCI_IMAGE_MEDIA_TYPE, "digest": ref_digest, "size": ref_size,
                 "platform": platform, "artifactType": REFERENCE_ARTIFACT_TYPE,
                 "annotations": {KIND_ANNOTATION: "reference"}},
            ],
        });
        let body = serde_json::to_vec(&index).expect("json serializes");
        let (digest, n) = self
            .put_manifest(&r, OCI_IMAGE_INDEX_MEDIA_TYPE, body)
            .await?;
        report.manifest_bytes += n;
        report.index_digest = Some(digest);
        report.plain_manifest_digest = Some(plain_digest);
        Ok(report)
    }

    /// Fetches the image manifest of `image`. From an index, it picks the entry of kind
    /// `want` (`reference` or `plain`, by [`KIND_ANNOTATION`] or `artifactType`), or,
    /// for `plain`, the first linux/amd64 entry.
    ///
    /// # Errors
    /// `NotFound` if the index has no such entry; `InvalidInput` for a malformed
    /// manifest; `Backend` for registry failures.
    pub async fn pull_manifest(&self, image: &str, want: &str) -> Result<PulledManifest> {
        let r = parse_ref(image)?;
        let (body, digest) = self
            .client
            .pull_manifest_raw(&r, &self.auth, &MANIFEST_TYPES)
            .await
            .map_err(oci_error)?;
        let mut bytes = body.len() as u64;
        let mut v: Value = serde_json::from_slice(&body)
            .map_err(|e| Error::invalid(format!("manifest of {image}: {e}")))?;
        let mut digest = digest;
        let mut picked = None;
        if v.get("manifests").is_some() {
            let entries = v["manifests"].as_array().cloned().unwrap_or_default();
            let kind_of = |e: &Value| -> String {
                if e["annotations"][KIND_ANNOTATION].as_str() == Some("reference")
                    || e["artifactType"].as_str() == Some(REFERENCE_ARTIFACT_TYPE)
                {
                    "reference".to_owned()
                } else {
                    "plain".to_owned()
                }
            };
            let entry = entries
                .iter()
                .find(|e| kind_of(e) == want && (want == "reference" || is_linux_amd64(e)))
                .ok_or_else(|| {
                    Error::not_found(
                        slacker_core::ObjectKind::Other,
                        format!("{want} manifest in the index of {image}"),
                    )
                })?;
            let d = entry["digest"]
                .as_str()
                .ok_or_else(|| Error::invalid("index entry without a digest"))?
                .to_owned();
            let (body, _) = self
                .client
                .pull_manifest_raw(&by_digest(&r, &d), &self.auth, &MANIFEST_TYPES)
                .await
                .map_err(oci_error)?;
            if sha256_digest(&body) != d {
                return Err(Error::Integrity(format!(
                    "manifest {d} does not match its digest"
                )));
            }
            bytes += body.len() as u64;
            v = serde_json::from_slice(&body)
                .map_err(|e| Error::invalid(format!("manifest {d}: {e}")))?;
            digest = d;
            picked = Some(want.to_owned());
        }
        let config: OciDescriptor = serde_json::from_value(v["config"].clone())
            .map_err(|e| Error::invalid(format!("manifest config: {e}")))?;
        let layers: Vec<OciDescriptor> = serde_json::from_value(v["layers"].clone())
            .map_err(|e| Error::invalid(format!("manifest layers: {e}")))?;
        Ok(PulledManifest {
            digest,
            config,
            layers,
            bytes,
            picked_from_index: picked,
        })
    }

    /// Downloads a blob of `image` into memory (digest-verified).
    ///
    /// # Errors
    /// `Backend` for registry failures or a digest mismatch.
    pub async fn pull_blob(&self, image: &str, desc: &OciDescriptor) -> Result<Vec<u8>> {
        let r = parse_ref(image)?;
        let mut out = Vec::with_capacity(usize::try_from(desc.size).unwrap_or(0).min(1 << 30));
        self.client
            .pull_blob(&r, desc, &mut out)
            .await
            .map_err(oci_error)?;
        Ok(out)
    }

    /// Pulls `image` into `store`: manifest (the slacker entry of an index, else the
    /// plain one), config, then each layer not already in the store, applied with
    /// [`LayerStore::apply_diff`] under its chain id. Reference layers are recorded
    /// lazily (no data moves); traditional layers are unpacked.
    ///
    /// # Errors
    /// Registry failures (`Backend`), malformed manifests (`InvalidInput`), and the
    /// errors of `apply_diff`.
    pub async fn pull_image<B: Backend>(
        &self,
        store: &LayerStore<B>,
        image: &str,
    ) -> Result<PullReport> {
        let m = match self.pull_manifest(image, "reference").await {
            Err(e) if e.kind() == slacker_core::ErrorKind::NotFound => {
                self.pull_manifest(image, "plain").await?
            }
            other => other?,
        };
        if m.layers.is_empty() {
            return Err(Error::invalid(format!("image {image} has no layers")));
        }
        let config = self.pull_blob(image, &m.config).await?;
        let cfg: Value = serde_json::from_slice(&config)
            .map_err(|e| Error::invalid(format!("image config: {e}")))?;
        let diff_ids: Vec<String> = cfg["rootfs"]["diff_ids"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|d| d.as_str().map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default();
        let mut report = PullReport {
            manifest_digest: m.digest.clone(),
            picked_from_index: m.picked_from_index.clone(),
            manifest_bytes: m.bytes,
            config_bytes: config.len() as u64,
            ..PullReport::default()
        };
        let mut chain: Option<String> = None;
        let mut parent: Option<String> = None;
        for (i, desc) in m.layers.iter().enumerate() {
            if !LAYER_MEDIA_TYPES.contains(&desc.media_type.as_str()) {
                return Err(Error::invalid(format!(
                    "layer {} has unsupported media type {}",
                    desc.digest, desc.media_type
                )));
            }
            let diff_id = match diff_ids.get(i) {
                Some(d) if diff_ids.len() == m.layers.len() => d.clone(),
                _ => desc.digest.clone(),
            };
            let next = match &chain {
                None => diff_id,
                Some(c) => sha256_digest(format!("{c} {diff_id}").as_bytes()),
            };
            let id = next.trim_start_matches("sha256:").to_owned();
            let size = u64::try_from(desc.size).unwrap_or(0);
            let (transferred, kind) = if store.exists(&id).await? {
                (false, store.layer(&id).await?.kind)
            } else {
                let applied = if size > SPOOL_ABOVE {
                    let file = self.spool(image, desc).await?;
                    store.apply_diff(&id, parent.as_deref(), file).await?
                } else {
                    let data = self.pull_blob(image, desc).await?;
                    store
                        .apply_diff(&id, parent.as_deref(), std::io::Cursor::new(data))
                        .await?
                };
                (true, applied.kind)
            };
            report.layers.push(PulledLayer {
                id: id.clone(),
                blob: BlobTransfer {
                    digest: desc.digest.clone(),
                    media_type: desc.media_type.clone(),
                    size,
                    transferred,
                },
                kind,
            });
            chain = Some(next);
            parent = Some(id);
        }
        report.top_layer = parent.expect("at least one layer");
        Ok(report)
    }

    /// Downloads a large blob into an unlinked temporary file.
    async fn spool(&self, image: &str, desc: &OciDescriptor) -> Result<std::fs::File> {
        let r = parse_ref(image)?;
        let file = tempfile::tempfile().map_err(|e| Error::backend("oci", e.to_string()))?;
        let mut out = tokio::fs::File::from_std(
            file.try_clone()
                .map_err(|e| Error::backend("oci", e.to_string()))?,
        );
        self.client
            .pull_blob(&r, desc, &mut out)
            .await
            .map_err(oci_error)?;
        drop(out);
        let mut file = file;
        std::io::Seek::seek(&mut file, std::io::SeekFrom::Start(0))
            .map_err(|e| Error::backend("oci", e.to_string()))?;
        Ok(file)
    }
}

fn is_linux_amd64(e: &Value) -> bool {
    e["platform"]["os"].as_str() == Some("linux")
        && e["platform"]["architecture"].as_str() == Some("amd64")
}

/// A tar of the tree under `dir` (sorted, owners and modes kept, for the plain export).
///
/// # Errors
/// `Backend` for IO errors.
pub fn tar_tree(dir: &Path) -> Result<Vec<u8>> {
    let io = |e: std::io::Error| Error::backend("oci", format!("tar of {}: {e}", dir.display()));
    let mut b = tar::Builder::new(Vec::new());
    b.mode(tar::HeaderMode::Complete);
    b.follow_symlinks(false);
    let mut stack = vec![std::path::PathBuf::new()];
    let mut entries: BTreeMap<std::path::PathBuf, ()> = BTreeMap::new();
    while let Some(rel) = stack.pop() {
        let mut names: Vec<_> = std::fs::read_dir(dir.join(&rel))
            .map_err(io)?
            .map(|e| e.map(|e| e.file_name()))
            .collect::<std::io::Result<_>>()
            .map_err(io)?;
        names.sort();
        for n in names {
            let p = rel.join(n);
            if std::fs::symlink_metadata(dir.join(&p))
                .map_err(io)?
                .is_dir()
            {
                stack.push(p.clone());
            }
            entries.insert(p, ());
        }
    }
    for p in entries.keys() {
        b.append_path_with_name(dir.join(p), p).map_err(io)?;
    }
    b.into_inner().map_err(io)
}
