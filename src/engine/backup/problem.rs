//! What a post-check found wrong, typed: the file it concerns, the kind of fault and the
//! detail. The post-checks of a copy before it is published (`direct.rs`), of a streamed
//! backup staged by the Bacula plugin (`PluginError::StagedRefused`) and `vm-backup check
//! --post` all report a [`Problems`] list; each [`Problem`] prints as the one line users have
//! always seen ("vm-vda.qcow2 is missing", "a.xml: not listed in checksums.sha256", …), so the
//! program, the status page and the Bacula job log show the same texts, while code (and the
//! `--json` output) can tell a missing file from a corrupt one.

use std::fmt;

use serde::Serialize;

/// The kind of fault a post-check found.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum ProblemKind {
    /// The file the metadata names is not in the folder.
    Missing,
    /// The file could not be read or examined (an I/O error other than "not found").
    Unreadable,
    /// The file could not be flushed to the share before it was re-read.
    Unflushed,
    /// A line of `checksums.sha256` is malformed.
    MalformedLine,
    /// The metadata names the file but `checksums.sha256` does not list it.
    NotListed,
    /// The file's SHA-256 differs from `checksums.sha256` or from the metadata.
    ChecksumMismatch,
    /// The file's size differs from the one recorded.
    SizeMismatch,
    /// Chunks of a disk image differ from its chunk manifest.
    ChunkMismatch,
    /// Re-hashing a disk image against its manifest could not run to its end.
    VerifyFailed,
    /// A backing chain inside the folder does not open as a whole.
    BackingChain,
    /// `qemu-img check` refused the image.
    ImageCheck,
    /// The backup is not of this domain (its name or UUID differ).
    Identity,
    /// The domain is not back on its images, or still has a block job.
    Domain,
    /// A check could not run at all (libvirt unreachable, a checking thread panicked).
    CheckFailed,
}

/// One fault a post-check found.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Problem {
    /// The file of the backup folder it concerns (a name inside the folder, or a path), if any.
    pub file: Option<String>,
    /// The kind of fault.
    pub kind: ProblemKind,
    /// What was found (the error, the digests or sizes compared); may be empty.
    pub detail: String,
}

impl Problem {
    /// A fault of `file`.
    pub fn file(file: impl Into<String>, kind: ProblemKind, detail: impl Into<String>) -> Self {
        Self {
            file: Some(file.into()),
            kind,
            detail: detail.into(),
        }
    }

    /// A fault of no single file (the domain, the backup's identity, a check that could not run).
    pub fn general(kind: ProblemKind, detail: impl Into<String>) -> Self {
        Self {
            file: None,
            kind,
            detail: detail.into(),
        }
    }

    /// A file that could not be read: [`ProblemKind::Missing`] when it is not there, else
    /// [`ProblemKind::Unreadable`] with the error.
    pub fn io(file: impl Into<String>, e: &std::io::Error) -> Self {
        if e.kind() == std::io::ErrorKind::NotFound {
            Self::file(file, ProblemKind::Missing, "")
        } else {
            Self::file(file, ProblemKind::Unreadable, e.to_string())
        }
    }
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let file = self.file.as_deref().unwrap_or("");
        let detail = &self.detail;
        match (self.kind, self.file.is_some()) {
            (ProblemKind::Missing, true) => write!(f, "{file} is missing"),
            (ProblemKind::NotListed, true) => write!(f, "{file}: not listed in checksums.sha256"),
            (ProblemKind::MalformedLine, true) => write!(f, "malformed line in {file}: {detail}"),
            (ProblemKind::Unflushed, true) => {
                write!(f, "{file}: cannot flush it to the share: {detail}")
            }
            (ProblemKind::VerifyFailed, true) => write!(f, "{file}: verification failed: {detail}"),
            (ProblemKind::BackingChain, true) => write!(f, "{file}: backing chain: {detail}"),
            (_, true) => write!(f, "{file}: {detail}"),
            (_, false) => f.write_str(detail),
        }
    }
}

