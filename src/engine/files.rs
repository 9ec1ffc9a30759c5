//! `vm-backup files … ls|find|cat|extract`: browse and copy out files of a backup without a
//! mount left behind. The chain of [`super::mount`] is built in a private folder for the
//! time of one call ([`Browse`]) and taken down when it ends, even on error; a killed command
//! leaves a state that `orphans --cleanup` takes down.
//!
//! Paths: when the disk holds one filesystem, a path is inside it (`/etc/hosts`); otherwise it
//! starts with the volume name (`part1/etc/hosts`, `vg0-root/etc/hosts`), and `/` lists the
//! volumes.

use std::fs;
use std::io::{self, Write};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};

use serde::Serialize;

use super::mount::{self, MountError, MountKind, MountRequest, MountState};

/// One entry, as `ls` and `find` show it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Entry {
    /// The path, as given to the command (volume first when there are several).
    pub path: String,
    /// `file`, `dir`, `symlink`, `block`, `char`, `fifo`, `socket`.
    #[serde(rename = "type")]
    pub kind: String,
    /// Permission bits and set-id/sticky bits (`st_mode & 0o7777`).
    pub mode: u32,
    /// Owner id (as in the guest).
    pub uid: u32,
    /// Group id (as in the guest).
    pub gid: u32,
    /// Size in bytes.
    pub size: u64,
    /// Modification time, seconds since the epoch.
    pub mtime: i64,
    /// Access time, seconds since the epoch.
    pub atime: i64,
    /// Change time, seconds since the epoch.
    pub ctime: i64,
    /// A symlink's target.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub target: Option<String>,
}

impl Entry {
    /// `drwxr-xr-x`-style mode string.
    pub fn mode_string(&self) -> String {
        let t = match self.kind.as_str() {
            "dir" => 'd',
            "symlink" => 'l',
            "block" => 'b',
            "char" => 'c',
            "fifo" => 'p',
            "socket" => 's',
            _ => '-',
        };
        let mut s = String::from(t);
        for (i, c) in "rwxrwxrwx".chars().enumerate() {
            s.push(if self.mode & (0o400 >> i) != 0 {
                c
            } else {
                '-'
            });
        }
        s
    }
}

fn kind_of(ft: fs::FileType) -> &'static str {
    use std::os::unix::fs::FileTypeExt;
    if ft.is_dir() {
        "dir"
    } else if ft.is_symlink() {
        "symlink"
    } else if ft.is_block_device() {
        "block"
    } else if ft.is_char_device() {
        "char"
    } else if ft.is_fifo() {
        "fifo"
    } else if ft.is_socket() {
        "socket"
    } else {
        "file"
    }
}

/// A backup's filesystems mounted in a private folder for the time of this value.
pub struct Browse {
    state: MountState,
}

impl Browse {
    /// Builds the chain (recorded under the journal folder, so a killed command's leftovers
    /// are found by `orphans`).
    pub fn open(req: &MountRequest) -> Result<Self, MountError> {
        let id = format!("files-{}", std::process::id());
        let root = mount::mounts_folder(&req.journal_dir).join(&id).join("fs");
        fs::create_dir_all(&root)
            .map_err(|e| MountError::io(format!("cannot create {}", root.display()), e))?;
        match mount::build(req, MountKind::Files, &id, &root) {
            Ok(state) => Ok(Self { state }),
            Err(e) => {
                // A failure before anything was recorded (no such backup) leaves empty folders.
                if let Some(work) = root.parent() {
                    let _ = fs::remove_dir(&root);
                    let _ = fs::remove_dir(work);
                }
                Err(e)
            }
        }
    }

    /// The chain's state (volumes, backup folder).
    pub fn state(&self) -> &MountState {
        &self.state
    }

    fn single(&self) -> bool {
        self.state.volumes.len() == 1 && self.state.volumes[0].name.is_empty()
    }

