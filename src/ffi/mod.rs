//! The C ABI declared in `include/vm_backup.h`: the contract between the Bacula plugin shim
//! (`c-shim/`) and the engine. Every entry point catches panics so that none crosses into C.

pub mod job;
