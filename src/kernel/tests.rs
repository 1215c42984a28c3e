//! The kernel against itself: every path (vector and portable loops, any thread count, in place
//! or not) gives the bits of the portable single-threaded one, for every application, dtype,
//! layout and mask granularity.

use super::*;
use crate::mask::spread::tests::{broadcast_reference, MIDDLE_CASES};
use half::{bf16, f16};

const KEY: Key = Key {
    seed: 0x5eed,
    stream: 3,
};
const PORTABLE: Config = Config {
    isa: Isa::Portable,
    threads: 1,
};

/// Deterministic awkward values: signed zeros, infinities, tiny and huge magnitudes, NaN.
fn values(n: usize, salt: u64) -> Vec<f64> {
    let special = [
        0.0,
        -0.0,
        f64::INFINITY,
        f64::NEG_INFINITY,
        1e-7,
        -6e-8,
        65504.0,
        3.0e38,
        1e-300,
        f64::NAN,
    ];
    (0..n as u64)
        .map(|i| {
            let mut z = (i ^ salt.rotate_left(17)).wrapping_mul(0x9E37_79B9_7F4A_7C15);
            z = (z ^ (z >> 29)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            if z.is_multiple_of(13) {
                special[(z >> 8) as usize % special.len()]
            } else {
                ((z >> 11) as f64 / (1u64 << 53) as f64 - 0.5) * 8.0
            }
        })
        .collect()
}

trait Probe: Element + std::fmt::Debug {
    fn from_f64(v: f64) -> Self;
    fn same(a: Self, b: Self) -> bool;
}
impl Probe for f32 {
    fn from_f64(v: f64) -> Self {
        v as f32
    }
    fn same(a: Self, b: Self) -> bool {
        a.to_bits() == b.to_bits() || (a.is_nan() && b.is_nan())
    }
}
impl Probe for f64 {
    fn from_f64(v: f64) -> Self {
        v
    }
    fn same(a: Self, b: Self) -> bool {
        a.to_bits() == b.to_bits() || (a.is_nan() && b.is_nan())
    }
}
impl Probe for f16 {
    fn from_f64(v: f64) -> Self {
        f16::from_f64(v)
    }
    fn same(a: Self, b: Self) -> bool {
        a.to_bits() == b.to_bits() || (a.is_nan() && b.is_nan())
    }
}
impl Probe for bf16 {
    fn from_f64(v: f64) -> Self {
        bf16::from_f64(v)
    }
    fn same(a: Self, b: Self) -> bool {
        a.to_bits() == b.to_bits() || (a.is_nan() && b.is_nan())
    }
}

fn assert_same<T: Probe>(want: &[T], got: &[T], what: &str) {
    assert_eq!(want.len(), got.len());
    for (i, (&a, &b)) in want.iter().zip(got).enumerate() {
        assert!(T::same(a, b), "{what}: element {i}: {a:?} vs {b:?}");
    }
}

fn apps() -> Vec<Application> {
    vec![
        Application::Scale { scale: 1.0 / 0.7 },
        Application::Affine {
            a: 0.8,
            shift: 0.3,
            dropped: -1.1,
        },
        Application::Noise {
            scale: 2.0,
            key: KEY,
            first_block: 1 << 20,
        },
    ]
}

/// A strided view into a buffer: `shape` with C-ordered element strides stretched by
/// `pad` along the last-but-one axis (rows padded) and `start` elements of offset, so runs
/// start misaligned and rows are not mergeable.
struct Layout {
    shape: Vec<usize>,
    strides: Vec<isize>,
    start: usize,
    len: usize,
}

fn layout<T>(shape: &[usize], pad: usize, start: usize) -> Layout {
    let mut strides = vec![0isize; shape.len()];
    let mut acc = 1usize;
    for d in (0..shape.len()).rev() {
        strides[d] = acc as isize;
        acc *= shape[d] + if d + 1 == shape.len() { pad } else { 0 };
    }
    let size = std::mem::size_of::<T>() as isize;
    Layout {
        shape: shape.to_vec(),
        strides: strides.iter().map(|s| s * size).collect(),
        start,
        len: start + acc,
    }
}

/// One call's inputs: a layout, a mask shape, the values of the input (and residual) buffers,
/// given mask bits (or a fresh mask) and the application.
#[derive(Clone, Copy)]
struct Case<'a, T> {
    l: &'a Layout,
    mask_shape: &'a [usize],
    x: &'a [T],
    r: Option<&'a [T]>,
    given: Option<&'a [u64]>,
    app: Application,
}

