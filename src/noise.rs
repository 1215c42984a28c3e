//! Standard normal deviates, a pure function of (key, first block, index).
//!
//! **The mapping.** Deviates come in pairs: pair `k` is Box-Muller on the 32-bit words `2k` and
//! `2k + 1` of the counter stream from `first_block` (lanes 0-1 and 2-3 of block `first_block +
//! k / 2`, see `rng::fill_u32`). With `u = (w[2k] + 1/2) / 2^32` in (0, 1) and
//! `t = 2 pi w[2k + 1] / 2^32`, deviate `2k` is `sqrt(-2 ln u) cos t` and deviate `2k + 1` is
//! `sqrt(-2 ln u) sin t`: both outputs of the transform are used, two deviates a word pair, four
//! a counter block. Nothing depends on how a call is cut into chunks or threads.
//!
//! **Two precisions of one function.** Both compute it branch-free, with the angle reduced
//! *exactly* in integers (a quadrant and an octant reflection, so that `t` near a multiple of
//! pi / 2 keeps full relative precision) and polynomials of plain multiplies and adds, never
//! fused: the scalar loop and the AVX2 one (the same loop compiled for AVX2) give the same bits,
//! on any CPU. float64 deviates ([`normal_at`], [`fill_normals`] into `f64`) use fdlibm's `log`
//! and `sin`/`cos` kernels, within 4 units in the last place of libm's (tested). float32
//! deviates ([`fill_normals`] into `f32`) use Cephes' `logf`, `sinf` and `cosf`, with `1 - u`
//! kept to full precision where `u` would round to 1; each is within 5 units in the last place
//! of the f64 one (tested). A deviate's magnitude is below sqrt(2 ln 2^33) < 6.8.

use crate::kernel::{for_each_chunk, get_num_threads, isa, Isa};
use crate::rng::{self, Key};
use std::sync::Mutex;

/// Deviates per chunk: a multiple of four, so that every chunk starts on a counter block.
const CHUNK: usize = 1 << 14;
/// Deviates per vector step of the f32 loop: 8 pairs, one AVX2 register of each operand.
const STEP: usize = 16;
const _: () = assert!(CHUNK.is_multiple_of(4) && CHUNK.is_multiple_of(STEP));

/// A float type deviates are computed and stored in.
pub trait Deviate: Copy + Default + Send + Sync {
    /// The deviates (cosine, sine) of the pair of words (w0, w1).
    fn pair(w0: u32, w1: u32) -> (Self, Self);
}

impl Deviate for f32 {
    #[inline(always)]
    fn pair(w0: u32, w1: u32) -> (f32, f32) {
        let r = minus_two_ln_u(w0).sqrt();
        let (c, s) = cos_sin(w1);
        (r * c, r * s)
    }
}

impl Deviate for f64 {
    #[inline(always)]
    fn pair(w0: u32, w1: u32) -> (f64, f64) {
        let r = minus_two_ln_u_f64(w0).sqrt();
        let (c, s) = cos_sin_f64(w1);
        (r * c, r * s)
    }
}

/// `out[i]` = deviate `i` of the mapping, from `words` (words `2k`, `2k + 1` make pair `k`;
/// `words.len() >= 2 * ceil(out.len() / 2)`), on the vector path when `isa` allows.
fn from_words<T: Deviate>(isa: Isa, words: &[u32], out: &mut [T]) {
    let full = out.len() / STEP * STEP;
    let (body, tail) = out.split_at_mut(full);
    match isa {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `kernel::isa` is Avx2 only when this CPU has AVX2 (and F16C).
        Isa::Avx2 => unsafe { steps_avx2(&words[..full], body) },
        _ => steps(&words[..full], body),
    }
    for (w, o) in words[full..].chunks_exact(2).zip(tail.chunks_mut(2)) {
        let (c, s) = T::pair(w[0], w[1]);
        o[0] = c;
        if let Some(o1) = o.get_mut(1) {
            *o1 = s;
        }
    }
}

