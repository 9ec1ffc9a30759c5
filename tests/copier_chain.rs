//! The copier's backing-name rewrite on real qcow2 chains made with qemu-img and qemu-io:
//! the copies of a three-layer chain (relative and absolute names, a raw bottom) name each
//! other inside the destination folder, `qemu-img check` and `qemu-img compare` against the
//! source pass there with the originals moved away, the digests are those of the written
//! files, and the source's own manifest root is reported. Both I/O engines.

mod copier_support;

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::Command;

use copier_support::*;
use vm_backup::copier::{self, BackingRename, CopyOptions, CopyReport, Sink};
use vm_backup::progress::{CancelToken, NoProgress};

/// A plain file sink: created in place, synced on commit.
struct PlainSink {
    file: File,
    path: PathBuf,
}

impl Sink for PlainSink {
    fn file(&self) -> &File {
        &self.file
    }
    fn is_direct(&self) -> bool {
        false
    }
    fn path(&self) -> &Path {
        &self.path
    }
    fn commit(self: Box<Self>) -> std::io::Result<()> {
        self.file.sync_all()
    }
}

fn sink(path: &Path) -> Box<PlainSink> {
    Box::new(PlainSink {
        file: File::options()
            .read(true)
            .write(true)
            .create_new(true)
            .open(path)
            .expect("create sink"),
        path: path.to_owned(),
    })
}

fn run(tool: &str, args: &[&str]) -> (bool, String) {
    let out = Command::new(tool).args(args).output().expect("run tool");
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

fn ok(tool: &str, args: &[&str]) {
    let (good, out) = run(tool, args);
    assert!(good, "{tool} {args:?}: {out}");
}

fn have_tools() -> bool {
    Command::new("qemu-io").arg("--version").output().is_ok()
        && Command::new("qemu-img").arg("--version").output().is_ok()
}

/// top.qcow2 -> mid.qcow2 (relative) -> /abs/bottom.raw (absolute), each layer with data.
fn make_chain(src: &Path) -> PathBuf {
    let p = |n: &str| src.join(n).to_str().unwrap().to_string();
    ok(
        "qemu-img",
        &["create", "-q", "-f", "raw", &p("bottom.raw"), "4M"],
    );
    ok(
        "qemu-io",
        &["-f", "raw", "-c", "write -P 0x11 0 1M", &p("bottom.raw")],
    );
    ok(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            &p("bottom.raw"),
            "-F",
            "raw",
            &p("mid.qcow2"),
        ],
    );
    ok(
        "qemu-io",
        &[
            "-f",
            "qcow2",
            "-c",
            "write -P 0x22 512k 1M",
            &p("mid.qcow2"),
        ],
    );
    ok(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "compat=0.10",
            "-b",
            "mid.qcow2",
            "-F",
            "qcow2",
            &p("top.qcow2"),
        ],
    );
    ok(
        "qemu-io",
        &["-f", "qcow2", "-c", "write -P 0x33 3M 64k", &p("top.qcow2")],
    );
    src.join("top.qcow2")
}

fn copy(src: &Path, dst: &Path, opts: &CopyOptions, rename: Option<&str>) -> CopyReport {
    let cancel = CancelToken::new();
    match rename {
        Some(n) => copier::copy_into_renaming_backing(
            src,
            sink(dst),
            opts,
            &BackingRename {
                new_name: n.to_string(),
            },
            &NoProgress,
            &cancel,
        ),
        None => copier::copy_into(src, sink(dst), opts, &NoProgress, &cancel),
    }
    .expect("copy")
}

