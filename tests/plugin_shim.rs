//! The File Daemon plugin as the File Daemon sees it, without Bacula: `vm-backup-fd.so` (built by
//! build.rs) is loaded with `dlopen`, and `loadPlugin` must hand back the identity and entry
//! points the 9.6 File Daemon checks (magic, interface version 14, licence "AGPLv3", sizes).
//! The real File Daemon's view is in `tests/lab_bacula.rs`.

use std::ffi::{c_char, c_void, CStr};
use std::process::Command;

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
