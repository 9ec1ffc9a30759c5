//! The pure half of a restore: where every file goes, under which name, which headers are
//! rebased onto which layer, and what changes in the domain XML, decided from the backup and
//! from what the host looks like, without changing anything.
//!
//! The questions asked of the host (does this file exist, what is its SHA-256, which domain
//! uses which disk, is a domain of that name defined or running) go through [`HostView`], so
//! the plan is unit-tested with a fake host, without libvirt or files.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use serde::Serialize;

use super::{RestoreError, RestoreRequest, DEFAULT_NVRAM_DIR};
use crate::format::layout;
use crate::format::metadata::{BackingRecord, BackupMetadata, DiskRecord};
use crate::hv::xml::DomainXml;
use crate::hv::xml_edit::XmlEdits;

/// What a plan may ask of the host: read-only questions.
pub trait HostView {
    /// Whether anything exists at `path`.
    fn exists(&self, path: &Path) -> bool;
    /// Whether `path` is a regular file.
    fn is_file(&self, path: &Path) -> bool;
    /// Whether `path` is a folder.
    fn is_dir(&self, path: &Path) -> bool;
    /// The SHA-256 (lowercase hex) of the file at `path`, if it can be read.
    fn sha256(&self, path: &Path) -> Option<String>;
    /// `path` with symbolic links resolved, or as given when that fails.
    fn canonical(&self, path: &Path) -> PathBuf;
    /// Whether a domain named `name` is defined: `None` if not, else whether it is active.
    fn domain_active(&self, name: &str) -> Result<Option<bool>, RestoreError>;
    /// Every disk and NVRAM file of every domain but `except`, with the domain using it.
    fn disks_of_other_domains(
        &self,
        except: &str,
    ) -> Result<BTreeMap<PathBuf, String>, RestoreError>;
    /// Every image file (canonical) in the backing chains of `disks`, with the domain using it.
    fn chain_files_of(&self, disks: &BTreeMap<PathBuf, String>) -> BTreeMap<PathBuf, String>;
}

/// What the plan is made from.
#[derive(Debug, Clone, Copy)]
pub struct PlanInput<'a> {
    /// The request.
    pub request: &'a RestoreRequest,
    /// The backup folder.
    pub dir: &'a Path,
    /// Its metadata.
    pub meta: &'a BackupMetadata,
    /// Its domain XML, parsed.
    pub domain: &'a DomainXml,
    /// The UUID a copy beside the original gets (`--as`).
    pub new_uuid: &'a str,
}

/// One file (or folder) to copy from the backup.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PlannedFile {
    /// In the backup folder.
    pub from: PathBuf,
    /// Its destination.
    pub to: PathBuf,
}

/// One backing layer to restore.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PlannedLayer {
    /// What the backup recorded of it.
    pub record: BackingRecord,
    /// Its file in the backup folder.
    pub from: PathBuf,
    /// Where it goes.
    pub dest: PathBuf,
    /// In place, the file is already there with the backup's content: left untouched.
    pub reuse: bool,
}

/// One disk to restore, with its backing chain.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PlannedDisk {
    /// What the backup recorded of it.
    pub record: DiskRecord,
    /// Its image in the backup folder.
    pub from: PathBuf,
    /// Where it goes.
    pub dest: PathBuf,
    /// Its backing layers, top to bottom.
    pub layers: Vec<PlannedLayer>,
    /// The header rewrites that make the restored chain self-contained.
    pub rebases: Vec<Rebase>,
}

/// Everything a restore will do, decided before anything is done.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RestorePlan {
    /// The backup folder restored from.
    pub backup_dir: PathBuf,
    /// The domain name to define.
    pub name: String,
    /// The disks.
    pub disks: Vec<PlannedDisk>,
    /// True when the disks go back to their original paths.
    pub in_place: bool,
    /// The NVRAM file, if the backup has one.
    pub nvram: Option<PlannedFile>,
    /// The appliance configurations, if the backup has them.
    pub configs: Option<PlannedFile>,
    /// The changes to the domain XML.
    pub edits: XmlEdits,
    /// A defined, shut-off domain of that name is replaced (`force`).
    pub replaces: bool,
    /// Overwrite files and accept chunks that differ from the manifest (`force`).
    pub force: bool,
    /// Start the domain once defined.
    pub start: bool,
    /// Things the operator should be told (a backing file name was taken…).
    pub notes: Vec<String>,
}

