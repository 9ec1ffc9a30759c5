//! `qemu-img`, wrapped in one place: image info with the backing chain, check, rebase,
//! commit and overlay creation. Each function runs one `qemu-img` process and returns typed
//! results; the engine never spawns `qemu-img` itself.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde::Deserialize;

/// Errors running `qemu-img`.
#[derive(Debug, thiserror::Error)]
pub enum QemuImgError {
    /// `qemu-img` could not be started (not installed, not executable).
    #[error("cannot run qemu-img {op}: {source}")]
    Spawn {
        /// The subcommand (`info`, `check`, …).
        op: &'static str,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// `qemu-img` ran and failed.
    #[error("qemu-img {op} {} failed: {stderr}", path.display())]
    Failed {
        /// The subcommand, with the options that say what it did (`info --backing-chain`).
        op: &'static str,
        /// The image it was run on.
        path: PathBuf,
        /// Its exit code (`None`: killed by a signal).
        code: Option<i32>,
        /// What it printed on stderr, trimmed.
        stderr: String,
    },
    /// `qemu-img` printed JSON this module cannot read.
    #[error("qemu-img {op} {} printed unusable JSON: {source}", path.display())]
    Json {
        /// The subcommand.
        op: &'static str,
        /// The image it was run on.
        path: PathBuf,
        /// The cause.
        #[source]
        source: serde_json::Error,
    },
    /// `qemu-img check` found corruption or could not check the image.
    #[error(
        "qemu-img check failed (exit {}): {corruptions} corruption(s), {check_errors} error(s){}",
        code.unwrap_or(-1),
        if stderr.is_empty() { String::new() } else { format!(" {stderr}") }
    )]
    Check {
        /// The image checked.
        path: PathBuf,
        /// Its exit code (2: corruption or check errors; 1: the image could not be opened).
        code: Option<i32>,
        /// Corruptions found.
        corruptions: u64,
        /// Errors while checking.
        check_errors: u64,
        /// What it printed on stderr, trimmed.
        stderr: String,
    },
}

impl QemuImgError {
    /// What kind of failure this is (decides guidance, exit code and severity).
    pub fn kind(&self) -> crate::error::ErrorKind {
        use crate::error::ErrorKind;
        match self {
            QemuImgError::Spawn { .. } => ErrorKind::Tool,
            QemuImgError::Failed { .. } => ErrorKind::Tool,
            QemuImgError::Json { .. } => ErrorKind::Tool,
            QemuImgError::Check { .. } => ErrorKind::Corrupt,
        }
    }
}

/// One image of `qemu-img info --backing-chain --output=json`, top first.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct ImageInfo {
    /// The image file as qemu-img opened it.
    pub filename: String,
    /// `qcow2`, `raw`, …
    pub format: String,
    /// Virtual size, bytes.
    #[serde(rename = "virtual-size", default)]
    pub virtual_size: u64,
    /// Bytes allocated on the host.
    #[serde(rename = "actual-size", default)]
    pub actual_size: u64,
    /// How this image's header names its backing file (may be relative).
    #[serde(rename = "backing-filename", default)]
    pub backing_filename: Option<String>,
}

/// What a clean `qemu-img check` reported.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct CheckReport {
    /// Leaked clusters: wasted space, no corruption (exit code 3).
    pub leaks: u64,
}

fn run(op: &'static str, args: &[OsString]) -> Result<Output, QemuImgError> {
    tracing::debug!(?args, "qemu-img");
    Command::new("qemu-img")
        .args(args)
        .output()
        .map_err(|source| QemuImgError::Spawn { op, source })
}

