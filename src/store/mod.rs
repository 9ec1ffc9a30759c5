//! The backup target: the only code that touches its files, and the catalog index on it.

pub mod catalog;
pub mod verified_read;
