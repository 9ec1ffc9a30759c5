//! The copier produces byte-exact copies, sha256sum-compatible digests and identical manifests
//! on both I/O engines, keeps holes, and detects zero chunks.

mod copier_support;

use std::path::Path;

use copier_support::*;
use vm_backup::copier::{self, CopyOptions, CopyReport, HashMode, IoPath};
use vm_backup::progress::{CancelToken, NoProgress};

const KIB: u64 = 1024;
const MIB: u64 = 1024 * 1024;

fn copy(src: &Path, dst: &Path, opts: &CopyOptions) -> CopyReport {
    copier::copy_file(src, dst, opts, &NoProgress, &CancelToken::new())
        .unwrap_or_else(|e| panic!("copy {} with {:?} failed: {e}", src.display(), opts.io))
}

/// Copies `src` with every engine, checks bytes, digests and that the engines agree.
fn check_case(name: &str, src: &Path, opts: CopyOptions) -> Vec<CopyReport> {
    let dir = src.parent().expect("parent");
    let expected_sha = sha256_of(src);
    let mut reports = Vec::new();
    for io in engines() {
        let dst = dir.join(format!("{name}.{io:?}.out"));
        let r = copy(src, &dst, &CopyOptions { io, ..opts.clone() });
        assert_eq!(r.io_path, io, "{name}: engine used");
        assert_same_bytes(src, &dst);
        assert_eq!(r.sha256.as_deref(), Some(expected_sha.as_str()), "{name}");
        assert_eq!(r.logical_size, std::fs::metadata(src).expect("meta").len());
        let m = r.manifest.as_ref().expect("manifest");
        assert_eq!(
            m.digests.len() as u64,
            r.logical_size.div_ceil(m.chunk_size),
            "{name}: one digest per chunk"
        );
        let v = copier::verify_file(&dst, m, &NoProgress, &CancelToken::new()).expect("verify");
        assert!(
            v.ok,
            "{name}: the copy verifies against its manifest: {v:?}"
        );
        reports.push(r);
    }
    if let [a, b] = &reports[..] {
        assert_eq!(a.sha256, b.sha256, "{name}: engines agree on the digest");
        assert_eq!(
            a.manifest, b.manifest,
            "{name}: engines agree on the manifest"
        );
        assert_eq!(a.bytes_read, b.bytes_read, "{name}");
        assert_eq!(a.bytes_written, b.bytes_written, "{name}");
        assert_eq!(a.holes_skipped, b.holes_skipped, "{name}");
    }
    reports
}

#[test]
fn dense_sizes_are_copied_exactly() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let buffer = 64 * KIB;
    for (name, size) in [
        ("empty", 0u64),
        ("one-byte", 1),
        ("page-plus-one", 4097),
        ("buffer-minus-one", buffer - 1),
        ("buffer-plus-one", buffer + 1),
        ("odd", 3 * buffer + 12345),
        ("chunks-and-a-bit", 5 * 256 * KIB + 7),
    ] {
        let src = tmp.path().join(name);
        std::fs::write(&src, pattern(size as usize, size + 7)).expect("write");
        let reports = check_case(name, &src, options(IoPath::Auto));
        for r in &reports {
            assert_eq!(r.bytes_read, size, "{name}: dense file read whole");
            assert_eq!(r.bytes_written, size, "{name}");
            assert_eq!(r.holes_skipped, 0, "{name}");
        }
        if size == 0 {
            let m = reports[0].manifest.as_ref().expect("manifest");
            assert!(m.digests.is_empty());
            assert_eq!(
                reports[0].sha256.as_deref(),
                Some("e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855")
            );
        }
    }
}

#[test]
fn whole_file_digest_equals_sha256sum() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let src = tmp.path().join("mixed");
    sparse_file(
        &src,
        3 * MIB + 5,
        &[(MIB, 300_000), (3 * MIB - 4096, 4096 + 5)],
    );
    for io in engines() {
        let dst = tmp.path().join(format!("out-{io:?}"));
        let r = copy(&src, &dst, &options(io));
        assert_eq!(r.sha256.expect("digest"), sha256sum(&src), "{io:?}");
        assert_eq!(sha256sum(&dst), sha256sum(&src));
    }
}

