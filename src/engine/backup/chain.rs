//! The backing chain of a disk's base image: the images below the one the domain points at
//! (before our overlay), found with `qemu-img info -U --backing-chain`, copied into the
//! backup as `<vm>-<dev>.backing-<n>.<ext>` so that a backup restores on its own.

use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::error::ErrorKind;
use crate::format::layout::{self, LayoutError};

use super::ToolError;

/// Why the backing chain of a disk cannot be backed up.
#[derive(Debug, thiserror::Error)]
pub enum ChainError {
    /// `qemu-img info` failed.
    #[error(transparent)]
    Tool(#[from] ToolError),
    /// Its output is not what we expect.
    #[error("cannot parse qemu-img info --backing-chain: {0}")]
    Parse(#[source] serde_json::Error),
    /// A backing image is not a local file (NBD, a `json:` pseudo-protocol…).
    #[error("disk {target}: backing image {file:?} (depth {depth}) is not a local file: cannot back it up")]
    NotLocal {
        /// The disk.
        target: String,
        /// The file name qemu-img reports.
        file: String,
        /// Its depth.
        depth: usize,
    },
    /// A backing image has a format other than qcow2 or raw.
    #[error(
        "disk {target}: backing image {file} has format {format}: only qcow2 and raw are supported"
    )]
    Format {
        /// The disk.
        target: String,
        /// The image.
        file: String,
        /// Its format.
        format: String,
    },
    /// A name is not allowed in the layout.
    #[error(transparent)]
    Layout(#[from] LayoutError),
}

impl ChainError {
    /// What kind of failure this is.
    pub fn kind(&self) -> ErrorKind {
        match self {
            ChainError::Tool(e) => e.kind(),
            ChainError::Parse(_) => ErrorKind::Tool,
            ChainError::NotLocal { .. } | ChainError::Format { .. } => ErrorKind::InvalidInput,
            ChainError::Layout(e) => e.kind(),
        }
    }
}

/// One image below a disk's base image (depth 1 is the base's own backing file).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackingImage {
    /// 1 for the base image's backing file, 2 for that one's backing file, …
    pub depth: usize,
    /// The image's absolute path on the host.
    pub path: PathBuf,
    /// `qcow2`, `raw`, … as qemu-img reports it.
    pub format: String,
    /// How the image above names this one in its header (may be relative).
    pub named_as: Option<String>,
    /// Virtual size, bytes.
    pub virtual_size: u64,
    /// Bytes allocated on the host.
    pub allocated_size: u64,
    /// The file name inside the backup folder.
    pub file_name: String,
}

/// One element of `qemu-img info --backing-chain --output=json`.
#[derive(Debug, Deserialize)]
struct InfoEntry {
    filename: String,
    format: String,
    #[serde(rename = "virtual-size", default)]
    virtual_size: u64,
    #[serde(rename = "actual-size", default)]
    actual_size: u64,
    #[serde(rename = "backing-filename", default)]
    backing_filename: Option<String>,
}

/// The file name of the backing image at `depth` of disk `target` inside a backup:
/// `<vm>-<target>.backing-<depth>.qcow2` (or `.raw`), sanitised like the disk's own name.
pub fn backing_file_name(
    vm: &str,
    target: &str,
    depth: usize,
    format: &str,
) -> Result<String, LayoutError> {
    let ext = if format == "qcow2" { "qcow2" } else { "raw" };
    Ok(format!(
        "{}-{}.backing-{depth}.{ext}",
        layout::safe_component(vm)?,
        layout::safe_component(target)?
    ))
}

/// Parses the JSON of `qemu-img info --backing-chain --output=json` of a base image into the
/// images below it (the first element, the base itself, is left out).
pub fn parse_chain(json: &str, vm: &str, target: &str) -> Result<Vec<BackingImage>, ChainError> {
    let entries: Vec<InfoEntry> = serde_json::from_str(json).map_err(ChainError::Parse)?;
    let mut out = Vec::new();
    for (i, pair) in entries.windows(2).enumerate() {
        let (above, e) = (&pair[0], &pair[1]);
        let depth = i + 1;
        let path = PathBuf::from(&e.filename);
        if !path.is_absolute() || e.filename.starts_with("json:") {
            return Err(ChainError::NotLocal {
                target: target.to_string(),
                file: e.filename.clone(),
                depth,
            });
        }
        if e.format != "qcow2" && e.format != "raw" {
            return Err(ChainError::Format {
                target: target.to_string(),
                file: e.filename.clone(),
                format: e.format.clone(),
            });
        }
        out.push(BackingImage {
            depth,
            file_name: backing_file_name(vm, target, depth, &e.format)?,
            path,
            format: e.format.clone(),
            named_as: above.backing_filename.clone(),
            virtual_size: e.virtual_size,
            allocated_size: e.actual_size,
        });
    }
    Ok(out)
}

/// The images below `base` (format `format`) with `qemu-img info -U --backing-chain`
/// (`-U`: the base is in use by the running domain). Empty when the base has no backing file.
pub fn backing_chain(
    base: &Path,
    format: &str,
    vm: &str,
    target: &str,
) -> Result<Vec<BackingImage>, ChainError> {
    if format == "raw" {
        return Ok(Vec::new()); // raw images have no header, hence no backing file
    }
    let json = crate::hv::qemu_img::info_chain_json(base, Some(format))?;
    parse_chain(&json, vm, target)
}

#[cfg(test)]
mod tests {
    use super::*;

    const CHAIN: &str = r#"[
      {"filename": "/i/top.qcow2", "format": "qcow2", "virtual-size": 64, "actual-size": 10,
       "backing-filename": "mid.qcow2", "full-backing-filename": "/i/mid.qcow2"},
      {"filename": "/i/mid.qcow2", "format": "qcow2", "virtual-size": 64, "actual-size": 20,
       "backing-filename": "/b/bottom.img", "full-backing-filename": "/b/bottom.img"},
      {"filename": "/b/bottom.img", "format": "raw", "virtual-size": 64, "actual-size": 30}
    ]"#;

    #[test]
    fn chain_below_the_base_is_listed_with_depths_names_and_header_names() {
        let c = parse_chain(CHAIN, "web 01", "vdb").unwrap();
        assert_eq!(c.len(), 2);
        assert_eq!(c[0].depth, 1);
        assert_eq!(c[0].path, Path::new("/i/mid.qcow2"));
        assert_eq!(c[0].named_as.as_deref(), Some("mid.qcow2"));
        let vm = layout::safe_component("web 01").unwrap();
        assert!(vm.starts_with("web_01-"), "{vm}");
        assert_eq!(c[0].file_name, format!("{vm}-vdb.backing-1.qcow2"));
        assert_eq!(c[0].allocated_size, 20);
        assert_eq!(c[1].depth, 2);
        assert_eq!(c[1].format, "raw");
        assert_eq!(c[1].named_as.as_deref(), Some("/b/bottom.img"));
        assert_eq!(c[1].file_name, format!("{vm}-vdb.backing-2.raw"));
        // A lone image has no chain.
        let single = r#"[{"filename": "/i/a.qcow2", "format": "qcow2"}]"#;
        assert!(parse_chain(single, "x", "vda").unwrap().is_empty());
    }

    #[test]
    fn network_backing_images_are_refused() {
        let j = r#"[{"filename": "/i/a.qcow2", "format": "qcow2"},
                   {"filename": "json:{\"driver\":\"nbd\"}", "format": "raw"}]"#;
        let e = parse_chain(j, "x", "vda").unwrap_err();
        assert!(e.to_string().contains("not a local file"), "{e}");
    }
}
