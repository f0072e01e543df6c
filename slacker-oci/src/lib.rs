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
//! | plain image | the image's (default: this host's) | `plain` | – |
//! | slacker image | the same | `reference` | [`REFERENCE_ARTIFACT_TYPE`] |
//!
//! How a consumer picks: slacker ([`RegistryClient::pull_image`]) takes the entry
//! annotated `reference` (or with that `artifactType`), and falls back to the plain entry
//! when the storage of the reference is not wanted. Docker, containerd and other OCI
//! clients select by platform and take the **first** match, the plain image, whose
//! layers they understand; they never see the reference layer.
//!
//! **The image config travels.** [`PushOptions::config`] carries an image's original
//! config ([`ImageConfiguration`]: Entrypoint, Cmd, Env, User, WorkingDir, Labels,
//! ExposedPorts, history, platform) into both the slacker and the plain manifest (only
//! `rootfs.diff_ids` is replaced, and one history entry appended);
//! [`PullReport::config`] returns it. Manifests, indexes and configs are `oci-spec`
//! types, re-exported here on purpose; `oci-client` stays an implementation detail.
//!
//! **Pulls verify before they record.** Every blob is checked against its digest and
//! every layer's uncompressed digest against the config's `diff_ids` before the first
//! layer is applied: a tampered blob or a lying config is an
//! [`Integrity`](slacker_core::ErrorKind::Integrity) error and nothing is recorded.
//!
//! **Registry access.** HTTPS by default (rustls with the `ring` provider; the
//! `native-tls` feature switches to the system's OpenSSL); plain HTTP only when asked
//! ([`ClientOptions::plain_http`]). Credentials come from the docker client config and
//! credential helpers ([`auth`]).
//!
//! Blobs the registry already has (`HEAD` → 200) are not uploaded again; reports count
//! the bytes that actually moved.
//!
//! **A pull in one request.** A slacker manifest embeds its small blobs (the config and
//! the 2 KiB reference layer, up to [`INLINE_MAX_BYTES`]) in their descriptors as `data`
//! (base64; OCI image-spec 1.1 allows `data` on any descriptor). The blobs are pushed as
//! well, so clients that ignore `data` (containerd 1.6, skopeo) fetch them as before.
//! [`RegistryClient::pull_blob`] (and so every pull) uses embedded data when a descriptor
//! carries it, after checking it against the descriptor's size and digest exactly as a
//! downloaded blob (a mismatch is an [`Integrity`](slacker_core::ErrorKind::Integrity)
//! error), and fetches the blob otherwise: pulling a slacker image then costs one `GET`,
//! the manifest's.

#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod auth;
pub mod deploy;
#[cfg(feature = "test-util")]
pub mod local;
pub mod referrers;

use std::collections::{BTreeMap, HashMap};
use std::io::{Read, Seek, Write};
use std::path::Path;
use std::sync::Mutex;

use base64::Engine;
use oci_client::client::{ClientConfig, ClientProtocol};
use oci_client::errors::OciDistributionError;
use oci_client::manifest::OciDescriptor;
use oci_client::secrets::RegistryAuth;
use oci_client::{Client, Reference};
use oci_spec::image::{
    Arch, Descriptor, DescriptorBuilder, HistoryBuilder, ImageIndex, ImageIndexBuilder,
    ImageManifest, ImageManifestBuilder, MediaType, Os, PlatformBuilder, RootFs,
};
use sha2::{Digest, Sha256};
use slacker_core::layer::{LayerDiff, LayerKind};
use slacker_core::{Backend, Error, LayerStore, Result};

pub use auth::Credentials;
#[cfg(feature = "test-util")]
pub use local::LocalRegistry;
/// The `oci-spec` image types this crate's API uses (re-exported on purpose).
pub use oci_spec::image::{self as spec, ImageConfiguration};

/// Media type of a slacker reference layer.
pub const REFERENCE_MEDIA_TYPE: &str = slacker_core::layer::reference::MEDIA_TYPE;
/// Media type of an uncompressed OCI layer.
pub const IMAGE_LAYER_MEDIA_TYPE: &str = "application/vnd.oci.image.layer.v1.tar";
/// Media type of a gzip-compressed OCI layer.
pub const IMAGE_LAYER_GZIP_MEDIA_TYPE: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
/// Media type of a zstd-compressed traditional layer.
pub const IMAGE_LAYER_ZSTD_MEDIA_TYPE: &str = "application/vnd.oci.image.layer.v1.tar+zstd";
/// Media type of a Docker (schema 2) layer.
pub const DOCKER_LAYER_GZIP_MEDIA_TYPE: &str = "application/vnd.docker.image.rootfs.diff.tar.gzip";
/// Media type of an OCI image config.
pub const IMAGE_CONFIG_MEDIA_TYPE: &str = "application/vnd.oci.image.config.v1+json";
/// `artifactType` of the slacker manifest in an image index.
pub const REFERENCE_ARTIFACT_TYPE: &str = "application/vnd.slacker.image.v1";
/// Annotation on index entries and manifests: `reference` or `plain`.
pub const KIND_ANNOTATION: &str = "dev.slacker.image.kind";
/// Annotation on the plain entry of an index: `true` if the plain export kept every file
/// attribute (see [`PushReport::plain_export_lossless`]).
pub const LOSSLESS_ANNOTATION: &str = "dev.slacker.plain.lossless";

const OCI_IMAGE_MEDIA_TYPE: &str = "application/vnd.oci.image.manifest.v1+json";
const OCI_IMAGE_INDEX_MEDIA_TYPE: &str = "application/vnd.oci.image.index.v1+json";
const DOCKER_MANIFEST_MEDIA_TYPE: &str = "application/vnd.docker.distribution.manifest.v2+json";
const DOCKER_LIST_MEDIA_TYPE: &str = "application/vnd.docker.distribution.manifest.list.v2+json";

/// Media types [`RegistryClient::pull_image`] accepts for layers.
pub const LAYER_MEDIA_TYPES: [&str; 6] = [
    REFERENCE_MEDIA_TYPE,
    IMAGE_LAYER_MEDIA_TYPE,
    IMAGE_LAYER_GZIP_MEDIA_TYPE,
    IMAGE_LAYER_ZSTD_MEDIA_TYPE,
    "application/vnd.docker.image.rootfs.diff.tar",
    DOCKER_LAYER_GZIP_MEDIA_TYPE,
];

const MANIFEST_TYPES: [&str; 4] = [
    OCI_IMAGE_MEDIA_TYPE,
    OCI_IMAGE_INDEX_MEDIA_TYPE,
    DOCKER_MANIFEST_MEDIA_TYPE,
    DOCKER_LIST_MEDIA_TYPE,
];

/// Layers bigger than this are spooled to a temporary file when pulled.
const SPOOL_ABOVE: u64 = 64 << 20;

/// Reference layers up to this size are fetched alongside the config.
const EARLY_LAYER_BYTES: u64 = 64 << 10;

/// Blobs of a slacker manifest up to this size (the config, the 2 KiB reference layer)
/// are also embedded in their descriptors as `data` by default (see
/// [`PushOptions::inline_max_bytes`]).
pub const INLINE_MAX_BYTES: u64 = 16 << 10;

/// Largest manifest or index read (the distribution spec lets registries refuse
/// manifests above 4 MiB).
pub(crate) const MAX_MANIFEST_BYTES: u64 = 4 << 20;