/// Deviates of whole steps of [`STEP`]: straight-line, branch-free code over 8 pairs that the
/// compiler turns into vector code (SSE2 or NEON here, AVX2 in [`steps_avx2`]).
#[inline(always)]
fn steps<T: Deviate>(words: &[u32], out: &mut [T]) {
    for (w, o) in words.chunks_exact(STEP).zip(out.chunks_exact_mut(STEP)) {
        let w: &[u32; STEP] = w.try_into().expect("a whole step");
        let o: &mut [T; STEP] = o.try_into().expect("a whole step");
        let mut c = [T::default(); STEP / 2];
        let mut s = [T::default(); STEP / 2];
        for j in 0..STEP / 2 {
            (c[j], s[j]) = T::pair(w[2 * j], w[2 * j + 1]);
        }
        for j in 0..STEP / 2 {
            o[2 * j] = c[j];
            o[2 * j + 1] = s[j];
        }
    }
}

/// [`steps`] compiled for AVX2: the same operations (never fused), so the same bits.
///
/// # Safety
/// The CPU must have AVX2.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn steps_avx2<T: Deviate>(words: &[u32], out: &mut [T]) {
    steps(words, out)
}

/// `-2 ln u` for `u = (w + 1/2) / 2^32`, in f64: `u` is exact (33 bits), and `ln u = e ln 2 +
/// log1p(f)` with `f = m - 1` exact for `m` in [sqrt(1/2), sqrt(2)), log1p as fdlibm's `log`
/// computes it (`s = f / (2 + f)`, its `Lg1`..`Lg7`).
#[inline(always)]
fn minus_two_ln_u_f64(w: u32) -> f64 {
    let u = (w as f64 + 0.5) * (1.0 / 4294967296.0);
    let bits = u.to_bits();
    let m = f64::from_bits((bits & 0x000F_FFFF_FFFF_FFFF) | 0x3FF0_0000_0000_0000);
    let big = m > std::f64::consts::SQRT_2;
    let m = if big { m * 0.5 } else { m };
    let e = ((bits >> 52) as i32 - 1023 + big as i32) as f64;
    let f = m - 1.0;
    let s = f / (2.0 + f);
    let z = s * s;
    let mut r = 1.479_819_860_511_658_6e-1;
    r = r * z + 1.531_383_769_920_937_3e-1;
    r = r * z + 1.818_357_216_161_805e-1;
    r = r * z + 2.222_219_843_214_978_4e-1;
    r = r * z + 2.857_142_874_366_239e-1;
    r = r * z + 3.999_999_999_940_942e-1;
    r = r * z + 6.666_666_666_666_735e-1;
    let r = r * z;
    let hfsq = 0.5 * f * f;
    const LN2_HI: f64 = 6.931_471_803_691_238e-1;
    const LN2_LO: f64 = 1.908_214_929_270_587_7e-10;
    let ln_u = e * LN2_HI - ((hfsq - (s * (hfsq + r) + e * LN2_LO)) - f);
    -2.0 * ln_u
}

/// `(cos t, sin t)` for `t = 2 pi w / 2^32`, in f64: the quadrant and octant as in
/// [`cos_sin`], then fdlibm's `__kernel_sin` / `__kernel_cos` polynomials on [0, pi/4].
#[inline(always)]
fn cos_sin_f64(w: u32) -> (f64, f64) {
    let q = w >> 30;
    let t = w & 0x3FFF_FFFF;
    let reflect = t >= 1 << 29;
    let k = if reflect { (1 << 30) - t } else { t };
    let phi = k as i32 as f64 * (std::f64::consts::FRAC_PI_2 / 1_073_741_824.0);
    let z = phi * phi;
    let mut r = 1.589_690_995_211_55e-10;
    r = r * z - 2.505_076_025_340_686_3e-8;
    r = r * z + 2.755_731_370_707_006_8e-6;
    r = r * z - 1.984_126_982_985_795e-4;
    r = r * z + 8.333_333_333_322_49e-3;
    let s = phi + phi * z * (-1.666_666_666_666_663_2e-1 + z * r);
    let mut r = -1.135_964_755_778_819_5e-11;
    r = r * z + 2.087_572_321_298_175e-9;
    r = r * z - 2.755_731_435_139_066_3e-7;
    r = r * z + 2.480_158_728_947_673e-5;
    r = r * z - 1.388_888_888_887_411e-3;
    r = r * z + 4.166_666_666_666_66e-2;
    let c = 1.0 - (0.5 * z - z * (z * r));
    let (c, s) = if reflect { (s, c) } else { (c, s) };
    let (c, s) = if q & 1 == 1 { (s, c) } else { (c, s) };
    let cos_sign = (((q + 1) >> 1 & 1) as u64) << 63;
    let sin_sign = ((q >> 1) as u64) << 63;
    (
        f64::from_bits(c.to_bits() ^ cos_sign),
        f64::from_bits(s.to_bits() ^ sin_sign),
    )
}