/// One `qemu-img rebase -u` of a restore: point `image`'s header at `backing`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Rebase {
    /// The restored image whose header is rewritten.
    pub image: PathBuf,
    /// Its format.
    pub format: String,
    /// The restored image below it.
    pub backing: PathBuf,
    /// The format of that one.
    pub backing_format: String,
}

impl Rebase {
    /// The arguments of `qemu-img` for this rebase, applied to `file` (the image itself or
    /// its staging copy).
    pub fn args(&self, file: &Path) -> Vec<std::ffi::OsString> {
        crate::hv::qemu_img::rebase_args(file, &self.format, &self.backing, &self.backing_format)
    }
}

/// The rebases that make a restored disk's chain self-contained: for each layer from the top
/// down, its header is pointed at the restored layer below. `top` is where the disk image was
/// restored, `layers[i]` where `disk.backing_chain[i]` was. In an in-place restore a layer
/// whose header already names the right file (the name its copy holds: `backing_rewrite.written`
/// of the image above when the backup rewrote it, else `backing_named_as`, resolved against
/// its own folder) is skipped. Pure: runs nothing.
pub fn rebase_plan(
    disk: &DiskRecord,
    top: &Path,
    layers: &[PathBuf],
    in_place: bool,
) -> Vec<Rebase> {
    let mut out = Vec::new();
    for (i, (record, below)) in disk.backing_chain.iter().zip(layers).enumerate() {
        let (image, format) = if i == 0 {
            (top.to_path_buf(), disk.format.clone())
        } else {
            (
                layers[i - 1].clone(),
                disk.backing_chain[i - 1].format.clone(),
            )
        };
        // What the restored image's header names: the folder's name when the backup
        // rewrote it, else the original name.
        let rewrite = if i == 0 {
            disk.backing_rewrite.as_ref()
        } else {
            disk.backing_chain[i - 1].backing_rewrite.as_ref()
        };
        let header_names = rewrite
            .map(|r| Some(&r.written))
            .unwrap_or(record.backing_named_as.as_ref());
        if in_place {
            if let Some(named) = header_names {
                let base = image.parent().unwrap_or(Path::new("/"));
                if normalize(&base.join(named)) == normalize(below) {
                    continue;
                }
            }
        }
        out.push(Rebase {
            image,
            format,
            backing: below.clone(),
            backing_format: record.format.clone(),
        });
    }
    out
}

/// Lexical normalisation: drops `.`, resolves `..` against the preceding component.
pub(crate) fn normalize(p: &Path) -> PathBuf {
    use std::path::Component;
    let mut out = PathBuf::new();
    for c in p.components() {
        match c {
            Component::CurDir => {}
            Component::ParentDir => {
                out.pop();
            }
            other => out.push(other.as_os_str()),
        }
    }
    out
}

/// The name the restored domain gets (`--as`, else the backup's), refused when it is not a
/// safe single path component.
pub fn domain_name(request: &RestoreRequest, domain: &DomainXml) -> Result<String, RestoreError> {
    let name = request
        .new_name
        .clone()
        .unwrap_or_else(|| domain.name.clone());
    if name.is_empty() || layout::safe_component(&name).ok().as_deref() != Some(name.as_str()) {
        return Err(RestoreError::BadName(name));
    }
    Ok(name)
}

/// Decides everything a restore does and checks it against the host: a running domain of
/// that name is never touched, a defined one is replaced only with `force`, no destination may
/// be a disk of another domain, and existing files are overwritten only with `force`.
pub fn plan(input: &PlanInput<'_>, host: &dyn HostView) -> Result<RestorePlan, RestoreError> {
    let request = input.request;
    let name = domain_name(request, input.domain)?;
    let replaces = match host.domain_active(&name)? {
        None => false,
        Some(true) => return Err(RestoreError::Running(name)),
        Some(false) if !request.force => return Err(RestoreError::Exists(name)),
        Some(false) => true,
    };
    let mut plan = destinations(input, host, &name)?;
    plan.replaces = replaces;

    let others = host.disks_of_other_domains(&name)?;
    let mut seen = BTreeSet::new();
    let dests = plan
        .disks
        .iter()
        .map(|d| d.dest.clone())
        .chain(plan.nvram.iter().map(|f| f.to.clone()));
    for dest in dests {
        if let Some(domain) = others.get(&dest) {
            return Err(RestoreError::InUse {
                path: dest,
                domain: domain.clone(),
            });
        }
        if host.exists(&dest) && !request.force {
            return Err(RestoreError::FileExists(dest));
        }
        if !seen.insert(dest.clone()) {
            return Err(RestoreError::FileExists(dest));
        }
    }
    if let Some(configs) = &plan.configs {
        if host.exists(&configs.to) && !request.force {
            return Err(RestoreError::FileExists(configs.to.clone()));
        }
    }
    check_layers(&mut plan, host, &others, &mut seen, request.force)?;
    for disk in &mut plan.disks {
        let layers: Vec<PathBuf> = disk.layers.iter().map(|l| l.dest.clone()).collect();
        disk.rebases = rebase_plan(&disk.record, &disk.dest, &layers, plan.in_place);
    }
    Ok(plan)
}

