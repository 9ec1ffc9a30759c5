//! The copier on tmpfs (/dev/shm): both engines across buffer sizes, hashing both digests.
//! Quick by design; the disk-bound comparison with cp/qemu-img is `vm-backup bench`.

use std::path::PathBuf;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use vm_backup::copier::{self, CopyOptions, HashMode, IoPath};
use vm_backup::progress::{CancelToken, NoProgress};

const SIZE: usize = 256 << 20;

fn scratch() -> tempfile::TempDir {
    let base = PathBuf::from("/dev/shm");
    if base.is_dir() {
        tempfile::tempdir_in(base).expect("tempdir in /dev/shm")
    } else {
        tempfile::tempdir().expect("tempdir")
    }
}

fn bench(c: &mut Criterion) {
    let dir = scratch();
    let src = dir.path().join("src.raw");
    let mut x = 0x9E37_79B9_7F4A_7C15u64;
    let data: Vec<u8> = (0..SIZE / 8)
        .flat_map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x.to_le_bytes()
        })
        .collect();
    std::fs::write(&src, &data).expect("write source");
    drop(data);
    let mut engines = vec![IoPath::Threads];
    if copier::probe_uring().is_ok() {
        engines.push(IoPath::Uring);
    }
    let mut g = c.benchmark_group("copy-256MiB-tmpfs");
    g.throughput(Throughput::Bytes(SIZE as u64));
    g.sample_size(10);
    g.warm_up_time(Duration::from_millis(500));
    g.measurement_time(Duration::from_secs(4));
    for io in engines {
        for buffer in [256usize << 10, 1 << 20, 4 << 20] {
            for hash in [HashMode::Both, HashMode::None] {
                let opts = CopyOptions {
                    io,
                    buffer_size: buffer,
                    hash,
                    ..CopyOptions::default()
                };
                let id =
                    BenchmarkId::new(format!("{io:?}-{hash:?}"), format!("{}KiB", buffer >> 10));
                g.bench_with_input(id, &opts, |b, opts| {
                    b.iter(|| {
                        let dst = dir.path().join("dst.raw");
                        copier::copy_file(&src, &dst, opts, &NoProgress, &CancelToken::new())
                            .expect("copy")
                    })
                });
            }
        }
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