    /// The host path of `path` (see the module doc), refusing `..`.
    pub fn resolve(&self, path: &str) -> Result<PathBuf, MountError> {
        let rel = Path::new(path.trim_start_matches('/'));
        if rel.components().any(|c| matches!(c, Component::ParentDir)) {
            return Err(MountError::Invalid(format!("{path}: '..' is not allowed")));
        }
        if self.single() || rel.as_os_str().is_empty() {
            return Ok(self.state.dir.join(rel));
        }
        let mut comps = rel.components();
        let first = comps
            .next()
            .map(|c| c.as_os_str().to_string_lossy().into_owned())
            .unwrap_or_default();
        let vol = self
            .state
            .volumes
            .iter()
            .find(|v| v.name == first)
            .ok_or_else(|| {
                MountError::NotFound(format!(
                    "no volume {first:?} on this disk (volumes: {})",
                    self.state
                        .volumes
                        .iter()
                        .map(|v| v.name.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                ))
            })?;
        Ok(vol.path.join(comps.as_path()))
    }

    /// Wraps an I/O error of a read: a damaged chunk behind it becomes [`MountError::Damaged`].
    pub fn read_error(&self, path: &str, e: io::Error) -> MountError {
        let damage = self.state.damage();
        if !damage.is_empty() {
            return MountError::Damaged {
                path: path.to_string(),
                damage,
            };
        }
        if e.kind() == io::ErrorKind::NotFound {
            return MountError::NotFound(format!("{path}: no such file or folder in the backup"));
        }
        MountError::io(format!("cannot read {path} in the backup"), e)
    }

    fn entry(&self, shown: &str, host: &Path) -> Result<Entry, MountError> {
        let md = fs::symlink_metadata(host).map_err(|e| self.read_error(shown, e))?;
        let target = if md.file_type().is_symlink() {
            fs::read_link(host)
                .ok()
                .map(|t| t.to_string_lossy().into_owned())
        } else {
            None
        };
        Ok(Entry {
            path: shown.to_string(),
            kind: kind_of(md.file_type()).to_string(),
            mode: md.mode() & 0o7777,
            uid: md.uid(),
            gid: md.gid(),
            size: md.size(),
            mtime: md.mtime(),
            atime: md.atime(),
            ctime: md.ctime(),
            target,
        })
    }

    /// The entries of a folder (or the entry of a file).
    pub fn ls(&self, path: &str) -> Result<Vec<Entry>, MountError> {
        let host = self.resolve(path)?;
        let top = self.entry(path, &host)?;
        if top.kind != "dir" {
            return Ok(vec![top]);
        }
        let mut names: Vec<String> = fs::read_dir(&host)
            .map_err(|e| self.read_error(path, e))?
            .map(|e| e.map(|e| e.file_name().to_string_lossy().into_owned()))
            .collect::<Result<_, _>>()
            .map_err(|e| self.read_error(path, e))?;
        names.sort();
        names
            .iter()
            .map(|n| self.entry(&join_shown(path, n), &host.join(n)))
            .collect()
    }

    /// Every entry under `path` (itself included), depth first, sorted by name; calls `each`
    /// as soon as an entry is known (so the first one shows at once).
    pub fn find(&self, path: &str, each: &mut dyn FnMut(&Entry)) -> Result<u64, MountError> {
        let host = self.resolve(path)?;
        let top = self.entry(path, &host)?;
        each(&top);
        let mut n = 1;
        if top.kind == "dir" {
            n += self.walk(path, &host, each)?;
        }
        Ok(n)
    }

    fn walk(
        &self,
        shown: &str,
        host: &Path,
        each: &mut dyn FnMut(&Entry),
    ) -> Result<u64, MountError> {
        let mut names: Vec<String> = fs::read_dir(host)
            .map_err(|e| self.read_error(shown, e))?
            .map(|e| e.map(|e| e.file_name().to_string_lossy().into_owned()))
            .collect::<Result<_, _>>()
            .map_err(|e| self.read_error(shown, e))?;
        names.sort();
        let mut n = 0;
        for name in names {
            let s = join_shown(shown, &name);
            let h = host.join(&name);
            let e = self.entry(&s, &h)?;
            each(&e);
            n += 1;
            if e.kind == "dir" {
                n += self.walk(&s, &h, each)?;
            }
        }
        Ok(n)
    }

    /// Writes a file's content to `out`.
    pub fn cat(&self, path: &str, out: &mut dyn Write) -> Result<u64, MountError> {
        let host = self.resolve(path)?;
        let mut f = fs::File::open(&host).map_err(|e| self.read_error(path, e))?;
        copy_checked(&mut f, out).map_err(|e| match e {
            CopyErr::Read(e) => self.read_error(path, e),
            CopyErr::Write(e) => MountError::io("cannot write the output", e),
        })
    }

    /// Copies `path` (a file, a folder and everything under it, a symlink) to `dest` with
    /// owner, mode and times. `dest` must not exist; when it is an existing folder the copy
    /// goes inside it under the same name.
    pub fn extract(&self, path: &str, dest: &Path) -> Result<ExtractReport, MountError> {
        let host = self.resolve(path)?;
        let mut dest = dest.to_path_buf();
        if dest.is_dir() {
            let name = Path::new(path.trim_end_matches('/'))
                .file_name()
                .map(|n| n.to_os_string())
                .unwrap_or_else(|| "root".into());
            dest = dest.join(name);
        }
        if fs::symlink_metadata(&dest).is_ok() {
            return Err(MountError::Busy(format!(
                "{} exists: not overwritten",
                dest.display()
            )));
        }
        let mut report = ExtractReport {
            dest: dest.clone(),
            ..Default::default()
        };
        self.extract_one(path, &host, &dest, &mut report)?;
        Ok(report)
    }

    fn extract_one(
        &self,
        shown: &str,
        host: &Path,
        dest: &Path,
        report: &mut ExtractReport,
    ) -> Result<(), MountError> {
        let md = fs::symlink_metadata(host).map_err(|e| self.read_error(shown, e))?;
        let ft = md.file_type();
        let werr = |e| MountError::io(format!("cannot write {}", dest.display()), e);
        if ft.is_dir() {
            fs::create_dir(dest).map_err(werr)?;
            let mut names: Vec<_> = fs::read_dir(host)
                .map_err(|e| self.read_error(shown, e))?
                .map(|e| e.map(|e| e.file_name()))
                .collect::<Result<_, _>>()
                .map_err(|e| self.read_error(shown, e))?;
            names.sort();
            for n in names {
                let s = join_shown(shown, &n.to_string_lossy());
                self.extract_one(&s, &host.join(&n), &dest.join(&n), report)?;
            }
            report.dirs += 1;
        } else if ft.is_symlink() {
            let t = fs::read_link(host).map_err(|e| self.read_error(shown, e))?;
            std::os::unix::fs::symlink(&t, dest).map_err(werr)?;
            report.symlinks += 1;
        } else if ft.is_file() {
            let mut src = fs::File::open(host).map_err(|e| self.read_error(shown, e))?;
            let mut out = fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(dest)
                .map_err(werr)?;
            let n = match copy_checked(&mut src, &mut out) {
                Ok(n) => n,
                Err(e) => {
                    // Never leave a partial copy that could pass for the file.
                    drop(out);
                    let _ = fs::remove_file(dest);
                    return Err(match e {
                        CopyErr::Read(e) => self.read_error(shown, e),
                        CopyErr::Write(e) => werr(e),
                    });
                }
            };
            out.sync_all().map_err(werr)?;
            report.files += 1;
            report.bytes += n;
        } else {
            report
                .skipped
                .push(format!("{shown}: a {} is not extracted", kind_of(ft)));
            return Ok(());
        }
        if !ft.is_symlink() {
            let (copied, refused) = copy_xattrs(host, dest).map_err(werr)?;
            report.xattrs += copied;
            report.skipped.extend(
                refused
                    .into_iter()
                    .map(|(name, e)| format!("{shown}: extended attribute {name} not kept: {e}")),
            );
        }
        apply_meta(dest, &md, ft.is_symlink()).map_err(werr)
    }
}

/// Copies the extended attributes of `src` onto `dest` (neither a symlink), POSIX ACLs
/// included (`system.posix_acl_access`/`_default`); `security.selinux` is left to the host's
/// policy, and xfs's `trusted.SGI_ACL_*` (the same ACLs) is not duplicated. Returns how many were copied and those the destination refused (a filesystem
/// without xattrs or ACLs: `EOPNOTSUPP`), which are reported, not fatal. Done before the
/// owner, mode and times are set (an ACL write adjusts the mode; the times come last).
fn copy_xattrs(src: &Path, dest: &Path) -> io::Result<(u64, Vec<(String, String)>)> {
    let mut copied = 0;
    let mut refused = Vec::new();
    let names = match xattr::list(src) {
        Ok(n) => n,
        Err(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP) => return Ok((0, refused)),
        Err(e) => return Err(e),
    };
    for name in names {
        let shown = name.to_string_lossy().into_owned();
        // xfs also shows its ACLs to root as `trusted.SGI_ACL_*`, its on-disk form of the
        // `system.posix_acl_*` copied here: copying both would leave a stray attribute.
        if shown == "security.selinux" || shown.starts_with("trusted.SGI_ACL_") {
            continue;
        }
        let Some(value) = xattr::get(src, &name)? else {
            continue;
        };
        match xattr::set(dest, &name, &value) {
            Ok(()) => copied += 1,
            Err(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP) => {
                refused.push((shown, e.to_string()))
            }
            Err(e) => return Err(e),
        }
    }
    Ok((copied, refused))
}

impl Drop for Browse {
    fn drop(&mut self) {
        if let Err(e) = mount::teardown(&self.state, true) {
            tracing::error!(
                "cannot take down the mount chain in {}: {e} (run `vm-backup orphans --cleanup`)",
                self.state.workdir.display()
            );
        }
    }
}

/// What an extract copied.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ExtractReport {
    /// Where it went.
    pub dest: PathBuf,
    /// Regular files copied.
    pub files: u64,
    /// Folders created.
    pub dirs: u64,
    /// Symlinks created.
    pub symlinks: u64,
    /// Bytes of file content.
    pub bytes: u64,
    /// Extended attributes copied (POSIX ACLs included: `system.posix_acl_*`).
    pub xattrs: u64,
    /// Devices, fifos and sockets not extracted; attributes the destination refused.
    pub skipped: Vec<String>,
}

