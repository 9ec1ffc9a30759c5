//! The libvirt calls the engine needs (through the `virt` crate), and domain XML parsing.

/// Errors of this module.
#[derive(Debug, thiserror::Error)]
pub enum LibvirtError {
    /// Not built yet.
    #[error("{0} is not implemented yet")]
    NotImplemented(&'static str),
}