#[test]
fn holes_at_start_middle_end_and_all_hole() {
    let tmp = tempfile::tempdir().expect("tempdir");
    type Case = (&'static str, u64, Vec<(u64, usize)>);
    let cases: Vec<Case> = vec![
        ("hole-start", 4 * MIB, vec![(2 * MIB, 2 * MIB as usize)]),
        (
            "hole-middle",
            4 * MIB,
            vec![(0, MIB as usize), (3 * MIB, MIB as usize)],
        ),
        ("hole-end", 4 * MIB + 100, vec![(0, 1_000_000)]),
        ("all-hole", 5 * MIB + 3, vec![]),
    ];
    for (name, size, extents) in cases {
        let src = tmp.path().join(name);
        sparse_file(&src, size, &extents);
        let data: u64 = extents.iter().map(|e| e.1 as u64).sum();
        let reports = check_case(name, &src, options(IoPath::Auto));
        for r in &reports {
            let dst = &r.destination;
            assert!(
                r.holes_skipped >= size - data.next_multiple_of(4096) - 4096 * extents.len() as u64,
                "{name}: holes skipped {} of {}",
                r.holes_skipped,
                size - data
            );
            assert!(r.bytes_read <= data + 8192 * extents.len() as u64, "{name}");
            // The destination keeps the holes: no more allocated than the source, plus slack.
            assert!(
                blocks(dst) <= blocks(&src) + 64,
                "{name}: destination {} blocks, source {}",
                blocks(dst),
                blocks(&src)
            );
            if extents.is_empty() {
                assert_eq!(blocks(dst), 0, "{name}: all-hole copy allocates nothing");
                assert_eq!(r.bytes_read, 0);
                let m = r.manifest.as_ref().expect("manifest");
                assert_eq!(m.zero_chunks.len(), m.digests.len(), "all chunks are zero");
            }
        }
    }
}

/// A long hole first keeps the whole-file hasher busy with zeros while the data behind it is
/// copied: with two buffers it lets blocks go and reads them back from the destination; the
/// digests and the manifest stay those of the source (`check_case` compares with sha256sum and
/// verifies the manifest, on both engines).
#[test]
fn whole_file_hasher_behind_the_copy_still_hashes_the_copied_bytes() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let src = tmp.path().join("late-data");
    let extents: Vec<(u64, usize)> = (0..6)
        .map(|i| (64 * MIB + i * 2 * MIB, MIB as usize + 4097))
        .collect();
    sparse_file(&src, 77 * MIB + 5, &extents);
    let opts = CopyOptions {
        queue_depth: 2,
        ..options(IoPath::Auto)
    };
    check_case("late-data", &src, opts);
}

#[test]
fn zero_chunks_are_detected_and_zero_as_holes_leaves_holes() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let src = tmp.path().join("zeros");
    // 1 MiB of data, 1 MiB of allocated zeros, 1 MiB of data: chunk size 256 KiB.
    let mut bytes = pattern(MIB as usize, 3);
    bytes.extend(std::iter::repeat_n(0u8, MIB as usize));
    bytes.extend(pattern(MIB as usize, 4));
    std::fs::write(&src, &bytes).expect("write");
    assert!(blocks(&src) >= 3 * MIB / 512, "the zeros are allocated");
    let mut opts = options(IoPath::Auto);
    opts.zero_as_holes = true;
    let reports = check_case("zeros", &src, opts);
    for r in &reports {
        let m = r.manifest.as_ref().expect("manifest");
        assert_eq!(m.zero_chunks, vec![4, 5, 6, 7], "zero chunks by index");
        assert_eq!(r.zero_chunks, 4);
        assert_eq!(r.zero_bytes_skipped, MIB);
        assert_eq!(r.bytes_written, 2 * MIB);
        assert!(
            blocks(&r.destination) <= 2 * MIB / 512 + 64,
            "zeros written as holes: {} blocks",
            blocks(&r.destination)
        );
        let zero = hex::encode(copier::zero_digest(256 * KIB));
        assert_eq!(
            m.digests[5], zero,
            "precomputed zero digest is the real one"
        );
    }
}

