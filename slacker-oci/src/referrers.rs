//! Startup traces as OCI artifacts attached to an image through the referrers API.
//!
//! ```text
//!  container ready ─▶ LazyVolume::access_trace ─▶ StartupTrace ─push_trace─▶ registry
//!                                                     artifact manifest, subject = image manifest
//!  deploy ─▶ pull_image ┬─▶ (lazy layers)                              │
//!                       └─ pull_trace ◀── referrers API (or the sha256-<hex> tag) ┘
//!                              └─▶ LazyVolume::prefetch (bounded parallelism and bytes)
//! ```
//!
//! A trace is an ordinary OCI artifact: an image manifest with `artifactType`
//! [`TRACE_ARTIFACT_TYPE`], the empty config (`application/vnd.oci.empty.v1+json`), one
//! layer of media type [`TRACE_MEDIA_TYPE`] (the JSON of [`StartupTrace`]) and a
//! `subject` naming the image manifest; a trace of up to [`INLINE_MAX_BYTES`](crate::INLINE_MAX_BYTES)
//! is also embedded in its layer descriptor (`data`), which saves a deploy one request.
//! Nothing is added to the image itself: its
//! manifest, digest and tags stay as they were, and an image without a trace pulls and
//! runs as before ([`RegistryClient::pull_trace`] answers `None`).
//!
//! Registries with the referrers API (distribution-spec 1.1) list the artifact under
//! `GET /v2/<name>/referrers/<digest>`. Debian's `docker-registry` (distribution 2.8)
//! lacks it, so a push also maintains the spec's fallback: an image index tagged
//! `sha256-<hex of the subject digest>` listing every referrer (read, extended, written
//! back; the registry has no compare-and-swap, so each pusher checks after a pause that its
//! entry is still listed and adds it again if a concurrent pusher overwrote it). A small
//! artifact manifest (up to [`INLINE_MAX_BYTES`](crate::INLINE_MAX_BYTES)) is embedded in
//! its index entry (`data`, checked against the entry's size and digest on read), so a
//! deploy finds the trace with the index alone. Fetching asks the referrers API and the
//! fallback tag at once and uses the tag only when the registry has no referrers API
//! (through `oci-client`'s `pull_referrers` for registries that want authentication).

use base64::Engine;
use oci_client::Reference;
use oci_client::manifest::{OCI_IMAGE_INDEX_MEDIA_TYPE, OCI_IMAGE_MEDIA_TYPE, OciDescriptor};
use oci_client::secrets::RegistryAuth;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use slacker_core::{BlockRange, BlockSize, Error, ErrorKind, Result};

use crate::{MAX_MANIFEST_BYTES, RegistryClient, read_capped, sha256_digest};

fn oci_error(e: impl std::fmt::Display) -> Error {
    Error::backend("oci", e.to_string())
}

/// `artifactType` of a startup-trace artifact.
pub const TRACE_ARTIFACT_TYPE: &str = "application/vnd.slacker.startup-trace.v1";
/// Media type of the trace blob (the JSON of a [`StartupTrace`]).
pub const TRACE_MEDIA_TYPE: &str = "application/vnd.slacker.startup-trace.v1+json";
/// The OCI empty descriptor's media type (the config of an artifact).
pub const EMPTY_MEDIA_TYPE: &str = "application/vnd.oci.empty.v1+json";
/// The trace format version.
pub const TRACE_VERSION: u32 = 1;
/// Largest trace blob [`StartupTrace::decode`] accepts, in bytes.
pub const MAX_TRACE_BYTES: usize = 8 << 20;

const EMPTY_JSON: &[u8] = b"{}";

/// The blocks a container read before it was ready: what to prefetch on the next start
/// of the same image. Runs of blocks, sorted and disjoint.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct StartupTrace {
    /// Format version ([`TRACE_VERSION`]).
    pub version: u32,
    /// Block size of the volume the trace was recorded on.
    pub block_size: BlockSize,
    /// Blocks of that volume (the trace's ranges lie below).
    pub blocks: u32,
    /// `[start, end)` block runs, flattened: `[s0, e0, s1, e1, …]`.
    pub ranges: Vec<u32>,
}

