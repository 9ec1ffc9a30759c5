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
//! | module | responsibility |
//! | --- | --- |
//! | [`copier`] | copy one file at hardware speed (io_uring, or a thread-pool fallback), hashing it in the same pass |
//! | [`libvirt`] | the few libvirt calls the engine needs, and domain XML parsing |
//! | [`backup`] | the backup workflow: pre-checks, freeze/snapshot, copy, commit, publish, post-checks, guards, journal, orphans |
//! | [`layout`] | where a backup lives on the target, name sanitisation, `.partial` folders |
//! | [`metadata`] | `backup-metadata.json`, the record every backup carries |
//! | [`restore`], [`verify`], [`prune`], [`catalog`] | operations on published backups |
//! | [`notify`], [`metrics`], [`appliance`] | Slack webhooks, Prometheus textfile, Cisco ASAv configuration capture |
//! | [`config`] | `vm-backup.conf` and the `vm-list.yaml` inventory |
//! | [`plugin`] | the Bacula plugin string and the job state behind the C ABI |
//! | [`bacula_config`] | Director resources generated from the inventory |
//! | [`bench`] | the throughput harness behind `vm-backup bench` |
//! | [`ffi`] | the C ABI (the only place besides the io_uring engine with `unsafe`) |
//!
//! The layout on disk, the command line and the exit codes are contracts described in
//! `DESIGN.md` and `docs/`.

pub mod appliance;
pub mod backup;
pub mod bacula_config;
pub mod bench;
pub mod catalog;
pub mod config;
pub mod copier;
pub mod error;
pub mod ffi;
pub mod layout;
pub mod libvirt;
pub mod metadata;
pub mod metrics;
pub mod notify;
pub mod plugin;
pub mod progress;
pub mod prune;
pub mod restore;
pub mod verify;

pub use error::{Error, ExitStatus};

/// The version of this build, as recorded in every backup's metadata.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