/// Decides where every file goes and what changes in the XML (before the destinations are
/// checked against the host).
fn destinations(
    input: &PlanInput<'_>,
    host: &dyn HostView,
    name: &str,
) -> Result<RestorePlan, RestoreError> {
    let PlanInput {
        request,
        dir,
        meta,
        domain: domain_xml,
        new_uuid,
    } = *input;
    let renamed = request.new_name.is_some();
    let mut edits = XmlEdits::default();
    if renamed {
        edits.name = Some(name.to_string());
        edits.uuid = Some(new_uuid.to_string());
        edits.new_macs = true;
    }
    edits.strip_interfaces = request.strip_interfaces;

    let in_place = request.disk_dir.is_none() && !renamed;
    let mut disks = Vec::new();
    for disk in &meta.disks {
        let file = layout::disk_file_name(name, &disk.target, &disk.format)?;
        let original = PathBuf::from(&disk.source);
        let dest = match (&request.disk_dir, renamed) {
            (Some(d), _) => d.join(&file),
            (None, true) => original
                .parent()
                .map(|p| p.join(&file))
                .unwrap_or_else(|| PathBuf::from(&file)),
            (None, false) => original,
        };
        if !dest.is_absolute() {
            return Err(RestoreError::NotFound(format!(
                "no absolute destination for disk {} (use --disk-dir)",
                disk.target
            )));
        }
        edits
            .disk_sources
            .insert(disk.target.clone(), dest.display().to_string());
        // In place: each layer to its original path. Otherwise beside the disk; the final,
        // non-colliding names are chosen when the destinations are checked.
        let layers = disk
            .backing_chain
            .iter()
            .map(|record| {
                let dest = if in_place {
                    PathBuf::from(&record.source)
                } else {
                    dest.with_file_name(backing_file_name(name, &disk.target, record, 1))
                };
                PlannedLayer {
                    record: record.clone(),
                    from: dir.join(&record.file),
                    dest,
                    reuse: false,
                }
            })
            .collect::<Vec<_>>();
        if in_place {
            if let Some(l) = layers.iter().find(|l| !l.dest.is_absolute()) {
                return Err(RestoreError::NotFound(format!(
                    "no absolute original path for {} (use --disk-dir)",
                    l.record.file
                )));
            }
        }
        disks.push(PlannedDisk {
            record: disk.clone(),
            from: dir.join(&disk.file),
            dest,
            layers,
            rebases: Vec::new(),
        });
    }

    // A copy beside the original must not share a writable disk that was not backed up.
    if renamed {
        for d in &domain_xml.disks {
            let restored = meta.disks.iter().any(|m| m.target == d.target);
            let read_only_media = matches!(d.device.as_str(), "cdrom" | "floppy");
            if !restored && !read_only_media {
                edits.drop_disks.insert(d.target.clone());
            }
        }
    }

    // NVRAM: the backup's copy goes where the (renamed) domain will look for it.
    let nvram_src = dir.join(layout::nvram_file_name(&meta.vm_name)?);
    let nvram = if host.is_file(&nvram_src) {
        let vars = format!("{name}_VARS.fd");
        let dest = match (&request.disk_dir, &domain_xml.nvram, renamed) {
            (Some(d), _, _) => d.join(&vars),
            (None, Some(p), true) => p
                .parent()
                .unwrap_or(Path::new(DEFAULT_NVRAM_DIR))
                .join(&vars),
            (None, Some(p), false) => p.clone(),
            (None, None, _) => Path::new(DEFAULT_NVRAM_DIR).join(&vars),
        };
        if domain_xml.nvram.is_some() {
            edits.nvram = Some(dest.display().to_string());
        } else if request.disk_dir.is_some() || renamed {
            edits.add_nvram = Some(dest.display().to_string());
        }
        Some(PlannedFile {
            from: nvram_src,
            to: dest,
        })
    } else {
        None
    };

    // Appliance configurations, and the console logs of a copy, beside the first disk.
    let beside = request.disk_dir.clone().or_else(|| {
        disks
            .first()
            .and_then(|d| d.dest.parent().map(Path::to_path_buf))
    });
    let configs_src = dir.join(layout::CONFIGS_DIR);
    let configs = if host.is_dir(&configs_src) {
        beside.as_ref().map(|b| PlannedFile {
            from: configs_src,
            to: b.join(format!("{name}-configs")),
        })
    } else {
        None
    };

    // File-backed consoles of a copy must not share the original's file.
    if renamed {
        if let Some(base) = &beside {
            for kind in ["serial", "console"] {
                for i in 0..4 {
                    edits.char_files.insert(
                        format!("{kind}{i}"),
                        base.join(format!("{name}.{kind}{i}.log"))
                            .display()
                            .to_string(),
                    );
                }
            }
        }
    }
    Ok(RestorePlan {
        backup_dir: dir.to_path_buf(),
        name: name.to_string(),
        disks,
        in_place,
        nvram,
        configs,
        edits,
        replaces: false,
        force: request.force,
        start: request.start,
        notes: Vec::new(),
    })
}

