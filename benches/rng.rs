//! Throughput of the ARS-5 keep-mask kernel per backend against a plain memcpy floor.
//!
//! Throughput is reported as bytes of the f32 activation the decisions would mask (4 bytes per
//! decision), so the keep-mask numbers are directly comparable with copying that many f32s: a
//! mask generator at or above the copy's GB/s cannot be the bottleneck of a dropout pass.

use std::hint::black_box;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use fastdrop::rng::{available_backends, keep_words_with, threshold_for, Key};

/// 64M decisions: far beyond cache, the regime of a large activation tensor.
const BIG: usize = 64 << 20;
/// 1M decisions: the mask (128 KiB) fits in L2, showing raw generator speed.
const SMALL: usize = 1 << 20;

fn keep_words_bench(c: &mut Criterion) {
    let key = Key {
        seed: 0x5eed,
        stream: 1,
    };
    let thr = threshold_for(0.9);
    let mut g = c.benchmark_group("keep_words");
    for n in [SMALL, BIG] {
        g.throughput(Throughput::Bytes((n * 4) as u64));
        let mut words = vec![0u64; n / 64];
        for be in available_backends() {
            g.bench_with_input(BenchmarkId::new(format!("{be:?}"), n), &n, |b, _| {
                b.iter(|| {
                    keep_words_with(be, key, black_box(0), thr, &mut words);
                    black_box(&words);
                })
            });
        }
    }
    g.finish();
}

fn memcpy_floor(c: &mut Criterion) {
    let mut g = c.benchmark_group("copy_f32");
    for n in [SMALL, BIG] {
        g.throughput(Throughput::Bytes((n * 4) as u64));
        let src = vec![1.0f32; n];
        let mut dst = vec![0.0f32; n];
        g.bench_with_input(BenchmarkId::new("copy_from_slice", n), &n, |b, _| {
            b.iter(|| {
                dst.copy_from_slice(black_box(&src));
                black_box(&dst);
            })
        });
    }
    g.finish();
}

fn config() -> Criterion {
    Criterion::default()
        .sample_size(10)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(3))
}

criterion_group! {
    name = benches;
    config = config();
    targets = keep_words_bench, memcpy_floor
}
criterion_main!(benches);
