//! `vm-backup verify-file`: re-hash one file against a chunk manifest.

use std::path::PathBuf;

use vm_backup::copier::{self, ChunkManifest};

use super::copy::Bar;

/// Arguments of `vm-backup verify-file`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// The file to check.
    file: PathBuf,
    /// The chunk manifest (JSON, as written by `vm-backup copy --manifest`).
    #[arg(long, value_name = "FILE")]
    manifest: PathBuf,
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
}

/// Runs `vm-backup verify-file`: exit 0 when the file matches, 1 when it does not.
pub fn run(args: Args) -> Result<i32, vm_backup::Error> {
    let manifest = ChunkManifest::read_json(&args.manifest)
        .map_err(|e| vm_backup::Error::Other(e.to_string()))?;
    let cancel = super::common::cancel_on_signals();
    let bar = Bar::new(args.json);
    let result = copier::verify_file(&args.file, &manifest, &bar, &cancel);
    bar.done();
    let report = result?;
    if args.json {
        let text = serde_json::to_string_pretty(&report)
            .map_err(|e| vm_backup::Error::Other(format!("cannot encode report: {e}")))?;
        println!("{text}");
    } else if report.ok {
        println!(
            "{}: OK ({} chunks, {:.2} s)",
            report.file.display(),
            report.chunks,
            report.duration.as_secs_f64()
        );
    } else {
        println!("{}: MISMATCH", report.file.display());
        if report.file_size != report.expected_size {
            println!(
                "  size is {} bytes, the manifest says {}",
                report.file_size, report.expected_size
            );
        }
        if !report.root_ok {
            println!("  the manifest's root does not match its own digests");
        }
        if let Some(bad) = &report.first_bad {
            println!(
                "  first bad chunk: {} at offset {} ({} bad chunks in all)",
                bad.index,
                bad.offset,
                report.bad_chunks.len()
            );
            println!("    expected {}", bad.expected);
            println!("    actual   {}", bad.actual);
        }
    }
    Ok(if report.ok { 0 } else { 1 })
}
