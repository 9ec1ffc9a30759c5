//! The C ABI seen from C: compiles `tests/c/copy_verify.c` against `include/vm_backup.h` and
//! the `libvm_backup.so` cargo built for this test, runs it, and checks what it did.

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use vm_backup::copier::ChunkManifest;

/// The folder holding the cdylib built with this test: `target/<profile>/deps`, or its parent
/// when that copy is newer (cargo refreshes the parent's copy only on `cargo build`).
fn library_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("the test binary's path");
    let deps = exe
        .parent()
        .expect("the test binary's folder")
        .to_path_buf();
    let candidates = [deps.clone(), deps.parent().unwrap_or(&deps).to_path_buf()];
    candidates
        .into_iter()
        .filter_map(|dir| {
            let modified = std::fs::metadata(dir.join("libvm_backup.so"))
                .and_then(|m| m.modified())
                .ok()?;
            Some((modified, dir))
        })
        .max_by_key(|(modified, _)| *modified)
        .map(|(_, dir)| dir)
        .unwrap_or_else(|| {
            panic!(
                "libvm_backup.so not found next to {} (cargo builds the cdylib with the tests)",
                exe.display()
            )
        })
}

/// A command for a program linked against the library: cargo's LD_LIBRARY_PATH (which may
/// list a stale copy first) is removed so that the program's rpath decides.
fn linked_program(exe: &Path) -> Command {
    let mut command = Command::new(exe);
    command.env_remove("LD_LIBRARY_PATH");
    command
}