/// The body of `resp`, refused (`Integrity`) as soon as it passes `max` bytes: a registry
/// cannot make a pull buffer more than the descriptor announced.
pub(crate) async fn read_capped(
    mut resp: reqwest::Response,
    max: u64,
    url: &str,
) -> Result<Vec<u8>> {
    let mut out = Vec::with_capacity(usize::try_from(max.min(1 << 20)).unwrap_or(0));
    while let Some(chunk) = resp
        .chunk()
        .await
        .map_err(|e| Error::backend("oci", format!("GET {url}: {e}")))?
    {
        if (out.len() + chunk.len()) as u64 > max {
            return Err(Error::Integrity(format!(
                "GET {url}: more than the {max} bytes expected"
            )));
        }
        out.extend_from_slice(&chunk);
    }
    Ok(out)
}

/// Attempts of a blob upload or manifest push that a concurrent push of the same blobs
/// may fail, and the first pause between them (doubling: 20 ms to 320 ms, 620 ms in all).
const PUSH_ATTEMPTS: u32 = 5;
const PUSH_PAUSE: std::time::Duration = std::time::Duration::from_millis(20);

/// Whether a failed push is worth retrying: a server error, or distribution's answers
/// while a concurrent pusher rewrites a blob's link (`BLOB_UNKNOWN`, `DIGEST_INVALID`).
fn retryable(e: &Error) -> bool {
    let m = e.to_string();
    ["BLOB_UNKNOWN", "DIGEST_INVALID", ": 5", "code: 5"]
        .iter()
        .any(|p| m.contains(p))
}

/// Runs `f` until it succeeds, up to [`PUSH_ATTEMPTS`] times while it fails with a
/// [`retryable`] error, pausing [`PUSH_PAUSE`] (doubling) in between.
async fn retry<T, F, Fut>(mut f: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T>>,
{
    let mut pause = PUSH_PAUSE;
    let mut attempt = 1;
    loop {
        match f().await {
            Err(e) if attempt < PUSH_ATTEMPTS && retryable(&e) => {
                tracing::debug!(error = %e, attempt, "registry push step failed; retrying");
                tokio::time::sleep(pause).await;
                pause *= 2;
                attempt += 1;
            }
            other => return other,
        }
    }
}

/// `resp` if its status is a success, else a `Backend` error naming the status and the
/// start of the body.
async fn status_ok(method: &str, url: &str, resp: reqwest::Response) -> Result<reqwest::Response> {
    let status = resp.status();
    if status.is_success() {
        return Ok(resp);
    }
    let body = resp.bytes().await.unwrap_or_default();
    Err(Error::backend(
        "oci",
        format!(
            "{method} {url}: {status}: {}",
            String::from_utf8_lossy(&body[..body.len().min(512)]).trim()
        ),
    ))
}

fn oci_error(e: impl std::fmt::Display) -> Error {
    Error::backend("oci", e.to_string())
}

/// A blob download error: a digest mismatch is `Integrity`, anything else `Backend`.
fn blob_error(e: OciDistributionError) -> Error {
    match e {
        OciDistributionError::DigestError(d) => {
            Error::Integrity(format!("blob does not match its digest: {d}"))
        }
        other => oci_error(other),
    }
}

fn spec_error(e: impl std::fmt::Display) -> Error {
    Error::invalid(format!("OCI document: {e}"))
}

/// `sha256:<hex>` of `data`.
pub fn sha256_digest(data: &[u8]) -> String {
    hex_digest(Sha256::digest(data).as_slice())
}

fn hex_digest(h: &[u8]) -> String {
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

fn descriptor(media_type: &str, digest: &str, size: u64) -> Result<Descriptor> {
    let d: oci_spec::image::Digest = digest.parse().map_err(spec_error)?;
    Ok(Descriptor::new(MediaType::from(media_type), size, d))
}

fn to_client_desc(d: &Descriptor) -> OciDescriptor {
    OciDescriptor {
        media_type: d.media_type().to_string(),
        digest: d.digest().to_string(),
        size: i64::try_from(d.size()).unwrap_or(i64::MAX),
        ..OciDescriptor::default()
    }
}

/// An image config for this host's platform and nothing else: what a push without
/// [`PushOptions::config`] carries.
pub fn default_config() -> ImageConfiguration {
    let mut c = ImageConfiguration::default();
    c.set_architecture(Arch::default());
    c.set_os(Os::default());
    c
}

/// `base` with `rootfs.diff_ids` replaced by `diff_ids`; the original history entries
/// are kept (marked `empty_layer`: their layers were flattened) and one entry saying
/// what made the new layer is appended.
fn derive_config(
    base: &ImageConfiguration,
    diff_ids: Vec<String>,
    made_by: &str,
) -> Result<Vec<u8>> {
    let mut cfg = base.clone();
    let mut rootfs = RootFs::default();
    rootfs.set_diff_ids(diff_ids);
    cfg.set_rootfs(rootfs);
    if base.history().is_some() {
        let mut h: Vec<_> = base.history().clone().unwrap_or_default();
        for e in &mut h {
            e.set_empty_layer(Some(true));
        }
        h.push(
            HistoryBuilder::default()
                .created_by(made_by)
                .build()
                .map_err(spec_error)?,
        );
        cfg.set_history(Some(h));
    }
    serde_json::to_vec(&cfg).map_err(spec_error)
}

/// What [`RegistryClient::existing_plain`] found.
struct PreviousPlain {
    index: String,
    plain: String,
    lossless: Option<bool>,
}

/// How to reach registries.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct ClientOptions {
    /// Speak plain HTTP (for a registry on 127.0.0.1); HTTPS otherwise.
    pub plain_http: bool,
    /// Credentials for every registry; `None`: from the docker config ([`auth`]).
    pub credentials: Option<Credentials>,
}

impl ClientOptions {
    /// Plain HTTP to every registry (loopback test registries).
    pub fn plain_http() -> Self {
        Self {
            plain_http: true,
            credentials: None,
        }
    }
    /// Sets [`credentials`](Self::credentials).
    pub fn with_credentials(mut self, c: Credentials) -> Self {
        self.credentials = Some(c);
        self
    }
}

/// What [`RegistryClient::push_image`] should do besides the slacker manifest.
#[derive(Clone, Debug, Default, PartialEq)]
#[non_exhaustive]
pub struct PushOptions {
    /// Also push an ordinary OCI image (tar+gzip of the ext4 tree) and tag an index of
    /// both (see the [crate docs](crate)).
    pub plain_export: bool,
    /// The image config to carry (the original image's); default
    /// [`default_config`].
    pub config: Option<ImageConfiguration>,
    /// Blobs of the slacker manifest up to this size are embedded in their descriptors
    /// as `data` (they are uploaded too); `None`: [`INLINE_MAX_BYTES`]; `Some(0)`: none.
    /// The plain export never embeds.
    pub inline_max_bytes: Option<u64>,
}

impl PushOptions {
    /// Sets [`plain_export`](Self::plain_export).
    pub fn with_plain_export(mut self, on: bool) -> Self {
        self.plain_export = on;
        self
    }
    /// Sets [`config`](Self::config).
    pub fn with_config(mut self, config: ImageConfiguration) -> Self {
        self.config = Some(config);
        self
    }
    /// Sets [`inline_max_bytes`](Self::inline_max_bytes) (0: embed nothing).
    pub fn with_inline_max_bytes(mut self, max: u64) -> Self {
        self.inline_max_bytes = Some(max);
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
    /// Push: also embedded in the manifest as `data`. Pull: taken from the manifest's
    /// `data` (no request of its own; its bytes are counted in the manifest's).
    pub embedded: bool,
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
    /// Whether the plain export kept every file attribute (see
    /// [`LayerStore::export_tar`]).
    pub plain_export_lossless: Option<bool>,
    /// The tag already indexed this very reference manifest and a complete plain image
    /// (manifest, config and layer all in the registry), so the plain export was reused:
    /// the volume was not read, nothing was compressed or uploaded.
    pub plain_export_reused: bool,
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
    /// What applying it could not keep (see [`slacker_core::Loss`]); empty when reused.
    pub losses: Vec<slacker_core::Loss>,
}

/// What a pull did.
#[derive(Clone, Debug, Default, PartialEq)]
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
    /// Bytes of the index and manifest downloaded (with any blobs they embed).
    pub manifest_bytes: u64,
    /// Bytes of the config downloaded by a request of its own (0 when the manifest
    /// embedded it).
    pub config_bytes: u64,
    /// The image config (Entrypoint, Cmd, Env, User, WorkingDir, ...).
    pub config: ImageConfiguration,
}

impl PullReport {
    /// Layer bytes downloaded by requests of their own (embedded layers came with the
    /// manifest, see [`manifest_bytes`](Self::manifest_bytes)).
    pub fn layer_bytes_downloaded(&self) -> u64 {
        self.layers
            .iter()
            .filter(|l| l.blob.transferred && !l.blob.embedded)
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
    /// The manifest.
    pub manifest: ImageManifest,
    /// The config descriptor.
    pub config: Descriptor,
    /// The layer descriptors, bottom first (sizes as the registry stores them).
    pub layers: Vec<Descriptor>,
    /// Bytes downloaded for it (and for the index it was picked from).
    pub bytes: u64,
    /// Which index entry kind was picked, if the tag named an index.
    pub picked_from_index: Option<String>,
}

/// A registry client for slacker images and standard OCI/Docker images.
pub struct RegistryClient {
    client: Client,
    options: ClientOptions,
    /// Credentials resolved per registry.
    auths: Mutex<HashMap<String, RegistryAuth>>,
    /// Pulls from registries that need no authentication go over this one pool of
    /// keep-alive connections, one request each: oci-client probes `GET /v2/` before
    /// every request to such a registry (it caches tokens, not the absence of a
    /// challenge), which doubled a pull's round trips.
    http: reqwest::Client,
    /// Per registry: whether it answered without a challenge: a pull's first manifest
    /// GET, or a push's `GET /v2/` probe (asked once).
    open: Mutex<HashMap<String, bool>>,
    /// Held while probing, so that concurrent first requests (a push uploads its layer
    /// and config at once) probe once.
    probing: tokio::sync::Mutex<()>,
}

impl std::fmt::Debug for RegistryClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RegistryClient")
            .field("plain_http", &self.options.plain_http)
            .finish_non_exhaustive()
    }
}

