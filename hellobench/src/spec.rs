//! The corpus description and readiness rules, kept as data in `hellobench/images.json`
//! (as HelloBench keeps its per-image "is it up?" checks).

use serde::{Deserialize, Serialize};

use crate::error::{Context, Result};

/// The `images.json` shipped with the crate (compiled in, so the binary runs from anywhere).
pub const BUILTIN_IMAGES_JSON: &str = include_str!("../images.json");

/// Which images to build and measure.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Corpus {
    /// Just `shell` (a minbase tree, or a busybox tree when debootstrap is missing): for CI.
    Reduced,
    /// Every image of the full corpus (`reduced` and `full` images).
    Full,
    /// Only the heavy images: language runtimes and servers whose startup reads 50 MB or more
    /// (where the lazy path is link-bound). Measured in a run of their own, so their own
    /// tables and medians never mix with the main corpus's.
    Heavy,
}

impl Corpus {
    /// Parse `reduced` / `full` / `heavy`.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "reduced" => Some(Self::Reduced),
            "full" => Some(Self::Full),
            "heavy" => Some(Self::Heavy),
            _ => None,
        }
    }

    /// Whether this selection includes an image tagged `image`.
    pub fn includes(self, image: Corpus) -> bool {
        match self {
            Self::Reduced => image == Self::Reduced,
            Self::Full => image != Self::Heavy,
            Self::Heavy => image == Self::Heavy,
        }
    }
}

/// The whole `images.json`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Spec {
    /// Free-form notes; ignored.
    #[serde(rename = "_comment", default)]
    pub comment: serde_json::Value,
    /// Upper bound on any readiness wait, in seconds.
    pub timeout_secs: u64,
    /// The images, in table order.
    pub images: Vec<ImageSpec>,
}

/// One image: packages on top of the base tree, and when it counts as started.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ImageSpec {
    /// Short name: table row, registry repository, cache directory.
    pub name: String,
    /// The smallest corpus that includes this image.
    pub corpus: Corpus,
    /// Debian packages installed with `apt-get install --no-install-recommends`.
    pub packages: Vec<String>,
    /// When the container has done its first useful work.
    pub readiness: Readiness,
}

/// A file the readiness rule writes into the container before starting it.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileSpec {
    /// Absolute path inside the container.
    pub path: String,
    /// Contents; `{port}` is substituted.
    pub content: String,
}

/// A readiness rule.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum Readiness {
    /// Run `argv`; ready when it exits 0 and its stdout contains `expect`.
    Command {
        /// Files to write first.
        #[serde(default)]
        files: Vec<FileSpec>,
        /// Command inside the container (resolved on the container's `PATH`).
        argv: Vec<String>,
        /// Substring of stdout.
        expect: String,
    },
    /// Start the server `argv`; ready when `127.0.0.1:{port}` answers `send` with a reply
    /// that contains `expect` (first request answered).
    Serve {
        /// Files to write first.
        #[serde(default)]
        files: Vec<FileSpec>,
        /// Server command inside the container; `{port}` is substituted.
        argv: Vec<String>,
        /// Bytes sent after connecting.
        send: String,
        /// Substring of the reply.
        expect: String,
    },
}

impl Spec {
    /// Parse an `images.json`.
    pub fn parse(json: &str) -> Result<Self> {
        let spec: Spec = serde_json::from_str(json).context("parsing images.json")?;
        let mut seen = std::collections::BTreeSet::new();
        for i in &spec.images {
            if i.name.is_empty()
                || !i
                    .name
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
            {
                crate::bail!(
                    "image name {:?}: use [a-z0-9-]+ (it names a registry repository)",
                    i.name
                );
            }
            if !seen.insert(i.name.clone()) {
                crate::bail!("image {:?} listed twice", i.name);
            }
        }
        Ok(spec)
    }

    /// The built-in `images.json`.
    pub fn builtin() -> Self {
        Self::parse(BUILTIN_IMAGES_JSON).expect("the built-in images.json parses (tested)")
    }

    /// The images of `corpus`, optionally only those named in `only`.
    pub fn select(&self, corpus: Corpus, only: Option<&[String]>) -> Result<Vec<ImageSpec>> {
        if let Some(only) = only {
            for n in only {
                if !self.images.iter().any(|i| &i.name == n) {
                    let names: Vec<_> = self.images.iter().map(|i| i.name.as_str()).collect();
                    crate::bail!("--only {n}: no such image (known: {})", names.join(", "));
                }
            }
        }
        Ok(self
            .images
            .iter()
            .filter(|i| corpus.includes(i.corpus))
            .filter(|i| only.is_none_or(|o| o.contains(&i.name)))
            .cloned()
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builtin_spec_parses_and_selects() {
        let s = Spec::builtin();
        let reduced = s.select(Corpus::Reduced, None).unwrap();
        assert_eq!(
            reduced.iter().map(|i| i.name.as_str()).collect::<Vec<_>>(),
            ["shell"]
        );
        let full = s.select(Corpus::Full, None).unwrap();
        assert!(full.len() >= 5);
        assert!(
            full.iter()
                .any(|i| matches!(i.readiness, Readiness::Serve { .. }))
        );
        let only = s.select(Corpus::Full, Some(&["perl".into()])).unwrap();
        assert_eq!(only.len(), 1);
        assert!(s.select(Corpus::Full, Some(&["nope".into()])).is_err());
        // The heavy images are their own selection: never in the full (or reduced) corpus.
        let heavy = s.select(Corpus::Heavy, None).unwrap();
        assert!(heavy.len() >= 3);
        assert!(heavy.iter().all(|i| i.corpus == Corpus::Heavy));
        assert!(full.iter().all(|i| i.corpus != Corpus::Heavy));
        assert!(!full.iter().any(|f| heavy.iter().any(|h| h.name == f.name)));
    }
}
