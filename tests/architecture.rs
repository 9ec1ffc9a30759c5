//! The architecture test: holds the rooms of `src/` apart (DESIGN.md "Rooms",
//! docs/architecture.md).
//!
//! It reads every `src/**/*.rs`, finds the file's room (the first folder under `src/`, or the
//! leaf module `error`, `progress`, `config`, `lib`, `main`), and collects the rooms the file
//! names through `crate::X` (and `vm_backup::X` in the program, `src/cli/` and `src/main.rs`).
//! Comments and string literals are skipped, so a doc link is not a dependency. Then each rule
//! below is one test, so a failure says which rule broke, where (file:line, the line itself)
//! and what the rule allows.
//!
//! Rules that the code does not follow yet carry `#[ignore = "until …"]`: once the move they
//! wait for has landed, remove the `ignore` line and the rule holds from then on.
//!
//! Not seen by this test: `super::super::…` paths that climb out of a room (use `crate::`).

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::{Path, PathBuf};

// ------------------------------------------------------------------------------------------
// The rules.

/// The rooms (folders under `src/`), bottom first.
const ROOMS: &[&str] = &[
    "format", "store", "hv", "copier", "engine", "ops", "bacula", "ffi", "cli",
];

/// The shared leaves (single files under `src/`), which every room may use.
const LEAVES: &[&str] = &["error", "progress", "config"];

/// The crate roots: `lib` declares the rooms, `main` is the program's entry (it mounts `cli`).
const ROOTS: &[&str] = &["lib", "main"];

/// Items of the crate root that `crate::X` may name, and the room each really lives in
/// (`src/lib.rs` re-exports the error types and holds `VERSION`).
const ROOT_ITEMS: &[(&str, &str)] = &[
    ("Error", "error"),
    ("ErrorKind", "error"),
    ("ExitStatus", "error"),
    ("Severity", "error"),
    ("VERSION", "lib"),
];

/// The rooms a room may use besides itself; `None` means every room.
fn allowed(room: &str) -> Option<Vec<&'static str>> {
    let with_leaves = |rooms: &[&'static str]| {
        let mut v = rooms.to_vec();
        v.extend_from_slice(LEAVES);
        Some(v)
    };
    match room {
        // The on-disk contract depends on nothing above it.
        "format" => with_leaves(&[]),
        "store" => with_leaves(&["format"]),
        "hv" => with_leaves(&["format"]),
        // The copier moves bytes; it takes its settings as arguments, so not even `config`
        // (`error` only for the `ErrorKind` its error reports).
        "copier" => Some(vec!["progress", "error"]),
        "engine" => with_leaves(&["format", "store", "hv", "copier"]),
        "ops" => with_leaves(&["engine", "store", "format"]),
        // DESIGN.md says "bacula: engine"; `format` too, as a pure data dependency (plugin
        // string values, the metadata it catalogues).
        "bacula" => with_leaves(&["engine", "format"]),
        "ffi" => with_leaves(&["bacula", "engine", "format", "copier"]),
        "cli" => None,
        _ => Some(vec![]),
    }
}

/// Exactly what each leaf and crate root uses today. Leaves are used by everyone, so every
/// new arrow out of them is a decision: make it here, on purpose.
fn leaf_uses() -> BTreeMap<&'static str, BTreeSet<&'static str>> {
    let mut m = BTreeMap::new();
    // `Error` gathers every room's error for the drivers (program, C ABI). Issue 8 named
    // `bacula` (the plugin) as one it should not need.
    m.insert(
        "error",
        BTreeSet::from([
            "bacula", "config", "copier", "engine", "format", "hv", "store",
        ]),
    );
    m.insert("progress", BTreeSet::new());
    // The inventory's method (`format::metadata::Method`), the host name default
    // (`format::layout::this_host`), and `ErrorKind`.
    m.insert("config", BTreeSet::from(["error", "format"]));
    m.insert("lib", BTreeSet::new());
    m.insert("main", BTreeSet::new());
    m
}