/// Deviate `index` of the mapping, in f64: what [`fill_normals`] writes into an `f64` slice.
pub fn normal_at(key: Key, first_block: u64, index: usize) -> f64 {
    let mut words = [0u32; 4];
    rng::fill_u32(
        key,
        first_block.wrapping_add((index / 4) as u64),
        &mut words,
    );
    let pair = 2 * ((index / 2) % 2);
    let (c, s) = f64::pair(words[pair], words[pair + 1]);
    if index.is_multiple_of(2) {
        c
    } else {
        s
    }
}

/// `-2 ln u` for `u = (w + 1/2) / 2^32`, in f32, to about one unit in the last place.
///
/// `ln u = e ln 2 + log1p(x)` with `x` in [sqrt(1/2) - 1, sqrt(2) - 1], `x` exact: for `u < 1/2`
/// from the exponent and mantissa of `w + 1/2`; for `u >= 1/2` from `v = 1 - u =
/// (!w + 1/2) / 2^32`, which f32 holds to full relative precision where `u` itself would round
/// to 1: `x = -v` (e = 0) or `x = 1 - 2v` (e = -1). log1p is Cephes' `logf` polynomial.
#[inline(always)]
fn minus_two_ln_u(w: u32) -> f32 {
    let upper = w >> 31 == 1;
    // Below 2^31 either way, so the signed conversion is exact in range.
    let t = if upper { !w } else { w };
    let a = (t as i32 as f32 + 0.5) * (1.0 / 4294967296.0);
    // u = a < 1/2: a = m 2^e with m in [1, 2), halved when above sqrt(2).
    let bits = a.to_bits();
    let m = f32::from_bits((bits & 0x007F_FFFF) | 0x3F80_0000);
    let big = m > std::f32::consts::SQRT_2;
    let m = if big { m * 0.5 } else { m };
    let e_low = ((bits >> 23) as i32 - 127 + big as i32) as f32;
    // u = 1 - a >= 1/2.
    let near_one = a <= 1.0 - std::f32::consts::FRAC_1_SQRT_2;
    let x_high = if near_one { -a } else { 1.0 - 2.0 * a };
    let e_high = if near_one { 0.0 } else { -1.0 };
    let (x, e) = if upper {
        (x_high, e_high)
    } else {
        (m - 1.0, e_low)
    };
    let z = x * x;
    let mut p = 7.037_683_6e-2f32;
    p = p * x - 1.151_461e-1;
    p = p * x + 1.167_699_9e-1;
    p = p * x - 1.242_014_1e-1;
    p = p * x + 1.424_932_3e-1;
    p = p * x - 1.666_805_8e-1;
    p = p * x + 2.000_071_5e-1;
    p = p * x - 2.499_999_4e-1;
    p = p * x + 3.333_333e-1;
    let mut y = x * z * p;
    y += e * -2.121_944_4e-4;
    y += -0.5 * z;
    let ln_u = x + y + e * 0.693_359_4;
    -2.0 * ln_u
}