#[test]
fn hash_modes_and_folder_destination() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let src = tmp.path().join("disk.raw");
    std::fs::write(&src, pattern(700_000, 9)).expect("write");
    let out = tmp.path().join("out");
    std::fs::create_dir(&out).expect("mkdir");
    for (mode, file, chunks) in [
        (HashMode::Both, true, true),
        (HashMode::Chunks, false, true),
        (HashMode::File, true, false),
        (HashMode::None, false, false),
    ] {
        for io in engines() {
            let mut opts = options(io);
            opts.hash = mode;
            let r = copy(&src, &out, &opts);
            assert_eq!(
                r.destination,
                out.join("disk.raw"),
                "folder gets the source name"
            );
            assert_eq!(r.sha256.is_some(), file, "{mode:?}");
            assert_eq!(r.manifest.is_some(), chunks, "{mode:?}");
            assert_same_bytes(&src, &r.destination);
        }
    }
    assert_eq!(entries(&out), vec!["disk.raw"], "no temporary file left");
}

#[test]
fn direct_io_gives_the_same_result_or_says_why_not() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let src = tmp.path().join("d");
    sparse_file(
        &src,
        2 * MIB + 333,
        &[(0, 700_001), (2 * MIB - 8192, 8192 + 333)],
    );
    let plain = copy(&src, &tmp.path().join("plain"), &options(IoPath::Threads));
    for io in engines() {
        let mut opts = options(io);
        opts.direct_read = true;
        opts.direct_write = true;
        let dst = tmp.path().join(format!("direct-{io:?}"));
        let r = copy(&src, &dst, &opts);
        assert_same_bytes(&src, &dst);
        assert_eq!(r.sha256, plain.sha256);
        assert_eq!(r.manifest, plain.manifest);
        // Either O_DIRECT ran, or a note says it was refused.
        assert!(
            (r.settings.direct_read && r.settings.direct_write) || !r.notes.is_empty(),
            "{r:?}"
        );
    }
}

#[test]
fn three_gib_file_with_real_data() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let src = tmp.path().join("big.raw");
    let size = 3 * 1024 * MIB;
    let extents: Vec<(u64, usize)> = (0..12u64)
        .map(|i| {
            (
                i * 256 * MIB + i * 12_288,
                4 * MIB as usize + 4096 * i as usize,
            )
        })
        .chain([(size - 3 * MIB, 3 * MIB as usize)])
        .collect();
    sparse_file(&src, size, &extents);
    let expected = sha256_of(&src);
    let mut reports = Vec::new();
    for io in engines() {
        let dst = tmp.path().join(format!("big-{io:?}"));
        let r = copy(&src, &dst, &CopyOptions::default().with_io(io));
        assert_eq!(r.logical_size, size);
        assert_eq!(r.sha256.as_deref(), Some(expected.as_str()), "{io:?}");
        assert_same_bytes(&src, &dst);
        assert!(r.holes_skipped > 2 * 1024 * MIB, "holes skipped");
        assert!(blocks(&dst) <= blocks(&src) + 64);
        std::fs::remove_file(&dst).expect("rm");
        reports.push(r);
    }
    if let [a, b] = &reports[..] {
        assert_eq!(a.manifest, b.manifest);
    }
}

trait WithIo {
    fn with_io(self, io: IoPath) -> Self;
}

impl WithIo for CopyOptions {
    fn with_io(mut self, io: IoPath) -> Self {
        self.io = io;
        self
    }
}

