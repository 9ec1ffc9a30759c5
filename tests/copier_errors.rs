//! Every failure gets its own error, names the path (and offset), and leaves nothing behind.

mod copier_support;

use std::path::Path;

use copier_support::*;
use vm_backup::copier::{self, CopyError, CopyOptions, HashMode, IoPath};
use vm_backup::progress::{CancelToken, NoProgress};

const MIB: u64 = 1024 * 1024;

fn copy_err(src: &Path, dst: &Path, opts: &CopyOptions) -> CopyError {
    match copier::copy_file(src, dst, opts, &NoProgress, &CancelToken::new()) {
        Ok(r) => panic!("copy of {} should fail, got {r:?}", src.display()),
        Err(e) => e,
    }
}

#[test]
fn full_destination_gives_no_space_and_leaves_no_file() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let src = tmp.path().join("src.raw");
    std::fs::write(&src, pattern(16 * MIB as usize, 1)).expect("write");
    let mnt = tmp.path().join("small");
    std::fs::create_dir(&mnt).expect("mkdir");
    let Some(_fs) = Tmpfs::mount(&mnt, "8m") else {
        return;
    };
    for io in engines() {
        let e = copy_err(&src, &mnt.join("dst.raw"), &options(io));
        match &e {
            CopyError::NoSpace { path, offset } => {
                assert_eq!(path, &mnt.join("dst.raw"));
                assert!(*offset > 0 && *offset < 16 * MIB, "offset {offset}");
            }
            other => panic!("{io:?}: expected NoSpace, got {other:?}"),
        }
        assert!(e.to_string().contains("no space"), "{e}");
        assert!(entries(&mnt).is_empty(), "{io:?}: left {:?}", entries(&mnt));
    }
}

#[test]
fn source_truncated_during_copy_is_detected() {
    let tmp = tempfile::tempdir().expect("tempdir");
    for io in engines() {
        let src = tmp.path().join(format!("shrinking-{io:?}"));
        std::fs::write(&src, pattern(32 * MIB as usize, 2)).expect("write");
        let out = tmp.path().join(format!("out-{io:?}"));
        std::fs::create_dir(&out).expect("mkdir");
        // Truncate the source from the hashing thread as soon as the copy reports progress.
        let victim = src.clone();
        let progress = OnFirst::new(move || {
            open_rw(&victim).set_len(MIB).expect("truncate");
        });
        let mut opts = options(io);
        opts.queue_depth = 2;
        let r = copier::copy_file(&src, &out, &opts, &progress, &CancelToken::new());
        match r {
            Err(CopyError::SourceChanged { path, offset, .. }) => {
                assert_eq!(path, src);
                assert!((MIB..32 * MIB).contains(&offset), "offset {offset}");
            }
            other => panic!("{io:?}: expected SourceChanged, got {other:?}"),
        }
        assert!(entries(&out).is_empty(), "{io:?}: left {:?}", entries(&out));
    }
}

#[test]
fn unreadable_source_gives_source_read() {
    let tmp = tempfile::tempdir().expect("tempdir");
    // A directory opens for reading, even for root, but read(2) fails with EISDIR.
    let src = tmp.path().join("not-a-file");
    std::fs::create_dir(&src).expect("mkdir");
    std::fs::write(src.join("inside"), b"x").expect("write");
    if std::fs::metadata(&src).expect("meta").len() == 0 {
        eprintln!("SKIP: directories have size 0 on this filesystem");
        return;
    }
    let out = tmp.path().join("out");
    std::fs::create_dir(&out).expect("mkdir");
    for io in engines() {
        match copy_err(&src, &out.join("x"), &options(io)) {
            CopyError::SourceRead {
                path,
                offset,
                source,
            } => {
                assert_eq!(path, src);
                assert_eq!(offset, 0);
                assert_eq!(source.raw_os_error(), Some(libc::EISDIR), "{io:?}");
            }
            other => panic!("{io:?}: expected SourceRead, got {other:?}"),
        }
        assert!(entries(&out).is_empty(), "{io:?}");
    }
}

