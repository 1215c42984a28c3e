//! Full kernels (mask generation fused with the application) per dtype, size and variant,
//! against the floor measured in the same run: `copy_from_slice` of the same buffer.
//! Throughput counts bytes read + written, so the GB/s of every row compare directly.
//!
//! `FASTDROP_SIMD=portable cargo bench --bench kernels` measures the portable loops.
//! `cargo bench --bench kernels -- noise` runs only Gaussian noise's normal deviates.

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use fastdrop::kernel::set_num_threads;
use fastdrop::kernel::{
    apply_contiguous, apply_in_place, bernoulli_words, Application, Bits, Config, Contiguous,
    Element,
};
use fastdrop::noise::fill_normals;
use fastdrop::rng::{fill_u32, keep_words, threshold_for, Key};
use half::f16;
use std::hint::black_box;
use std::time::Duration;

const KEY: Key = Key {
    seed: 42,
    stream: 0,
};
const P: f64 = 0.1;

/// Sizes in elements; 64M only with few samples (each pass moves half a GiB for f32).
const SIZES: [(usize, &str); 3] = [(1 << 10, "1K"), (1 << 20, "1M"), (1 << 26, "64M")];

fn fresh() -> Bits<'static> {
    Bits::Fresh {
        key: KEY,
        first_block: 0,
        threshold: threshold_for(1.0 - P),
        store: None,
    }
}

fn scale() -> Application {
    Application::Scale {
        scale: 1.0 / (1.0 - P),
    }
}

fn bench_dtype<T: Element + Default>(c: &mut Criterion, name: &str, from_f32: fn(f32) -> T) {
    let size = std::mem::size_of::<T>() as u64;
    let config = Config::current();
    for &(n, label) in &SIZES {
        let mut g = c.benchmark_group(format!("{name}/{label}"));
        g.sample_size(10);
        if n >= 1 << 26 {
            g.warm_up_time(Duration::from_millis(300))
                .measurement_time(Duration::from_secs(2));
        } else {
            g.warm_up_time(Duration::from_millis(200))
                .measurement_time(Duration::from_millis(600));
        }
        let x: Vec<T> = (0..n)
            .map(|i| from_f32((i % 1000) as f32 * 0.01 - 5.0))
            .collect();
        let r = x.clone();
        let mut out = vec![T::default(); n];
        // (N, C, L) views for the channel and sample masks.
        let (batch, chans) = (64usize.min(n / 16), 16usize);
        let shape = [batch, chans, n / (batch * chans)];
        let channel_words = bernoulli_words(KEY, 0, threshold_for(1.0 - P), batch * chans);
        let sample_words = bernoulli_words(KEY, 0, threshold_for(1.0 - P), batch);

        g.throughput(Throughput::Bytes(2 * size * n as u64));
        g.bench_function("memcpy", |b| b.iter(|| out.copy_from_slice(black_box(&x))));
        g.bench_function("dropout", |b| {
            b.iter(|| {
                apply_contiguous(
                    config,
                    Contiguous {
                        shape: &[n],
                        mask_shape: &[n],
                        res: None,
                        bits: fresh(),
                        app: scale(),
                    },
                    black_box(&x),
                    &mut out,
                )
            })
        });
        let mut y = x.clone();
        g.bench_function("dropout_inplace", |b| {
            b.iter(|| {
                apply_in_place(
                    config,
                    Contiguous {
                        shape: &[n],
                        mask_shape: &[n],
                        res: None,
                        bits: fresh(),
                        app: scale(),
                    },
                    black_box(&mut y),
                )
            })
        });
        g.bench_function("alpha_dropout", |b| {
            let app = Application::Affine {
                a: 0.9,
                shift: 0.1,
                dropped: -1.2,
            };
            b.iter(|| {
                apply_contiguous(
                    config,
                    Contiguous {
                        shape: &[n],
                        mask_shape: &[n],
                        res: None,
                        bits: fresh(),
                        app,
                    },
                    black_box(&x),
                    &mut out,
                )
            })
        });
        g.bench_function("channel", |b| {
            let ms = [batch, chans, 1];
            let n3 = shape.iter().product::<usize>();
            b.iter(|| {
                apply_contiguous(
                    config,
                    Contiguous {
                        shape: &shape,
                        mask_shape: &ms,
                        res: None,
                        bits: Bits::Given(&channel_words),
                        app: scale(),
                    },
                    black_box(&x[..n3]),
                    &mut out[..n3],
                )
            })
        });
        g.bench_function("sample", |b| {
            let ms = [batch, 1, 1];
            let n3 = shape.iter().product::<usize>();
            b.iter(|| {
                apply_contiguous(
                    config,
                    Contiguous {
                        shape: &shape,
                        mask_shape: &ms,
                        res: None,
                        bits: Bits::Given(&sample_words),
                        app: scale(),
                    },
                    black_box(&x[..n3]),
                    &mut out[..n3],
                )
            })
        });
        // The fused ops read two arrays: three streams like `np.add(a, b, out=c)`.
        g.throughput(Throughput::Bytes(3 * size * n as u64));
        g.bench_function("dropout_add", |b| {
            b.iter(|| {
                apply_contiguous(
                    config,
                    Contiguous {
                        shape: &[n],
                        mask_shape: &[n],
                        res: Some(&r),
                        bits: fresh(),
                        app: scale(),
                    },
                    black_box(&x),
                    &mut out,
                )
            })
        });
        g.bench_function("drop_path_add", |b| {
            let ms = [batch, 1, 1];
            let n3 = shape.iter().product::<usize>();
            b.iter(|| {
                apply_contiguous(
                    config,
                    Contiguous {
                        shape: &shape,
                        mask_shape: &ms,
                        res: Some(&r[..n3]),
                        bits: Bits::Given(&sample_words),
                        app: scale(),
                    },
                    black_box(&x[..n3]),
                    &mut out[..n3],
                )
            })
        });
        g.finish();
    }
}