#[test]
fn progress_is_rate_limited_and_ends_at_the_total() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let src = tmp.path().join("p");
    std::fs::write(&src, pattern(24 * MIB as usize, 11)).expect("write");
    for io in engines() {
        let progress = OnFirst::new(|| {});
        let started = std::time::Instant::now();
        let r = copier::copy_file(
            &src,
            &tmp.path().join(format!("p-{io:?}")),
            &options(io),
            &progress,
            &CancelToken::new(),
        )
        .expect("copy");
        let secs = started.elapsed().as_secs_f64();
        let calls = progress.calls.load(std::sync::atomic::Ordering::SeqCst);
        assert!(calls >= 1, "{io:?}: progress reported");
        assert!(
            (calls as f64) <= secs * 4.0 + 3.0,
            "{io:?}: {calls} calls in {secs:.2} s"
        );
        let last = progress.last.lock().expect("lock").expect("a transfer");
        assert_eq!((last.done, last.total), (r.logical_size, r.logical_size));
    }
}

/// ramfs has no O_DIRECT: the copy falls back to the page cache and says so in its notes.
#[test]
fn o_direct_refused_falls_back_with_a_note() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let mnt = tmp.path().join("ramfs");
    std::fs::create_dir(&mnt).expect("mkdir");
    let Some(_fs) = Tmpfs::mount_fs("ramfs", &mnt, "mode=0755") else {
        return;
    };
    let src = mnt.join("s.raw");
    std::fs::write(&src, pattern(300_001, 17)).expect("write");
    for io in engines() {
        let mut opts = options(io);
        opts.direct_read = true;
        opts.direct_write = true;
        let dst = mnt.join(format!("d-{io:?}"));
        let r = copy(&src, &dst, &opts);
        assert_same_bytes(&src, &dst);
        assert!(
            !r.settings.direct_read && !r.settings.direct_write,
            "{io:?}"
        );
        let notes = r.notes.join("\n");
        assert!(notes.contains("O_DIRECT refused on source"), "{notes}");
        assert!(notes.contains("O_DIRECT refused on destination"), "{notes}");
    }
    let mut left = entries(&mnt);
    left.retain(|n| n.contains("vmb-tmp"));
    assert!(left.is_empty(), "temporary files left: {left:?}");
}

/// With O_DIRECT writes, `read_back` reads every written block back from the destination and
/// counts it; holes are not written, so not read back. Without O_DIRECT writes it stays off and
/// a note says why (a buffered read-back would be answered by the page cache).
#[test]
fn read_back_proves_every_written_byte_or_says_why_not() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let src = tmp.path().join("rb");
    sparse_file(
        &src,
        5 * MIB + 333,
        &[(0, 1_500_001), (3 * MIB, 2 * MIB as usize + 333)],
    );
    for io in engines() {
        let mut opts = options(io);
        opts.direct_write = true;
        opts.read_back = true;
        let dst = tmp.path().join(format!("rb-{io:?}"));
        let r = copy(&src, &dst, &opts);
        assert_same_bytes(&src, &dst);
        if r.settings.direct_write {
            assert!(r.settings.read_back, "{io:?}: {r:?}");
            assert!(r.bytes_written > 0);
            assert_eq!(
                r.bytes_read_back, r.bytes_written,
                "{io:?}: every block read back"
            );
        } else {
            assert_eq!(r.bytes_read_back, 0);
            assert!(!r.notes.is_empty(), "{io:?}: a note says why: {r:?}");
        }
        let mut buffered = options(io);
        buffered.read_back = true;
        let r = copy(
            &src,
            &tmp.path().join(format!("rb-buffered-{io:?}")),
            &buffered,
        );
        assert!(!r.settings.read_back, "{io:?}");
        assert_eq!(r.bytes_read_back, 0, "{io:?}");
        assert!(
            r.notes.iter().any(|n| n.contains("no read-back")),
            "{io:?}: {:?}",
            r.notes
        );
    }
}