/// A downloaded, verified layer blob.
enum Blob {
    Memory(Vec<u8>),
    File(std::fs::File),
}

impl RegistryClient {
    /// The oci-client underneath, for this crate's own modules (referrers); not public API.
    pub(crate) fn inner(&self) -> &Client {
        &self.client
    }

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
        install_tls_provider();
        let http = reqwest::Client::builder()
            .user_agent(concat!("slacker-oci/", env!("CARGO_PKG_VERSION")))
            .build()
            .unwrap_or_default();
        Self {
            client: Client::new(config),
            options,
            auths: Mutex::new(HashMap::new()),
            http,
            open: Mutex::new(HashMap::new()),
            probing: tokio::sync::Mutex::new(()),
        }
    }

    /// `http://` or `https://` and the registry of `r`.
    pub(crate) fn base_url(&self, r: &Reference) -> String {
        let scheme = if self.options.plain_http {
            "http"
        } else {
            "https"
        };
        format!("{scheme}://{}", r.resolve_registry())
    }

    /// Whether requests to `r`'s registry go over [`Self::http`], if known without asking:
    /// never with credentials; else what a probe or a first manifest GET found.
    fn known_open(&self, r: &Reference, auth: &RegistryAuth) -> Option<bool> {
        if !matches!(auth, RegistryAuth::Anonymous) {
            return Some(false);
        }
        self.open
            .lock()
            .expect("open lock")
            .get(r.resolve_registry())
            .copied()
    }

    /// Whether pulls from `r`'s registry go over [`Self::http`]: anonymous access and a
    /// registry whose `GET /v2/` answers 200 without a challenge (asked once per
    /// registry; a registry that cannot be reached is asked again next time).
    pub(crate) async fn open_registry(&self, r: &Reference, auth: &RegistryAuth) -> bool {
        if let Some(open) = self.known_open(r, auth) {
            return open;
        }
        let registry = r.resolve_registry().to_owned();
        let _probing = self.probing.lock().await;
        if let Some(&open) = self.open.lock().expect("open lock").get(&registry) {
            return open;
        }
        let Ok(resp) = self
            .http
            .get(format!("{}/v2/", self.base_url(r)))
            .send()
            .await
        else {
            return false; // oci-client reports the failure
        };
        let open = resp.status().is_success()
            && !resp
                .headers()
                .contains_key(reqwest::header::WWW_AUTHENTICATE);
        // Read the body so the connection goes back to the pool.
        let _ = resp.bytes().await;
        self.open.lock().expect("open lock").insert(registry, open);
        open
    }

    /// `GET url` on the open-registry pool: the response of a 2xx; `NotFound` for a 404;
    /// else a `Backend` error naming the status.
    pub(crate) async fn get_ok(
        &self,
        url: &str,
        accept: Option<&str>,
    ) -> Result<reqwest::Response> {
        let resp = self.get_any(url, accept).await?;
        Self::ok_or_error(url, resp).await
    }

    /// `GET url` on the open-registry pool, whatever the status.
    async fn get_any(&self, url: &str, accept: Option<&str>) -> Result<reqwest::Response> {
        let mut req = self.http.get(url);
        if let Some(a) = accept {
            req = req.header(reqwest::header::ACCEPT, a);
        }
        req.send()
            .await
            .map_err(|e| Error::backend("oci", format!("GET {url}: {e}")))
    }

    /// `resp` of a 2xx; `NotFound` for a 404; else a `Backend` error naming the status.
    async fn ok_or_error(url: &str, resp: reqwest::Response) -> Result<reqwest::Response> {
        let status = resp.status();
        if status.is_success() {
            return Ok(resp);
        }
        let body = resp.bytes().await.unwrap_or_default();
        if status == reqwest::StatusCode::NOT_FOUND {
            return Err(Error::not_found(
                slacker_core::ObjectKind::Other,
                format!("GET {url}"),
            ));
        }
        Err(Error::backend(
            "oci",
            format!(
                "GET {url}: {status}: {}",
                String::from_utf8_lossy(&body[..body.len().min(512)]).trim()
            ),
        ))
    }

    /// A manifest (or index) of `r` as bytes and its digest: the digest `r` names, else
    /// the body's `sha256:`, checked against the registry's `Docker-Content-Digest`.
    ///
    /// # Errors
    /// `Integrity` when the body does not match either; `Backend` for registry failures.
    pub(crate) async fn manifest_raw(
        &self,
        r: &Reference,
        auth: &RegistryAuth,
    ) -> Result<(Vec<u8>, String)> {
        let through_client = async {
            let (body, digest) = self
                .client
                .pull_manifest_raw(r, auth, &MANIFEST_TYPES)
                .await
                .map_err(oci_error)?;
            Ok((body.to_vec(), digest))
        };
        let name = r.digest().or(r.tag()).unwrap_or("latest");
        let url = format!(
            "{}/v2/{}/manifests/{name}",
            self.base_url(r),
            r.repository()
        );
        let accept = MANIFEST_TYPES.join(", ");
        let resp = match self.known_open(r, auth) {
            Some(true) => self.get_ok(&url, Some(&accept)).await?,
            Some(false) => return through_client.await,
            // Not known yet (a new client): no `GET /v2/` probe, the manifest GET itself
            // tells, as containerd's resolver does. An answer without a challenge marks
            // the registry open; a challenge sends this and every later request through
            // oci-client, which authenticates (an anonymous token, or the credentials).
            None => {
                let resp = self.get_any(&url, Some(&accept)).await?;
                let challenged = resp.status() == reqwest::StatusCode::UNAUTHORIZED
                    || resp
                        .headers()
                        .contains_key(reqwest::header::WWW_AUTHENTICATE);
                // A 2xx or 404 without a challenge is an answer to anyone; other
                // statuses (a 5xx) tell nothing: the next request asks again.
                let status = resp.status();
                if challenged || status.is_success() || status == reqwest::StatusCode::NOT_FOUND {
                    self.open
                        .lock()
                        .expect("open lock")
                        .insert(r.resolve_registry().to_owned(), !challenged);
                }
                if challenged {
                    // Read the body so the connection goes back to the pool.
                    let _ = resp.bytes().await;
                    return through_client.await;
                }
                Self::ok_or_error(&url, resp).await?
            }
        };
        let header = resp
            .headers()
            .get("docker-content-digest")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        let body = read_capped(resp, MAX_MANIFEST_BYTES, &url).await?;
        let digest = sha256_digest(&body);
        for claimed in [r.digest().map(str::to_owned), header]
            .into_iter()
            .flatten()
        {
            if claimed.starts_with("sha256:") && claimed != digest {
                return Err(Error::Integrity(format!(
                    "manifest {url} is {digest}, not {claimed}"
                )));
            }
        }
        Ok((body, digest))
    }

    /// Resolves and stores the credentials for `r`'s registry (once per registry).
    pub(crate) async fn prepare(&self, r: &Reference) -> Result<RegistryAuth> {
        let registry = r.resolve_registry().to_owned();
        let known = self
            .auths
            .lock()
            .expect("auth lock")
            .get(&registry)
            .cloned();
        let auth = match known {
            Some(a) => a,
            None => {
                let creds = match &self.options.credentials {
                    Some(c) => c.clone(),
                    None => auth::credentials(r.registry())?,
                };
                let a = match creds {
                    Credentials::Anonymous => RegistryAuth::Anonymous,
                    Credentials::Basic { username, password } => {
                        RegistryAuth::Basic(username, password)
                    }
                };
                self.auths
                    .lock()
                    .expect("auth lock")
                    .insert(registry.clone(), a.clone());
                a
            }
        };
        self.client.store_auth_if_needed(&registry, &auth).await;
        Ok(auth)
    }

    /// Whether `r`'s repository has blob `digest`: one `HEAD` on the open-registry pool,
    /// else through oci-client.
    async fn blob_exists(&self, r: &Reference, open: bool, digest: &str) -> Result<bool> {
        if !open {
            return self.client.blob_exists(r, digest).await.map_err(oci_error);
        }
        let url = format!("{}/v2/{}/blobs/{digest}", self.base_url(r), r.repository());
        let resp = self
            .http
            .head(&url)
            .send()
            .await
            .map_err(|e| Error::backend("oci", format!("HEAD {url}: {e}")))?;
        match resp.status() {
            s if s.is_success() => Ok(true),
            reqwest::StatusCode::NOT_FOUND => Ok(false),
            s => Err(Error::backend("oci", format!("HEAD {url}: {s}"))),
        }
    }

    /// One monolithic upload of a blob: `POST` an upload, `PUT` the bytes to the
    /// location it names (two requests on the open-registry pool), else through
    /// oci-client (which probes `/v2/` before each).
    async fn push_blob_once(
        &self,
        r: &Reference,
        open: bool,
        data: &bytes::Bytes,
        digest: &str,
    ) -> Result<()> {
        if !open {
            return self
                .client
                .push_blob(r, data.clone(), digest)
                .await
                .map(|_| ())
                .map_err(oci_error);
        }
        let base = self.base_url(r);
        let url = format!("{base}/v2/{}/blobs/uploads/", r.repository());
        let resp = self
            .http
            .post(&url)
            .header(reqwest::header::CONTENT_LENGTH, "0")
            .send()
            .await
            .map_err(|e| Error::backend("oci", format!("POST {url}: {e}")))?;
        let resp = status_ok("POST", &url, resp).await?;
        let location = resp
            .headers()
            .get(reqwest::header::LOCATION)
            .and_then(|v| v.to_str().ok())
            .ok_or_else(|| Error::backend("oci", format!("POST {url}: no Location")))?;
        let location = if location.starts_with('/') {
            format!("{base}{location}")
        } else {
            location.to_owned()
        };
        let sep = if location.contains('?') { '&' } else { '?' };
        let put = format!("{location}{sep}digest={digest}");
        let resp = self
            .http
            .put(&put)
            .header(reqwest::header::CONTENT_TYPE, "application/octet-stream")
            .body(data.clone())
            .send()
            .await
            .map_err(|e| Error::backend("oci", format!("PUT {url}: {e}")))?;
        status_ok("PUT", &url, resp).await.map(|_| ())
    }

    /// Uploads a blob unless the repository has it. Runtimes pushing the same image (or
    /// images sharing a layer) at once upload the same blob at once, and distribution
    /// 2.8 may then fail some of those uploads (500) while another one commits: an upload
    /// that fails is retried after a pause unless the blob is there by then.
    pub(crate) async fn upload(
        &self,
        r: &Reference,
        media_type: &str,
        data: Vec<u8>,
    ) -> Result<BlobTransfer> {
        let auth = self.prepare(r).await?;
        let open = self.open_registry(r, &auth).await;
        let digest = sha256_digest(&data);
        let size = data.len() as u64;
        let exists = retry(|| self.blob_exists(r, open, &digest)).await?;
        if !exists {
            let data = bytes::Bytes::from(data);
            retry(|| async {
                match self.push_blob_once(r, open, &data, &digest).await {
                    Ok(()) => Ok(()),
                    // Another pusher's upload of the same blob may have won.
                    Err(e) => match self.blob_exists(r, open, &digest).await {
                        Ok(true) => Ok(()),
                        _ => Err(e),
                    },
                }
            })
            .await?;
        }
        Ok(BlobTransfer {
            digest,
            media_type: media_type.to_owned(),
            size,
            transferred: !exists,
            embedded: false,
        })
    }

    /// Stores a manifest (or index) under `r`'s tag or digest: one `PUT` on the
    /// open-registry pool, else through oci-client. Distribution 2.8 rewrites a blob's
    /// link in the repository in place when another pusher commits the same blob, and a
    /// manifest checked at that moment is refused (`MANIFEST_BLOB_UNKNOWN`): such an
    /// answer is retried after a pause.
    pub(crate) async fn put_manifest(
        &self,
        r: &Reference,
        media_type: &str,
        body: Vec<u8>,
    ) -> Result<(String, u64)> {
        let auth = self.prepare(r).await?;
        let open = self.open_registry(r, &auth).await;
        let digest = sha256_digest(&body);
        let n = body.len() as u64;
        let body = bytes::Bytes::from(body);
        retry(|| self.put_manifest_once(r, open, media_type, &body)).await?;
        Ok((digest, n))
    }

    async fn put_manifest_once(
        &self,
        r: &Reference,
        open: bool,
        media_type: &str,
        body: &bytes::Bytes,
    ) -> Result<()> {
        if !open {
            let ct = media_type
                .parse()
                .map_err(|_| Error::invalid(format!("media type {media_type:?}")))?;
            return self
                .client
                .push_manifest_raw(r, body.to_vec(), ct)
                .await
                .map(|_| ())
                .map_err(oci_error);
        }
        let name = r.digest().or(r.tag()).unwrap_or("latest");
        let url = format!(
            "{}/v2/{}/manifests/{name}",
            self.base_url(r),
            r.repository()
        );
        let resp = self
            .http
            .put(&url)
            .header(reqwest::header::CONTENT_TYPE, media_type)
            .body(body.clone())
            .send()
            .await
            .map_err(|e| Error::backend("oci", format!("PUT {url}: {e}")))?;
        status_ok("PUT", &url, resp).await.map(|_| ())
    }

    /// Pushes an image made of `layers` (bottom first) as an OCI image manifest tagged
    /// `image`, with `config` (default [`default_config`]; its `diff_ids` are replaced by
    /// the layers'); blobs the registry has are skipped.
    ///
    /// # Errors
    /// `InvalidInput` for a bad reference; `Backend` for registry failures.
    pub async fn push_layers(
        &self,
        image: &str,
        layers: Vec<PushLayer>,
        config: Option<&ImageConfiguration>,
    ) -> Result<PushReport> {
        let r = parse_ref(image)?;
        self.prepare(&r).await?;
        let base = config.cloned().unwrap_or_else(default_config);
        let diff_ids: Vec<String> = layers.iter().map(|l| l.diff_id.clone()).collect();
        let cfg = if config.is_some() {
            let mut c = base.clone();
            let mut rootfs = RootFs::default();
            rootfs.set_diff_ids(diff_ids);
            c.set_rootfs(rootfs);
            serde_json::to_vec(&c).map_err(spec_error)?
        } else {
            derive_config(&base, diff_ids, "slacker push")?
        };
        let (mut report, body) = self.push_parts(&r, layers, cfg, "plain", 0).await?;
        let (digest, n) = self.put_manifest(&r, OCI_IMAGE_MEDIA_TYPE, body).await?;
        report.manifest_digest = digest;
        report.manifest_bytes += n;
        Ok(report)
    }

    /// Uploads layers and config; returns the report so far and the manifest body. Blobs
    /// up to `inline_max` bytes are also embedded in their descriptors as `data`.
    async fn push_parts(
        &self,
        r: &Reference,
        layers: Vec<PushLayer>,
        config: Vec<u8>,
        kind: &str,
        inline_max: u64,
    ) -> Result<(PushReport, Vec<u8>)> {
        let mut report = PushReport::default();
        let embed = |data: &[u8]| {
            (data.len() as u64 <= inline_max)
                .then(|| base64::engine::general_purpose::STANDARD.encode(data))
        };
        let layer_data: Vec<Option<String>> = layers.iter().map(|l| embed(&l.data)).collect();
        let config_data = embed(&config);
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
        let (mut layers_up, mut cfg) = (layers_up?, cfg?);
        let with_data = |mut d: Descriptor, t: &mut BlobTransfer, data: Option<String>| {
            t.embedded = data.is_some();
            d.set_data(data);
            d
        };
        let descs = layers_up
            .iter_mut()
            .zip(layer_data)
            .map(|(t, data)| {
                Ok(with_data(
                    descriptor(&t.media_type, &t.digest, t.size)?,
                    t,
                    data,
                ))
            })
            .collect::<Result<Vec<_>>>()?;
        let cfg_desc = with_data(
            descriptor(IMAGE_CONFIG_MEDIA_TYPE, &cfg.digest, cfg.size)?,
            &mut cfg,
            config_data,
        );
        report.blobs.extend(layers_up);
        report.blobs.push(cfg.clone());
        let mut b = ImageManifestBuilder::default()
            .schema_version(2u32)
            .media_type(MediaType::ImageManifest)
            .config(cfg_desc)
            .layers(descs)
            .annotations(HashMap::from([(
                KIND_ANNOTATION.to_owned(),
                kind.to_owned(),
            )]));
        if kind == "reference" {
            b = b.artifact_type(MediaType::Other(REFERENCE_ARTIFACT_TYPE.to_owned()));
        }
        let manifest = b.build().map_err(spec_error)?;
        let body = serde_json::to_vec(&manifest).map_err(spec_error)?;
        Ok((report, body))
    }

    /// Pushes layer `top` of `store` as image `image`: [`LayerStore::diff`] (a snapshot,
    /// O(1)) and a 2 KiB reference layer, with the config of [`PushOptions::config`].
    /// With [`PushOptions::plain_export`], also the plain image (its tree as one
    /// tar+gzip layer, see [`LayerStore::export_tar`]) and an index of both under the
    /// tag, platform from the config. Pushing the same layer with the same config to the
    /// same tag again reuses the plain image already there (when the registry still has
    /// all of it) instead of exporting the volume again
    /// ([`PushReport::plain_export_reused`]).
    ///
    /// # Errors
    /// Store errors from `diff`/`export_tar`; `Backend` for registry failures.
    pub async fn push_image<B: Backend>(
        &self,
        store: &LayerStore<B>,
        top: &str,
        image: &str,
        options: &PushOptions,
    ) -> Result<PushReport> {
        let r = parse_ref(image)?;
        self.prepare(&r).await?;
        let base = options.config.clone().unwrap_or_else(default_config);
        let diff = store.diff(top).await?;
        let layer = PushLayer::reference(&diff);
        let cfg = derive_config(
            &base,
            vec![layer.diff_id.clone()],
            "slacker: image flattened into a snapshot reference",
        )?;
        let inline_max = options.inline_max_bytes.unwrap_or(INLINE_MAX_BYTES);
        let (mut report, body) = self
            .push_parts(&r, vec![layer], cfg, "reference", inline_max)
            .await?;
        if !options.plain_export {
            let (digest, n) = self.put_manifest(&r, OCI_IMAGE_MEDIA_TYPE, body).await?;
            report.manifest_digest = digest;
            report.manifest_bytes += n;
            return Ok(report);
        }
        let ref_digest = sha256_digest(&body);
        let ref_size = body.len() as u64;
        let (_, n) = self
            .put_manifest(&by_digest(&r, &ref_digest), OCI_IMAGE_MEDIA_TYPE, body)
            .await?;
        report.manifest_digest = ref_digest.clone();
        report.manifest_bytes += n;

        // Pushed before (the same volume under the same config gives the same reference
        // manifest): reuse the plain image if the registry still has all of it.
        if let Some(prev) = self.existing_plain(&r, &ref_digest).await {
            report.index_digest = Some(prev.index);
            report.plain_manifest_digest = Some(prev.plain);
            report.plain_export_lossless = prev.lossless;
            report.plain_export_reused = true;
            return Ok(report);
        }

        // The plain image: the volume's file tree as one tar+gzip layer.
        let scratch = tempfile::tempdir()
            .map_err(|e| Error::backend("oci", format!("scratch directory: {e}")))?;
        let tar_path = scratch.path().join("plain.tar");
        let lossless = store.export_tar(top, &tar_path).await?;
        report.plain_export_lossless = Some(lossless);
        let layer = tokio::task::spawn_blocking(move || -> Result<PushLayer> {
            let io = |e: std::io::Error| Error::backend("oci", format!("plain export: {e}"));
            let mut f = std::fs::File::open(&tar_path).map_err(io)?;
            let mut hasher = Sha256::new();
            let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::new(6));
            let mut buf = vec![0u8; 1 << 20];
            loop {
                let n = f.read(&mut buf).map_err(io)?;
                if n == 0 {
                    break;
                }
                hasher.update(&buf[..n]);
                gz.write_all(&buf[..n]).map_err(io)?;
            }
            let data = gz.finish().map_err(io)?;
            Ok(PushLayer::new(
                IMAGE_LAYER_GZIP_MEDIA_TYPE,
                data,
                hex_digest(hasher.finalize().as_slice()),
            ))
        })
        .await
        .map_err(oci_error)??;
        let cfg = derive_config(
            &base,
            vec![layer.diff_id.clone()],
            "slacker: plain export of the flattened image",
        )?;
        let (plain, plain_body) = self.push_parts(&r, vec![layer], cfg, "plain", 0).await?;
        report.blobs.extend(plain.blobs);
        let plain_digest = sha256_digest(&plain_body);
        let plain_size = plain_body.len() as u64;
        let (_, n) = self
            .put_manifest(
                &by_digest(&r, &plain_digest),
                OCI_IMAGE_MEDIA_TYPE,
                plain_body,
            )
            .await?;
        report.manifest_bytes += n;
        let platform = PlatformBuilder::default()
            .architecture(base.architecture().clone())
            .os(base.os().clone())
            .build()
            .map_err(spec_error)?;
        let entry = |digest: &str, size: u64, kind: &str| -> Result<Descriptor> {
            let mut b = DescriptorBuilder::default()
                .media_type(MediaType::ImageManifest)
                .digest(
                    digest
                        .parse::<oci_spec::image::Digest>()
                        .map_err(spec_error)?,
                )
                .size(size)
                .platform(platform.clone())
                .annotations(if kind == "plain" {
                    HashMap::from([
                        (KIND_ANNOTATION.to_owned(), kind.to_owned()),
                        (LOSSLESS_ANNOTATION.to_owned(), lossless.to_string()),
                    ])
                } else {
                    HashMap::from([(KIND_ANNOTATION.to_owned(), kind.to_owned())])
                });
            if kind == "reference" {
                b = b.artifact_type(MediaType::Other(REFERENCE_ARTIFACT_TYPE.to_owned()));
            }
            b.build().map_err(spec_error)
        };
        let index = ImageIndexBuilder::default()
            .schema_version(2u32)
            .media_type(MediaType::ImageIndex)
            .manifests(vec![
                entry(&plain_digest, plain_size, "plain")?,
                entry(&ref_digest, ref_size, "reference")?,
            ])
            .build()
            .map_err(spec_error)?;
        let body = serde_json::to_vec(&index).map_err(spec_error)?;
        let (digest, n) = self
            .put_manifest(&r, OCI_IMAGE_INDEX_MEDIA_TYPE, body)
            .await?;
        report.manifest_bytes += n;
        report.index_digest = Some(digest);
        report.plain_manifest_digest = Some(plain_digest);
        Ok(report)
    }

    /// The plain image a previous [`push_image`](Self::push_image) left under tag `r`,
    /// if the tag is an index whose reference entry is `ref_digest` and the registry
    /// still has the plain manifest (matching its digest), its config and its layers.
    /// Anything else (no tag, another image, a missing blob, a registry error) is `None`:
    /// the caller exports again.
    async fn existing_plain(&self, r: &Reference, ref_digest: &str) -> Option<PreviousPlain> {
        let auth = self.prepare(r).await.ok()?;
        let (body, _) = self
            .client
            .pull_manifest_raw(r, &auth, &MANIFEST_TYPES)
            .await
            .ok()?;
        let index_digest = sha256_digest(&body);
        let index: ImageIndex = serde_json::from_slice(&body).ok()?;
        let kind = |e: &Descriptor| {
            e.annotations()
                .as_ref()
                .and_then(|a| a.get(KIND_ANNOTATION).cloned())
        };
        let entries = index.manifests();
        if !entries.iter().any(|e| {
            kind(e).as_deref() == Some("reference") && e.digest().to_string() == ref_digest
        }) {
            return None;
        }
        let plain = entries
            .iter()
            .find(|e| kind(e).as_deref() == Some("plain"))?;
        let plain_digest = plain.digest().to_string();
        let (body, _) = self
            .client
            .pull_manifest_raw(&by_digest(r, &plain_digest), &auth, &MANIFEST_TYPES)
            .await
            .ok()?;
        if sha256_digest(&body) != plain_digest {
            return None;
        }
        let manifest: ImageManifest = serde_json::from_slice(&body).ok()?;
        for d in std::iter::once(manifest.config()).chain(manifest.layers()) {
            let there = self.client.blob_exists(r, d.digest().as_ref()).await.ok()?;
            if !there {
                return None;
            }
        }
        let lossless = plain
            .annotations()
            .as_ref()
            .and_then(|a| a.get(LOSSLESS_ANNOTATION))
            .and_then(|v| v.parse().ok());
        Some(PreviousPlain {
            index: index_digest,
            plain: plain_digest,
            lossless,
        })
    }

    /// Fetches the image manifest of `image`. From an index, it picks the entry of kind
    /// `want` (`reference` or `plain`, by [`KIND_ANNOTATION`] or `artifactType`), or,
    /// for `plain`, the first entry for this host's platform.
    ///
    /// # Errors
    /// `NotFound` if the index has no such entry; `InvalidInput` for a malformed
    /// manifest; `Integrity` for a manifest that does not match its digest; `Backend`
    /// for registry failures.
    pub async fn pull_manifest(&self, image: &str, want: &str) -> Result<PulledManifest> {
        let r = parse_ref(image)?;
        let t = std::time::Instant::now();
        let auth = self.prepare(&r).await?;
        tracing::debug!(target: "slacker_oci::timing", step = "credentials", image, us = t.elapsed().as_micros() as u64);
        let (body, digest) = self.manifest_raw(&r, &auth).await?;
        tracing::debug!(target: "slacker_oci::timing", step = "manifest GET", image, us = t.elapsed().as_micros() as u64);
        let mut bytes = body.len() as u64;
        let probe: serde_json::Value = serde_json::from_slice(&body)
            .map_err(|e| Error::invalid(format!("manifest of {image}: {e}")))?;
        let mut digest = digest;
        let mut picked = None;
        let body = if probe.get("manifests").is_some() {
            let index: ImageIndex = serde_json::from_slice(&body)
                .map_err(|e| Error::invalid(format!("index of {image}: {e}")))?;
            let kind_of = |e: &Descriptor| -> &'static str {
                let annotated = e
                    .annotations()
                    .as_ref()
                    .and_then(|a| a.get(KIND_ANNOTATION))
                    .map(String::as_str);
                let artifact = e.artifact_type().as_ref().map(|t| t.to_string());
                if annotated == Some("reference")
                    || artifact.as_deref() == Some(REFERENCE_ARTIFACT_TYPE)
                {
                    "reference"
                } else {
                    "plain"
                }
            };
            let host = (Arch::default(), Os::default());
            let entry = index
                .manifests()
                .iter()
                .find(|e| {
                    kind_of(e) == want
                        && (want == "reference"
                            || e.platform()
                                .as_ref()
                                .is_none_or(|p| (p.architecture().clone(), p.os().clone()) == host))
                })
                .ok_or_else(|| {
                    Error::not_found(
                        slacker_core::ObjectKind::Other,
                        format!("{want} manifest in the index of {image}"),
                    )
                })?;
            let d = entry.digest().to_string();
            let (body, _) = self.manifest_raw(&by_digest(&r, &d), &auth).await?;
            if sha256_digest(&body) != d {
                return Err(Error::Integrity(format!(
                    "manifest {d} does not match its digest"
                )));
            }
            bytes += body.len() as u64;
            digest = d;
            picked = Some(want.to_owned());
            body
        } else {
            body
        };
        let manifest: ImageManifest = serde_json::from_slice(&body)
            .map_err(|e| Error::invalid(format!("manifest {digest}: {e}")))?;
        Ok(PulledManifest {
            digest,
            config: manifest.config().clone(),
            layers: manifest.layers().clone(),
            manifest,
            bytes,
            picked_from_index: picked,
        })
    }

    /// A blob of `image` in memory, checked against `desc`'s digest: the data `desc`
    /// embeds (no request; also checked against `desc`'s size), else downloaded.
    ///
    /// # Errors
    /// `Integrity` for a digest mismatch, or embedded data that is not base64 or not of
    /// the descriptor's size; `Backend` for registry failures.
    pub async fn pull_blob(&self, image: &str, desc: &Descriptor) -> Result<Vec<u8>> {
        if let Some(data) = embedded(desc)? {
            return Ok(data);
        }
        let r = parse_ref(image)?;
        let auth = self.prepare(&r).await?;
        let out = if self.open_registry(&r, &auth).await {
            let url = format!(
                "{}/v2/{}/blobs/{}",
                self.base_url(&r),
                r.repository(),
                desc.digest()
            );
            let resp = self.get_ok(&url, None).await?;
            read_capped(resp, desc.size(), &url).await?
        } else {
            let mut out =
                Vec::with_capacity(usize::try_from(desc.size()).unwrap_or(0).min(1 << 30));
            self.client
                .pull_blob(&r, &to_client_desc(desc), &mut out)
                .await
                .map_err(blob_error)?;
            out
        };
        if sha256_digest(&out) != desc.digest().to_string() {
            return Err(Error::Integrity(format!(
                "blob {} does not match its digest",
                desc.digest()
            )));
        }
        Ok(out)
    }

    /// Fetches and parses the config of `image` (the plain entry of an index, else its
    /// manifest's).
    ///
    /// # Errors
    /// As [`pull_manifest`](Self::pull_manifest) and [`pull_blob`](Self::pull_blob);
    /// `InvalidInput` for a malformed config.
    pub async fn pull_config(&self, image: &str) -> Result<ImageConfiguration> {
        let m = match self.pull_manifest(image, "reference").await {
            Err(e) if e.kind() == slacker_core::ErrorKind::NotFound => {
                self.pull_manifest(image, "plain").await?
            }
            other => other?,
        };
        let bytes = self.pull_blob(image, &m.config).await?;
        ImageConfiguration::from_reader(&bytes[..])
            .map_err(|e| Error::invalid(format!("image config of {image}: {e}")))
    }

    /// Pulls `image` into `store`: manifest (the slacker entry of an index, else the
    /// plain one), config, then every layer not already in the store is downloaded and
    /// verified (its digest, and its uncompressed digest against the config's
    /// `diff_ids`) before any is applied with [`LayerStore::apply_diff`] under its
    /// chain id. Reference layers are recorded lazily (no data moves); traditional
    /// layers are unpacked.
    ///
    /// # Errors
    /// Registry failures (`Backend`), malformed manifests or configs (`InvalidInput`),
    /// blobs or configs that do not match (`Integrity`: nothing is recorded), and the
    /// errors of `apply_diff`.
    pub async fn pull_image<B: Backend>(
        &self,
        store: &LayerStore<B>,
        image: &str,
    ) -> Result<PullReport> {
        let t = std::time::Instant::now();
        let m = self.image_manifest(image).await?;
        tracing::debug!(target: "slacker_oci::timing", step = "manifest", image, us = t.elapsed().as_micros() as u64);
        let r = self.pull_manifested(store, image, m).await;
        tracing::debug!(target: "slacker_oci::timing", step = "pull_image", image, us = t.elapsed().as_micros() as u64);
        r
    }

    /// The manifest [`pull_image`](Self::pull_image) uses: the slacker entry of an index,
    /// else the plain one.
    pub(crate) async fn image_manifest(&self, image: &str) -> Result<PulledManifest> {
        match self.pull_manifest(image, "reference").await {
            Err(e) if e.kind() == slacker_core::ErrorKind::NotFound => {
                self.pull_manifest(image, "plain").await
            }
            other => other,
        }
    }

    /// [`pull_image`](Self::pull_image) once the manifest is known.
    pub(crate) async fn pull_manifested<B: Backend>(
        &self,
        store: &LayerStore<B>,
        image: &str,
        m: PulledManifest,
    ) -> Result<PullReport> {
        if m.layers.is_empty() {
            return Err(Error::invalid(format!("image {image} has no layers")));
        }
        // The config and the reference layers (2 KiB each) at once: the store can only
        // say which layers it lacks once the config names their chain ids, and a
        // reference layer costs less to fetch again than a round trip to wait for.
        let early = async {
            let mut out = BTreeMap::new();
            for (i, desc) in m.layers.iter().enumerate() {
                if desc.media_type().to_string() == REFERENCE_MEDIA_TYPE
                    && desc.size() <= EARLY_LAYER_BYTES
                {
                    out.insert(i, self.pull_blob(image, desc).await?);
                }
            }
            Ok::<_, Error>(out)
        };
        let (config, early) = tokio::join!(self.pull_blob(image, &m.config), early);
        let (config, mut early) = (config?, early?);
        let cfg = ImageConfiguration::from_reader(&config[..])
            .map_err(|e| Error::invalid(format!("image config of {image}: {e}")))?;
        let diff_ids = cfg.rootfs().diff_ids().clone();
        if diff_ids.len() != m.layers.len() {
            return Err(Error::Integrity(format!(
                "the config of {image} lists {} diff_ids for {} layers",
                diff_ids.len(),
                m.layers.len()
            )));
        }
        // Ids (chain ids) and what must be downloaded.
        let mut ids = Vec::new();
        let mut chain: Option<String> = None;
        for (desc, diff_id) in m.layers.iter().zip(&diff_ids) {
            let mt = desc.media_type().to_string();
            if !LAYER_MEDIA_TYPES.contains(&mt.as_str()) {
                return Err(Error::invalid(format!(
                    "layer {} has unsupported media type {mt}",
                    desc.digest()
                )));
            }
            let next = match &chain {
                None => diff_id.clone(),
                Some(c) => sha256_digest(format!("{c} {diff_id}").as_bytes()),
            };
            ids.push(next.trim_start_matches("sha256:").to_owned());
            chain = Some(next);
        }
        // Download and verify everything missing before anything is recorded.
        let mut blobs: BTreeMap<usize, Blob> = BTreeMap::new();
        for (i, desc) in m.layers.iter().enumerate() {
            if store.exists(&ids[i]).await? {
                continue;
            }
            let blob = if let Some(b) = early.remove(&i) {
                Blob::Memory(b)
            } else if desc.size() > SPOOL_ABOVE {
                Blob::File(self.spool(image, desc).await?)
            } else {
                Blob::Memory(self.pull_blob(image, desc).await?)
            };
            // A small blob (a 2 KiB reference layer) is hashed here: a thread hand-off
            // would cost more than the hash.
            let (blob, got) = match blob {
                Blob::Memory(v) if v.len() as u64 <= EARLY_LAYER_BYTES => {
                    let blob = Blob::Memory(v);
                    let d = diff_id_of(&blob);
                    (blob, d)
                }
                blob => tokio::task::spawn_blocking(move || {
                    let d = diff_id_of(&blob);
                    (blob, d)
                })
                .await
                .map_err(oci_error)?,
            };
            let got = got?;
            if got != diff_ids[i] {
                return Err(Error::Integrity(format!(
                    "layer {} uncompresses to {got}, but the config says {}",
                    desc.digest(),
                    diff_ids[i]
                )));
            }
            blobs.insert(i, blob);
        }
        let mut report = PullReport {
            manifest_digest: m.digest.clone(),
            picked_from_index: m.picked_from_index.clone(),
            manifest_bytes: m.bytes,
            config_bytes: if m.config.data().is_some() {
                0
            } else {
                config.len() as u64
            },
            config: cfg,
            ..PullReport::default()
        };
        let mut parent: Option<String> = None;
        for (i, desc) in m.layers.iter().enumerate() {
            let id = ids[i].clone();
            let (transferred, kind, losses) = match blobs.remove(&i) {
                None => (false, store.layer(&id).await?.kind, Vec::new()),
                Some(blob) => {
                    let t = std::time::Instant::now();
                    let applied = match blob {
                        Blob::Memory(data) => {
                            store.apply_diff_bytes(&id, parent.as_deref(), data).await?
                        }
                        Blob::File(f) => store.apply_diff(&id, parent.as_deref(), f).await?,
                    };
                    tracing::debug!(target: "slacker_oci::timing", step = "apply_diff", layer = %id, us = t.elapsed().as_micros() as u64);
                    (true, applied.kind, applied.losses)
                }
            };
            report.layers.push(PulledLayer {
                id: id.clone(),
                blob: BlobTransfer {
                    digest: desc.digest().to_string(),
                    media_type: desc.media_type().to_string(),
                    size: desc.size(),
                    transferred,
                    embedded: transferred && desc.data().is_some(),
                },
                kind,
                losses,
            });
            parent = Some(id);
        }
        report.top_layer = parent.expect("at least one layer");
        Ok(report)
    }

    /// Downloads a large blob into an unlinked temporary file (digest-verified by the
    /// client).
    async fn spool(&self, image: &str, desc: &Descriptor) -> Result<std::fs::File> {
        let r = parse_ref(image)?;
        self.prepare(&r).await?;
        let file = tempfile::tempfile().map_err(|e| Error::backend("oci", e.to_string()))?;
        let mut out = tokio::fs::File::from_std(
            file.try_clone()
                .map_err(|e| Error::backend("oci", e.to_string()))?,
        );
        self.client
            .pull_blob(&r, &to_client_desc(desc), &mut out)
            .await
            .map_err(blob_error)?;
        tokio::io::AsyncWriteExt::flush(&mut out)
            .await
            .map_err(|e| Error::backend("oci", e.to_string()))?;
        drop(out);
        let mut file = file;
        file.seek(std::io::SeekFrom::Start(0))
            .map_err(|e| Error::backend("oci", e.to_string()))?;
        Ok(file)
    }
}