#[test]
fn a_copied_chain_names_its_own_layers_and_checks_without_the_originals() {
    if !have_tools() {
        eprintln!("skipped: qemu-img/qemu-io missing");
        return;
    }
    for io in engines() {
        let tmp = tempfile::tempdir().unwrap();
        let src = tmp.path().join("src");
        let out = tmp.path().join("out");
        std::fs::create_dir_all(&src).unwrap();
        std::fs::create_dir_all(&out).unwrap();
        let top = make_chain(&src);
        let opts = options(io);
        let layers = [
            ("top.qcow2", "vm-vda.qcow2", Some("vm-vda.backing-1.qcow2")),
            (
                "mid.qcow2",
                "vm-vda.backing-1.qcow2",
                Some("vm-vda.backing-2.raw"),
            ),
            ("bottom.raw", "vm-vda.backing-2.raw", None),
        ];
        for (from, to, rename) in layers {
            let s = src.join(from);
            let d = out.join(to);
            let r = copy(&s, &d, &opts, rename);
            // The digests are those of the written file.
            assert_eq!(r.sha256.as_deref(), Some(sha256_of(&d).as_str()), "{to}");
            let m = r.manifest.as_ref().unwrap();
            let v = copier::verify_file(&d, m, &NoProgress, &CancelToken::new()).unwrap();
            assert!(v.ok, "{to}: manifest of the written file");
            match rename {
                Some(n) => {
                    let h = r.header_rewrite.as_ref().expect("rewrite reported");
                    assert!(h.applied, "{to}: {}", h.reason);
                    assert_eq!(h.new_name, n);
                    // The source's own root: a plain copy of the source has it.
                    let plain = tmp.path().join(format!("plain-{to}"));
                    let p = copy(&s, &plain, &opts, None);
                    let pm = p.manifest.unwrap();
                    assert_eq!(h.source_root.as_deref(), Some(pm.root.as_str()), "{to}");
                    assert_eq!(h.source_chunk0.as_deref(), Some(pm.digests[0].as_str()));
                    assert_ne!(pm.root, m.root, "{to}: the copy differs from its source");
                    assert_eq!(pm.digests[1..], m.digests[1..], "only chunk 0 differs");
                    std::fs::remove_file(plain).unwrap();
                }
                None => assert!(r.header_rewrite.is_none()),
            }
        }
        // Move the originals away (the absolute bottom too): the copy stands on its own.
        let moved = tmp.path().join("moved");
        std::fs::rename(&src, &moved).unwrap();
        let copy_top = out.join("vm-vda.qcow2");
        let (good, info) = run(
            "qemu-img",
            &[
                "info",
                "--backing-chain",
                "--output=json",
                copy_top.to_str().unwrap(),
            ],
        );
        assert!(good, "{info}");
        let chain: Vec<serde_json::Value> = serde_json::from_str(&info).unwrap();
        let files: Vec<&str> = chain
            .iter()
            .map(|i| i["filename"].as_str().unwrap())
            .collect();
        assert_eq!(files.len(), 3, "{files:?}");
        for f in &files {
            assert!(Path::new(f).starts_with(&out), "{f} is outside the copy");
        }
        ok("qemu-img", &["check", "-q", copy_top.to_str().unwrap()]);
        // Compare with the source chain, put back where its absolute name points.
        std::fs::rename(&moved, &src).unwrap();
        ok(
            "qemu-img",
            &[
                "compare",
                "-q",
                copy_top.to_str().unwrap(),
                top.to_str().unwrap(),
            ],
        );
        chain_check_judges_the_folder(&out, &src);
    }
}

fn record(file: &str, format: &str) -> (String, String) {
    (file.to_string(), format.to_string())
}