impl StartupTrace {
    /// A trace of `ranges` (any order, may overlap: they are merged) on a volume of
    /// `blocks` blocks of `block_size`.
    pub fn new(
        block_size: BlockSize,
        blocks: u32,
        ranges: impl IntoIterator<Item = BlockRange>,
    ) -> Self {
        let mut bm = slacker_core::BlockBitmap::new();
        for r in ranges {
            bm.insert_range(BlockRange::new(r.start.min(blocks), r.end.min(blocks)));
        }
        let ranges = bm.runs().flat_map(|r| [r.start, r.end]).collect();
        Self {
            version: TRACE_VERSION,
            block_size,
            blocks,
            ranges,
        }
    }

    /// The runs, in order.
    pub fn runs(&self) -> impl Iterator<Item = BlockRange> + '_ {
        self.ranges
            .chunks_exact(2)
            .map(|c| BlockRange::new(c[0], c[1]))
    }

    /// Bytes the trace covers.
    pub fn bytes(&self) -> u64 {
        self.runs().map(|r| r.len()).sum::<u64>() * self.block_size.bytes()
    }

    /// The first runs of the trace (in block order) covering at most `max_bytes`: the
    /// byte bound of a prefetch.
    pub fn clipped(&self, max_bytes: u64) -> Vec<BlockRange> {
        let bs = self.block_size.bytes();
        let mut left = max_bytes / bs;
        let mut out = Vec::new();
        for r in self.runs() {
            if left == 0 {
                break;
            }
            let n = r.len().min(left);
            out.push(BlockRange::new(r.start, r.start + n as u32));
            left -= n;
        }
        out
    }

    /// The blob: compact JSON.
    pub fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("a trace always serializes")
    }

    /// Parses a trace blob strictly: at most [`MAX_TRACE_BYTES`], no unknown fields,
    /// version [`TRACE_VERSION`], runs non-empty, sorted, disjoint and inside the volume.
    ///
    /// # Errors
    /// `InvalidInput` naming the problem.
    pub fn decode(bytes: &[u8]) -> Result<Self> {
        if bytes.len() > MAX_TRACE_BYTES {
            return Err(Error::invalid(format!(
                "startup trace of {} bytes, at most {MAX_TRACE_BYTES} allowed",
                bytes.len()
            )));
        }
        let t: StartupTrace = serde_json::from_slice(bytes)
            .map_err(|e| Error::invalid(format!("startup trace: {e}")))?;
        if t.version != TRACE_VERSION {
            return Err(Error::invalid(format!(
                "startup trace version {} is not supported (only {TRACE_VERSION})",
                t.version
            )));
        }
        if t.ranges.len() % 2 != 0 {
            return Err(Error::invalid(
                "startup trace: an odd number of range bounds",
            ));
        }
        let mut prev_end = None;
        for r in t.ranges.chunks_exact(2) {
            let (s, e) = (r[0], r[1]);
            if s >= e || e > t.blocks || prev_end.is_some_and(|p| s <= p) {
                return Err(Error::invalid(format!(
                    "startup trace: run [{s}, {e}) is empty, out of order, adjacent to the previous one or past {} blocks",
                    t.blocks
                )));
            }
            prev_end = Some(e);
        }
        Ok(t)
    }
}

/// What [`RegistryClient::push_trace`] did.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct TracePush {
    /// Digest of the artifact manifest.
    pub manifest_digest: String,
    /// The image manifest it refers to (its subject).
    pub subject_digest: String,
    /// Bytes uploaded (trace blob, empty config if new, manifest, fallback index).
    pub bytes_uploaded: u64,
    /// The fallback tag written (`sha256-<hex>`).
    pub fallback_tag: String,
}

/// A trace as fetched.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct PulledTrace {
    /// The trace.
    pub trace: StartupTrace,
    /// Digest of its artifact manifest.
    pub manifest_digest: String,
    /// Bytes downloaded (referrers list, manifest, blob; what rides embedded in the
    /// list or the manifest counts once).
    pub bytes: u64,
}

/// An entry of a referrers list (the referrers API's answer or the fallback index), as
/// far as a trace lookup reads it.
#[derive(Deserialize)]
struct Referrer {
    digest: String,
    #[serde(default)]
    size: u64,
    #[serde(rename = "artifactType", default)]
    artifact_type: Option<String>,
    /// The artifact manifest itself, base64 (set by [`RegistryClient::push_trace`]).
    #[serde(default)]
    data: Option<String>,
}