fn run_ok(op: &'static str, path: &Path, args: &[OsString]) -> Result<Output, QemuImgError> {
    let out = run(op, args)?;
    if !out.status.success() {
        return Err(QemuImgError::Failed {
            op,
            path: path.to_path_buf(),
            code: out.status.code(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(out)
}

/// The raw JSON of `qemu-img info -U --backing-chain --output=json [-f format] path`: the
/// image and every image below it (`-U`: the image may be in use by a running domain).
pub fn info_chain_json(path: &Path, format: Option<&str>) -> Result<String, QemuImgError> {
    let mut args: Vec<OsString> = ["info", "-U", "--backing-chain", "--output=json"]
        .map(OsString::from)
        .to_vec();
    if let Some(f) = format {
        args.extend(["-f".into(), f.into()]);
    }
    args.push(path.into());
    let out = run_ok("info --backing-chain", path, &args)?;
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// `path` and the images below it, top first (see [`info_chain_json`]).
pub fn info_chain(path: &Path, format: Option<&str>) -> Result<Vec<ImageInfo>, QemuImgError> {
    let json = info_chain_json(path, format)?;
    serde_json::from_str(&json).map_err(|source| QemuImgError::Json {
        op: "info --backing-chain",
        path: path.to_path_buf(),
        source,
    })
}

/// `qemu-img check` of a qcow2 image, opened without its backing file (a backup's copies
/// still name the original backing paths, which need not exist): only this file's own
/// structure is checked. Exit 0 is clean, 3 is leaked clusters only (harmless, reported in
/// the [`CheckReport`]); anything else is [`QemuImgError::Check`].
pub fn check(path: &Path) -> Result<CheckReport, QemuImgError> {
    let spec = serde_json::json!({
        "driver": "qcow2",
        "file": {"driver": "file", "filename": path.to_string_lossy()},
        "backing": null,
    });
    check_with(
        path,
        &[
            "check".into(),
            "--output=json".into(),
            format!("json:{spec}").into(),
        ],
    )
}

/// `qemu-img check -f format path` with its backing chain opened as its header names it
/// (relative names against the image's own folder): the whole chain must open, and the
/// top's structure is checked with it. Run it only on an image whose chain is known to stay
/// where the caller wants it (see [`info`]: each layer's header names its parent).
pub fn check_chain(path: &Path, format: &str) -> Result<CheckReport, QemuImgError> {
    check_with(
        path,
        &[
            "check".into(),
            "--output=json".into(),
            "-f".into(),
            format.into(),
            path.into(),
        ],
    )
}

fn check_with(path: &Path, args: &[OsString]) -> Result<CheckReport, QemuImgError> {
    let out = run("check", args)?;
    let json: serde_json::Value =
        serde_json::from_slice(&out.stdout).unwrap_or(serde_json::Value::Null);
    let field = |k: &str| json.get(k).and_then(|v| v.as_u64()).unwrap_or(0);
    match out.status.code() {
        Some(0) => Ok(CheckReport::default()),
        Some(3) => Ok(CheckReport {
            leaks: field("leaks"),
        }),
        code => Err(QemuImgError::Check {
            path: path.to_path_buf(),
            code,
            corruptions: field("corruptions"),
            check_errors: field("check-errors"),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        }),
    }
}

/// `qemu-img info -U --output=json -f format path` of one image, its backing file not
/// opened: what its own header says (`backing_filename` as written there).
pub fn info(path: &Path, format: &str) -> Result<ImageInfo, QemuImgError> {
    let args: Vec<OsString> = vec![
        "info".into(),
        "-U".into(),
        "--output=json".into(),
        "-f".into(),
        format.into(),
        path.into(),
    ];
    let out = run_ok("info", path, &args)?;
    serde_json::from_slice(&out.stdout).map_err(|source| QemuImgError::Json {
        op: "info",
        path: path.to_path_buf(),
        source,
    })
}

/// The arguments of `qemu-img rebase -u -f format -b backing -F backing_format file`: an
/// unsafe rebase, which rewrites only the header of `file` (no data is read or copied).
pub fn rebase_args(
    file: &Path,
    format: &str,
    backing: &Path,
    backing_format: &str,
) -> Vec<OsString> {
    vec![
        "rebase".into(),
        "-u".into(),
        "-f".into(),
        format.into(),
        "-b".into(),
        backing.as_os_str().to_owned(),
        "-F".into(),
        backing_format.into(),
        file.as_os_str().to_owned(),
    ]
}

/// Points the header of `file` (format `format`) at `backing` (format `backing_format`)
/// without touching any data: `qemu-img rebase -u`.
pub fn rebase_unsafe(
    file: &Path,
    format: &str,
    backing: &Path,
    backing_format: &str,
) -> Result<(), QemuImgError> {
    run_ok(
        "rebase",
        file,
        &rebase_args(file, format, backing, backing_format),
    )
    .map(drop)
}

/// `qemu-img commit -q overlay`: writes the overlay's data into its backing file.
pub fn commit(overlay: &Path) -> Result<(), QemuImgError> {
    run_ok(
        "commit",
        overlay,
        &["commit".into(), "-q".into(), overlay.into()],
    )
    .map(drop)
}

/// Creates the qcow2 overlay `overlay` on top of `base` (format `base_format`, its absolute
/// path recorded in the header) of `virtual_size` bytes. `-u`: the base is in use by the
/// running domain, so it is not opened (which is why its size is given).
pub fn create_overlay(
    base: &Path,
    base_format: &str,
    overlay: &Path,
    virtual_size: u64,
) -> Result<(), QemuImgError> {
    let args: Vec<OsString> = vec![
        "create".into(),
        "-q".into(),
        "-f".into(),
        "qcow2".into(),
        "-u".into(),
        "-F".into(),
        base_format.into(),
        "-b".into(),
        base.into(),
        overlay.into(),
        virtual_size.to_string().into(),
    ];
    run_ok("create", overlay, &args).map(drop)
}

/// Creates an empty image `path` (format `format`, no backing file) of `virtual_size` bytes.
pub fn create(path: &Path, format: &str, virtual_size: u64) -> Result<(), QemuImgError> {
    let args: Vec<OsString> = vec![
        "create".into(),
        "-q".into(),
        "-f".into(),
        format.into(),
        path.into(),
        virtual_size.to_string().into(),
    ];
    run_ok("create", path, &args).map(drop)
}

/// `qemu-img convert -O format src dest`: `src` with its whole backing chain flattened into
/// the standalone image `dest` (no backing file).
pub fn convert_flat(src: &Path, dest: &Path, format: &str) -> Result<(), QemuImgError> {
    let args: Vec<OsString> = vec![
        "convert".into(),
        "-q".into(),
        "-O".into(),
        format.into(),
        src.into(),
        dest.into(),
    ];
    run_ok("convert", dest, &args).map(drop)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rebase_args_are_unsafe_and_name_both_formats() {
        let args: Vec<String> =
            rebase_args(Path::new("/r/.tmp"), "qcow2", Path::new("/r/b.raw"), "raw")
                .into_iter()
                .map(|a| a.to_string_lossy().into_owned())
                .collect();
        assert_eq!(
            args,
            ["rebase", "-u", "-f", "qcow2", "-b", "/r/b.raw", "-F", "raw", "/r/.tmp"]
        );
    }

    #[test]
    fn check_error_reads_like_before() {
        let e = QemuImgError::Check {
            path: "/x".into(),
            code: Some(2),
            corruptions: 3,
            check_errors: 0,
            stderr: String::new(),
        };
        assert_eq!(
            e.to_string(),
            "qemu-img check failed (exit 2): 3 corruption(s), 0 error(s)"
        );
    }

    #[test]
    fn info_json_is_read() {
        let json = r#"[{"filename": "/i/top.qcow2", "format": "qcow2", "virtual-size": 64,
            "actual-size": 10, "backing-filename": "mid.qcow2"},
            {"filename": "/b/bottom.img", "format": "raw", "virtual-size": 64}]"#;
        let chain: Vec<ImageInfo> = serde_json::from_str(json).unwrap();
        assert_eq!(chain.len(), 2);
        assert_eq!(chain[0].backing_filename.as_deref(), Some("mid.qcow2"));
        assert_eq!(chain[1].actual_size, 0);
    }
}

/// One persistent dirty bitmap of a qcow2 image (`qemu-img info` format-specific data).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct Bitmap {
    /// Its name (libvirt names it after the checkpoint).
    pub name: String,
    /// `in-use` (open by a running QEMU), `auto` (recording), `inconsistent` (not saved
    /// cleanly: unusable).
    #[serde(default)]
    pub flags: Vec<String>,
}

impl Bitmap {
    /// Whether the bitmap was not written back cleanly (a crash): unusable.
    pub fn is_inconsistent(&self) -> bool {
        self.flags.iter().any(|f| f == "inconsistent")
    }
}

#[derive(Deserialize)]
struct InfoBitmaps {
    #[serde(rename = "format-specific", default)]
    format_specific: Option<FormatSpecific>,
}

#[derive(Deserialize)]
struct FormatSpecific {
    #[serde(default)]
    data: Option<FormatData>,
}

#[derive(Deserialize)]
struct FormatData {
    #[serde(default)]
    bitmaps: Vec<Bitmap>,
}

/// The persistent bitmaps of a qcow2 image (`qemu-img info -U --output=json`; empty for
/// other formats).
pub fn bitmaps(path: &Path) -> Result<Vec<Bitmap>, QemuImgError> {
    let args: Vec<OsString> = vec![
        "info".into(),
        "-U".into(),
        "--output=json".into(),
        path.into(),
    ];
    let out = run_ok("info", path, &args)?;
    parse_bitmaps(&out.stdout).map_err(|source| QemuImgError::Json {
        op: "info",
        path: path.to_path_buf(),
        source,
    })
}

/// Removes from the qcow2 image `path` every persistent bitmap whose name starts with
/// `prefix` (`qemu-img bitmap --remove`), opened without its backing file (a restored layer
/// may name one not in place yet). Returns the names removed. A restored image must not
/// carry the checkpoints' bitmaps of the domain it was copied from (flagged `in-use`).
pub fn remove_bitmaps(path: &Path, prefix: &str) -> Result<Vec<String>, QemuImgError> {
    let names: Vec<String> = bitmaps(path)?
        .into_iter()
        .map(|b| b.name)
        .filter(|n| n.starts_with(prefix))
        .collect();
    if names.is_empty() {
        return Ok(names);
    }
    let spec = serde_json::json!({
        "driver": "qcow2",
        "backing": null,
        "file": {"driver": "file", "filename": path},
    });
    let spec: OsString = format!("json:{spec}").into();
    for name in &names {
        let args: Vec<OsString> = vec![
            "bitmap".into(),
            "--remove".into(),
            spec.clone(),
            name.into(),
        ];
        run_ok("bitmap", path, &args)?;
    }
    Ok(names)
}

fn parse_bitmaps(json: &[u8]) -> Result<Vec<Bitmap>, serde_json::Error> {
    let info: InfoBitmaps = serde_json::from_slice(json)?;
    Ok(info
        .format_specific
        .and_then(|f| f.data)
        .map(|d| d.bitmaps)
        .unwrap_or_default())
}

#[cfg(test)]
mod bitmap_tests {
    use super::*;

    #[test]
    fn bitmaps_are_read_with_their_flags() {
        let json = br#"{"virtual-size":1,"format":"qcow2","format-specific":{"type":"qcow2","data":{"compat":"1.1","bitmaps":[{"flags":["in-use","auto"],"name":"vmb-a","granularity":65536},{"flags":["inconsistent"],"name":"vmb-b","granularity":65536}]}}}"#;
        let b = parse_bitmaps(json).unwrap();
        assert_eq!(b.len(), 2);
        assert!(!b[0].is_inconsistent());
        assert!(b[1].is_inconsistent());
        assert!(parse_bitmaps(br#"{"format":"raw"}"#).unwrap().is_empty());
    }

    #[test]
    fn our_bitmaps_are_removed_and_others_kept_even_with_a_missing_backing_file() {
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("a.qcow2");
        let q = |args: &[&str]| {
            let ok = Command::new("qemu-img")
                .args(args)
                .status()
                .map(|s| s.success());
            assert_eq!(ok.ok(), Some(true), "qemu-img {args:?}");
        };
        let p = img.display().to_string();
        q(&["create", "-q", "-f", "qcow2", &p, "1M"]);
        q(&["bitmap", "--add", &p, "vmb-2026-01-01-000000"]);
        q(&["bitmap", "--add", &p, "theirs"]);
        q(&[
            "rebase",
            "-u",
            "-b",
            "../gone/base.qcow2",
            "-F",
            "qcow2",
            &p,
        ]);
        let removed = remove_bitmaps(&img, "vmb-").unwrap();
        assert_eq!(removed, vec!["vmb-2026-01-01-000000"]);
        let left: Vec<String> = bitmaps(&img).unwrap().into_iter().map(|b| b.name).collect();
        assert_eq!(left, vec!["theirs"]);
        assert!(remove_bitmaps(&img, "vmb-").unwrap().is_empty());
    }
}