/// Runs `case` on fresh copies of its buffers: out of place into a zeroed buffer, or in place;
/// returns the whole output buffer and the stored mask.
fn call<T: Probe>(config: Config, case: Case<T>, in_place: bool) -> (Vec<T>, Vec<u64>) {
    let Case {
        l,
        mask_shape,
        x,
        r,
        given,
        app,
    } = case;
    let n: usize = l.shape.iter().product();
    let mut src = x.to_vec();
    let mut dst = if in_place {
        Vec::new()
    } else {
        vec![T::from_f64(0.0); x.len()]
    };
    let mut store = vec![0u64; words_for(n)];
    let bits = match given {
        Some(w) => Bits::Given(w),
        None => Bits::Fresh {
            key: KEY,
            first_block: 77,
            threshold: rng::threshold_for(0.6),
            store: Some(&mut store),
        },
    };
    let base = |v: &mut Vec<T>| unsafe {
        (v.as_mut_ptr() as *mut u8).add(l.start * std::mem::size_of::<T>())
    };
    let sp = base(&mut src);
    let dp = if in_place { sp } else { base(&mut dst) };
    let mut res = r.map(|r| r.to_vec());
    let rp = res.as_mut().map(|v| Operand {
        ptr: base(v),
        strides: &l.strides,
    });
    // SAFETY: the layout addresses elements start .. len of buffers of len elements, rows
    // never overlap (pad >= 0), and in place the two operands are the same view.
    unsafe {
        run_with::<T>(
            config,
            Call {
                shape: &l.shape,
                mask_shape,
                src: Operand {
                    ptr: sp,
                    strides: &l.strides,
                },
                dst: Operand {
                    ptr: dp,
                    strides: &l.strides,
                },
                res: rp,
                bits,
                app,
            },
        );
    }
    (if in_place { src } else { dst }, store)
}

/// Every path and thread count against the portable single-threaded one.
fn check_paths<T: Probe>(shape: &[usize], pad: usize, start: usize) {
    let l = layout::<T>(shape, pad, start);
    let x: Vec<T> = values(l.len, 1).into_iter().map(T::from_f64).collect();
    let r: Vec<T> = values(l.len, 2).into_iter().map(T::from_f64).collect();
    let n: usize = shape.iter().product();
    let nd = shape.len();
    let channel: Vec<usize> = shape
        .iter()
        .enumerate()
        .map(|(d, &s)| if d + 1 < nd || nd == 1 { s } else { 1 })
        .collect();
    let sample: Vec<usize> = shape
        .iter()
        .enumerate()
        .map(|(d, &s)| if d == 0 { s } else { 1 })
        .collect();
    let mask_words = bernoulli_words(KEY, 5, rng::threshold_for(0.5), n);
    let configs = [
        Config {
            isa: best_isa(),
            threads: 1,
        },
        Config {
            isa: best_isa(),
            threads: 2,
        },
        Config {
            isa: Isa::Portable,
            threads: 3,
        },
    ];
    for app in apps() {
        for res in [None, Some(&r[..])] {
            for (ms, given) in [
                (shape, None),
                (shape, Some(&mask_words[..])),
                (&channel[..], Some(&mask_words[..])),
                (&sample[..], Some(&mask_words[..])),
            ] {
                let what = format!(
                    "{} {shape:?} pad {pad} start {start} {app:?} res {} mask {ms:?} given {}",
                    std::any::type_name::<T>(),
                    res.is_some(),
                    given.is_some()
                );
                let case = Case {
                    l: &l,
                    mask_shape: ms,
                    x: &x,
                    r: res,
                    given,
                    app,
                };
                let (want, want_mask) = call::<T>(PORTABLE, case, false);
                for config in configs {
                    for in_place in [false, true] {
                        let (got, got_mask) = call::<T>(config, case, in_place);
                        assert_eq!(want_mask, got_mask, "{what}: mask on {config:?}");
                        if in_place {
                            // Outside the view the buffer keeps the input's values.
                            let (mut w, _) = call::<T>(PORTABLE, case, true);
                            w.truncate(got.len());
                            assert_same(&w, &got, &format!("{what} in place on {config:?}"));
                        } else {
                            assert_same(&want, &got, &format!("{what} on {config:?}"));
                        }
                    }
                }
            }
        }
    }
}