/// A referrers list: an image index.
#[derive(Deserialize)]
struct ReferrerIndex {
    #[serde(default)]
    manifests: Vec<Referrer>,
}

fn with_digest(r: &Reference, digest: &str) -> Reference {
    Reference::with_digest(
        r.registry().to_owned(),
        r.repository().to_owned(),
        digest.to_owned(),
    )
}

fn with_tag(r: &Reference, tag: &str) -> Reference {
    Reference::with_tag(
        r.registry().to_owned(),
        r.repository().to_owned(),
        tag.to_owned(),
    )
}

fn parse(image: &str) -> Result<Reference> {
    image
        .parse()
        .map_err(|e| Error::invalid(format!("image reference {image:?}: {e}")))
}

/// The fallback tag of a subject: `sha256:abc…` → `sha256-abc…`.
pub fn fallback_tag(subject_digest: &str) -> String {
    subject_digest.replacen(':', "-", 1)
}

/// Times a pusher re-adds its entry to the fallback index after losing it to a concurrent
/// pusher before giving up.
const INDEX_ATTEMPTS: usize = 8;
/// Consecutive reads (a pause apart) that must list a pusher's entry.
const INDEX_CHECKS: usize = 2;

const MANIFEST_TYPES: [&str; 2] = [OCI_IMAGE_MEDIA_TYPE, OCI_IMAGE_INDEX_MEDIA_TYPE];

impl RegistryClient {
    async fn upload_blob(&self, r: &Reference, data: Vec<u8>) -> Result<(String, u64, bool)> {
        // `upload` retries the 500 that concurrent uploads of one blob (the empty config
        // of every trace) can get from distribution.
        let t = self.upload(r, "", data).await?;
        Ok((t.digest, t.size, t.transferred))
    }

    async fn put_raw(&self, r: &Reference, media_type: &str, body: Vec<u8>) -> Result<()> {
        self.put_manifest(r, media_type, body).await.map(|_| ())
    }

    /// The slacker manifest of `image` (the `reference` entry of an index, else the image
    /// manifest itself): digest, size and media type, as a descriptor for `subject`.
    async fn subject_of(&self, image: &str) -> Result<Value> {
        let m = match self.pull_manifest(image, "reference").await {
            Err(e) if e.kind() == ErrorKind::NotFound => self.pull_manifest(image, "plain").await?,
            other => other?,
        };
        let r = parse(image)?;
        let (body, _) = self
            .inner()
            .pull_manifest_raw(
                &with_digest(&r, &m.digest),
                &oci_client::secrets::RegistryAuth::Anonymous,
                &MANIFEST_TYPES,
            )
            .await
            .map_err(oci_error)?;
        if sha256_digest(&body) != m.digest {
            return Err(Error::Integrity(format!(
                "manifest {} does not match its digest",
                m.digest
            )));
        }
        let media_type = serde_json::from_slice::<Value>(&body)
            .ok()
            .and_then(|v| v["mediaType"].as_str().map(str::to_owned))
            .unwrap_or_else(|| OCI_IMAGE_MEDIA_TYPE.to_owned());
        Ok(json!({"mediaType": media_type, "digest": m.digest, "size": body.len()}))
    }

