//! SHA-256 throughput: one stream (the whole-file digest) against 4 MiB chunks hashed on a
//! worker pool fed through crossbeam-channel (the manifest), and the zero-chunk shortcut.

use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use sha2::{Digest, Sha256};

const SIZE: usize = 64 << 20;
const CHUNK: usize = 4 << 20;

fn data() -> Vec<u8> {
    let mut x = 0x2545_F491_4F6C_DD1Du64;
    (0..SIZE / 8)
        .flat_map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x.to_le_bytes()
        })
        .collect()
}

fn chunked_on_pool(data: &[u8], workers: usize) -> Vec<[u8; 32]> {
    let (tx, rx) = crossbeam_channel::bounded::<(usize, &[u8])>(workers * 2);
    let (out_tx, out_rx) = crossbeam_channel::unbounded();
    std::thread::scope(|s| {
        for _ in 0..workers {
            let rx = rx.clone();
            let out_tx = out_tx.clone();
            s.spawn(move || {
                for (i, chunk) in rx {
                    let d: [u8; 32] = Sha256::digest(chunk).into();
                    let _ = out_tx.send((i, d));
                }
            });
        }
        for (i, c) in data.chunks(CHUNK).enumerate() {
            let _ = tx.send((i, c));
        }
        drop(tx);
    });
    drop(out_tx);
    let mut v: Vec<(usize, [u8; 32])> = out_rx.iter().collect();
    v.sort_unstable_by_key(|x| x.0);
    v.into_iter().map(|x| x.1).collect()
}

fn bench(c: &mut Criterion) {
    let data = data();
    let workers = std::thread::available_parallelism().map_or(2, |n| n.get());
    let mut g = c.benchmark_group("sha256");
    g.throughput(Throughput::Bytes(SIZE as u64));
    g.sample_size(10);
    g.warm_up_time(Duration::from_millis(500));
    g.measurement_time(Duration::from_secs(3));
    g.bench_function("one-stream", |b| b.iter(|| Sha256::digest(&data)));
    g.bench_function(format!("chunks-4MiB-{workers}-workers"), |b| {
        b.iter(|| chunked_on_pool(&data, workers))
    });
    g.bench_function("zero-chunks-precomputed", |b| {
        let zero = vm_backup::copier::zero_digest(CHUNK as u64);
        let zeros = vec![0u8; SIZE];
        b.iter(|| {
            zeros
                .chunks(CHUNK)
                .map(|c| -> [u8; 32] {
                    if c.iter().all(|&b| b == 0) {
                        zero
                    } else {
                        Sha256::digest(c).into()
                    }
                })
                .collect::<Vec<_>>()
        })
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
