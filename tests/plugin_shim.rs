//! The File Daemon plugin as the File Daemon sees it, without Bacula: `vm-backup-fd.so` (built by
//! build.rs) is loaded with `dlopen`, and `loadPlugin` must hand back the identity and entry
//! points the 9.6 File Daemon checks (magic, interface version 14, licence "AGPLv3", sizes),
//! with the version, date and description of the engine library. `tests/c/shim_events.c` then
//! sends it the events of a job. The real File Daemon's view is in `tests/lab_bacula.rs`.

use std::ffi::{c_char, c_void, CStr};
use std::path::{Path, PathBuf};
use std::process::Command;

/// The engine library built with this test: `target/<profile>/deps/libvm_backup.so`, or the
/// parent folder's copy when that one is newer (cargo refreshes it only on `cargo build`).
fn engine_library() -> PathBuf {
    let exe = std::env::current_exe().expect("the test binary's path");
    let deps = exe
        .parent()
        .expect("the test binary's folder")
        .to_path_buf();
    let candidates = [deps.clone(), deps.parent().unwrap_or(&deps).to_path_buf()];
    candidates
        .into_iter()
        .map(|dir| dir.join("libvm_backup.so"))
        .filter_map(|lib| {
            let modified = std::fs::metadata(&lib).and_then(|m| m.modified()).ok()?;
            Some((modified, lib))
        })
        .max_by_key(|(modified, _)| *modified)
        .map(|(_, lib)| lib)
        .expect("cargo builds libvm_backup.so with the tests")
}

/// pInfo as the 9.6 File Daemon reads it (56 bytes).
#[repr(C)]
struct PInfo {
    size: u32,
    version: u32,
    magic: *const c_char,
    license: *const c_char,
    author: *const c_char,
    date: *const c_char,
    plugin_version: *const c_char,
    description: *const c_char,
}

/// pFuncs: size, version, then 15 entry points (128 bytes).
#[repr(C)]
struct PFuncs {
    size: u32,
    version: u32,
    entries: [*const c_void; 15],
}

type LoadPlugin =
    unsafe extern "C" fn(*mut c_void, *mut c_void, *mut *mut PInfo, *mut *mut PFuncs) -> i32;

fn text(p: *const c_char) -> String {
    assert!(!p.is_null());
    // SAFETY: the plugin's static strings are NUL-terminated.
    unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned()
}

#[test]
fn load_plugin_returns_what_the_9_6_file_daemon_checks() {
    assert_eq!(std::mem::size_of::<PInfo>(), 56);
    assert_eq!(std::mem::size_of::<PFuncs>(), 128);
    let path = std::ffi::CString::new(env!("VMB_FD_PLUGIN")).unwrap();
    // The shim loads the engine named here (this build's), not an older copy.
    std::env::set_var("VMB_LIBRARY", engine_library());
    // SAFETY: dlopen/dlsym of the plugin built by build.rs; loadPlugin only stores the pointers
    // it gets (bfuncs is never called during loading) and fills the two out-pointers.
    unsafe {
        let handle = libc::dlopen(path.as_ptr(), libc::RTLD_NOW | libc::RTLD_LOCAL);
        assert!(!handle.is_null(), "dlopen {}", env!("VMB_FD_PLUGIN"));
        let sym = libc::dlsym(handle, c"loadPlugin".as_ptr());
        assert!(!sym.is_null(), "loadPlugin is not exported");
        assert!(!libc::dlsym(handle, c"unloadPlugin".as_ptr()).is_null());
        let load: LoadPlugin = std::mem::transmute::<*mut c_void, LoadPlugin>(sym);
        let mut binfo = [8u32, 14u32];
        let mut bfuncs = [0u8; 144];
        let mut pinfo: *mut PInfo = std::ptr::null_mut();
        let mut pfuncs: *mut PFuncs = std::ptr::null_mut();
        let rc = load(
            binfo.as_mut_ptr().cast(),
            bfuncs.as_mut_ptr().cast(),
            &mut pinfo,
            &mut pfuncs,
        );
        assert_eq!(rc, 0, "loadPlugin returned {rc}");
        let info = &*pinfo;
        assert_eq!(info.size, 56);
        assert_eq!(info.version, 14);
        assert_eq!(text(info.magic), "*FDPluginData*");
        assert_eq!(text(info.license), "AGPLv3");
        assert_eq!(text(info.plugin_version), env!("CARGO_PKG_VERSION"));
        assert_eq!(text(info.date), vm_backup::bacula::PLUGIN_DATE);
        assert_eq!(
            text(info.description),
            vm_backup::bacula::plugin_description()
        );
        let funcs = &*pfuncs;
        assert_eq!(funcs.size, 128);
        assert_eq!(funcs.version, 14);
        // All entry points but the last two (handleXACLdata, checkStream) must be set.
        for (i, f) in funcs.entries.iter().enumerate().take(13) {
            assert!(!f.is_null(), "entry point {i} is NULL");
        }
    }
}

#[test]
fn only_the_two_entry_points_are_exported_and_the_name_is_right() {
    let plugin = std::path::Path::new(env!("VMB_FD_PLUGIN"));
    // The File Daemon loads `<name>-fd.so` and matches FileSet strings `<name>:`.
    assert_eq!(plugin.file_name().unwrap(), "vm-backup-fd.so");
    let Ok(out) = Command::new("nm")
        .args(["-D", "--defined-only"])
        .arg(plugin)
        .output()
    else {
        eprintln!("SKIP: nm not installed");
        return;
    };
    let text = String::from_utf8_lossy(&out.stdout);
    let mut names: Vec<&str> = text
        .lines()
        .filter_map(|l| l.split_whitespace().nth(2))
        .collect();
    names.sort();
    assert_eq!(names, ["loadPlugin", "unloadPlugin"], "{text}");
}

/// Compiles `tests/c/shim_events.c` and runs it against the plugin and this build's engine: the
/// events of an estimate job, and failures that must each end the job with an M_FATAL message.
#[test]
fn every_failure_of_a_job_ends_it_with_a_fatal_message() {
    let crate_dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    let scratch = tempfile::tempdir().unwrap();
    let exe = scratch.path().join("shim_events");
    let compiled = Command::new("cc")
        .args(["-std=c11", "-Wall", "-Wextra", "-Werror", "-I"])
        .arg(crate_dir.join("include"))
        .arg(crate_dir.join("tests/c/shim_events.c"))
        .arg("-ldl")
        .arg("-o")
        .arg(&exe)
        .output()
        .expect("run cc");
    assert!(
        compiled.status.success(),
        "cc: {}",
        String::from_utf8_lossy(&compiled.stderr)
    );
    let target = scratch.path().join("target");
    std::fs::create_dir(&target).unwrap();
    let out = Command::new(&exe)
        .arg(env!("VMB_FD_PLUGIN"))
        .arg(&target)
        .arg(env!("CARGO_PKG_VERSION"))
        .arg(vm_backup::bacula::PLUGIN_DATE)
        .env("VMB_LIBRARY", engine_library())
        .env("VM_BACKUP_CONFIG", "/nonexistent")
        .output()
        .expect("run shim_events");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "shim_events failed:\nstdout:\n{stdout}\nstderr:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("fatals=4"), "{stdout}");
    // An estimate touches nothing on the target.
    assert_eq!(std::fs::read_dir(&target).unwrap().count(), 0);
}