    /// Attaches `trace` to `image` (a tag or digest; for an index, its slacker entry) as a
    /// referrer artifact, and lists it under the fallback tag. The image is not changed.
    ///
    /// # Errors
    /// `NotFound`/`Backend` when the image or registry fails; `InvalidInput` for a bad
    /// reference.
    pub async fn push_trace(&self, image: &str, trace: &StartupTrace) -> Result<TracePush> {
        let r = parse(image)?;
        let subject = self.subject_of(image).await?;
        let subject_digest = subject["digest"].as_str().expect("set above").to_owned();
        let mut uploaded = 0;
        let (cfg_digest, cfg_size, new) = self.upload_blob(&r, EMPTY_JSON.to_vec()).await?;
        if new {
            uploaded += cfg_size;
        }
        let blob = trace.encode();
        // A small trace also rides in the manifest (`data`): a deploy then fetches it
        // with one request fewer.
        let embedded = (blob.len() as u64 <= crate::INLINE_MAX_BYTES)
            .then(|| base64::engine::general_purpose::STANDARD.encode(&blob));
        let (blob_digest, blob_size, new) = self.upload_blob(&r, blob).await?;
        if new {
            uploaded += blob_size;
        }
        let mut layer =
            json!({"mediaType": TRACE_MEDIA_TYPE, "digest": blob_digest, "size": blob_size});
        if let Some(data) = embedded {
            layer["data"] = data.into();
        }
        let manifest = json!({
            "schemaVersion": 2,
            "mediaType": OCI_IMAGE_MEDIA_TYPE,
            "artifactType": TRACE_ARTIFACT_TYPE,
            "config": {"mediaType": EMPTY_MEDIA_TYPE, "digest": cfg_digest, "size": cfg_size, "data": "e30="},
            "layers": [layer],
            "subject": subject,
        });
        let body = serde_json::to_vec(&manifest).expect("json");
        let body_for_index = body.clone();
        let manifest_digest = sha256_digest(&body);
        let manifest_size = body.len() as u64;
        uploaded += manifest_size;
        self.put_raw(
            &with_digest(&r, &manifest_digest),
            OCI_IMAGE_MEDIA_TYPE,
            body,
        )
        .await?;

        // The fallback tag: the referrers index, extended with this artifact. The registry
        // offers no compare-and-swap on tags, so two pushers can each read the index
        // and write it back without the other's entry. Each pusher therefore checks,
        // after a pause longer than its own read-modify-write took, that its entry is
        // still listed, and adds it again if not (bounded attempts).
        let tag = fallback_tag(&subject_digest);
        let tagged = with_tag(&r, &tag);
        let mut entry = json!({
            "mediaType": OCI_IMAGE_MEDIA_TYPE,
            "digest": manifest_digest,
            "size": manifest_size,
            "artifactType": TRACE_ARTIFACT_TYPE,
        });
        // The (small) artifact manifest rides in its index entry too (`data`): a deploy
        // then finds the trace with the index GET alone.
        if manifest_size <= crate::INLINE_MAX_BYTES {
            entry["data"] = base64::engine::general_purpose::STANDARD
                .encode(&body_for_index)
                .into();
        }
        let mut seen = 0;
        let mut attempts = 0;
        let mut pause = std::time::Duration::from_millis(5);
        while seen < INDEX_CHECKS {
            let t = std::time::Instant::now();
            let mut entries = self.fallback_entries(&tagged).await;
            if entries
                .iter()
                .any(|e| e["digest"].as_str() == Some(manifest_digest.as_str()))
            {
                seen += 1;
            } else {
                if attempts == INDEX_ATTEMPTS {
                    return Err(Error::backend(
                        "oci",
                        format!(
                            "the referrers index {tag} lost the trace {manifest_digest} {INDEX_ATTEMPTS} times to concurrent pushers; the trace is stored but not listed"
                        ),
                    ));
                }
                attempts += 1;
                seen = 0;
                entries.push(entry.clone());
                let index = serde_json::to_vec(&json!({
                    "schemaVersion": 2,
                    "mediaType": OCI_IMAGE_INDEX_MEDIA_TYPE,
                    "manifests": entries,
                }))
                .expect("json");
                uploaded += index.len() as u64;
                self.put_raw(&tagged, OCI_IMAGE_INDEX_MEDIA_TYPE, index)
                    .await?;
                // Wait longer than this read-modify-write took (another pusher's that
                // read before our write lands within it), jittered so pushers desynchronize.
                let jitter = u64::from(std::process::id() ^ (attempts as u32 * 7919)) % 5;
                pause = (t.elapsed() * 2).max(pause) + std::time::Duration::from_millis(jitter);
            }
            tokio::time::sleep(pause).await;
        }
        Ok(TracePush {
            manifest_digest,
            subject_digest,
            bytes_uploaded: uploaded,
            fallback_tag: tag,
        })
    }

    /// The entries of the fallback index `tagged` (none when it does not exist or cannot
    /// be read: an unreadable index is replaced).
    async fn fallback_entries(&self, tagged: &Reference) -> Vec<Value> {
        match self
            .inner()
            .pull_manifest_raw(
                tagged,
                &oci_client::secrets::RegistryAuth::Anonymous,
                &MANIFEST_TYPES,
            )
            .await
        {
            Ok((body, _)) => serde_json::from_slice::<Value>(&body)
                .ok()
                .and_then(|v| v["manifests"].as_array().cloned())
                .unwrap_or_default(),
            Err(_) => Vec::new(),
        }
    }