#[test]
fn vector_loops_match_the_portable_ones_on_odd_lengths_and_offsets() {
    for (shape, pad, start) in [
        (&[1][..], 0, 0),
        (&[63], 0, 1),
        (&[64], 0, 0),
        (&[65], 0, 3),
        (&[1000], 0, 1),
        (&[CHUNK + 77], 0, 5),
        (&[3, 5, 131], 0, 2),
        (&[4, 7, 67], 3, 1),
        (&[2, 3, 200], 1, 0),
    ] {
        check_paths::<f32>(shape, pad, start);
        check_paths::<f64>(shape, pad, start);
        check_paths::<f16>(shape, pad, start);
        check_paths::<bf16>(shape, pad, start);
    }
}

#[test]
fn masks_broadcast_over_a_middle_dimension_give_what_their_element_mask_gives() {
    for (shape, mask_shape, _) in MIDDLE_CASES {
        let m: usize = mask_shape.iter().product();
        let words = bernoulli_words(KEY, 3, rng::threshold_for(0.5), m);
        let want = broadcast_reference(&words, shape, mask_shape);
        let n = want.len();
        // The kernel gives, on every path and thread count, what the element mask gives.
        let element: Vec<u64> = (0..words_for(n))
            .map(|w| {
                (0..64)
                    .filter(|b| want.get(64 * w + b) == Some(&true))
                    .fold(0u64, |acc, b| acc | 1 << b)
            })
            .collect();
        let x: Vec<f32> = values(n, 4).into_iter().map(|v| v as f32).collect();
        let app = Application::Scale { scale: 1.25 };
        let mut want_out = vec![0f32; n];
        apply_contiguous(
            PORTABLE,
            Contiguous {
                shape,
                mask_shape: shape,
                res: None,
                bits: Bits::Given(&element),
                app,
            },
            &x,
            &mut want_out,
        );
        for threads in [1, 2] {
            for isa in [best_isa(), Isa::Portable] {
                let mut out = vec![0f32; n];
                let config = Config { isa, threads };
                let bits = Bits::Given(&words);
                apply_contiguous(
                    config,
                    Contiguous {
                        shape,
                        mask_shape,
                        res: None,
                        bits,
                        app,
                    },
                    &x,
                    &mut out,
                );
                assert_same(
                    &want_out,
                    &out,
                    &format!("{shape:?} {mask_shape:?} {config:?}"),
                );
            }
        }
    }
}

#[test]
fn threads_split_large_calls_without_changing_a_bit() {
    check_paths::<f32>(&[3, PARALLEL_MIN / 2 + 33], 0, 1);
    check_paths::<f16>(&[PARALLEL_MIN + 100], 0, 0);
    check_paths::<f64>(&[5, 4, PARALLEL_MIN / 16 + 3], 2, 0);
}

/// `len` elements of `buf` from element `off` past its first 64-byte boundary.
fn at_alignment<T>(buf: &mut [T], off: usize, len: usize) -> &mut [T] {
    let base = buf.as_ptr().align_offset(64);
    &mut buf[base + off..base + off + len]
}