/// The faults a post-check found, in the order found; prints them joined by "; ".
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
#[serde(transparent)]
pub struct Problems(pub Vec<Problem>);

impl Problems {
    /// No fault found.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// How many faults.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// The faults, in the order found.
    pub fn iter(&self) -> std::slice::Iter<'_, Problem> {
        self.0.iter()
    }

    /// Adds one fault.
    pub fn push(&mut self, p: Problem) {
        self.0.push(p);
    }

    /// The lines users see, one per fault.
    pub fn lines(&self) -> Vec<String> {
        self.0.iter().map(Problem::to_string).collect()
    }
}

impl fmt::Display for Problems {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, p) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("; ")?;
            }
            write!(f, "{p}")?;
        }
        Ok(())
    }
}

impl Extend<Problem> for Problems {
    fn extend<T: IntoIterator<Item = Problem>>(&mut self, iter: T) {
        self.0.extend(iter);
    }
}

impl IntoIterator for Problems {
    type Item = Problem;
    type IntoIter = std::vec::IntoIter<Problem>;
    fn into_iter(self) -> Self::IntoIter {
        self.0.into_iter()
    }
}

impl<'a> IntoIterator for &'a Problems {
    type Item = &'a Problem;
    type IntoIter = std::slice::Iter<'a, Problem>;
    fn into_iter(self) -> Self::IntoIter {
        self.0.iter()
    }
}

impl From<Vec<Problem>> for Problems {
    fn from(v: Vec<Problem>) -> Self {
        Self(v)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn problems_print_the_lines_users_have_always_seen() {
        let cases = [
            (
                Problem::file("vm-vda.qcow2", ProblemKind::Missing, ""),
                "vm-vda.qcow2 is missing",
            ),
            (
                Problem::file("vm.xml", ProblemKind::NotListed, ""),
                "vm.xml: not listed in checksums.sha256",
            ),
            (
                Problem::file("checksums.sha256", ProblemKind::MalformedLine, "\"x\""),
                "malformed line in checksums.sha256: \"x\"",
            ),
            (
                Problem::file("a", ProblemKind::Unflushed, "EIO"),
                "a: cannot flush it to the share: EIO",
            ),
            (
                Problem::file(
                    "a",
                    ProblemKind::SizeMismatch,
                    "size 1 differs from the recorded 2",
                ),
                "a: size 1 differs from the recorded 2",
            ),
            (
                Problem::general(ProblemKind::Domain, "disk vda has a commit block job"),
                "disk vda has a commit block job",
            ),
        ];
        for (p, text) in cases {
            assert_eq!(p.to_string(), text);
        }
        let all = Problems(vec![
            Problem::file("a", ProblemKind::Missing, ""),
            Problem::file("b", ProblemKind::NotListed, ""),
        ]);
        assert_eq!(
            all.to_string(),
            "a is missing; b: not listed in checksums.sha256"
        );
    }

    #[test]
    fn a_file_not_found_is_missing_and_other_errors_are_unreadable() {
        let gone = std::io::Error::from(std::io::ErrorKind::NotFound);
        assert_eq!(Problem::io("d.qcow2", &gone).kind, ProblemKind::Missing);
        assert_eq!(
            Problem::io("d.qcow2", &gone).to_string(),
            "d.qcow2 is missing"
        );
        let eio = std::io::Error::from_raw_os_error(5);
        let p = Problem::io("d.qcow2", &eio);
        assert_eq!(p.kind, ProblemKind::Unreadable);
        assert!(p.to_string().starts_with("d.qcow2: "), "{p}");
    }

    #[test]
    fn json_names_the_file_the_kind_and_the_detail() {
        let p = Problem::file("a.xml", ProblemKind::ChecksumMismatch, "SHA-256 x");
        let v = serde_json::to_value(&p).unwrap();
        assert_eq!(v["file"], "a.xml");
        assert_eq!(v["kind"], "checksum-mismatch");
        assert_eq!(v["detail"], "SHA-256 x");
    }
}