    /// The referrers of `subject_digest` (entries of any artifact type) and the bytes of
    /// their list: the referrers API, else the fallback tag; none when neither exists.
    /// On the open-registry pool both are asked at once (one round trip; the fallback's
    /// answer is used only when the registry has no referrers API).
    async fn trace_referrers(
        &self,
        r: &Reference,
        auth: &RegistryAuth,
        subject_digest: &str,
    ) -> Result<(Vec<Referrer>, u64)> {
        if !self.open_registry(r, auth).await {
            let index = self
                .inner()
                .pull_referrers(&with_digest(r, subject_digest), Some(TRACE_ARTIFACT_TYPE))
                .await
                .map_err(oci_error)?;
            let bytes = serde_json::to_vec(&index)
                .map(|v| v.len() as u64)
                .unwrap_or(0);
            let entries = index
                .manifests
                .into_iter()
                .map(|e| Referrer {
                    digest: e.digest,
                    size: u64::try_from(e.size).unwrap_or(0),
                    artifact_type: e.artifact_type,
                    data: None,
                })
                .collect();
            return Ok((entries, bytes));
        }
        let url = format!(
            "{}/v2/{}/referrers/{subject_digest}?artifactType={TRACE_ARTIFACT_TYPE}",
            self.base_url(r),
            r.repository()
        );
        let tagged = with_tag(r, &fallback_tag(subject_digest));
        let t = std::time::Instant::now();
        let api = async {
            let r = match self.get_ok(&url, Some(OCI_IMAGE_INDEX_MEDIA_TYPE)).await {
                Ok(resp) => read_capped(resp, MAX_MANIFEST_BYTES, &url).await.map(Some),
                // No referrers API (distribution 2.8).
                Err(e) if e.kind() == ErrorKind::NotFound => Ok(None),
                Err(e) => Err(e),
            };
            tracing::debug!(target: "slacker_oci::timing", step = "referrers API", us = t.elapsed().as_micros() as u64);
            r
        };
        let fallback = async {
            let r = match self.manifest_raw(&tagged, auth).await {
                Ok((body, _)) => Ok(Some(body)),
                Err(e) if e.kind() == ErrorKind::NotFound => Ok(None),
                Err(e) => Err(e),
            };
            tracing::debug!(target: "slacker_oci::timing", step = "referrers fallback tag", us = t.elapsed().as_micros() as u64);
            r
        };
        let (api, fallback) = tokio::join!(api, fallback);
        let body = match api? {
            Some(body) => body,
            None => match fallback? {
                Some(body) => body,
                None => return Ok((Vec::new(), 0)),
            },
        };
        let index: ReferrerIndex = serde_json::from_slice(&body)
            .map_err(|e| Error::invalid(format!("referrers of {subject_digest}: {e}")))?;
        Ok((index.manifests, body.len() as u64))
    }

