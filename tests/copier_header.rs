//! Unit tests of the copier's qcow2 backing-name rewrite on v2 and v3 headers made with
//! qemu-img in a tempdir (here, not in `src/`: only `hv` spawns qemu-img in the library).

use std::path::Path;
use std::process::Command;

use vm_backup::copier::header::{rewrite_backing_name, NotRewritten, Rewritten};

fn be64(b: &[u8], at: usize) -> Option<u64> {
    b.get(at..at + 8)
        .map(|s| u64::from_be_bytes(s.try_into().unwrap()))
}

fn be32(b: &[u8], at: usize) -> Option<u32> {
    b.get(at..at + 4)
        .map(|s| u32::from_be_bytes(s.try_into().unwrap()))
}

fn qemu_img(args: &[&str]) -> bool {
    Command::new("qemu-img")
        .args(args)
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
}

fn info_backing(path: &Path) -> (Option<String>, Option<String>) {
    let out = Command::new("qemu-img")
        .args(["info", "-U", "--output=json"])
        .arg(path)
        .output()
        .expect("qemu-img info");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    let s = |k: &str| v.get(k).and_then(|x| x.as_str()).map(str::to_string);
    (s("backing-filename"), s("backing-filename-format"))
}

/// A top image on `base` in `dir`, compat `compat`, named in its header as `named`.
fn make(dir: &Path, compat: &str, base_fmt: &str, named: &str) -> std::path::PathBuf {
    let base = dir.join(named.trim_start_matches('/').replace('/', "_"));
    let base = if named.starts_with('/') {
        std::path::PathBuf::from(named)
    } else {
        base
    };
    let top = dir.join(format!("top-{compat}.qcow2"));
    assert!(qemu_img(&[
        "create",
        "-q",
        "-f",
        base_fmt,
        base.to_str().unwrap(),
        "1M"
    ]));
    assert!(qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        &format!("compat={compat}"),
        "-b",
        named,
        "-F",
        base_fmt,
        top.to_str().unwrap(),
    ]));
    top
}

fn have_qemu_img() -> bool {
    qemu_img(&["--version"])
}

fn rewrite_file(top: &Path, new: &str) -> Result<Rewritten, NotRewritten> {
    let mut bytes = std::fs::read(top).unwrap();
    let n = bytes.len().min(4096);
    let r = rewrite_backing_name(&mut bytes[..n], new.as_bytes());
    std::fs::write(top, &bytes).unwrap();
    r
}

#[test]
fn v2_and_v3_headers_are_rewritten_and_qemu_img_reads_them() {
    if !have_qemu_img() {
        eprintln!("skipped: no qemu-img");
        return;
    }
    for compat in ["0.10", "1.1"] {
        for (fmt, named) in [("qcow2", "base.qcow2"), ("raw", "base-raw.img")] {
            let dir = tempfile::tempdir().unwrap();
            let top = make(dir.path(), compat, fmt, named);
            let new = format!(
                "vm-vda.backing-1.{}",
                if fmt == "raw" { "raw" } else { fmt }
            );
            std::fs::copy(dir.path().join(named), dir.path().join(&new)).unwrap();
            let r = rewrite_file(&top, &new).unwrap();
            assert_eq!(r.old_name, named);
            let (b, f) = info_backing(&top);
            assert_eq!(b.as_deref(), Some(new.as_str()), "compat {compat}");
            assert_eq!(f.as_deref(), Some(fmt), "compat {compat}: format kept");
            // The chain opens inside the folder and is clean.
            assert!(qemu_img(&["check", "-q", top.to_str().unwrap()]));
            // Putting the original bytes back gives the source header again.
            let mut bytes = std::fs::read(&top).unwrap();
            bytes[..r.original.len()].copy_from_slice(&r.original);
            std::fs::write(&top, &bytes).unwrap();
            assert_eq!(info_backing(&top).0.as_deref(), Some(named));
        }
    }
}

#[test]
fn a_shorter_name_leaves_no_trace_of_the_longer_one() {
    if !have_qemu_img() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let long = dir
        .path()
        .join("a-rather-long-original-base-image-name.qcow2");
    let top = make(dir.path(), "1.1", "qcow2", long.to_str().unwrap());
    std::fs::copy(&long, dir.path().join("b.qcow2")).unwrap();
    let r = rewrite_file(&top, "b.qcow2").unwrap();
    assert_eq!(r.old_name, long.to_str().unwrap());
    assert_eq!(info_backing(&top).0.as_deref(), Some("b.qcow2"));
    let bytes = std::fs::read(&top).unwrap();
    let hay = &bytes[..4096];
    assert!(!hay.windows(12).any(|w| w == b"rather-long-"));
}

#[test]
fn names_that_do_not_fit_are_refused_and_the_block_is_untouched() {
    if !have_qemu_img() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let top = make(dir.path(), "1.1", "qcow2", "base.qcow2");
    let mut bytes = std::fs::read(&top).unwrap();
    // A first block that ends right after the old name: no room for a longer one.
    let off = be64(&bytes, 8).unwrap() as usize;
    let end = off + be32(&bytes, 16).unwrap() as usize;
    let mut block = bytes[..end].to_vec();
    let before = block.clone();
    let e = rewrite_backing_name(&mut block, b"vm-vda.backing-1.qcow2").unwrap_err();
    assert!(
        matches!(
            e,
            NotRewritten::DoesNotFit {
                need: 22,
                room: 10,
                ..
            }
        ),
        "{e}"
    );
    assert_eq!(block, before);
    // Too long for qemu.
    let e = rewrite_backing_name(&mut bytes[..4096], &[b'a'; 1024]).unwrap_err();
    assert_eq!(e, NotRewritten::TooLong(1024));
    // No backing file, not qcow2.
    let plain = dir.path().join("plain.qcow2");
    assert!(qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        plain.to_str().unwrap(),
        "1M"
    ]));
    let mut p = std::fs::read(&plain).unwrap();
    assert_eq!(
        rewrite_backing_name(&mut p[..4096], b"x").unwrap_err(),
        NotRewritten::NoBackingFile
    );
    assert_eq!(
        rewrite_backing_name(&mut [0u8; 512], b"x").unwrap_err(),
        NotRewritten::NotQcow2
    );
}
