//! `vm-backup copy` and `vm-backup verify-file` as a user runs them.

mod copier_support;

use std::path::Path;
use std::process::{Command, Output};

use copier_support::*;

const BIN: &str = env!("CARGO_BIN_EXE_vm-backup");

fn run(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut c = Command::new(BIN);
    c.args(args).env_remove("VMB_IO");
    for (k, v) in env {
        c.env(k, v);
    }
    c.output().expect("run vm-backup")
}

fn json(out: &Output) -> serde_json::Value {
    assert!(
        out.status.success(),
        "exit {:?}: {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("JSON report")
}

fn s(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

#[test]
fn copy_then_verify_then_detect_a_flipped_byte() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let src = tmp.path().join("vm-vda.raw");
    sparse_file(&src, 9 << 20, &[(0, 3 << 20), (6 << 20, (2 << 20) + 17)]);
    let out = tmp.path().join("backup");
    std::fs::create_dir(&out).expect("mkdir");
    let manifest = tmp.path().join("manifest.json");
    let report = json(&run(
        &[
            "copy",
            s(&src),
            s(&out),
            "--buffer-size",
            "256k",
            "--chunk-size",
            "1MiB",
            "--queue-depth",
            "8",
            "--manifest",
            s(&manifest),
            "--json",
        ],
        &[],
    ));
    let dst = out.join("vm-vda.raw");
    assert_same_bytes(&src, &dst);
    assert_eq!(report["sha256"].as_str(), Some(sha256sum(&src).as_str()));
    assert_eq!(report["settings"]["buffer_size"], 256 * 1024);
    assert_eq!(report["manifest"]["chunk_size"], 1 << 20);

    let ok = run(&["verify-file", s(&dst), "--manifest", s(&manifest)], &[]);
    assert_eq!(
        ok.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&ok.stdout)
    );

    // Flip one byte in chunk 6 (offset 6 MiB + 1000).
    let f = open_rw(&dst);
    let at = (6 << 20) + 1000;
    let mut b = [0u8; 1];
    std::os::unix::fs::FileExt::read_exact_at(&f, &mut b, at).expect("read");
    b[0] ^= 0x40;
    std::os::unix::fs::FileExt::write_all_at(&f, &b, at).expect("write");
    drop(f);

    let bad = run(
        &["verify-file", s(&dst), "--manifest", s(&manifest), "--json"],
        &[],
    );
    assert_eq!(bad.status.code(), Some(1), "mismatch exits 1");
    let v: serde_json::Value = serde_json::from_slice(&bad.stdout).expect("JSON");
    assert_eq!(v["ok"], false);
    assert_eq!(v["first_bad"]["index"], 6);
    assert_eq!(v["first_bad"]["offset"], 6 << 20);
    assert_eq!(v["bad_chunks"], serde_json::json!([6]));

    let human = run(&["verify-file", s(&dst), "--manifest", s(&manifest)], &[]);
    assert_eq!(human.status.code(), Some(1));
    let text = String::from_utf8_lossy(&human.stdout);
    assert!(
        text.contains("first bad chunk: 6 at offset 6291456"),
        "{text}"
    );
}

#[test]
fn env_forces_the_thread_pool_and_both_paths_agree() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let src = tmp.path().join("d.img");
    std::fs::write(&src, pattern(3_000_001, 5)).expect("write");
    let forced = json(&run(
        &["copy", s(&src), s(&tmp.path().join("a")), "--json"],
        &[("VMB_IO", "threads")],
    ));
    assert_eq!(forced["io_path"], "threads");
    assert!(forced["notes"].to_string().contains("VMB_IO=threads"));
    let flag = json(&run(
        &[
            "copy",
            s(&src),
            s(&tmp.path().join("b")),
            "--io",
            "threads",
            "--json",
        ],
        &[],
    ));
    assert_eq!(flag["io_path"], "threads");
    if vm_backup::copier::probe_uring().is_ok() {
        let uring = json(&run(
            &[
                "copy",
                s(&src),
                s(&tmp.path().join("c")),
                "--io",
                "uring",
                "--json",
            ],
            &[],
        ));
        assert_eq!(uring["io_path"], "uring");
        assert_eq!(uring["sha256"], forced["sha256"]);
        assert_eq!(uring["manifest"], forced["manifest"]);
    } else {
        eprintln!("SKIP: io_uring unavailable, uring leg not run");
    }
    assert_same_bytes(&src, &tmp.path().join("a"));
}

#[test]
fn max_rate_paces_the_data_and_lets_holes_through() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let src = tmp.path().join("sparse.raw");
    // 6 MiB of data in a 70 MiB file: at 4 MiB/s the data needs 1.5 s; the holes, if they
    // were counted, 16 s more.
    sparse_file(&src, 70 << 20, &[(0, 3 << 20), (40 << 20, 3 << 20)]);
    for io in ["threads", "uring"] {
        if io == "uring" && vm_backup::copier::probe_uring().is_err() {
            eprintln!("SKIP: io_uring unavailable, uring leg not run");
            continue;
        }
        let dst = tmp.path().join(io);
        let started = std::time::Instant::now();
        let report = json(&run(
            &[
                "copy",
                s(&src),
                s(&dst),
                "--io",
                io,
                "--buffer-size",
                "256k",
                "--max-rate",
                "4M/s",
                "--json",
            ],
            &[],
        ));
        let took = started.elapsed().as_secs_f64();
        assert_eq!(report["io_path"], io);
        assert_same_bytes(&src, &dst);
        // The last of the 24 blocks may start (24 - 2) × 256 KiB ÷ 4 MiB/s = 1.375 s in (one
        // block at once plus the 100 ms burst window); no sooner.
        assert!(took >= 1.3, "{io}: 6 MiB at 4 MiB/s took only {took:.2} s");
        assert!(took < 10.0, "{io}: the holes were paced too ({took:.2} s)");
    }
    let zero = run(
        &["copy", s(&src), s(&tmp.path().join("z")), "--max-rate", "0"],
        &[],
    );
    assert!(!zero.status.success());
    assert!(
        String::from_utf8_lossy(&zero.stderr).contains("more than 0 bytes per second"),
        "{}",
        String::from_utf8_lossy(&zero.stderr)
    );
}

#[test]
fn errors_are_worded_and_exit_non_zero() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let src = tmp.path().join("x");
    std::fs::write(&src, b"abc").expect("write");
    let out = run(
        &["copy", s(&src), s(&tmp.path().join("nope").join("x"))],
        &[],
    );
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("destination folder") && err.contains("nope"),
        "{err}"
    );

    let out = run(
        &[
            "copy",
            s(&src),
            s(&tmp.path().join("y")),
            "--buffer-size",
            "12q",
        ],
        &[],
    );
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("12q"));

    // Human summary on success.
    let ok = run(&["copy", s(&src), s(&tmp.path().join("z"))], &[]);
    assert!(ok.status.success());
    let text = String::from_utf8_lossy(&ok.stdout);
    assert!(
        text.contains("sha256 ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"),
        "{text}"
    );
}