/// `<name>-<target>.backing-<depth>.<ext>`, or with `-<n>` after the depth for `n > 1`.
fn backing_file_name(name: &str, target: &str, record: &BackingRecord, n: usize) -> String {
    let ext = if record.format == "qcow2" {
        "qcow2"
    } else {
        "raw"
    };
    let safe = |s: &str| layout::safe_component(s).unwrap_or_else(|_| "disk".into());
    if n > 1 {
        format!(
            "{}-{}.backing-{}-{n}.{ext}",
            safe(name),
            safe(target),
            record.depth
        )
    } else {
        format!(
            "{}-{}.backing-{}.{ext}",
            safe(name),
            safe(target),
            record.depth
        )
    }
}

/// Checks (and, beside the original, chooses) the destinations of the backing layers.
/// In place: a layer already there with the backup's SHA-256 is kept; a different one is
/// overwritten only with `force`, and never when another domain's chain uses it. Elsewhere:
/// a name that exists or is planned already is never overwritten, the next free one is taken.
fn check_layers(
    plan: &mut RestorePlan,
    host: &dyn HostView,
    others: &BTreeMap<PathBuf, String>,
    seen: &mut BTreeSet<PathBuf>,
    force: bool,
) -> Result<(), RestoreError> {
    let mut other_chains: Option<BTreeMap<PathBuf, String>> = None;
    let in_place = plan.in_place;
    let name = plan.name.clone();
    for disk in plan.disks.iter_mut() {
        for layer in disk.layers.iter_mut() {
            if in_place {
                if let Some(domain) = others.get(&layer.dest) {
                    return Err(RestoreError::InUse {
                        path: layer.dest.clone(),
                        domain: domain.clone(),
                    });
                }
                if host.exists(&layer.dest) {
                    let same = host
                        .sha256(&layer.dest)
                        .is_some_and(|d| d.eq_ignore_ascii_case(&layer.record.sha256));
                    if same {
                        layer.reuse = true;
                    } else if !force {
                        return Err(RestoreError::FileExists(layer.dest.clone()));
                    } else {
                        let chains =
                            other_chains.get_or_insert_with(|| host.chain_files_of(others));
                        if let Some(domain) = chains.get(&host.canonical(&layer.dest)) {
                            return Err(RestoreError::InUse {
                                path: layer.dest.clone(),
                                domain: domain.clone(),
                            });
                        }
                    }
                }
                if !layer.reuse && !seen.insert(layer.dest.clone()) {
                    return Err(RestoreError::FileExists(layer.dest.clone()));
                }
            } else {
                let mut n = 1;
                while host.exists(&layer.dest)
                    || seen.contains(&layer.dest)
                    || others.contains_key(&layer.dest)
                {
                    n += 1;
                    layer.dest = layer.dest.with_file_name(backing_file_name(
                        &name,
                        &disk.record.target,
                        &layer.record,
                        n,
                    ));
                }
                if n > 1 {
                    plan.notes.push(format!(
                        "backing file name taken: using {}",
                        layer.dest.display()
                    ));
                }
                seen.insert(layer.dest.clone());
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::copier::ChunkManifest;
    use crate::engine::restore::StampChoice;
    use crate::error::ExitStatus;
    use crate::format::metadata::{Method, SkippedDisk};
    use crate::hv::xml::parse_domain;
    use std::cell::RefCell;

    fn manifest() -> ChunkManifest {
        ChunkManifest {
            chunk_size: 0,
            file_size: 0,
            digests: Vec::new(),
            zero_chunks: Vec::new(),
            root: String::new(),
        }
    }

    fn layer(depth: usize, source: &str, format: &str, named: &str) -> BackingRecord {
        BackingRecord {
            depth,
            file: format!("web-vdb.backing-{depth}.{format}"),
            source: source.into(),
            format: format.into(),
            backing_named_as: Some(named.into()),
            virtual_size: 0,
            allocated_size: 0,
            file_size: 0,
            sha256: String::new(),
            manifest: manifest(),
            copy_seconds: 0.0,
            backing_rewrite: None,
        }
    }

    /// vdb.qcow2 -> base.qcow2 (named relatively) -> golden.raw (named absolutely).
    fn disk() -> DiskRecord {
        DiskRecord {
            target: "vdb".into(),
            source: "/img/vdb.qcow2".into(),
            format: "qcow2".into(),
            file: "web-vdb.qcow2".into(),
            virtual_size: 0,
            allocated_size: 0,
            file_size: 0,
            sha256: String::new(),
            manifest: manifest(),
            copy_seconds: 0.0,
            bytes_per_sec: 0.0,
            io_path: String::new(),
            backing_chain: vec![
                layer(1, "/img/base.qcow2", "qcow2", "base.qcow2"),
                layer(2, "/gold/golden.raw", "raw", "/gold/golden.raw"),
            ],
            backing_rewrite: None,
        }
    }

    #[test]
    fn rebase_plan_points_each_layer_at_the_restored_one_below() {
        let top = PathBuf::from("/r/copy-vdb.qcow2");
        let layers = vec![
            PathBuf::from("/r/copy-vdb.backing-1.qcow2"),
            PathBuf::from("/r/copy-vdb.backing-2.raw"),
        ];
        let plan = rebase_plan(&disk(), &top, &layers, false);
        assert_eq!(
            plan,
            vec![
                Rebase {
                    image: top.clone(),
                    format: "qcow2".into(),
                    backing: layers[0].clone(),
                    backing_format: "qcow2".into(),
                },
                Rebase {
                    image: layers[0].clone(),
                    format: "qcow2".into(),
                    backing: layers[1].clone(),
                    backing_format: "raw".into(),
                },
            ]
        );
        let args: Vec<String> = plan[1]
            .args(Path::new("/r/.tmp"))
            .into_iter()
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        assert_eq!(
            args,
            [
                "rebase",
                "-u",
                "-f",
                "qcow2",
                "-b",
                "/r/copy-vdb.backing-2.raw",
                "-F",
                "raw",
                "/r/.tmp"
            ]
        );
        // A disk without a chain needs nothing.
        let mut flat = disk();
        flat.backing_chain.clear();
        assert!(rebase_plan(&flat, &top, &[], false).is_empty());
    }

    #[test]
    fn rebase_plan_in_place_skips_headers_that_already_name_the_right_file() {
        let d = disk();
        let top = PathBuf::from(&d.source);
        let layers: Vec<PathBuf> = d
            .backing_chain
            .iter()
            .map(|l| l.source.clone().into())
            .collect();
        assert!(rebase_plan(&d, &top, &layers, true).is_empty());
        // A relative name that resolves elsewhere (`../`) is rebased even in place.
        let mut moved = d.clone();
        moved.backing_chain[0].backing_named_as = Some("../other/base.qcow2".into());
        let plan = rebase_plan(&moved, &top, &layers, true);
        assert_eq!(plan.len(), 1);
        assert_eq!(plan[0].image, top);
        assert_eq!(plan[0].backing, layers[0]);
        // `./` and `x/../` spellings of the same file are recognised.
        moved.backing_chain[0].backing_named_as = Some("./sub/../base.qcow2".into());
        assert!(rebase_plan(&moved, &top, &layers, true).is_empty());
    }

    #[test]
    fn rebase_plan_in_place_rebases_headers_the_backup_rewrote() {
        use crate::format::metadata::BackingRewrite;
        let rw = |original: &str, written: &str| BackingRewrite {
            original: original.into(),
            written: written.into(),
            how: "copier".into(),
            source_chunk0_sha256: None,
            source_root: None,
        };
        let mut d = disk();
        d.backing_rewrite = Some(rw("base.qcow2", "web-vdb.backing-1.qcow2"));
        d.backing_chain[0].backing_rewrite = Some(rw("/gold/golden.raw", "web-vdb.backing-2.raw"));
        let top = PathBuf::from(&d.source);
        let layers: Vec<PathBuf> = d
            .backing_chain
            .iter()
            .map(|l| l.source.clone().into())
            .collect();
        // In place, both headers name files of the backup folder: both are pointed back.
        let plan = rebase_plan(&d, &top, &layers, true);
        assert_eq!(plan.len(), 2);
        assert_eq!(plan[0].image, top);
        assert_eq!(plan[0].backing, layers[0]);
        assert_eq!(plan[1].image, layers[0]);
        assert_eq!(plan[1].backing, layers[1]);
        // A rewritten name that happens to resolve to the restored layer is left alone.
        d.backing_rewrite = Some(rw("base.qcow2", "base.qcow2"));
        assert_eq!(rebase_plan(&d, &top, &layers, true).len(), 1);
    }

    #[test]
    fn backing_names_beside_the_copy_are_numbered_when_taken() {
        let l = layer(2, "/x", "raw", "/x");
        assert_eq!(backing_file_name("c", "vdb", &l, 1), "c-vdb.backing-2.raw");
        assert_eq!(
            backing_file_name("c", "vdb", &l, 3),
            "c-vdb.backing-2-3.raw"
        );
    }

    /// A host made of a set of files (path → SHA-256) and domains (name → active, disks).
    #[derive(Default)]
    struct FakeHost {
        files: BTreeMap<PathBuf, String>,
        dirs: BTreeSet<PathBuf>,
        domains: BTreeMap<String, (bool, Vec<PathBuf>)>,
        chains: BTreeMap<PathBuf, Vec<PathBuf>>,
        chain_calls: RefCell<usize>,
    }

    impl HostView for FakeHost {
        fn exists(&self, path: &Path) -> bool {
            self.files.contains_key(path) || self.dirs.contains(path)
        }
        fn is_file(&self, path: &Path) -> bool {
            self.files.contains_key(path)
        }
        fn is_dir(&self, path: &Path) -> bool {
            self.dirs.contains(path)
        }
        fn sha256(&self, path: &Path) -> Option<String> {
            self.files.get(path).cloned()
        }
        fn canonical(&self, path: &Path) -> PathBuf {
            path.to_path_buf()
        }
        fn domain_active(&self, name: &str) -> Result<Option<bool>, RestoreError> {
            Ok(self.domains.get(name).map(|(active, _)| *active))
        }
        fn disks_of_other_domains(
            &self,
            except: &str,
        ) -> Result<BTreeMap<PathBuf, String>, RestoreError> {
            Ok(self
                .domains
                .iter()
                .filter(|(n, _)| n.as_str() != except)
                .flat_map(|(n, (_, disks))| disks.iter().map(move |d| (d.clone(), n.clone())))
                .collect())
        }
        fn chain_files_of(&self, disks: &BTreeMap<PathBuf, String>) -> BTreeMap<PathBuf, String> {
            *self.chain_calls.borrow_mut() += 1;
            let mut out = BTreeMap::new();
            for (disk, domain) in disks {
                for f in self.chains.get(disk).into_iter().flatten() {
                    out.insert(f.clone(), domain.clone());
                }
            }
            out
        }
    }

    const XML: &str = "<domain type='kvm'><name>web</name><uuid>u-1</uuid>\
        <os><nvram>/var/lib/libvirt/qemu/nvram/web_VARS.fd</nvram></os><devices>\
        <disk type='file' device='disk'><source file='/img/vdb.qcow2'/><target dev='vdb'/></disk>\
        <disk type='file' device='disk'><source file='/img/scratch.raw'/><target dev='vdc'/></disk>\
        <disk type='file' device='cdrom'><source file='/iso/x.iso'/><target dev='hdc'/><readonly/></disk>\
        <serial type='file'><source path='/var/log/web.log'/></serial>\
        <interface type='network'><mac address='52:54:00:00:00:01'/></interface>\
        </devices></domain>";

    fn meta() -> BackupMetadata {
        BackupMetadata {
            schema_version: 1,
            tool_version: "0".into(),
            vm_name: "web".into(),
            vm_uuid: "u-1".into(),
            host: "hv1".into(),
            stamp: "2026-11-21-120000".into(),
            method_requested: Method::Auto,
            method: Method::Offline,
            method_note: None,
            started_at: String::new(),
            finished_at: String::new(),
            frozen_ms: None,
            phases: BTreeMap::new(),
            disks: vec![disk()],
            skipped_disks: vec![SkippedDisk {
                target: "vdc".into(),
                reason: "excluded".into(),
            }],
            files: Vec::new(),
            total_bytes: 0,
            bytes_per_sec: 0.0,
            result: ExitStatus::Success,
            warnings: Vec::new(),
            appliance: None,
            verify: None,
            test_restore: None,
            chain: Default::default(),
        }
    }

    const DIR: &str = "/b/hv1/web/2026-11-21-120000";

    /// The backup folder holds the NVRAM; the host holds the original chain.
    fn host() -> FakeHost {
        let mut h = FakeHost::default();
        h.files
            .insert(PathBuf::from(DIR).join("web-nvram.fd"), "n".into());
        h
    }

    fn run(request: &RestoreRequest, host: &FakeHost) -> Result<RestorePlan, RestoreError> {
        let domain = parse_domain(XML).unwrap();
        let meta = meta();
        let input = PlanInput {
            request,
            dir: Path::new(DIR),
            meta: &meta,
            domain: &domain,
            new_uuid: "new-uuid",
        };
        plan(&input, host)
    }

    fn request() -> RestoreRequest {
        RestoreRequest::new("/b", "hv1", "web", StampChoice::Latest)
    }

    #[test]
    fn in_place_plan_puts_everything_back_where_it_was() {
        let p = run(&request(), &host()).unwrap();
        assert_eq!(p.name, "web");
        assert!(p.in_place && !p.replaces && !p.force && !p.start);
        assert_eq!(p.disks.len(), 1);
        let d = &p.disks[0];
        assert_eq!(d.from, Path::new(DIR).join("web-vdb.qcow2"));
        assert_eq!(d.dest, PathBuf::from("/img/vdb.qcow2"));
        let layers: Vec<&Path> = d.layers.iter().map(|l| l.dest.as_path()).collect();
        assert_eq!(
            layers,
            [Path::new("/img/base.qcow2"), Path::new("/gold/golden.raw")]
        );
        // Both headers already name the original files: nothing to rebase.
        assert!(d.rebases.is_empty());
        let nvram = p.nvram.as_ref().unwrap();
        assert_eq!(
            nvram.to,
            PathBuf::from("/var/lib/libvirt/qemu/nvram/web_VARS.fd")
        );
        assert_eq!(p.edits.name, None);
        assert_eq!(p.edits.uuid, None);
        assert!(!p.edits.new_macs);
        assert!(p.edits.drop_disks.is_empty(), "in place keeps every disk");
        assert!(p.edits.char_files.is_empty());
        assert_eq!(p.edits.disk_sources["vdb"], "/img/vdb.qcow2");
        assert_eq!(p.configs, None);
    }

    #[test]
    fn a_copy_beside_the_original_gets_new_names_everywhere() {
        let mut r = request();
        r.new_name = Some("web-copy".into());
        let mut h = host();
        h.dirs.insert(PathBuf::from(DIR).join("configs"));
        let p = run(&r, &h).unwrap();
        assert!(!p.in_place);
        let d = &p.disks[0];
        assert_eq!(d.dest, PathBuf::from("/img/web-copy-vdb.qcow2"));
        assert_eq!(
            d.layers[0].dest,
            PathBuf::from("/img/web-copy-vdb.backing-1.qcow2")
        );
        assert_eq!(
            d.layers[1].dest,
            PathBuf::from("/img/web-copy-vdb.backing-2.raw")
        );
        assert_eq!(d.rebases.len(), 2);
        assert_eq!(d.rebases[0].image, d.dest);
        assert_eq!(d.rebases[1].backing, d.layers[1].dest);
        assert_eq!(p.edits.name.as_deref(), Some("web-copy"));
        assert_eq!(p.edits.uuid.as_deref(), Some("new-uuid"));
        assert!(p.edits.new_macs);
        // The writable disk not backed up is dropped; the cdrom stays.
        assert_eq!(p.edits.drop_disks, BTreeSet::from(["vdc".to_string()]));
        assert_eq!(
            p.edits.nvram.as_deref(),
            Some("/var/lib/libvirt/qemu/nvram/web-copy_VARS.fd")
        );
        assert_eq!(p.edits.char_files["serial0"], "/img/web-copy.serial0.log");
        assert_eq!(
            p.configs,
            Some(PlannedFile {
                from: Path::new(DIR).join("configs"),
                to: PathBuf::from("/img/web-copy-configs"),
            })
        );
    }

    #[test]
    fn disk_dir_and_taken_backing_names() {
        let mut r = request();
        r.new_name = Some("t".into());
        r.disk_dir = Some("/w".into());
        r.strip_interfaces = true;
        let mut h = host();
        h.files
            .insert("/w/t-vdb.backing-1.qcow2".into(), "x".into());
        h.files
            .insert("/w/t-vdb.backing-1-2.qcow2".into(), "x".into());
        let p = run(&r, &h).unwrap();
        assert!(p.edits.strip_interfaces);
        assert_eq!(p.disks[0].dest, PathBuf::from("/w/t-vdb.qcow2"));
        assert_eq!(
            p.disks[0].layers[0].dest,
            PathBuf::from("/w/t-vdb.backing-1-3.qcow2")
        );
        assert_eq!(p.notes.len(), 1, "{:?}", p.notes);
        assert_eq!(p.nvram.unwrap().to, PathBuf::from("/w/t_VARS.fd"));
    }

    #[test]
    fn a_running_or_defined_domain_and_existing_files_are_refused() {
        let mut h = host();
        h.domains.insert("web".into(), (true, vec![]));
        assert!(matches!(run(&request(), &h), Err(RestoreError::Running(_))));
        let mut forced = request();
        forced.force = true;
        assert!(matches!(run(&forced, &h), Err(RestoreError::Running(_))));
        h.domains.insert("web".into(), (false, vec![]));
        assert!(matches!(run(&request(), &h), Err(RestoreError::Exists(_))));
        assert!(run(&forced, &h).unwrap().replaces);

        let mut h = host();
        h.files.insert("/img/vdb.qcow2".into(), "old".into());
        assert!(matches!(
            run(&request(), &h),
            Err(RestoreError::FileExists(p)) if p == Path::new("/img/vdb.qcow2")
        ));
        assert!(run(&forced, &h).is_ok());

        let mut bad = request();
        bad.new_name = Some("../x".into());
        assert!(matches!(run(&bad, &host()), Err(RestoreError::BadName(_))));
    }

    #[test]
    fn another_domains_disk_or_chain_is_never_overwritten() {
        let mut h = host();
        h.domains
            .insert("other".into(), (false, vec!["/img/vdb.qcow2".into()]));
        let mut forced = request();
        forced.force = true;
        assert!(matches!(
            run(&forced, &h),
            Err(RestoreError::InUse { domain, .. }) if domain == "other"
        ));

        // A layer in place with the backup's content is kept, and nobody's chains are read.
        let mut h = host();
        h.files.insert("/img/base.qcow2".into(), String::new());
        let p = run(&request(), &h).unwrap();
        assert!(p.disks[0].layers[0].reuse);
        assert_eq!(*h.chain_calls.borrow(), 0);

        // A different one is overwritten only with force, and not when a chain uses it.
        let mut h = host();
        h.files
            .insert("/gold/golden.raw".into(), "different".into());
        h.domains
            .insert("other".into(), (false, vec!["/img/other.qcow2".into()]));
        assert!(matches!(
            run(&request(), &h),
            Err(RestoreError::FileExists(_))
        ));
        assert!(run(&forced, &h).is_ok());
        h.chains.insert(
            "/img/other.qcow2".into(),
            vec!["/img/other.qcow2".into(), "/gold/golden.raw".into()],
        );
        assert!(matches!(
            run(&forced, &h),
            Err(RestoreError::InUse { path, .. }) if path == Path::new("/gold/golden.raw")
        ));
    }
}
