//! # vm-backup
//!
//! A backup engine for KVM/libvirt virtual machines, driven by Bacula.
//!
//! The engine knows nothing of who drives it: the `vm-backup` command line, the C ABI
//! (`include/vm_backup.h`, used by the Bacula File Daemon plugin in `c-shim/`) and the tests all
//! call the same functions and inject their own [`progress::Progress`] sink and
//! [`progress::CancelToken`].
//!
//! ## Map of the crate
//!
//! | room | responsibility |
//! | --- | --- |
//! | [`format`] | the on-disk contract: folder names, `backup-metadata.json`, chunk manifests |
//! | [`store`] | the backup target and the catalog index on it |
//! | [`hv`] | libvirt, the domain XML and `qemu-img` |
//! | [`copier`] | copy one file at hardware speed (io_uring, or a thread-pool fallback), hashing it in the same pass |
//! | [`engine`] | backup, restore, verify, prune, orphan repair |
//! | [`ops`] | Slack webhooks, Prometheus textfile, weekly report, Cisco ASAv configuration capture |
//! | [`bacula`] | the Bacula plugin string, the job behind the C ABI, Director resources |
//! | [`ffi`] | the C ABI (the only place besides the io_uring engine with `unsafe`) |
//! | [`config`], [`progress`], [`error`] | shared leaves: settings and inventory, progress and cancellation, typed errors |
//!
//! `docs/architecture.md` draws the rooms and the arrows allowed between them.
//!
//! The layout on disk, the command line and the exit codes are contracts described in
//! `DESIGN.md` and `docs/`.

pub mod bacula;
pub mod config;
pub mod copier;
pub mod engine;
pub mod error;
pub mod ffi;
pub mod format;
pub mod hv;
pub mod ops;
pub mod progress;
pub mod store;

pub use error::{Error, ErrorKind, ExitStatus, Severity};

/// The version of this build, as recorded in every backup's metadata.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
