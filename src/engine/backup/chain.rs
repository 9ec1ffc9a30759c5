//! The backing chain of a disk's base image: the images below the one the domain points at
//! (before our overlay), found with `qemu-img info -U --backing-chain`, copied into the
//! backup as `<vm>-<dev>.backing-<n>.<ext>` so that a backup restores on its own.
//!
//! The copies stand on their own too: each qcow2 copy names the layer below by its file name
//! in the same folder ([`layer_below`], [`rename_for`]). The copier rewrites the name in the
//! header on the way; when the new name does not fit there, [`settle_rewrite`] rebases the
//! copy (`qemu-img rebase -u`) and hashes it again.

use std::path::{Path, PathBuf};
use std::time::Instant;

use crate::copier::{self, BackingRename, ChunkManifest, HeaderRewrite};
use crate::format::metadata::BackingRewrite;
use crate::progress::CancelToken;

use serde::Deserialize;

use crate::error::ErrorKind;
use crate::format::layout::{self, LayoutError};

use super::{Cause, ToolError};

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

/// The layer the copy of an image must name in its header inside the backup folder: for
/// the disk image itself (`depth` 0) the first layer of `chain`, for layer `depth` the next
/// one; `None` for the bottom layer and for raw images (no header).
pub fn layer_below<'a>(
    chain: &'a [BackingImage],
    depth: usize,
    format: &str,
) -> Option<&'a BackingImage> {
    if format != "qcow2" {
        return None;
    }
    chain.get(depth)
}

/// The copier's rewrite that points a copy at `below` inside the folder: its file name,
/// relative (the layers of one backup lie side by side).
pub fn rename_for(below: &BackingImage) -> BackingRename {
    BackingRename {
        new_name: below.file_name.clone(),
    }
}

/// A settled rewrite: the metadata record, and the copy's digests when it was hashed again.
#[derive(Debug)]
pub struct Settled {
    /// What goes into the record's `backing_rewrite`.
    pub record: BackingRewrite,
    /// New whole-file SHA-256 and manifest of the copy (only after a rebase).
    pub rehashed: Option<(String, ChunkManifest)>,
    /// What to tell the operator.
    pub note: String,
}

/// Turns the copier's `outcome` for the copy at `copy` (manifest `manifest`, as copied)
/// into its record. When the copier did not rewrite the header (the new name did not fit),
/// the copy is still the source byte for byte: `qemu-img rebase -u` points it at `below`,
/// and it is hashed again (one more pass over that file, timed in the note); the source's
/// own digests are then the copy's as copied.
pub fn settle_rewrite(
    copy: &Path,
    below: &BackingImage,
    outcome: &HeaderRewrite,
    manifest: &ChunkManifest,
    cancel: &CancelToken,
) -> Result<Settled, Cause> {
    let original = outcome
        .old_name
        .clone()
        .or_else(|| below.named_as.clone())
        .unwrap_or_default();
    if outcome.applied {
        return Ok(Settled {
            note: format!(
                "header names {} (was {original}): rewritten on the way",
                outcome.new_name
            ),
            record: BackingRewrite {
                original,
                written: outcome.new_name.clone(),
                how: "copier".into(),
                source_chunk0_sha256: outcome.source_chunk0.clone(),
                source_root: outcome.source_root.clone(),
            },
            rehashed: None,
        });
    }
    let t = Instant::now();
    crate::hv::qemu_img::rebase_unsafe(copy, "qcow2", Path::new(&outcome.new_name), &below.format)
        .map_err(Cause::Tool)?;
    let rehashed =
        copier::hash_file(copy, manifest.chunk_size, cancel).map_err(|source| Cause::Copy {
            label: copy.display().to_string(),
            source,
        })?;
    Ok(Settled {
        note: format!(
            "header not rewritten on the way ({}): rebased onto {} with qemu-img rebase -u and \
             hashed again in {:.2} s",
            outcome.reason,
            outcome.new_name,
            t.elapsed().as_secs_f64()
        ),
        record: BackingRewrite {
            original,
            written: outcome.new_name.clone(),
            how: "rebase".into(),
            source_chunk0_sha256: manifest.digests.first().cloned(),
            source_root: Some(manifest.root.clone()),
        },
        rehashed: Some(rehashed),
    })
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
    fn each_qcow2_copy_names_the_layer_below_in_the_folder() {
        let c = parse_chain(CHAIN, "web", "vdb").unwrap();
        let name = |d, f| layer_below(&c, d, f).map(|b| rename_for(b).new_name);
        assert_eq!(name(0, "qcow2").as_deref(), Some("web-vdb.backing-1.qcow2"));
        assert_eq!(name(1, "qcow2").as_deref(), Some("web-vdb.backing-2.raw"));
        assert_eq!(name(2, "raw"), None, "the bottom names nothing");
        assert_eq!(name(0, "raw"), None, "a raw image has no header");
    }

    #[test]
    fn network_backing_images_are_refused() {
        let j = r#"[{"filename": "/i/a.qcow2", "format": "qcow2"},
                   {"filename": "json:{\"driver\":\"nbd\"}", "format": "raw"}]"#;
        let e = parse_chain(j, "x", "vda").unwrap_err();
        assert!(e.to_string().contains("not a local file"), "{e}");
    }
}
