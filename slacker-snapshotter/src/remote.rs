//! Remote snapshots: the labels CRI and nerdctl put on a layer's `Prepare`
//! (`containerd.io/snapshot.ref`, `containerd.io/snapshot/cri.layer-digest`,
//! `containerd.io/snapshot/cri.image-ref`) let the snapshotter fetch the layer itself.
//! When the layer is a slacker reference layer, [`Remote::fetch_reference`] returns the
//! reference it holds; the snapshotter records the lazy snapshot under the chain id and
//! answers `AlreadyExists`, so containerd skips the download. Any other layer (a standard
//! tar+gzip one) is abandoned after [`MAX_REFERENCE_LAYER_BYTES`] and containerd
//! downloads and unpacks it as usual.
//!
//! The blob is fetched with `slacker-oci`'s registry client (anonymous, digest-verified),
//! over plain HTTP for the hosts the `[registry] plain_http` key names, HTTPS otherwise.

use std::io::Read;
use std::pin::Pin;
use std::task::{Context, Poll};

use slacker_core::layer::reference::{MAX_DOCUMENT_BYTES, Reference};

/// The largest layer taken for a reference layer: a reference tar is about 2 KiB; a
/// bigger blob is a standard layer and its download stops here.
pub const MAX_REFERENCE_LAYER_BYTES: usize = 64 << 10;

/// Why a remote layer could not be used.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RemoteError {
    /// The labels name an unparsable image or digest.
    #[error("remote snapshot labels: {0}")]
    BadLabels(String),
    /// The registry could not be reached or refused (containerd should download itself).
    #[error("fetching the layer: {0}")]
    Fetch(String),
    /// The layer is a slacker reference layer, but its document is invalid.
    #[error("reference layer: {0}")]
    BadReference(String),
}

/// Fetches reference layers from registries.
#[derive(Clone, Debug, Default)]
pub struct Remote {
    plain_http: Vec<String>,
}

/// An `AsyncWrite` into memory that fails once more than the cap arrives.
struct Capped(Vec<u8>);

impl tokio::io::AsyncWrite for Capped {
    fn poll_write(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        if self.0.len() + buf.len() > MAX_REFERENCE_LAYER_BYTES {
            return Poll::Ready(Err(std::io::Error::new(
                std::io::ErrorKind::FileTooLarge,
                "not a reference layer (too big)",
            )));
        }
        self.0.extend_from_slice(buf);
        Poll::Ready(Ok(buf.len()))
    }
    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }
    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

impl Remote {
    /// A fetcher speaking plain HTTP to the registries `plain_http` names (`host:port`).
    pub fn new(plain_http: Vec<String>) -> Self {
        Self { plain_http }
    }

    /// Fetches layer `digest` of `image` and returns the reference it holds, or `None`
    /// when it is not a slacker reference layer (bigger than
    /// [`MAX_REFERENCE_LAYER_BYTES`], or not a plain tar holding exactly
    /// `slacker/reference.json`).
    ///
    /// # Errors
    /// [`RemoteError::BadLabels`], [`RemoteError::Fetch`], [`RemoteError::BadReference`].
    pub async fn fetch_reference(
        &self,
        image: &str,
        digest: &str,
    ) -> Result<Option<Reference>, RemoteError> {
        let r: oci_client::Reference = image
            .parse()
            .map_err(|e| RemoteError::BadLabels(format!("image {image:?}: {e}")))?;
        if !digest.starts_with("sha256:") || digest.len() != 71 {
            return Err(RemoteError::BadLabels(format!("layer digest {digest:?}")));
        }
        let plain = self.plain_http.iter().any(|h| h == r.registry());
        // oci-client directly (slacker-oci keeps it private): the capped sink below needs
        // the streaming blob call, so a standard layer is abandoned after 64 KiB.
        let client = oci_client::Client::new(oci_client::client::ClientConfig {
            protocol: if plain {
                oci_client::client::ClientProtocol::Http
            } else {
                oci_client::client::ClientProtocol::Https
            },
            ..Default::default()
        });
        let by_digest = oci_client::Reference::with_digest(
            r.registry().to_owned(),
            r.repository().to_owned(),
            digest.to_owned(),
        );
        let mut out = Capped(Vec::new());
        match client.pull_blob(&by_digest, digest, &mut out).await {
            Ok(()) => {}
            Err(oci_client::errors::OciDistributionError::IoError(e))
                if e.kind() == std::io::ErrorKind::FileTooLarge =>
            {
                return Ok(None);
            }
            Err(e) => return Err(RemoteError::Fetch(e.to_string())),
        }
        parse_reference_tar(&out.0)
    }
}

/// The reference in a plain tar holding exactly `slacker/reference.json` (and the
/// `slacker/` directory entry); `None` for any other tar or a non-tar blob.
///
/// # Errors
/// [`RemoteError::BadReference`] when the document is there but invalid.
pub fn parse_reference_tar(data: &[u8]) -> Result<Option<Reference>, RemoteError> {
    let mut archive = tar::Archive::new(data);
    let Ok(entries) = archive.entries() else {
        return Ok(None);
    };
    let mut doc = None;
    for e in entries {
        let Ok(mut e) = e else { return Ok(None) };
        let Ok(path) = e.path().map(|p| p.to_string_lossy().into_owned()) else {
            return Ok(None);
        };
        let path = path.trim_start_matches("./").trim_end_matches('/');
        match path {
            "slacker" if e.header().entry_type().is_dir() => {}
            "slacker/reference.json" if e.header().entry_type().is_file() => {
                if e.size() == 0 || e.size() > MAX_DOCUMENT_BYTES {
                    return Err(RemoteError::BadReference(format!(
                        "document of {} bytes, 1..={MAX_DOCUMENT_BYTES} allowed",
                        e.size()
                    )));
                }
                let mut buf = Vec::new();
                e.read_to_end(&mut buf)
                    .map_err(|e| RemoteError::BadReference(e.to_string()))?;
                doc = Some(buf);
            }
            _ => return Ok(None),
        }
    }
    let Some(doc) = doc else { return Ok(None) };
    let r: Reference = serde_json::from_slice(&doc)
        .map_err(|e| RemoteError::BadReference(format!("not a valid reference: {e}")))?;
    r.validate()
        .map_err(|e| RemoteError::BadReference(e.to_string()))?;
    Ok(Some(r))
}
