//! The checked-in header `include/vm_backup.h` is the C ABI's contract: this test regenerates it
//! from the Rust source with cbindgen and fails when the two differ.
//!
//! After changing the ABI in `src/ffi/`, rewrite the header with
//! `VMB_BLESS=1 cargo test --test c_abi_header` and commit it.

use std::path::Path;

/// Generates the header text from the crate's source and `cbindgen.toml`.
fn generate() -> String {
    let crate_dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    let config = cbindgen::Config::from_file(crate_dir.join("cbindgen.toml"))
        .expect("cbindgen.toml is readable and valid");
    let bindings = cbindgen::generate_with_config(crate_dir, config)
        .expect("cbindgen parses the crate and generates the header");
    let mut text = Vec::new();
    bindings.write(&mut text);
    String::from_utf8(text).expect("the header is UTF-8")
}

/// The first line where two texts differ, for the failure message.
fn first_difference(expected: &str, actual: &str) -> String {
    let mut expected_lines = expected.lines();
    let mut actual_lines = actual.lines();
    for number in 1.. {
        match (expected_lines.next(), actual_lines.next()) {
            (None, None) => break,
            (e, a) if e == a => continue,
            (e, a) => {
                return format!(
                    "first difference at line {number}:\n  checked in: {}\n  generated:  {}",
                    e.unwrap_or("<end of file>"),
                    a.unwrap_or("<end of file>")
                )
            }
        }
    }
    "the files differ only in line endings".to_owned()
}

#[test]
fn checked_in_header_matches_the_rust_source() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("include/vm_backup.h");
    let generated = generate();
    if std::env::var_os("VMB_BLESS").is_some() {
        std::fs::write(&path, &generated).expect("include/vm_backup.h is writable");
        eprintln!("rewrote {}", path.display());
        return;
    }
    let checked_in = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        checked_in == generated,
        "include/vm_backup.h is out of date with src/ffi/ ({}).\n\
         Regenerate it with `VMB_BLESS=1 cargo test --test c_abi_header`, review \
         `git diff include/vm_backup.h`, and commit it.",
        first_difference(&checked_in, &generated)
    );
}

#[test]
fn header_declares_the_whole_abi() {
    let header = generate();
    for symbol in [
        "vmb_version",
        "vmb_abi_version",
        "vmb_status_str",
        "vmb_string_free",
        "vmb_cancel_new",
        "vmb_cancel_request",
        "vmb_cancel_free",
        "vmb_copy_options_default",
        "vmb_copy_file",
        "vmb_verify_file",
        "VMB_ERR_PANIC",
        "vmb_progress_fn",
        "vmb_log_fn",
        "char sha256[65]",
        "char manifest_root[65]",
        "#define VMB_ABI_VERSION",
        "vmb_is_our_command",
        "vmb_is_our_path",
        "vmb_plugin_date",
        "vmb_plugin_description",
    ] {
        assert!(header.contains(symbol), "the header lacks {symbol}");
    }
}

/// Every job function follows the ABI's one convention: it returns a `vmb_status` and takes
/// `char **error` last; only the destructor returns nothing.
#[test]
fn every_job_function_returns_a_status_and_takes_error_last() {
    let header = generate();
    let mut seen = 0;
    let code: String = header
        .lines()
        .filter(|line| !line.trim_start().starts_with("//"))
        .collect::<Vec<_>>()
        .join(" ");
    for piece in code.split(';') {
        let declaration = piece.trim();
        let Some(open) = declaration.find('(') else {
            continue;
        };
        let name = declaration[..open]
            .rsplit(|c: char| c.is_whitespace() || c == '*')
            .next()
            .unwrap_or_default();
        if !name.starts_with("vmb_job_") {
            continue;
        }
        seen += 1;
        if name == "vmb_job_free" {
            assert!(
                declaration.starts_with("void vmb_job_free("),
                "{declaration}"
            );
            continue;
        }
        assert!(
            declaration.starts_with("enum vmb_status vmb_job_")
                || declaration.starts_with("vmb_status vmb_job_"),
            "{declaration}"
        );
        assert!(
            declaration
                .replace(char::is_whitespace, "")
                .ends_with("char**error)"),
            "{declaration}"
        );
    }
    assert_eq!(seen, 17, "the 17 job functions are declared");
}

#[test]
fn header_abi_version_matches_the_library() {
    let header = generate();
    let define = format!(
        "#define VMB_ABI_VERSION {}",
        vm_backup::ffi::VMB_ABI_VERSION
    );
    assert!(
        header.contains(&define),
        "cbindgen.toml's after_includes must say `{define}`"
    );
}

/// The job functions (`src/ffi/job.rs`) name their enums the Rust way; the configuration must
/// turn `VmbMessageLevel::Warning` into `VMB_MESSAGE_LEVEL_WARNING`, which the shim uses, while
/// the enums that opt out keep their C names.
#[test]
fn config_names_rust_style_enum_variants_for_c() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("src")).unwrap();
    std::fs::write(
        dir.path().join("Cargo.toml"),
        "[package]\nname = \"probe\"\nversion = \"0.0.0\"\nedition = \"2021\"\n\n[lib]\npath = \"src/lib.rs\"\n",
    )
    .unwrap();
    std::fs::write(
        dir.path().join("src/lib.rs"),
        "#[repr(C)]\npub enum VmbMessageLevel { Info = 0, Warning = 1 }\n\
         /// cbindgen:rename-all=None\n#[repr(C)]\n#[allow(non_camel_case_types)]\npub enum vmb_status { VMB_OK = 0 }\n\
         #[no_mangle]\npub extern \"C\" fn probe(_l: VmbMessageLevel) -> vmb_status { vmb_status::VMB_OK }\n",
    )
    .unwrap();
    let config =
        cbindgen::Config::from_file(Path::new(env!("CARGO_MANIFEST_DIR")).join("cbindgen.toml"))
            .unwrap();
    let mut text = Vec::new();
    cbindgen::generate_with_config(dir.path(), config)
        .expect("cbindgen generates the probe header")
        .write(&mut text);
    let header = String::from_utf8(text).unwrap();
    assert!(header.contains("VMB_MESSAGE_LEVEL_WARNING = 1"), "{header}");
    assert!(header.contains("VMB_OK = 0"), "{header}");
}
