//! `vm-backup bench` end to end on tiny images: the harness runs every measurement and reports
//! them. This asserts that the harness works, not how fast anything is.

use std::path::Path;
use std::process::Command;

use serde_json::Value;

fn vm_backup() -> Command {
    Command::new(env!("CARGO_BIN_EXE_vm-backup"))
}

#[test]
fn quick_bench_reports_every_measurement_as_json() {
    let dir = tempfile::tempdir().unwrap();
    // --cache direct: O_DIRECT reads instead of dropping the page cache of a shared machine.
    let output = vm_backup()
        .args(["bench", "--quick", "--rounds", "1", "--json", "--sweep"])
        .args(["--size", "8M", "--sparse-size", "32M", "--cache", "direct"])
        .arg("--dir")
        .arg(dir.path())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "bench failed:\n{stderr}");
    let report: Value = serde_json::from_slice(&output.stdout).unwrap_or_else(|e| {
        panic!(
            "not JSON ({e}):\n{}",
            String::from_utf8_lossy(&output.stdout)
        )
    });

    assert_eq!(report["cache"], "direct");
    assert_eq!(report["rounds"], 1);

    let images = report["images"].as_array().unwrap();
    let names: Vec<&str> = images.iter().map(|i| i["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["dense", "sparse", "qcow2"]);
    let sparse = &images[1];
    assert_eq!(sparse["size"], 32 << 20);
    let allocated = sparse["allocated"].as_u64().unwrap();
    assert!(
        (8 << 20..10 << 20).contains(&allocated),
        "sparse allocated {allocated}"
    );

    let measurements = report["measurements"].as_array().unwrap();
    let mut expected: Vec<(String, String)> = Vec::new();
    for image in ["dense", "sparse", "qcow2"] {
        for method in [
            "copy-both",
            "copy-threads",
            "copy-chunks",
            "copy-backup",
            "cp-sha256sum",
            "qemu-img",
            "verify",
            "sha256sum-copy",
            "restore",
        ] {
            expected.push((image.into(), method.into()));
        }
    }
    for method in ["read-only", "write-only", "sha256-memory"] {
        expected.push(("dense".into(), method.into()));
    }
    let found: Vec<(String, String)> = measurements
        .iter()
        .map(|m| {
            (
                m["image"].as_str().unwrap().to_owned(),
                m["method"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    assert_eq!(found, expected);
    for m in measurements {
        let gib = m["gib_per_sec"].as_f64().unwrap();
        assert!(gib > 0.0 && gib.is_finite(), "{m}");
        assert_eq!(m["seconds"].as_array().unwrap().len(), 1, "{m}");
    }

    let ratios: Vec<(String, String)> = report["ratios"]
        .as_array()
        .unwrap()
        .iter()
        .inspect(|r| assert!(r["value"].as_f64().unwrap() > 0.0, "{r}"))
        .map(|r| {
            (
                r["image"].as_str().unwrap().to_owned(),
                r["name"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    for image in ["dense", "sparse", "qcow2"] {
        assert!(ratios.contains(&(image.into(), "a/c".into())), "{ratios:?}");
        assert!(ratios.contains(&(image.into(), "a/d".into())), "{ratios:?}");
        for name in ["v/v2", "r/d", "r/a"] {
            assert!(ratios.contains(&(image.into(), name.into())), "{ratios:?}");
        }
    }
    assert!(ratios.contains(&("dense".into(), "a/min(read,write,hash)".into())));
    assert!(ratios.contains(&("dense".into(), "v/read".into())));
    assert!(ratios.contains(&("dense".into(), "a3/min(read,write,hash)".into())));
    for image in ["dense", "sparse", "qcow2"] {
        assert!(
            ratios.contains(&(image.into(), "a3/d".into())),
            "{ratios:?}"
        );
    }

    assert!(
        report["peak_rss_kib"].as_u64().unwrap() > 0,
        "{}",
        report["notes"]
    );
    assert!(["uring", "threads"].contains(&report["copy_io_path"].as_str().unwrap()));
    assert_eq!(report["sweep"].as_array().unwrap().len(), 18);
    assert!(report["sweep_best"]["gib_per_sec"].as_f64().unwrap() > 0.0);

    // The named folder keeps the images for the next run, and nothing else.
    let mut left: Vec<String> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    left.sort();
    assert_eq!(
        left,
        [
            "dense-8388608.qcow2",
            "dense-8388608.raw",
            "sparse-33554432.raw"
        ]
    );
    assert!(Path::new(&dir.path().join("dense-8388608.raw")).is_file());
}

#[test]
fn zero_rounds_is_refused_with_a_message() {
    let dir = tempfile::tempdir().unwrap();
    let output = vm_backup()
        .args(["bench", "--quick", "--rounds", "0", "--cache", "warm"])
        .arg("--dir")
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("--rounds"), "{stderr}");
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
}