/// `(cos t, sin t)` for `t = 2 pi w / 2^32`, in f32. The quadrant is the top two bits of `w`
/// and the octant reflection is exact in integers, so the polynomials (Cephes' `sinf`/`cosf`)
/// only see angles in [0, pi/4].
#[inline(always)]
fn cos_sin(w: u32) -> (f32, f32) {
    let q = w >> 30;
    let t = w & 0x3FFF_FFFF;
    let reflect = t >= 1 << 29;
    let k = if reflect { (1 << 30) - t } else { t };
    // k < 2^30 in two parts that f32 holds exactly (24 and 6 bits).
    const RADIANS: f32 = std::f32::consts::FRAC_PI_2 / 1_073_741_824.0;
    let phi = (k & !0x3F) as i32 as f32 * RADIANS + (k & 0x3F) as i32 as f32 * RADIANS;
    let z = phi * phi;
    let mut s = -1.951_529_6e-4f32;
    s = s * z + 8.332_161e-3;
    s = s * z - 1.666_665_5e-1;
    let s = s * z * phi + phi;
    let mut c = 2.443_315_7e-5f32;
    c = c * z - 1.388_731_6e-3;
    c = c * z + 4.166_664_6e-2;
    let c = c * z * z - 0.5 * z + 1.0;
    // (cos, sin) of the angle within its quadrant, then rotated by q quarter turns.
    let (c, s) = if reflect { (s, c) } else { (c, s) };
    let (c, s) = if q & 1 == 1 { (s, c) } else { (c, s) };
    let cos_sign = ((q + 1) >> 1 & 1) << 31;
    let sin_sign = (q >> 1) << 31;
    (
        f32::from_bits(c.to_bits() ^ cos_sign),
        f32::from_bits(s.to_bits() ^ sin_sign),
    )
}

/// `out[i]` = deviate `i` of the mapping (see the module) from counter blocks `first_block`..,
/// for every `i`, in parallel by index range. Uses at most `generator::blocks_for_normals
/// (out.len())` counter blocks (a quarter of a block per deviate; the reservation allows half).
pub fn fill_normals<T: Deviate>(key: Key, first_block: u64, out: &mut [T]) {
    fill_normals_on(isa(), key, first_block, out)
}

/// [`fill_normals`] on a chosen instruction set (`Isa::Avx2` only on a CPU that has it).
fn fill_normals_on<T: Deviate>(isa: Isa, key: Key, first_block: u64, out: &mut [T]) {
    let n = out.len();
    // Each chunk's slice is taken out of its slot by whichever thread runs the chunk.
    let slots: Vec<Mutex<Option<&mut [T]>>> =
        out.chunks_mut(CHUNK).map(|c| Mutex::new(Some(c))).collect();
    for_each_chunk(get_num_threads(), n, slots.len(), |c| {
        let taken = slots[c].lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(o) = taken {
            fill_range(
                isa,
                key,
                first_block.wrapping_add((c * CHUNK / 4) as u64),
                o,
            );
        }
    });
}