// ------------------------------------------------------------------------------------------
// One test per rule.

#[test]
#[ignore = "until the chunk manifest (ChunkManifest) moves from copier to format"]
fn format_uses_only_the_leaves() {
    assert_arrows("format");
}

#[test]
fn store_uses_only_format() {
    assert_arrows("store");
}

#[test]
fn hv_uses_only_format() {
    assert_arrows("hv");
}

#[test]
fn copier_uses_only_progress() {
    assert_arrows("copier");
}

#[test]
fn engine_uses_only_format_store_hv_copier() {
    assert_arrows("engine");
}

#[test]
fn ops_uses_only_engine_store_format() {
    assert_arrows("ops");
}

#[test]
#[ignore = "until the plugin reaches the reporter and appliance hook (ops) and the restore staging (store) through the engine"]
fn bacula_uses_only_engine_and_format() {
    assert_arrows("bacula");
}

#[test]
fn ffi_uses_only_bacula_engine_format_copier() {
    assert_arrows("ffi");
}

#[test]
fn leaves_use_exactly_what_is_listed() {
    let srcs = sources();
    let mut found: BTreeMap<&str, BTreeSet<String>> = BTreeMap::new();
    let mut lines: BTreeMap<(String, String), String> = BTreeMap::new();
    for s in &srcs {
        if !LEAVES.contains(&s.room.as_str()) && !ROOTS.contains(&s.room.as_str()) {
            continue;
        }
        let leaf = LEAVES
            .iter()
            .chain(ROOTS)
            .find(|l| **l == s.room)
            .copied()
            .unwrap();
        let set = found.entry(leaf).or_default();
        for u in &s.uses {
            if u.to != s.room {
                set.insert(u.to.clone());
                lines
                    .entry((s.room.clone(), u.to.clone()))
                    .or_insert_with(|| u.place());
            }
        }
    }
    let mut problems = Vec::new();
    for (leaf, want) in leaf_uses() {
        let got = found.get(leaf).cloned().unwrap_or_default();
        for to in got.iter().filter(|t| !want.contains(t.as_str())) {
            problems.push(format!(
                "{leaf} -> {to} is new: {}\n    a shared leaf is used by every room, so it \
                 should not reach up into one; if it must, add it to leaf_uses() in \
                 tests/architecture.rs and say why",
                lines[&(leaf.to_string(), to.clone())]
            ));
        }
        for to in want.iter().filter(|t| !got.contains(**t)) {
            problems.push(format!(
                "{leaf} -> {to} is listed in leaf_uses() but no longer used: remove it from \
                 the list in tests/architecture.rs (good news)"
            ));
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

#[test]
fn every_file_is_in_a_known_room_and_every_path_names_one() {
    let mut problems = Vec::new();
    for s in sources() {
        let known = ROOMS.contains(&s.room.as_str())
            || LEAVES.contains(&s.room.as_str())
            || ROOTS.contains(&s.room.as_str());
        if !known {
            problems.push(format!(
                "{}: room `{}` is not in ROOMS or LEAVES of tests/architecture.rs: add it there \
                 (with its arrows) and to docs/architecture.md",
                s.path, s.room
            ));
        }
        for u in &s.unknown {
            problems.push(format!(
                "{}: `{}` names neither a room nor a known root item: add it to ROOT_ITEMS in \
                 tests/architecture.rs",
                u.place(),
                u.to
            ));
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

#[test]
fn only_hv_calls_libvirt() {
    let mut problems = Vec::new();
    for s in sources() {
        if s.room == "hv" {
            continue;
        }
        for (line, text) in s.code_lines() {
            if contains_path(text, "virt") {
                problems.push(format!(
                    "{}:{line}: `{}`\n    only hv may call libvirt (the `virt` crate): add or \
                     use a function in src/hv/ instead",
                    s.path,
                    s.original_line(line)
                ));
            }
        }
    }
    assert_none("call(s) of libvirt outside hv", &problems);
}

#[test]
fn only_hv_spawns_qemu_img() {
    let mut problems = Vec::new();
    for s in sources() {
        if s.room == "hv" || s.path == "src/cli/bench_harness.rs" {
            continue;
        }
        for lit in &s.strings {
            if lit.text == "qemu-img" {
                problems.push(format!(
                    "{}:{}: `{}`\n    only hv may run qemu-img (besides the bench harness): \
                     call hv's qemu-img wrapper instead",
                    s.path,
                    lit.line,
                    s.original_line(lit.line)
                ));
            }
        }
    }
    assert_none("qemu-img call(s) outside hv", &problems);
}

#[test]
fn library_has_no_string_errors() {
    let mut problems = Vec::new();
    for s in sources() {
        if s.room == "cli" || s.room == "main" {
            continue;
        }
        for line in string_error_lines(&s.code) {
            problems.push(format!(
                "{}:{line}: `{}`\n    library code returns typed errors: use the room's \
                 thiserror enum (with its kind()), not Result<_, String>",
                s.path,
                s.original_line(line)
            ));
        }
    }
    assert_none("Result<_, String> in library code", &problems);
}

/// Panics with every problem, counted, unless there is none.
fn assert_none(what: &str, problems: &[String]) {
    assert!(
        problems.is_empty(),
        "{} {what}:\n{}",
        problems.len(),
        problems.join("\n")
    );
}

/// Asserts that `room` uses only the rooms it may, naming every use that breaks the rule.
fn assert_arrows(room: &str) {
    let Some(ok) = allowed(room) else {
        return;
    };
    let srcs = sources();
    assert!(
        srcs.iter().any(|s| s.room == room),
        "no file of room `{room}` under src/"
    );
    let mut problems = Vec::new();
    for s in srcs.iter().filter(|s| s.room == room) {
        for u in &s.uses {
            // `lib` is the crate root's own items (`VERSION`): anyone may read them.
            if u.to != room && u.to != "lib" && !ok.contains(&u.to.as_str()) {
                problems.push(format!(
                    "{}\n    arrow {room} -> {} is not allowed: {room} may use only {}",
                    u.place(),
                    u.to,
                    ok.join(", ")
                ));
            }
        }
    }
    assert!(
        problems.is_empty(),
        "{} use(s) break the rooms (DESIGN.md \"Rooms\", docs/architecture.md):\n{}",
        problems.len(),
        problems.join("\n")
    );
}

// ------------------------------------------------------------------------------------------
// Reading the sources.

/// One `.rs` file under `src/`.
struct Source {
    /// Path relative to the crate, e.g. `src/engine/verify.rs`.
    path: String,
    /// Its room.
    room: String,
    /// The text as written.
    text: String,
    /// The text with comments and the insides of string and char literals blanked out
    /// (same length and line breaks as `text`).
    code: String,
    /// String literals, with their line.
    strings: Vec<Literal>,
    /// The rooms it names.
    uses: Vec<Use>,
    /// `crate::X` where X is not a room or a known root item.
    unknown: Vec<Use>,
}

/// A string literal and the line it starts on.
struct Literal {
    line: usize,
    text: String,
}

/// One path naming another room.
struct Use {
    path: String,
    line: usize,
    to: String,
    text: String,
}

impl Use {
    /// `file:line: `the line``.
    fn place(&self) -> String {
        format!("{}:{}: `{}`", self.path, self.line, self.text)
    }
}

impl Source {
    /// `(line number, code text)` of every line.
    fn code_lines(&self) -> impl Iterator<Item = (usize, &str)> {
        self.code.lines().enumerate().map(|(i, l)| (i + 1, l))
    }

    /// The line as written, trimmed.
    fn original_line(&self, line: usize) -> &str {
        self.text.lines().nth(line - 1).unwrap_or("").trim()
    }
}

fn sources() -> Vec<Source> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut files = Vec::new();
    rs_files(&root.join("src"), &mut files);
    files.sort();
    assert!(files.len() > 20, "too few files under src/: {files:?}");
    files
        .iter()
        .map(|f| {
            let rel = f.strip_prefix(root).unwrap().to_string_lossy().into_owned();
            let text = fs::read_to_string(f).unwrap();
            Source::parse(&rel, text)
        })
        .collect()
}

fn rs_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            rs_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The room of `src/…`: the first folder under `src/`, or the file's stem for `src/x.rs`.
fn room_of(rel: &str) -> String {
    let inner = rel.strip_prefix("src/").unwrap_or(rel);
    match inner.split_once('/') {
        Some((dir, _)) => dir.to_string(),
        None => inner.trim_end_matches(".rs").to_string(),
    }
}

impl Source {
    fn parse(rel: &str, text: String) -> Source {
        let room = room_of(rel);
        let (code, strings) = blank(&text);
        let program = room == "cli" || room == "main";
        let at = |line: usize, to: &str| Use {
            path: rel.to_string(),
            line,
            to: to.to_string(),
            text: text.lines().nth(line - 1).unwrap_or("").trim().to_string(),
        };
        let mut uses = Vec::new();
        let mut unknown = Vec::new();
        for (line, first) in crate_paths(&code, program) {
            match first.as_str() {
                // In the program, `crate::` is the program itself.
                "crate" => {}
                r if ROOMS.contains(&r) || LEAVES.contains(&r) => uses.push(at(line, r)),
                item => match ROOT_ITEMS.iter().find(|(n, _)| *n == item) {
                    Some((_, r)) => uses.push(at(line, r)),
                    None => unknown.push(at(line, item)),
                },
            }
        }
        Source {
            path: rel.to_string(),
            room,
            text,
            code,
            strings,
            uses,
            unknown,
        }
    }
}

/// Blanks comments and the insides of string and char literals (keeping line breaks, so
/// offsets and line numbers stay), and returns the string literals found.
fn blank(text: &str) -> (String, Vec<Literal>) {
    let b: Vec<char> = text.chars().collect();
    let mut out: Vec<char> = b.clone();
    let mut strings = Vec::new();
    let mut line = 1;
    let mut i = 0;
    let blank_range = |out: &mut Vec<char>, from: usize, to: usize| {
        for c in out.iter_mut().take(to).skip(from) {
            if *c != '\n' {
                *c = ' ';
            }
        }
    };
    let ident = |c: char| c.is_alphanumeric() || c == '_';
    while i < b.len() {
        let c = b[i];
        let next = b.get(i + 1).copied();
        if c == '\n' {
            line += 1;
            i += 1;
        } else if c == '/' && next == Some('/') {
            let end = b[i..]
                .iter()
                .position(|&c| c == '\n')
                .map_or(b.len(), |p| i + p);
            blank_range(&mut out, i, end);
            i = end;
        } else if c == '/' && next == Some('*') {
            let start = i;
            let mut depth = 0;
            while i < b.len() {
                if b[i] == '/' && b.get(i + 1) == Some(&'*') {
                    depth += 1;
                    i += 2;
                } else if b[i] == '*' && b.get(i + 1) == Some(&'/') {
                    depth -= 1;
                    i += 2;
                    if depth == 0 {
                        break;
                    }
                } else {
                    if b[i] == '\n' {
                        line += 1;
                    }
                    i += 1;
                }
            }
            blank_range(&mut out, start, i);
        } else if (c == 'r' || (c == 'b' && next == Some('r'))) && (i == 0 || !ident(b[i - 1])) && {
            let j = if c == 'b' { i + 2 } else { i + 1 };
            let hashes = b[j..].iter().take_while(|&&c| c == '#').count();
            b.get(j + hashes) == Some(&'"')
        } {
            // Raw string r"…", r#"…"#, br"…".
            let j = if c == 'b' { i + 2 } else { i + 1 };
            let hashes = b[j..].iter().take_while(|&&c| c == '#').count();
            let body = j + hashes + 1;
            let closing: Vec<char> = std::iter::once('"')
                .chain(std::iter::repeat_n('#', hashes))
                .collect();
            let mut k = body;
            while k < b.len() && !b[k..].starts_with(&closing) {
                k += 1;
            }
            let lit: String = b[body..k.min(b.len())].iter().collect();
            strings.push(Literal {
                line,
                text: lit.clone(),
            });
            line += lit.matches('\n').count();
            blank_range(&mut out, body, k);
            i = k + closing.len();
        } else if c == '"' {
            let body = i + 1;
            let mut k = body;
            while k < b.len() && b[k] != '"' {
                if b[k] == '\\' {
                    k += 1;
                }
                k += 1;
            }
            let lit: String = b[body..k.min(b.len())].iter().collect();
            strings.push(Literal {
                line,
                text: lit.clone(),
            });
            line += lit.matches('\n').count();
            blank_range(&mut out, body, k);
            i = k + 1;
        } else if c == '\'' {
            // A char literal ('x', '\n', '\''), or a lifetime / label ('a).
            if next == Some('\\') {
                let mut k = i + 2;
                while k < b.len() && b[k] != '\'' {
                    k += 1;
                }
                blank_range(&mut out, i + 1, k);
                i = k + 1;
            } else if b.get(i + 2) == Some(&'\'') {
                blank_range(&mut out, i + 1, i + 2);
                i += 3;
            } else {
                i += 1;
            }
        } else {
            i += 1;
        }
    }
    (out.into_iter().collect(), strings)
}

/// True when `code` holds the path `name::…` as a path of its own (not `libname::`).
fn contains_path(code: &str, name: &str) -> bool {
    let needle = format!("{name}::");
    code.match_indices(&needle).any(|(at, _)| {
        !code[..at]
            .chars()
            .next_back()
            .is_some_and(|c| c.is_alphanumeric() || c == '_')
    })
}

/// The first segment after every `crate::` (and, in the program, `vm_backup::`), with its
/// line; a group `crate::{a::b, c}` gives `a` and `c`.
fn crate_paths(code: &str, program: bool) -> Vec<(usize, String)> {
    let mut prefixes = vec!["crate::"];
    if program {
        prefixes.push("vm_backup::");
    }
    let mut found = Vec::new();
    for prefix in prefixes {
        for (at, _) in code.match_indices(prefix) {
            let before = code[..at].chars().next_back();
            if before.is_some_and(|c| c.is_alphanumeric() || c == '_' || c == '$' || c == ':') {
                continue;
            }
            let line = code[..at].matches('\n').count() + 1;
            let rest = code[at + prefix.len()..].trim_start();
            let first = if rest.starts_with('{') {
                group_heads(rest)
            } else {
                vec![leading_ident(rest)]
            };
            for name in first.into_iter().filter(|n| !n.is_empty() && n != "self") {
                // In the program, `crate::` is the program; `vm_backup::` is the library.
                let name = if program && prefix == "crate::" {
                    "crate".to_string()
                } else {
                    name
                };
                found.push((line, name));
            }
        }
    }
    found
}

fn leading_ident(s: &str) -> String {
    s.chars()
        .take_while(|c| c.is_alphanumeric() || *c == '_')
        .collect()
}

/// The first identifier of every top-level item of `{a::b, c::{d, e}, f}`.
fn group_heads(s: &str) -> Vec<String> {
    let mut heads = Vec::new();
    let mut depth = 0;
    let mut expect = true;
    for (i, c) in s.char_indices() {
        match c {
            '{' => {
                depth += 1;
                if depth == 1 {
                    expect = true;
                    continue;
                }
            }
            '}' => {
                depth -= 1;
                if depth == 0 {
                    break;
                }
            }
            ',' if depth == 1 => {
                expect = true;
                continue;
            }
            _ => {}
        }
        if depth == 1 && expect && !c.is_whitespace() {
            heads.push(leading_ident(&s[i..]));
            expect = false;
        }
    }
    heads
}

/// Lines (1-based) of `code` holding a `Result<…, String>` (its last type argument `String`).
fn string_error_lines(code: &str) -> Vec<usize> {
    let mut lines = Vec::new();
    for (at, _) in code.match_indices("Result<") {
        let before = code[..at].chars().next_back();
        if before.is_some_and(|c| c.is_alphanumeric() || c == '_') {
            continue;
        }
        let args = &code[at + "Result<".len()..];
        let mut depth = 1;
        let mut last_arg_start = 0;
        let mut end = None;
        let chars: Vec<(usize, char)> = args.char_indices().collect();
        let mut k = 0;
        while k < chars.len() {
            let (i, c) = chars[k];
            match c {
                // `->` in a fn type is not a closing bracket.
                '-' if chars.get(k + 1).is_some_and(|(_, n)| *n == '>') => k += 1,
                '<' | '(' | '[' => depth += 1,
                '>' | ')' | ']' => {
                    depth -= 1;
                    if depth == 0 {
                        end = Some(i);
                        break;
                    }
                }
                ',' if depth == 1 => last_arg_start = i + 1,
                _ => {}
            }
            k += 1;
        }
        let Some(end) = end else { continue };
        if last_arg_start > 0 {
            let last: String = args[last_arg_start..end]
                .chars()
                .filter(|c| !c.is_whitespace())
                .collect();
            if last == "String" || last == "std::string::String" {
                lines.push(code[..at].matches('\n').count() + 1);
            }
        }
    }
    lines
}

// ------------------------------------------------------------------------------------------
// The reader itself.

#[test]
fn reader_skips_comments_and_strings_and_reads_groups() {
    let src = r##"
//! See [`crate::ops`] (a doc link, not a dependency).
use crate::{format::layout, store::{self, Repository}, ErrorKind};
use crate::hv::Dom; /* crate::engine in a block comment */
let s = "crate::cli in a string"; let r = r#"crate::bacula "quoted""#;
let c = '"'; let l: &'static str = "x"; fn f<'a>(x: &'a str) {}
let q = "qemu-img";
let v = libvirt::x; let w = virt::Connect::open;
fn g() -> Result<BTreeMap<PathBuf, String>, MyError> {}
fn h() -> Result<Vec<String>,
    String> {}
fn k() -> Result<fn(u8) -> u8, String> {}
"##;
    let s = Source::parse("src/engine/x.rs", src.to_string());
    assert_eq!(s.room, "engine");
    let uses: Vec<(usize, &str)> = s.uses.iter().map(|u| (u.line, u.to.as_str())).collect();
    assert_eq!(
        uses,
        vec![(3, "format"), (3, "store"), (3, "error"), (4, "hv")]
    );
    assert!(s.unknown.is_empty());
    let lits: Vec<&str> = s.strings.iter().map(|l| l.text.as_str()).collect();
    assert!(lits.contains(&"qemu-img"), "{lits:?}");
    assert!(lits.contains(&r#"crate::bacula "quoted""#), "{lits:?}");
    let virt_lines: Vec<usize> = s
        .code_lines()
        .filter(|(_, l)| contains_path(l, "virt"))
        .map(|(n, _)| n)
        .collect();
    assert_eq!(virt_lines, vec![8]);
    assert_eq!(string_error_lines(&s.code), vec![10, 12]);
    assert_eq!(
        s.original_line(4),
        "use crate::hv::Dom; /* crate::engine in a block comment */"
    );

    let p = Source::parse(
        "src/cli/x.rs",
        "use crate::vm_backup_cli::common;\nuse vm_backup::{ops, engine::verify};\n".to_string(),
    );
    let uses: Vec<&str> = p.uses.iter().map(|u| u.to.as_str()).collect();
    assert_eq!(uses, vec!["ops", "engine"]);

    assert_eq!(room_of("src/error.rs"), "error");
    assert_eq!(room_of("src/engine/backup/mod.rs"), "engine");
}
