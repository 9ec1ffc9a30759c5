//! The glue between the copier and the store: a file the store stages is what the copier
//! fills. Neither room knows the other; the engine, which uses both, joins them here.

use std::fs::File;
use std::path::Path;

use crate::copier::Sink;
use crate::store::StagedFile;

impl Sink for StagedFile {
    fn file(&self) -> &File {
        StagedFile::file(self)
    }

    fn is_direct(&self) -> bool {
        StagedFile::is_direct(self)
    }

    fn path(&self) -> &Path {
        StagedFile::path(self)
    }

    fn note(&self) -> Option<&str> {
        StagedFile::note(self)
    }

    fn commit(self: Box<Self>) -> std::io::Result<()> {
        StagedFile::commit(*self).map_err(std::io::Error::from)
    }
}