fn join_shown(base: &str, name: &str) -> String {
    if base.is_empty() || base.ends_with('/') {
        format!("{base}{name}")
    } else {
        format!("{base}/{name}")
    }
}

enum CopyErr {
    Read(io::Error),
    Write(io::Error),
}

fn copy_checked(src: &mut dyn io::Read, out: &mut dyn Write) -> Result<u64, CopyErr> {
    let mut buf = vec![0u8; 1 << 20];
    let mut total = 0;
    loop {
        let n = match src.read(&mut buf) {
            Ok(0) => return Ok(total),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(CopyErr::Read(e)),
        };
        out.write_all(&buf[..n]).map_err(CopyErr::Write)?;
        total += n as u64;
    }
}

/// Owner, mode and times of `md` onto `dest` (owner and times only for a symlink).
fn apply_meta(dest: &Path, md: &fs::Metadata, symlink: bool) -> io::Result<()> {
    use nix::fcntl::AtFlags;
    use nix::sys::stat::{utimensat, UtimensatFlags};
    use nix::sys::time::TimeSpec;
    use nix::unistd::{fchownat, Gid, Uid};
    fchownat(
        None,
        dest,
        Some(Uid::from_raw(md.uid())),
        Some(Gid::from_raw(md.gid())),
        AtFlags::AT_SYMLINK_NOFOLLOW,
    )
    .map_err(io::Error::from)?;
    if !symlink {
        fs::set_permissions(dest, fs::Permissions::from_mode(md.mode() & 0o7777))?;
    }
    let at = TimeSpec::new(md.atime(), md.atime_nsec());
    let mt = TimeSpec::new(md.mtime(), md.mtime_nsec());
    utimensat(None, dest, &at, &mt, UtimensatFlags::NoFollowSymlink).map_err(io::Error::from)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shown_paths_join_without_double_slashes() {
        assert_eq!(join_shown("/", "etc"), "/etc");
        assert_eq!(join_shown("part1", "etc"), "part1/etc");
        assert_eq!(join_shown("", "part1"), "part1");
    }

    #[test]
    fn metadata_is_copied_onto_a_file_and_a_symlink() {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("a");
        fs::write(&src, b"x").unwrap();
        fs::set_permissions(&src, fs::Permissions::from_mode(0o640)).unwrap();
        let dst = dir.path().join("b");
        fs::write(&dst, b"x").unwrap();
        let md = fs::symlink_metadata(&src).unwrap();
        apply_meta(&dst, &md, false).unwrap();
        let got = fs::symlink_metadata(&dst).unwrap();
        assert_eq!(got.mode() & 0o7777, 0o640);
        assert_eq!(got.mtime(), md.mtime());
        let link = dir.path().join("l");
        std::os::unix::fs::symlink("a", &link).unwrap();
        apply_meta(&link, &md, true).unwrap();
    }

    #[test]
    fn extended_attributes_and_acls_are_copied() {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("a");
        fs::write(&src, b"x").unwrap();
        if xattr::set(&src, "user.vmb", b"kept").is_err() {
            eprintln!("SKIP: no user xattrs on {}", dir.path().display());
            return;
        }
        let acl = std::process::Command::new("setfacl")
            .args(["-m", "u:1234:r"])
            .arg(&src)
            .status()
            .is_ok_and(|s| s.success());
        let dst = dir.path().join("b");
        fs::write(&dst, b"x").unwrap();
        let (copied, refused) = copy_xattrs(&src, &dst).unwrap();
        assert!(refused.is_empty(), "{refused:?}");
        assert_eq!(
            xattr::get(&dst, "user.vmb").unwrap().as_deref(),
            Some(&b"kept"[..])
        );
        if acl {
            assert_eq!(copied, 2);
            assert_eq!(
                xattr::get(&dst, "system.posix_acl_access").unwrap(),
                xattr::get(&src, "system.posix_acl_access").unwrap()
            );
        }
    }

    #[test]
    fn mode_strings_read_like_ls() {
        let e = Entry {
            path: "x".into(),
            kind: "dir".into(),
            mode: 0o755,
            uid: 0,
            gid: 0,
            size: 0,
            mtime: 0,
            atime: 0,
            ctime: 0,
            target: None,
        };
        assert_eq!(e.mode_string(), "drwxr-xr-x");
    }
}