/// In-cache calls on one thread, taken apart: the whole kernel, the keep decisions alone
/// (`keep_words`), the application of given bits alone, against `copy_from_slice`, at p = 0.1
/// and 0.5 (the decisions need about 10 random bits at 0.1, one at 0.5).
fn incache(c: &mut Criterion) {
    let config = Config {
        threads: 1,
        ..Config::current()
    };
    for (n, label) in [(1usize << 16, "64K"), (1 << 20, "1M")] {
        let mut g = c.benchmark_group(format!("incache/{label}"));
        g.sample_size(20)
            .warm_up_time(Duration::from_millis(200))
            .measurement_time(Duration::from_millis(800))
            .throughput(Throughput::Bytes(8 * n as u64));
        let x: Vec<f32> = (0..n).map(|i| (i % 1000) as f32 * 0.01 - 5.0).collect();
        let mut out = vec![0f32; n];
        g.bench_function("memcpy", |b| b.iter(|| out.copy_from_slice(black_box(&x))));
        for p in [0.1, 0.5] {
            let threshold = threshold_for(1.0 - p);
            let app = Application::Scale {
                scale: 1.0 / (1.0 - p),
            };
            g.bench_function(format!("dropout p={p}"), |b| {
                b.iter(|| {
                    let bits = Bits::Fresh {
                        key: KEY,
                        first_block: 0,
                        threshold,
                        store: None,
                    };
                    apply_contiguous(
                        config,
                        Contiguous {
                            shape: &[n],
                            mask_shape: &[n],
                            res: None,
                            bits,
                            app,
                        },
                        black_box(&x),
                        &mut out,
                    )
                })
            });
            let mut words = vec![0u64; n / 64];
            g.bench_function(format!("keep_words p={p}"), |b| {
                b.iter(|| keep_words(KEY, black_box(0), threshold, &mut words))
            });
            g.bench_function(format!("apply given p={p}"), |b| {
                b.iter(|| {
                    let bits = Bits::Given(&words);
                    apply_contiguous(
                        config,
                        Contiguous {
                            shape: &[n],
                            mask_shape: &[n],
                            res: None,
                            bits,
                            app,
                        },
                        black_box(&x),
                        &mut out,
                    )
                })
            });
        }
        g.finish();
    }
}

/// The normal deviates of the 1M-element Gaussian dropout call, on one thread: `fill_normals`
/// into f32 and f64, against the loop it replaced (libm Box-Muller in f64 on two words per
/// deviate, the sine thrown away) and a copy of the output's size. Throughput counts the bytes
/// written.
fn noise(c: &mut Criterion) {
    set_num_threads(1).expect("one thread");
    let n = 1usize << 20;
    let mut g = c.benchmark_group("noise/1M");
    g.sample_size(20)
        .warm_up_time(Duration::from_millis(200))
        .measurement_time(Duration::from_millis(800));
    g.throughput(Throughput::Bytes(4 * n as u64));
    let x = vec![1f32; n];
    let mut out = vec![0f32; n];
    g.bench_function("memcpy f32", |b| {
        b.iter(|| out.copy_from_slice(black_box(&x)))
    });
    g.bench_function("fill_normals f32", |b| {
        b.iter(|| fill_normals(KEY, black_box(0), &mut out))
    });
    g.bench_function("cosine-only libm loop f32", |b| {
        b.iter(|| {
            let mut words = vec![0u32; 2 * n];
            fill_u32(KEY, black_box(0), &mut words);
            for (o, w) in out.iter_mut().zip(words.chunks_exact(2)) {
                let u1 = (w[0] as f64 + 0.5) * (1.0 / 4294967296.0);
                let u2 = w[1] as f64 * (1.0 / 4294967296.0);
                *o = ((-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()) as f32;
            }
        })
    });
    g.throughput(Throughput::Bytes(8 * n as u64));
    let mut out64 = vec![0f64; n];
    g.bench_function("fill_normals f64", |b| {
        b.iter(|| fill_normals(KEY, black_box(0), &mut out64))
    });
    g.finish();
}

fn kernels(c: &mut Criterion) {
    bench_dtype::<f32>(c, "f32", |v| v);
    bench_dtype::<f16>(c, "f16", f16::from_f32);
    bench_dtype::<f64>(c, "f64", f64::from);
}

criterion_group!(benches, incache, noise, kernels);
criterion_main!(benches);