/// Contiguous runs whose destination starts anywhere from a 64-byte boundary (so the head that
/// aligns the stores takes every length it can, or none below its minimum run), its source
/// and residual at the same or another offset, in place or not: the vector loops give the
/// portable loops' bits.
fn check_store_alignments<T: Probe>() {
    // Below the head's minimum run (whole words, then a tail of groups and a few elements),
    // at it, past it by a tail, and longer.
    let lens = [1024 + 37, 8191, 8192, 8192 + 37, 9000 + 99];
    let most = 9099;
    let words = bernoulli_words(KEY, 11, rng::threshold_for(0.5), most);
    let xs: Vec<T> = values(most + 64, 5).into_iter().map(T::from_f64).collect();
    let rs: Vec<T> = values(most + 64, 6).into_iter().map(T::from_f64).collect();
    let vector = Config {
        isa: best_isa(),
        threads: 1,
    };
    for n in lens {
        // Eight element offsets cover every store alignment of every element type.
        for dst_off in 0..8 {
            for src_off in [dst_off, (dst_off + 3) % 8] {
                for app in apps() {
                    for with_res in [false, true] {
                        for given in [true, false] {
                            let bits = || {
                                if given {
                                    Bits::Given(&words)
                                } else {
                                    Bits::Fresh {
                                        key: KEY,
                                        first_block: 3,
                                        threshold: rng::threshold_for(0.7),
                                        store: None,
                                    }
                                }
                            };
                            let mut x_buf = xs.clone();
                            let mut r_buf = rs.clone();
                            let src = &at_alignment(&mut x_buf, src_off, n)[..];
                            let r = &at_alignment(&mut r_buf, src_off, n)[..];
                            let res = with_res.then_some(r);
                            let what = format!(
                                "{} n {n} dst +{dst_off} src +{src_off} {app:?} res {with_res} \
                                 given {given}",
                                std::any::type_name::<T>()
                            );
                            let shape = [n];
                            let call = |res| Contiguous {
                                shape: &shape,
                                mask_shape: &shape,
                                res,
                                bits: bits(),
                                app,
                            };
                            let mut want = vec![T::from_f64(0.0); n];
                            apply_contiguous(PORTABLE, call(res), src, &mut want);
                            let mut out = xs.clone();
                            let dst = at_alignment(&mut out, dst_off, n);
                            apply_contiguous(vector, call(res), src, dst);
                            assert_same(&want, dst, &what);
                            // In place, the destination is the source (at the destination's
                            // offset), the residual elsewhere.
                            let mut inplace = xs.clone();
                            let data = at_alignment(&mut inplace, dst_off, n);
                            data.copy_from_slice(src);
                            apply_in_place(vector, call(res), data);
                            assert_same(&want, data, &format!("{what} in place"));
                        }
                    }
                }
            }
        }
    }
}

#[test]
fn vector_loops_match_the_portable_ones_at_every_store_alignment() {
    check_store_alignments::<f32>();
    check_store_alignments::<f64>();
    check_store_alignments::<f16>();
    check_store_alignments::<bf16>();
}

#[test]
fn streamed_outputs_match() {
    let n = STREAM_MIN_BYTES / 4 + 1000;
    for start in [0, 1, 4] {
        let l = layout::<f32>(&[n], 0, start);
        let x: Vec<f32> = values(l.len, 9).into_iter().map(|v| v as f32).collect();
        let r: Vec<f32> = values(l.len, 8).into_iter().map(|v| v as f32).collect();
        for res in [None, Some(&r[..])] {
            let case = Case {
                l: &l,
                mask_shape: &[n],
                x: &x,
                r: res,
                given: None,
                app: Application::Scale { scale: 2.5 },
            };
            let (want, _) = call::<f32>(PORTABLE, case, false);
            let config = Config {
                isa: best_isa(),
                threads: 2,
            };
            let (got, _) = call::<f32>(config, case, false);
            assert_same(&want, &got, "streamed f32");
        }
    }
}