    /// The newest startup trace attached to the image manifest `subject_digest` of
    /// `image`'s repository (referrers API, else the fallback tag), or `None` when it has
    /// none. Every manifest and blob is digest-checked.
    ///
    /// # Errors
    /// `InvalidInput` for a malformed subject digest, trace or artifact; `Integrity` for a digest
    /// mismatch; `Backend` for registry failures.
    pub async fn pull_trace(
        &self,
        image: &str,
        subject_digest: &str,
    ) -> Result<Option<PulledTrace>> {
        let r = parse(image)?;
        let valid = subject_digest
            .strip_prefix("sha256:")
            .is_some_and(|h| h.len() == 64 && h.bytes().all(|b| b.is_ascii_hexdigit()));
        if !valid {
            return Err(Error::invalid(format!(
                "subject digest {subject_digest:?} is not sha256:<64 hex>"
            )));
        }
        let auth = self.prepare(&r).await?;
        let (manifests, mut bytes) = self.trace_referrers(&r, &auth, subject_digest).await?;
        let Some(entry) = manifests
            .iter()
            .rev()
            .find(|e| e.artifact_type.as_deref() == Some(TRACE_ARTIFACT_TYPE))
        else {
            return Ok(None);
        };
        let body = match &entry.data {
            // Embedded in the index entry: checked against its size and digest
            // (`Integrity` on a mismatch, never a silent fetch instead).
            Some(data) => {
                let mut desc = crate::descriptor(OCI_IMAGE_MEDIA_TYPE, &entry.digest, entry.size)?;
                desc.set_data(Some(data.clone()));
                crate::embedded(&desc)?.unwrap_or_default()
            }
            None => {
                self.manifest_raw(&with_digest(&r, &entry.digest), &auth)
                    .await?
                    .0
            }
        };
        if sha256_digest(&body) != entry.digest {
            return Err(Error::Integrity(format!(
                "trace manifest {} does not match its digest",
                entry.digest
            )));
        }
        if entry.data.is_none() {
            bytes += body.len() as u64; // else counted in the list's bytes
        }
        let m: Value = serde_json::from_slice(&body)
            .map_err(|e| Error::invalid(format!("trace manifest {}: {e}", entry.digest)))?;
        if m["subject"]["digest"].as_str() != Some(subject_digest) {
            return Err(Error::invalid(format!(
                "trace manifest {} is not attached to {subject_digest}",
                entry.digest
            )));
        }
        let layers: Vec<OciDescriptor> = serde_json::from_value(m["layers"].clone())
            .map_err(|e| Error::invalid(format!("trace manifest layers: {e}")))?;
        let [layer] = layers.as_slice() else {
            return Err(Error::invalid("a trace manifest has exactly one layer"));
        };
        if layer.media_type != TRACE_MEDIA_TYPE || layer.size > MAX_TRACE_BYTES as i64 {
            return Err(Error::invalid(format!(
                "trace layer {} of {} bytes is not a startup trace",
                layer.media_type, layer.size
            )));
        }
        let mut desc = crate::descriptor(&layer.media_type, &layer.digest, layer.size as u64)?;
        // Embedded in the manifest: checked by `pull_blob` against size and digest.
        if let Some(data) = m["layers"][0]["data"].as_str() {
            desc.set_data(Some(data.to_owned()));
        }
        let blob = self.pull_blob(image, &desc).await?;
        if sha256_digest(&blob) != layer.digest {
            return Err(Error::Integrity(format!(
                "trace blob {} does not match its digest",
                layer.digest
            )));
        }
        if desc.data().is_none() {
            bytes += blob.len() as u64; // else counted in the manifest's bytes
        }
        Ok(Some(PulledTrace {
            trace: StartupTrace::decode(&blob)?,
            manifest_digest: entry.digest.clone(),
            bytes,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn traces_merge_clip_and_round_trip() {
        let t = StartupTrace::new(
            BlockSize::DEFAULT,
            100,
            [
                BlockRange::new(10, 20),
                BlockRange::new(15, 30),
                BlockRange::new(50, 60),
                BlockRange::new(95, 200),
            ],
        );
        assert_eq!(t.ranges, vec![10, 30, 50, 60, 95, 100]);
        assert_eq!(t.bytes(), 35 * 4096);
        assert_eq!(
            t.clipped(25 * 4096),
            vec![BlockRange::new(10, 30), BlockRange::new(50, 55)]
        );
        assert_eq!(StartupTrace::decode(&t.encode()).unwrap(), t);
    }

    #[test]
    fn malformed_traces_are_refused() {
        let good = StartupTrace::new(BlockSize::DEFAULT, 100, [BlockRange::new(1, 2)]);
        let text = String::from_utf8(good.encode()).unwrap();
        for bad in [
            text.replace("\"version\":1", "\"version\":2"),
            text.replace("[1,2]", "[2,1]"),
            text.replace("[1,2]", "[1,2,3]"),
            text.replace("[1,2]", "[1,2,2,5]"),
            text.replace("[1,2]", "[1,200]"),
            text.replace("\"blocks\":100", "\"blocks\":100,\"x\":1"),
            "not json".to_owned(),
        ] {
            let err = StartupTrace::decode(bad.as_bytes()).unwrap_err();
            assert_eq!(err.kind(), ErrorKind::InvalidInput, "{bad}");
        }
        let huge = vec![b' '; MAX_TRACE_BYTES + 1];
        assert_eq!(
            StartupTrace::decode(&huge).unwrap_err().kind(),
            ErrorKind::InvalidInput
        );
    }
}