/// The blob `desc` embeds as `data`, checked against its size and digest; `None` if it
/// embeds nothing.
///
/// # Errors
/// `Integrity` for data that is not base64, or not of `desc`'s size or digest.
pub(crate) fn embedded(desc: &Descriptor) -> Result<Option<Vec<u8>>> {
    let Some(data) = desc.data() else {
        return Ok(None);
    };
    let bad = |why: String| {
        Error::Integrity(format!(
            "the data embedded for blob {} {why}",
            desc.digest()
        ))
    };
    // Base64 of `size` bytes is about 4/3 of it: refuse more before decoding.
    if data.len() as u64 > desc.size().saturating_mul(4) / 3 + 4 {
        return Err(bad(format!("is longer than its {} bytes", desc.size())));
    }
    let out = base64::engine::general_purpose::STANDARD
        .decode(data)
        .map_err(|e| bad(format!("is not base64: {e}")))?;
    if out.len() as u64 != desc.size() {
        return Err(bad(format!(
            "is {} bytes, not the {} its descriptor says",
            out.len(),
            desc.size()
        )));
    }
    if sha256_digest(&out) != desc.digest().to_string() {
        return Err(bad("does not match its digest".to_owned()));
    }
    Ok(Some(out))
}

/// `sha256:` of a layer blob's uncompressed content (its `diff_id`); the blob is
/// rewound afterwards.
fn diff_id_of(blob: &Blob) -> Result<String> {
    fn digest<R: Read + Send>(r: R) -> Result<String> {
        let mut r = r;
        let head = slacker_core::layer::traditional::read_prefix(&mut r, 6)?;
        let mut d = slacker_core::layer::traditional::decompress(head, r)?;
        let mut h = Sha256::new();
        let mut buf = vec![0u8; 1 << 20];
        loop {
            let n = d
                .read(&mut buf)
                .map_err(|e| Error::invalid(format!("layer stream: {e}")))?;
            if n == 0 {
                break;
            }
            h.update(&buf[..n]);
        }
        Ok(hex_digest(h.finalize().as_slice()))
    }
    match blob {
        Blob::Memory(v) => digest(&v[..]),
        Blob::File(f) => {
            let mut f2 = f
                .try_clone()
                .map_err(|e| Error::backend("oci", e.to_string()))?;
            f2.seek(std::io::SeekFrom::Start(0))
                .map_err(|e| Error::backend("oci", e.to_string()))?;
            let d = digest(std::io::BufReader::new(&mut f2));
            f2.seek(std::io::SeekFrom::Start(0))
                .map_err(|e| Error::backend("oci", e.to_string()))?;
            d
        }
    }
}

/// Installs the process-wide rustls crypto provider (`ring`) once, when rustls is the
/// TLS backend.
fn install_tls_provider() {
    #[cfg(feature = "rustls")]
    {
        static ONCE: std::sync::Once = std::sync::Once::new();
        ONCE.call_once(|| {
            // Another component may have installed one already: keep it.
            let _ = rustls::crypto::ring::default_provider().install_default();
        });
    }
}

/// A tar of the tree under `dir` for the plain export (see
/// [`slacker_core::layer::archive::TreeTar`]: every attribute kept).
///
/// # Errors
/// `Backend` for IO errors.
pub fn tar_tree(dir: &Path) -> Result<Vec<u8>> {
    let mut t = slacker_core::layer::archive::TreeTar::new(Vec::new());
    t.append_tree(dir, &["lost+found"])?;
    t.finish()
}