#[test]
fn every_f16_value_gets_the_same_bits_on_every_path() {
    let x: Vec<f16> = (0..=u16::MAX).map(f16::from_bits).collect();
    let r: Vec<f16> = x.iter().rev().copied().collect();
    let n = x.len();
    let keep_all = vec![u64::MAX; words_for(n)];
    let half_kept = bernoulli_words(KEY, 0, rng::threshold_for(0.5), n);
    for app in [
        Application::Scale { scale: 1.0 / 0.9 },
        Application::Scale { scale: 3.0 },
        Application::Affine {
            a: 0.8,
            shift: -0.25,
            dropped: 0.1,
        },
    ] {
        for words in [&keep_all, &half_kept] {
            for res in [None, Some(&r[..])] {
                let mut want = vec![f16::ZERO; n];
                let mut got = vec![f16::ZERO; n];
                apply_contiguous(
                    PORTABLE,
                    Contiguous {
                        shape: &[n],
                        mask_shape: &[n],
                        res,
                        bits: Bits::Given(words),
                        app,
                    },
                    &x,
                    &mut want,
                );
                apply_contiguous(
                    Config {
                        isa: best_isa(),
                        threads: 1,
                    },
                    Contiguous {
                        shape: &[n],
                        mask_shape: &[n],
                        res,
                        bits: Bits::Given(words),
                        app,
                    },
                    &x,
                    &mut got,
                );
                assert_same(
                    &want,
                    &got,
                    &format!("f16 {app:?} residual {}", res.is_some()),
                );
            }
        }
    }
}

#[test]
fn the_safe_fronts_agree_with_each_other() {
    let n = 5000;
    let x: Vec<f32> = values(n, 4).into_iter().map(|v| v as f32).collect();
    let mut out = vec![0f32; n];
    let mut inplace = x.clone();
    let fresh = || Bits::Fresh {
        key: KEY,
        first_block: 9,
        threshold: rng::threshold_for(0.3),
        store: None,
    };
    let app = Application::Scale { scale: 1.0 / 0.3 };
    apply_contiguous(
        Config::current(),
        Contiguous {
            shape: &[n],
            mask_shape: &[n],
            res: None,
            bits: fresh(),
            app,
        },
        &x,
        &mut out,
    );
    apply_in_place(
        Config::current(),
        Contiguous {
            shape: &[n],
            mask_shape: &[n],
            res: None,
            bits: fresh(),
            app,
        },
        &mut inplace,
    );
    assert_same(&out, &inplace, "in place vs out of place");
    let kept = out.iter().filter(|v| **v != 0.0).count();
    assert!(
        (1200..1800).contains(&kept),
        "kept {kept} of {n} at keep 0.3"
    );
}

#[test]
#[should_panic(expected = "does not broadcast")]
fn the_safe_front_refuses_a_bad_mask_shape() {
    let x = vec![0f32; 6];
    let mut out = vec![0f32; 6];
    apply_contiguous(
        PORTABLE,
        Contiguous {
            shape: &[2, 3],
            mask_shape: &[3, 1],
            res: None,
            bits: Bits::Given(&[0]),
            app: Application::Scale { scale: 1.0 },
        },
        &x,
        &mut out,
    );
}