/// The post-check's and verify's chain check: passes on the copied chain, and fails, without
/// opening the chain, once a copy names a file outside the folder.
fn chain_check_judges_the_folder(out: &Path, src: &Path) {
    use vm_backup::format::metadata::{BackingRecord, BackingRewrite, DiskRecord};
    let manifest = copier::ChunkManifest {
        chunk_size: 1,
        file_size: 0,
        digests: Vec::new(),
        zero_chunks: Vec::new(),
        root: String::new(),
    };
    let rw = |w: &str| BackingRewrite {
        original: String::new(),
        written: w.into(),
        how: "copier".into(),
        source_chunk0_sha256: None,
        source_root: None,
    };
    let layer = |(file, format): (String, String), depth, next: Option<&str>| BackingRecord {
        depth,
        file,
        source: String::new(),
        format,
        backing_named_as: None,
        virtual_size: 0,
        allocated_size: 0,
        file_size: 0,
        sha256: String::new(),
        manifest: manifest.clone(),
        copy_seconds: 0.0,
        backing_rewrite: next.map(rw),
    };
    let disk = DiskRecord {
        target: "vda".into(),
        source: String::new(),
        format: "qcow2".into(),
        file: "vm-vda.qcow2".into(),
        virtual_size: 0,
        allocated_size: 0,
        file_size: 0,
        sha256: String::new(),
        manifest: manifest.clone(),
        copy_seconds: 0.0,
        bytes_per_sec: 0.0,
        io_path: String::new(),
        backing_chain: vec![
            layer(
                record("vm-vda.backing-1.qcow2", "qcow2"),
                1,
                Some("vm-vda.backing-2.raw"),
            ),
            layer(record("vm-vda.backing-2.raw", "raw"), 2, None),
        ],
        backing_rewrite: Some(rw("vm-vda.backing-1.qcow2")),
    };
    let c = vm_backup::engine::verify::chain_check(out, &disk);
    assert!(c.ok, "{}", c.detail);
    assert!(c.detail.contains("3 layer(s)"), "{}", c.detail);
    // The middle copy pointed back at the original: refused before anything is opened.
    let mid = out.join("vm-vda.backing-1.qcow2");
    let orig = src.join("bottom.raw");
    ok(
        "qemu-img",
        &[
            "rebase",
            "-u",
            "-f",
            "qcow2",
            "-b",
            orig.to_str().unwrap(),
            "-F",
            "raw",
            mid.to_str().unwrap(),
        ],
    );
    let c = vm_backup::engine::verify::chain_check(out, &disk);
    assert!(!c.ok, "{}", c.detail);
    assert!(c.detail.contains("would leave the backup"), "{}", c.detail);
    // A backup written before copies were rewritten passes, saying why it is not opened.
    let mut old = disk.clone();
    old.backing_rewrite = None;
    old.backing_chain[0].backing_rewrite = None;
    let c = vm_backup::engine::verify::chain_check(out, &old);
    assert!(c.ok && c.detail.contains("written before"), "{}", c.detail);
}

#[test]
fn a_name_that_does_not_fit_is_rebased_after_the_copy_and_hashed_again() {
    use vm_backup::engine::backup::chain::{settle_rewrite, BackingImage};
    if !have_tools() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    let out = tmp.path().join("out");
    std::fs::create_dir_all(&src).unwrap();
    std::fs::create_dir_all(&out).unwrap();
    make_chain(&src);
    // The copier was asked for a name that cannot fit: it leaves the copy as it is.
    let long = "x".repeat(1100); // longer than qemu allows: refused
    let copy_path = out.join("vm-vda.backing-1.qcow2");
    let r = copy(
        &src.join("mid.qcow2"),
        &copy_path,
        &options(engines()[0]),
        Some(&long),
    );
    let h = r.header_rewrite.clone().unwrap();
    assert!(!h.applied);
    assert!(h.reason.contains("1100 bytes"), "{}", h.reason);
    assert_eq!(sha256_of(&copy_path), sha256_of(&src.join("mid.qcow2")));
    // The engine then rebases onto the name that fits here and hashes again.
    let below = BackingImage {
        depth: 2,
        path: src.join("bottom.raw"),
        format: "raw".into(),
        named_as: None,
        virtual_size: 0,
        allocated_size: 0,
        file_name: "vm-vda.backing-2.raw".into(),
    };
    let asked = vm_backup::copier::HeaderRewrite {
        new_name: below.file_name.clone(),
        ..h
    };
    let m = r.manifest.clone().unwrap();
    let settled = settle_rewrite(&copy_path, &below, &asked, &m, &CancelToken::new()).unwrap();
    assert_eq!(settled.record.how, "rebase");
    assert_eq!(settled.record.source_root.as_deref(), Some(m.root.as_str()));
    assert!(settled.note.contains("hashed again"), "{}", settled.note);
    let (sha, manifest) = settled.rehashed.unwrap();
    assert_eq!(sha, sha256_of(&copy_path));
    assert_ne!(manifest.root, m.root);
    let v = copier::verify_file(&copy_path, &manifest, &NoProgress, &CancelToken::new()).unwrap();
    assert!(v.ok);
    std::fs::copy(src.join("bottom.raw"), out.join("vm-vda.backing-2.raw")).unwrap();
    ok("qemu-img", &["check", "-q", copy_path.to_str().unwrap()]);
}
