//! The local image list: image name -> top layer, its layers and its config, in one JSON
//! file (`<state>/images.json`) replaced atomically (written aside, fsynced, renamed).

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use slacker_core::{Error, ObjectKind, Result};
use slacker_oci::ImageConfiguration;

/// One local image.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ImageRecord {
    /// The top layer (what `run` clones).
    pub top: String,
    /// Every layer, bottom first.
    pub layers: Vec<String>,
    /// The image config.
    pub config: ImageConfiguration,
    /// Where it came from.
    pub source: Option<String>,
}

/// The list, loaded.
pub struct Images {
    path: PathBuf,
    map: BTreeMap<String, ImageRecord>,
}

impl Images {
    /// Loads `<state>/images.json` (empty if absent).
    pub fn open(state: &Path) -> Result<Self> {
        let path = state.join("images.json");
        let map = match std::fs::read(&path) {
            Ok(b) => serde_json::from_slice(&b)
                .map_err(|e| Error::Integrity(format!("{}: {e}", path.display())))?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => BTreeMap::new(),
            Err(e) => return Err(Error::Config(format!("{}: {e}", path.display()))),
        };
        Ok(Self { path, map })
    }

    fn save(&self) -> Result<()> {
        let io = |e: std::io::Error| Error::backend("cli-images", e.to_string());
        let tmp = self.path.with_extension("json.tmp");
        let mut f = std::fs::File::create(&tmp).map_err(io)?;
        f.write_all(&serde_json::to_vec_pretty(&self.map).expect("serializes"))
            .map_err(io)?;
        f.sync_all().map_err(io)?;
        std::fs::rename(&tmp, &self.path).map_err(io)?;
        if let Some(d) = self.path.parent() {
            std::fs::File::open(d)
                .and_then(|d| d.sync_all())
                .map_err(io)?;
        }
        Ok(())
    }

    /// The record of `name`.
    pub fn get(&self, name: &str) -> Result<ImageRecord> {
        self.map.get(name).cloned().ok_or_else(|| {
            Error::not_found(
                ObjectKind::Other,
                format!("local image {name} (pull or convert it first)"),
            )
        })
    }

    /// Records `name`.
    pub fn put(&mut self, name: &str, rec: ImageRecord) -> Result<()> {
        self.map.insert(name.to_owned(), rec);
        self.save()
    }

    /// Forgets `name`.
    pub fn remove(&mut self, name: &str) -> Result<()> {
        self.get(name)?;
        self.map.remove(name);
        self.save()
    }

    /// Every image, by name.
    pub fn all(&self) -> Vec<(String, ImageRecord)> {
        self.map
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    }
}