/// Deviates 0.. of `out` from counter blocks `first_block`.. (four a block).
fn fill_range<T: Deviate>(isa: Isa, key: Key, first_block: u64, out: &mut [T]) {
    let mut words = vec![0u32; 4 * out.len().div_ceil(4)];
    rng::fill_u32(key, first_block, &mut words);
    from_words(isa, &words, out);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernel::{best_isa, set_num_threads};

    const KEY: Key = Key {
        seed: 0x1234_5678_9abc_def0,
        stream: 7,
    };

    #[test]
    fn deviates_are_normal_at_for_any_length_offset_and_thread_count() {
        let n = 3 * CHUNK + 5; // several chunks and an odd tail
        let first = u64::MAX - 10; // the counter wraps inside the call
        let mut one = vec![0f64; n];
        set_num_threads(1).unwrap();
        fill_normals(KEY, first, &mut one);
        for (i, &v) in one.iter().enumerate() {
            assert_eq!(v.to_bits(), normal_at(KEY, first, i).to_bits(), "index {i}");
        }
        set_num_threads(3).unwrap();
        let mut three = vec![0f64; n];
        fill_normals(KEY, first, &mut three);
        assert_eq!(one, three);
        // Any prefix is the same deviates; so is an f32 fill on one thread and on three.
        let mut single = vec![0f64; 7];
        fill_normals(KEY, first, &mut single);
        assert_eq!(single, one[..7]);
        let mut f1 = vec![0f32; n];
        set_num_threads(1).unwrap();
        fill_normals(KEY, first, &mut f1);
        set_num_threads(3).unwrap();
        let mut f3 = vec![0f32; n];
        fill_normals(KEY, first, &mut f3);
        assert_eq!(f1, f3);
        let mut short = vec![0f32; 19];
        fill_normals(KEY, first, &mut short);
        assert_eq!(short, f1[..19]);
    }

    /// Words that reach every branch and edge: u at both ends and around 1/2 and
    /// 1 - sqrt(1/2), angles at and around every quadrant and octant boundary.
    fn edge_words() -> Vec<u32> {
        let mut w = vec![0, 1, 2, 3, u32::MAX, u32::MAX - 1, u32::MAX - 2];
        for b in [
            1u32 << 29,
            1 << 30,
            3 << 29,
            1 << 31,
            5 << 29,
            3 << 30,
            7 << 29,
        ] {
            w.extend([b - 2, b - 1, b, b + 1, b + 2]);
        }
        // u = 1 - v around v = 1 - sqrt(1/2).
        let v = ((1.0 - std::f64::consts::FRAC_1_SQRT_2) * 4294967296.0) as u32;
        w.extend((0..9).map(|d| u32::MAX - (v - 4 + d)));
        w
    }

    fn sample_words(n: usize) -> Vec<u32> {
        let mut w = vec![0u32; n];
        rng::fill_u32(
            Key {
                seed: 99,
                stream: 1,
            },
            0,
            &mut w,
        );
        w
    }

    /// Every pair of edge words, then 2^20 pairs of random ones.
    fn test_pairs() -> Vec<(u32, u32)> {
        let edges = edge_words();
        let mut pairs: Vec<(u32, u32)> = edges
            .iter()
            .flat_map(|&a| edges.iter().map(move |&b| (a, b)))
            .collect();
        let w = sample_words(1 << 21);
        pairs.extend(w.chunks_exact(2).map(|p| (p[0], p[1])));
        pairs
    }

    /// `|a - b|` in units of the spacing of `T` at `|b|`, less an absolute `slack`.
    fn ulps<T: Into<f64>>(a: T, b: f64, spacing: impl Fn(f64) -> f64, slack: f64) -> f64 {
        ((a.into() - b).abs() - slack).max(0.0) / spacing(b.abs())
    }

    fn f32_spacing(x: f64) -> f64 {
        let bits = (x as f32).max(f32::MIN_POSITIVE).to_bits();
        f32::from_bits(bits + 1) as f64 - f32::from_bits(bits) as f64
    }

    fn f64_spacing(x: f64) -> f64 {
        let bits = x.max(f64::MIN_POSITIVE).to_bits();
        f64::from_bits(bits + 1) - f64::from_bits(bits)
    }

    #[test]
    fn f64_deviates_are_the_libm_box_muller_to_a_few_ulps() {
        let mut worst = 0f64;
        for (w0, w1) in test_pairs() {
            let u = (w0 as f64 + 0.5) / 4294967296.0;
            let r = (-2.0 * u.ln()).sqrt();
            let (c, s) = f64::pair(w0, w1);
            // The naive formula: right to 1e-14 (2 pi w / 2^32 rounded is off by up to 1.3e-15
            // radians, times a radius below 6.8), which catches any quadrant or sign mistake.
            let t = std::f64::consts::TAU * (w1 as f64 / 4294967296.0);
            assert!((c - r * t.cos()).abs() < 1e-14 && (s - r * t.sin()).abs() < 1e-14);
            // libm on the exactly reduced angle (an octant and a reflection, as the pair
            // computes it): the polynomials and the logarithm to a few units in the last place.
            let (q, k) = (w1 >> 30, w1 & 0x3FFF_FFFF);
            let phi = |k: u32| std::f64::consts::FRAC_PI_2 * (k as f64 / 1_073_741_824.0);
            let (sq, cq) = if k >= 1 << 29 {
                let (s, c) = phi((1 << 30) - k).sin_cos();
                (c, s)
            } else {
                phi(k).sin_cos()
            };
            let (cos_t, sin_t) = [(cq, sq), (-sq, cq), (-cq, -sq), (sq, -cq)][q as usize];
            for (a, b) in [(c, r * cos_t), (s, r * sin_t)] {
                let err = ulps(a, b, f64_spacing, 0.0);
                assert!(err <= 4.0, "words {w0:#x} {w1:#x}: {a} vs {b} ({err} ulp)");
                worst = worst.max(err);
            }
        }
        // Observed: 3 ulp at worst over these pairs.
        assert!(worst > 0.0); // the comparison saw rounding, so it compared two computations
    }

    #[test]
    fn f32_deviates_are_the_f64_ones_to_a_few_ulps() {
        let mut worst = 0f64;
        for (w0, w1) in test_pairs() {
            let (c32, s32) = f32::pair(w0, w1);
            let (c64, s64) = f64::pair(w0, w1);
            for (a, b) in [(c32, c64), (s32, s64)] {
                let err = ulps(a, b, f32_spacing, 0.0);
                assert!(err <= 5.0, "words {w0:#x} {w1:#x}: {a} vs {b} ({err} ulp)");
                worst = worst.max(err);
            }
        }
        // Observed: 3.99 ulp at worst over these pairs; 5 leaves room for other samples.
        assert!(worst > 0.0); // the comparison saw rounding, so it compared two computations
    }

    fn vector_equals_portable<T: Deviate + Into<f64>>() {
        let mut w = edge_words();
        w.extend(sample_words(1 << 16));
        w.truncate(w.len() / STEP * STEP);
        let n = w.len() - 3; // an odd tail past the last whole step
        let mut fast = vec![T::default(); n];
        let mut plain = vec![T::default(); n];
        from_words(best_isa(), &w, &mut fast);
        from_words(Isa::Portable, &w, &mut plain);
        let bits = |v: &[T]| v.iter().map(|&x| x.into().to_bits()).collect::<Vec<u64>>();
        assert_eq!(bits(&fast), bits(&plain));
        let mut whole = vec![T::default(); 1 << 15];
        fill_normals_on(best_isa(), KEY, 5, &mut whole);
        let mut portable = vec![T::default(); 1 << 15];
        fill_normals_on(Isa::Portable, KEY, 5, &mut portable);
        assert_eq!(bits(&whole), bits(&portable));
    }

    #[test]
    fn the_vector_path_gives_the_portable_bits() {
        if best_isa() == Isa::Portable {
            return;
        }
        vector_equals_portable::<f32>();
        vector_equals_portable::<f64>();
    }

    #[test]
    fn deviates_have_mean_zero_and_unit_variance() {
        fn check(v: &[f64], what: &str) {
            let n = v.len() as f64;
            let mean = v.iter().sum::<f64>() / n;
            let var = v.iter().map(|x| (x - mean) * (x - mean)).sum::<f64>() / (n - 1.0);
            // Six standard errors: sd(mean) = 1/sqrt(n), sd(var) = sqrt(2/(n-1)).
            assert!(mean.abs() < 6.0 / n.sqrt(), "{what} mean {mean}");
            assert!(
                (var - 1.0).abs() < 6.0 * (2.0 / (n - 1.0)).sqrt(),
                "{what} variance {var}"
            );
        }
        let mut v = vec![0f64; 1 << 18];
        fill_normals(Key { seed: 3, stream: 0 }, 0, &mut v);
        check(&v, "f64");
        let mut f = vec![0f32; 1 << 18];
        fill_normals(Key { seed: 3, stream: 0 }, 0, &mut f);
        check(&f.iter().map(|&x| x as f64).collect::<Vec<_>>(), "f32");
        // The two partners of a pair are uncorrelated (the sine is not a copy of the cosine).
        let n = (v.len() / 2) as f64;
        let cross = v.chunks_exact(2).map(|p| p[0] * p[1]).sum::<f64>() / n;
        assert!(cross.abs() < 6.0 / n.sqrt(), "pair correlation {cross}");
    }
}