/// Runs a command and returns its stdout, failing the test with its stderr otherwise.
fn run(command: &mut Command) -> String {
    let output = command
        .output()
        .unwrap_or_else(|e| panic!("cannot run {command:?}: {e}"));
    assert!(
        output.status.success(),
        "{command:?} failed ({}):\nstdout:\n{}\nstderr:\n{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// Compiles a C program against the header and the library.
fn compile(source: &Path, output: &Path) {
    let crate_dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    let lib = library_dir();
    run(Command::new("cc")
        .args(["-std=c11", "-Wall", "-Wextra", "-Werror", "-pedantic", "-I"])
        .arg(crate_dir.join("include"))
        .arg(source)
        .arg("-L")
        .arg(&lib)
        .arg("-lvm_backup")
        .arg(format!("-Wl,-rpath,{}", lib.display()))
        .arg("-o")
        .arg(output));
}

/// A test image: pseudo-random data, a hole in the middle, and an odd-sized tail, so that the
/// copy crosses full, sparse and partial chunks.
fn make_source(path: &Path) -> u64 {
    let mut data = Vec::new();
    let mut state: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut noise = |n: usize| {
        (0..n)
            .map(|_| {
                state = state
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                (state >> 33) as u8
            })
            .collect::<Vec<u8>>()
    };
    data.extend(noise(1 << 20));
    data.extend(vec![0u8; 1 << 20]);
    data.extend(noise((1 << 20) + 12_345));
    let mut file = std::fs::File::create(path).unwrap();
    file.write_all(&data).unwrap();
    file.sync_all().unwrap();
    data.len() as u64
}

/// Runs a command to completion, killing it (and failing the test) if it takes longer than
/// `limit`, so that a hang in the engine fails the test instead of blocking the suite. Its
/// output goes through files in `scratch`, so that a full pipe can never block it.
fn output_within(command: &mut Command, scratch: &Path, limit: Duration) -> Output {
    let out_path = scratch.join("stdout.txt");
    let err_path = scratch.join("stderr.txt");
    let mut child = command
        .stdout(std::fs::File::create(&out_path).unwrap())
        .stderr(std::fs::File::create(&err_path).unwrap())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {command:?}: {e}"));
    let start = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().expect("waiting for the child") {
            break status;
        }
        if start.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "{command:?} did not finish within {limit:?}; killed.\nstdout:\n{}\nstderr:\n{}",
                std::fs::read_to_string(&out_path).unwrap_or_default(),
                std::fs::read_to_string(&err_path).unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    Output {
        status,
        stdout: std::fs::read(&out_path).unwrap_or_default(),
        stderr: std::fs::read(&err_path).unwrap_or_default(),
    }
}

/// `key=value` lines of the C program's output.
fn parse(stdout: &str) -> HashMap<String, String> {
    stdout
        .lines()
        .filter_map(|line| line.split_once('='))
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect()
}

/// The `sha256sum` of a file.
fn sha256sum(path: &Path) -> String {
    let out = run(Command::new("sha256sum").arg(path));
    out.split_whitespace().next().unwrap_or_default().to_owned()
}

#[test]
fn c_program_copies_verifies_and_detects_corruption() {
    let dir = tempfile::tempdir().unwrap();
    let exe = dir.path().join("copy_verify");
    compile(
        &Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/c/copy_verify.c"),
        &exe,
    );
    let src = dir.path().join("disk.raw");
    let size = make_source(&src);
    let out = dir.path().join("out");
    std::fs::create_dir(&out).unwrap();
    let dst = out.join("disk.raw");
    let manifest = out.join("disk.manifest.json");
    let corrupt = dir.path().join("corrupt.raw");

    let output = output_within(
        linked_program(&exe).args([&src, &dst, &manifest, &corrupt]),
        dir.path(),
        Duration::from_secs(300),
    );
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(
        output.status.code(),
        Some(0),
        "copy_verify failed:\nstdout:\n{stdout}\nstderr:\n{stderr}"
    );
    let kv = parse(&stdout);

    // The copy is byte-identical and its digest is sha256sum's.
    assert_eq!(std::fs::read(&dst).unwrap(), std::fs::read(&src).unwrap());
    let reference = sha256sum(&src);
    assert_eq!(kv["sha256"], reference);
    assert_eq!(sha256sum(&dst), reference);
    assert_eq!(kv["logical_size"], size.to_string());
    assert!(
        kv["progress_calls"].parse::<u64>().unwrap() >= 1,
        "{stdout}"
    );

    // The manifest the ABI wrote is the one the result names.
    let manifest: ChunkManifest =
        serde_json::from_slice(&std::fs::read(&manifest).unwrap()).expect("the manifest is JSON");
    assert_eq!(kv["manifest_root"], manifest.root);
    assert_eq!(manifest.file_size, size);
    assert_eq!(kv["verify_chunks"], manifest.digests.len().to_string());

    // Corruption is found, named by chunk and offset.
    assert_eq!(kv["corrupt_status"], "4", "{stdout}");
    assert_eq!(kv["corrupt_first_bad_chunk"], "1");
    assert_eq!(kv["corrupt_first_bad_offset"], "262144");
    assert!(
        kv["corrupt_error"].contains("chunk 1") && kv["corrupt_error"].contains("262144"),
        "{}",
        kv["corrupt_error"]
    );

    // NULL and cancellation are statuses with messages, and leave nothing behind.
    assert_eq!(kv["null_status"], "1");
    assert!(kv["null_error"].contains("`src`"), "{}", kv["null_error"]);
    assert_eq!(kv["cancel_status"], "5", "{stdout}");
    assert_ne!(kv["cancel_error"], "(none)");
    let mut left: Vec<String> = std::fs::read_dir(&out)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    left.sort();
    assert_eq!(left, ["disk.manifest.json", "disk.raw"]);
}

#[test]
fn header_compiles_as_c_and_cpp() {
    let dir = tempfile::tempdir().unwrap();
    let source = dir.path().join("use.c");
    std::fs::write(
        &source,
        "#include \"vm_backup.h\"\nint main(void) { return vmb_abi_version() == VMB_ABI_VERSION ? 0 : 1; }\n",
    )
    .unwrap();
    let exe = dir.path().join("use");
    compile(&source, &exe);
    run(&mut linked_program(&exe));

    let include = Path::new(env!("CARGO_MANIFEST_DIR")).join("include");
    run(Command::new("c++")
        .args([
            "-std=c++17",
            "-Wall",
            "-Wextra",
            "-Werror",
            "-fsyntax-only",
            "-x",
            "c++",
        ])
        .arg("-I")
        .arg(&include)
        .arg(&source));
}