#[test]
fn a_channels_last_output_walked_in_memory_order_gets_every_logical_bit() {
    // Given bits on a channels-last (N, C, H, W) view are walked along the channels (memory
    // order), not across them; each element must still read the bit of its logical index and
    // (noise) the deviate of its mask index, on every path and thread count.
    let shape = [3usize, 80, 3, 5];
    let [n, c, h, w] = shape;
    let total = n * c * h * w;
    let size = std::mem::size_of::<f32>() as isize;
    let nhwc: Vec<isize> = [h * w * c, 1, w * c, c]
        .iter()
        .map(|&s| s as isize * size)
        .collect();
    let nchw: Vec<isize> = [c * h * w, h * w, w, 1]
        .iter()
        .map(|&s| s as isize * size)
        .collect();
    assert_eq!(walk::memory_order(&shape, &nhwc), Some(vec![0, 2, 3, 1]));
    assert_eq!(walk::memory_order(&shape, &nchw), None);
    let logical: Vec<f32> = values(total, 9).into_iter().map(|v| v as f32).collect();
    let addr = |i: usize, strides: &[isize]| {
        let (mut rem, mut off) = (i, 0isize);
        for d in (0..4).rev() {
            off += (rem % shape[d]) as isize * strides[d] / size;
            rem /= shape[d];
        }
        off as usize
    };
    let mut x_nhwc = vec![0f32; total];
    for (i, &v) in logical.iter().enumerate() {
        x_nhwc[addr(i, &nhwc)] = v;
    }
    for mask_shape in [[n, c, 1, 1], [n, 1, 1, 1], [1, c, 1, w], shape] {
        let m: usize = mask_shape.iter().product();
        let words = bernoulli_words(KEY, 5, rng::threshold_for(0.5), m);
        for app in apps() {
            let run = |config: Config, src: &[f32], strides: &[isize]| {
                let mut out = vec![0f32; total];
                // SAFETY: both layouts address each of the `total` elements of their buffers
                // exactly once.
                unsafe {
                    run_with::<f32>(
                        config,
                        Call {
                            shape: &shape,
                            mask_shape: &mask_shape,
                            src: Operand {
                                ptr: src.as_ptr() as *const u8 as *mut u8,
                                strides,
                            },
                            dst: Operand {
                                ptr: out.as_mut_ptr() as *mut u8,
                                strides,
                            },
                            res: None,
                            bits: Bits::Given(&words),
                            app,
                        },
                    )
                };
                out
            };
            let want = run(PORTABLE, &logical, &nchw);
            for threads in [1, 2] {
                for isa in [best_isa(), Isa::Portable] {
                    let got = run(Config { isa, threads }, &x_nhwc, &nhwc);
                    let got_logical: Vec<f32> = (0..total).map(|i| got[addr(i, &nhwc)]).collect();
                    assert_same(
                        &want,
                        &got_logical,
                        &format!("{mask_shape:?} {app:?} {isa:?}"),
                    );
                }
            }
        }
    }
}

/// A fresh mask drawn piece by piece without being stored gives, on every path and thread
/// count, each element the decision `keep_words` gives it over the whole call, across the
/// generator's pieces and the threads' chunks, at p = 0.1 (many planes) and 0.5 (one); a
/// dropped infinity or NaN is exactly 0.
#[test]
fn unstored_fresh_masks_follow_keep_words_across_pieces_and_chunks() {
    let n = 2 * CHUNK + 16384 + 1000 + 3;
    let special = [f32::INFINITY, f32::NEG_INFINITY, f32::NAN];
    let x: Vec<f32> = (0..n)
        .map(|i| {
            if i % 11 == 0 {
                special[i % 3]
            } else {
                i as f32 * 0.5 - 7.0
            }
        })
        .collect();
    for keep in [0.9, 0.5] {
        let threshold = rng::threshold_for(keep);
        let mut words = vec![0u64; words_for(n)];
        rng::keep_words(KEY, 21, threshold, &mut words);
        let scale = (1.0 / keep) as f32;
        for (isa, threads) in [(best_isa(), 1), (best_isa(), 2), (Isa::Portable, 1)] {
            let mut out = vec![7f32; n];
            apply_contiguous(
                Config { isa, threads },
                Contiguous {
                    shape: &[n],
                    mask_shape: &[n],
                    res: None,
                    bits: Bits::Fresh {
                        key: KEY,
                        first_block: 21,
                        threshold,
                        store: None,
                    },
                    app: Application::Scale { scale: 1.0 / keep },
                },
                &x,
                &mut out,
            );
            for (i, (&o, &v)) in out.iter().zip(&x).enumerate() {
                let want = if crate::mask::bit(&words, i) {
                    v * scale
                } else {
                    0.0
                };
                assert_eq!(
                    o.to_bits(),
                    want.to_bits(),
                    "element {i} keep {keep} {isa:?} threads {threads}"
                );
            }
        }
    }
}