#[test]
fn missing_source_and_missing_destination_folder() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let src = tmp.path().join("exists");
    std::fs::write(&src, b"data").expect("write");
    match copy_err(
        &tmp.path().join("missing"),
        &tmp.path().join("d"),
        &options(IoPath::Threads),
    ) {
        CopyError::SourceOpen { path, .. } => assert_eq!(path, tmp.path().join("missing")),
        other => panic!("expected SourceOpen, got {other:?}"),
    }
    let nowhere = tmp.path().join("no-such-folder");
    match copy_err(&src, &nowhere.join("d"), &options(IoPath::Threads)) {
        CopyError::DestinationFolderMissing { path } => assert_eq!(path, nowhere),
        other => panic!("expected DestinationFolderMissing, got {other:?}"),
    }
    assert!(!nowhere.exists());
}

#[test]
fn cancellation_stops_within_a_buffer_and_leaves_nothing() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let src = tmp.path().join("src.raw");
    std::fs::write(&src, pattern(64 * MIB as usize, 3)).expect("write");
    for io in engines() {
        let out = tmp.path().join(format!("out-{io:?}"));
        std::fs::create_dir(&out).expect("mkdir");
        let cancel = CancelToken::new();
        let c2 = cancel.clone();
        let progress = OnFirst::new(move || c2.cancel());
        let r = copier::copy_file(&src, &out, &options(io), &progress, &cancel);
        match r {
            Err(CopyError::Cancelled { path, offset }) => {
                assert_eq!(path, src);
                assert!(offset < 64 * MIB, "cancelled before the end: {offset}");
            }
            other => panic!("{io:?}: expected Cancelled, got {other:?}"),
        }
        assert!(entries(&out).is_empty(), "{io:?}: left {:?}", entries(&out));
    }
}

#[test]
fn bad_options_are_refused_before_anything_is_created() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let src = tmp.path().join("s");
    std::fs::write(&src, b"data").expect("write");
    let out = tmp.path().join("out");
    std::fs::create_dir(&out).expect("mkdir");
    for opts in [
        CopyOptions {
            buffer_size: 1000,
            ..CopyOptions::default()
        },
        CopyOptions {
            queue_depth: 0,
            ..CopyOptions::default()
        },
        CopyOptions {
            chunk_size: 3 << 19,
            hash: HashMode::Both,
            ..CopyOptions::default()
        },
    ] {
        assert!(
            matches!(copy_err(&src, &out, &opts), CopyError::BadOptions(_)),
            "{opts:?}"
        );
    }
    assert!(entries(&out).is_empty());
}

/// A loop device stands in for an LVM volume: a block device source (size from lseek, no
/// extent map) is copied exactly.
#[test]
fn block_device_source_is_copied() {
    if !is_root() {
        eprintln!("SKIP: loop devices need root");
        return;
    }
    let tmp = tempfile::tempdir().expect("tempdir");
    let backing = tmp.path().join("backing.img");
    std::fs::write(&backing, pattern(3 * MIB as usize + 8192, 21)).expect("write");
    let out = std::process::Command::new("losetup")
        .args(["--find", "--show"])
        .arg(&backing)
        .output();
    let dev = match out {
        Ok(o) if o.status.success() => String::from_utf8_lossy(&o.stdout).trim().to_owned(),
        other => {
            eprintln!("SKIP: cannot attach a loop device: {other:?}");
            return;
        }
    };
    struct Detach(String);
    impl Drop for Detach {
        fn drop(&mut self) {
            let _ = std::process::Command::new("losetup")
                .args(["-d", &self.0])
                .status();
        }
    }
    let _guard = Detach(dev.clone());
    for io in engines() {
        let dst = tmp.path().join(format!("copy-{io:?}.raw"));
        let r = copier::copy_file(
            Path::new(&dev),
            &dst,
            &options(io),
            &NoProgress,
            &CancelToken::new(),
        )
        .expect("copy block device");
        assert_eq!(r.logical_size, 3 * MIB + 8192);
        assert_same_bytes(&backing, &dst);
        assert_eq!(r.sha256.expect("digest"), sha256_of(&backing));
    }
}
