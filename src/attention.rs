//! Attention's softmax and dropout in one pass over the weights, and their backward in one pass.
//!
//! Scaled dot-product attention is `softmax(scale * Q K^T + bias) V` with a dropout on the
//! softmax output (the attention weights). The two matrix products stay with the caller's BLAS;
//! what lies between them is here: per row of the `(rows, lk)` weights, the logits' scale, a
//! causal limit, the softmax and the dropout, with the keep bits drawn for the row's own range
//! of the mask (decision `e` is element `e` of the flat weights, as for every element mask, so
//! the bits are the same as `kernel::bernoulli_words` of the same key would give).
//!
//! The forward writes the softmax output `P` over the logits (what the backward needs) and the
//! dropped weights `P * mask * scale` (what multiplies V), and stores the mask as bits. The
//! backward takes the gradient of the dropped weights and turns it, in place, into the gradient
//! of the logits, `P * (dP - rowsum(dP * P))` with `dP = dPd * mask * scale`, while it writes the
//! dropped weights again for the gradient of V: nothing of the weights' size but `P` is held
//! between the two passes.
//!
//! A row whose logits are all `-inf` (every key masked) gets zero weights, as torch's math
//! attention gives (its `_safe_softmax`), not the NaN of a plain softmax.

use crate::error::Result;
use crate::kernel::{self, Element, OpFloat};
use crate::rng::{self, Key};
use std::sync::Mutex;

/// One chunk's slices, taken by the thread that runs the chunk.
type Slot<S> = Mutex<Option<S>>;
/// A forward chunk: its logits (softmax in place), dropped weights and keep words.
type ForwardChunk<'a, T> = (&'a mut [T], &'a mut [T], &'a mut [u64]);
/// A backward chunk: its softmax, gradient (in place) and dropped weights.
type BackwardChunk<'a, T> = (&'a [T], &'a mut [T], &'a mut [T]);

fn take<S>(slot: &Slot<S>) -> Option<S> {
    // Nothing panics while the lock is held, but poisoning must not become a panic either.
    slot.lock().unwrap_or_else(|e| e.into_inner()).take()
}
use std::ops::{Div, Sub};

/// Lanes of the running sums and maxima: a fixed number, so that the order of the additions,
/// hence the result, does not depend on the instruction set.
const LANES: usize = 8;
/// Weights a work item covers, about: enough to amortise a task, little enough for L2.
const ITEM_ELEMENTS: usize = 1 << 15;

/// The dropout on the weights: Bernoulli(threshold / 2^32) keep decisions drawn from
/// `first_block` of `key`, kept weights multiplied by `scale`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct WeightDropout {
    pub key: Key,
    pub first_block: u64,
    pub threshold: u64,
    /// `1 / keep` (0 when nothing is kept).
    pub scale: f64,
}

/// The shape of the weights: rows of `lk` keys; row `r` belongs to query `r % lq` (the rows of
/// one (batch, head) are its `lq` queries in order). With `causal`, query `i` sees keys `0..=i`
/// (torch's `is_causal`: the upper triangle, aligned top-left, is masked).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Rows {
    pub lq: usize,
    pub lk: usize,
    pub causal: bool,
}

impl Rows {
    /// Keys query row `r` sees.
    fn visible(&self, r: usize) -> usize {
        if self.causal {
            (r % self.lq + 1).min(self.lk)
        } else {
            self.lk
        }
    }

    fn check(&self, len: usize) -> Result<usize> {
        if self.lk == 0 || self.lq == 0 {
            return if len == 0 {
                Ok(0)
            } else {
                crate::value_err!(
                    "attention weights with lq={} lk={} must be empty",
                    self.lq,
                    self.lk
                )
            };
        }
        if !len.is_multiple_of(self.lk) || !(len / self.lk).is_multiple_of(self.lq) {
            return crate::value_err!(
                "attention weights of {len} elements are not whole ({}, {}) matrices",
                self.lq,
                self.lk
            );
        }
        Ok(len / self.lk)
    }
}

/// The arithmetic of the softmax, in the element's compute type.
pub trait SoftmaxFloat: OpFloat + Sub<Output = Self> + Div<Output = Self> + PartialOrd {
    const NEG_INF: Self;
    const ONE: Self;
    fn exp(self) -> Self;
    /// The larger of the two, ignoring a NaN (as `f32::max`).
    fn max(self, other: Self) -> Self;
}

impl SoftmaxFloat for f32 {
    const NEG_INF: Self = f32::NEG_INFINITY;
    const ONE: Self = 1.0;
    #[inline(always)]
    fn exp(self) -> f32 {
        exp_f32(self)
    }
    #[inline(always)]
    fn max(self, other: f32) -> f32 {
        f32::max(self, other)
    }
}

impl SoftmaxFloat for f64 {
    const NEG_INF: Self = f64::NEG_INFINITY;
    const ONE: Self = 1.0;
    #[inline(always)]
    fn exp(self) -> f64 {
        f64::exp(self)
    }
    #[inline(always)]
    fn max(self, other: f64) -> f64 {
        f64::max(self, other)
    }
}

/// `e^x` for the softmax's `x <= 0`, within 2 ulp (Cephes' `expf`), with no branch or call so
/// that a row's loop vectorises: `x = n ln 2 + r`, a degree-6 polynomial for `e^r` and `2^n` put
/// into the exponent bits. Below -87.3 (where `e^x` is subnormal) it returns 0, and `-inf`
/// gives 0; NaN stays NaN. Valid for `x <= 88`, all a softmax ever passes it.
#[inline(always)]
pub fn exp_f32(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    // Adding 1.5 * 2^23 rounds to an integer in the low mantissa bits (round to nearest).
    const ROUND: f32 = 12_582_912.0;
    let lo = -87.3f32;
    let xc = if x < lo { lo } else { x };
    let t = xc * LOG2E + ROUND;
    let n = t - ROUND;
    let r = xc - n * LN2_HI - n * LN2_LO;
    let z = r * r;
    let p = ((((1.987_569_2e-4 * r + 1.398_199_9e-3) * r + 8.333_452e-3) * r + 4.166_579_6e-2) * r
        + 1.666_666_5e-1)
        * r
        + 0.5;
    let y = p * z + r + 1.0;
    let pow2 = f32::from_bits(((t.to_bits() as i32 - 0x4B40_0000 + 127) as u32) << 23);
    if x < lo {
        0.0
    } else {
        y * pow2
    }
}

#[cfg(test)]
fn bit(words: &[u64], i: usize) -> bool {
    (words[i >> 6] >> (i & 63)) & 1 == 1
}

/// The 64 keep bits from bit `pos` on (zeros past the end of `words`).
#[inline(always)]
fn bits_at(words: &[u64], pos: usize) -> u64 {
    let (i, sh) = (pos >> 6, pos & 63);
    let lo = words.get(i).map_or(0, |w| w >> sh);
    if sh == 0 {
        lo
    } else {
        lo | words.get(i + 1).map_or(0, |w| w << (64 - sh))
    }
}

/// `a > b ? a : b`, which ignores a NaN `b` and compiles to one vector max.
#[inline(always)]
fn larger<F: SoftmaxFloat>(a: F, b: F) -> F {
    if b > a {
        b
    } else {
        a
    }
}

/// `f` folded over `v` in `LANES` interleaved lanes, then across the lanes: a fixed order of
/// operations (the same result on every path) that vectorises.
#[inline(always)]
fn lane_fold<F: SoftmaxFloat>(v: &[F], init: F, f: impl Fn(F, F) -> F) -> F {
    let mut lanes = [init; LANES];
    let mut chunks = v.chunks_exact(LANES);
    for c in &mut chunks {
        for (l, &x) in lanes.iter_mut().zip(c) {
            *l = f(*l, x);
        }
    }
    for (l, &x) in lanes.iter_mut().zip(chunks.remainder()) {
        *l = f(*l, x);
    }
    lanes.iter().fold(init, |a, &b| f(a, b))
}

/// Softmax and dropout of one row: `x` holds the row's logits and receives `P`; `d` receives
/// the dropped weights; `bits` holds the row's keep decisions from bit `bit0`.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn forward_row<T: Element>(
    x: &mut [T],
    d: &mut [T],
    visible: usize,
    logit_scale: T::Op,
    keep_scale: T::Op,
    bits: &[u64],
    bit0: usize,
    buf: &mut [T::Op],
) where
    T::Op: SoftmaxFloat,
{
    let zero = T::from_op(T::Op::ZERO);
    let buf = &mut buf[..visible];
    // Element-wise maps and 8-lane reductions in separate loops: each vectorises on its own.
    for (o, &v) in buf.iter_mut().zip(&x[..visible]) {
        *o = v.to_op() * logit_scale;
    }
    let m = lane_fold(buf, T::Op::NEG_INF, larger);
    if m == T::Op::NEG_INF {
        // Every key masked (or none visible): zero weights, as torch's `_safe_softmax`.
        x.fill(zero);
        d.fill(zero);
        return;
    }
    for v in buf.iter_mut() {
        *v = (*v - m).exp();
    }
    let sum = lane_fold(buf, T::Op::ZERO, |a, b| a + b);
    let inv = T::Op::ONE / sum;
    for (j0, ((bb, xb), db)) in buf
        .chunks(64)
        .zip(x.chunks_mut(64))
        .zip(d.chunks_mut(64))
        .enumerate()
    {
        let word = bits_at(bits, bit0 + 64 * j0);
        for (jj, ((&e, xo), dout)) in bb.iter().zip(xb.iter_mut()).zip(db.iter_mut()).enumerate() {
            let p = T::from_op(e * inv);
            *xo = p;
            *dout = if (word >> jj) & 1 == 1 {
                T::from_op(p.to_op() * keep_scale)
            } else {
                zero
            };
        }
    }
    x[visible..].fill(zero);
    d[visible..].fill(zero);
}

/// One work item of the forward: whole rows from a group boundary, with their mask words.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn forward_item<T: Element>(
    x: &mut [T],
    d: &mut [T],
    words: &mut [u64],
    first_row: usize,
    rows: Rows,
    logit_scale: f64,
    drop: &WeightDropout,
    first_block: u64,
) where
    T::Op: SoftmaxFloat,
{
    rng::keep_words(drop.key, first_block, drop.threshold, words);
    let (ls, ks) = (T::Op::from_f64(logit_scale), T::Op::from_f64(drop.scale));
    let mut buf = vec![T::Op::ZERO; rows.lk];
    for (i, (xr, dr)) in x.chunks_mut(rows.lk).zip(d.chunks_mut(rows.lk)).enumerate() {
        let visible = rows.visible(first_row + i);
        forward_row(xr, dr, visible, ls, ks, words, i * rows.lk, &mut buf);
    }
}

#[cfg(target_arch = "x86_64")]
/// # Safety
/// The CPU must support AVX2.
#[target_feature(enable = "avx2")]
#[allow(clippy::too_many_arguments)]
unsafe fn forward_item_avx2<T: Element>(
    x: &mut [T],
    d: &mut [T],
    words: &mut [u64],
    first_row: usize,
    rows: Rows,
    logit_scale: f64,
    drop: &WeightDropout,
    first_block: u64,
) where
    T::Op: SoftmaxFloat,
{
    forward_item(x, d, words, first_row, rows, logit_scale, drop, first_block)
}

fn use_avx2() -> bool {
    crate::cpu::isa() == crate::cpu::Isa::Avx2
}

/// Rows per forward work item: a whole number of the generator's 256-decision groups, so that
/// every item draws and stores its own mask words and no word is shared by two items.
fn forward_item_rows(lk: usize) -> usize {
    let unit = rng::GROUP / gcd(lk, rng::GROUP);
    unit * ITEM_ELEMENTS.div_ceil(unit * lk).max(1)
}

fn gcd(mut a: usize, mut b: usize) -> usize {
    while b != 0 {
        (a, b) = (b, a % b);
    }
    a
}

/// Words of mask a forward over `n` weights stores.
pub fn mask_words(n: usize) -> usize {
    kernel::words_for(n)
}

/// The forward pass over the weights, whose logits are in `scores` (`Q K^T`, or with a bias
/// already `scale * Q K^T + bias` and `logit_scale` 1): afterwards `scores` holds the softmax
/// `P` and `dropped` holds `P * mask * drop.scale`; `words` (`mask_words(n)` of them) receives the
/// keep bits, bit `e` for weight `e` in C order, drawn as `kernel::bernoulli_words(drop.key,
/// drop.first_block, drop.threshold, n)` draws them.
pub fn softmax_dropout_forward<T: Element>(
    scores: &mut [T],
    dropped: &mut [T],
    words: &mut [u64],
    rows: Rows,
    logit_scale: f64,
    drop: &WeightDropout,
) -> Result<()>
where
    T::Op: SoftmaxFloat,
{
    let n = scores.len();
    rows.check(n)?;
    if dropped.len() != n || words.len() != mask_words(n) {
        return crate::value_err!(
            "softmax_dropout_forward: {n} weights need {n} dropped weights and {} mask words, got {} and {}",
            mask_words(n),
            dropped.len(),
            words.len()
        );
    }
    if n == 0 {
        return Ok(());
    }
    let item_rows = forward_item_rows(rows.lk);
    let per = item_rows * rows.lk;
    let avx2 = use_avx2();
    // fastdrop's own pool (fork-safe, set_num_threads, backs off when helpers do not pay), not
    // rayon's global one: each chunk's slices are taken out of its slot by whichever thread runs
    // it, and a chunk's bits depend on its index alone.
    let slots: Vec<Slot<ForwardChunk<T>>> = scores
        .chunks_mut(per)
        .zip(dropped.chunks_mut(per))
        .zip(words.chunks_mut(per / 64))
        .map(|((x, d), w)| Mutex::new(Some((x, d, w))))
        .collect();
    kernel::for_each_chunk(kernel::get_num_threads(), n, slots.len(), |c| {
        let Some((x, d, w)) = take(&slots[c]) else {
            return;
        };
        // Element e's group starts at block e / 4 (64 blocks per 256 decisions).
        let first = drop.first_block.wrapping_add((c * per / 4) as u64);
        let first_row = c * item_rows;
        #[cfg(target_arch = "x86_64")]
        if avx2 {
            // SAFETY: `use_avx2` saw AVX2 on this CPU.
            unsafe { forward_item_avx2(x, d, w, first_row, rows, logit_scale, drop, first) };
            return;
        }
        let _ = avx2;
        forward_item(x, d, w, first_row, rows, logit_scale, drop, first);
    });
    kernel::clear_tail(words, n);
    Ok(())
}

/// The backward of one row: `g` holds the gradient of the dropped weights and receives the
/// gradient of the logits; `d` receives the dropped weights again.
#[inline(always)]
fn backward_row<T: Element>(
    p: &[T],
    g: &mut [T],
    d: &mut [T],
    keep_scale: T::Op,
    bits: &[u64],
    bit0: usize,
    bufs: (&mut [T::Op], &mut [T::Op]),
) where
    T::Op: SoftmaxFloat,
{
    let zero = T::from_op(T::Op::ZERO);
    let (dp, pf) = bufs;
    for (j0, (((dpb, pfb), gb), pb)) in dp
        .chunks_mut(64)
        .zip(pf.chunks_mut(64))
        .zip(g.chunks(64))
        .zip(p.chunks(64))
        .enumerate()
    {
        let word = bits_at(bits, bit0 + 64 * j0);
        for (jj, (((o, q), &gv), &pv)) in dpb
            .iter_mut()
            .zip(pfb.iter_mut())
            .zip(gb)
            .zip(pb)
            .enumerate()
        {
            *o = if (word >> jj) & 1 == 1 {
                gv.to_op() * keep_scale
            } else {
                T::Op::ZERO
            };
            *q = pv.to_op();
        }
    }
    let mut lanes = [T::Op::ZERO; LANES];
    let mut chunks = dp.chunks_exact(LANES).zip(pf.chunks_exact(LANES));
    for (a, b) in &mut chunks {
        for ((l, &x), &y) in lanes.iter_mut().zip(a).zip(b) {
            *l = *l + x * y;
        }
    }
    let tail = dp.len() - dp.len() % LANES;
    for ((l, &x), &y) in lanes.iter_mut().zip(&dp[tail..]).zip(&pf[tail..]) {
        *l = *l + x * y;
    }
    let dot = lanes.iter().fold(T::Op::ZERO, |a, &b| a + b);
    for (j0, (((dpb, pfb), gb), db)) in dp
        .chunks(64)
        .zip(pf.chunks(64))
        .zip(g.chunks_mut(64))
        .zip(d.chunks_mut(64))
        .enumerate()
    {
        let word = bits_at(bits, bit0 + 64 * j0);
        for (jj, (((&x, &pv), gv), dv)) in dpb
            .iter()
            .zip(pfb)
            .zip(gb.iter_mut())
            .zip(db.iter_mut())
            .enumerate()
        {
            *gv = T::from_op(pv * (x - dot));
            *dv = if (word >> jj) & 1 == 1 {
                T::from_op(pv * keep_scale)
            } else {
                zero
            };
        }
    }
}

#[inline(always)]
fn backward_item<T: Element>(
    p: &[T],
    g: &mut [T],
    d: &mut [T],
    words: &[u64],
    first_row: usize,
    lk: usize,
    keep_scale: f64,
) where
    T::Op: SoftmaxFloat,
{
    let ks = T::Op::from_f64(keep_scale);
    let mut dp = vec![T::Op::ZERO; lk];
    let mut pf = vec![T::Op::ZERO; lk];
    for (i, ((pr, gr), dr)) in p
        .chunks(lk)
        .zip(g.chunks_mut(lk))
        .zip(d.chunks_mut(lk))
        .enumerate()
    {
        let bit0 = (first_row + i) * lk;
        backward_row(pr, gr, dr, ks, words, bit0, (&mut dp, &mut pf));
    }
}

#[cfg(target_arch = "x86_64")]
/// # Safety
/// The CPU must support AVX2.
#[target_feature(enable = "avx2")]
unsafe fn backward_item_avx2<T: Element>(
    p: &[T],
    g: &mut [T],
    d: &mut [T],
    words: &[u64],
    first_row: usize,
    lk: usize,
    keep_scale: f64,
) where
    T::Op: SoftmaxFloat,
{
    backward_item(p, g, d, words, first_row, lk, keep_scale)
}

/// The backward pass: `probs` is the forward's `P`, `grad` the gradient of the dropped weights,
/// which becomes the gradient of the logits (`scale * Q K^T + bias`, before `logit_scale`);
/// `dropped` receives `P * mask * keep_scale` again; `words` is the forward's mask.
pub fn softmax_dropout_backward<T: Element>(
    probs: &[T],
    grad: &mut [T],
    dropped: &mut [T],
    words: &[u64],
    lk: usize,
    keep_scale: f64,
) -> Result<()>
where
    T::Op: SoftmaxFloat,
{
    let n = probs.len();
    if lk == 0 || !n.is_multiple_of(lk) {
        return crate::value_err!("{n} attention weights are not whole rows of {lk}");
    }
    if grad.len() != n || dropped.len() != n || words.len() < mask_words(n) {
        return crate::value_err!(
            "softmax_dropout_backward: {n} weights need {n} gradients, {n} dropped weights and {} mask words, got {}, {} and {}",
            mask_words(n),
            grad.len(),
            dropped.len(),
            words.len()
        );
    }
    let item_rows = ITEM_ELEMENTS.div_ceil(lk).max(1);
    let per = item_rows * lk;
    let avx2 = use_avx2();
    let slots: Vec<Slot<BackwardChunk<T>>> = probs
        .chunks(per)
        .zip(grad.chunks_mut(per))
        .zip(dropped.chunks_mut(per))
        .map(|((p, g), d)| Mutex::new(Some((p, g, d))))
        .collect();
    kernel::for_each_chunk(kernel::get_num_threads(), n, slots.len(), |c| {
        let Some((p, g, d)) = take(&slots[c]) else {
            return;
        };
        let first_row = c * item_rows;
        #[cfg(target_arch = "x86_64")]
        if avx2 {
            // SAFETY: `use_avx2` saw AVX2 on this CPU.
            unsafe { backward_item_avx2(p, g, d, words, first_row, lk, keep_scale) };
            return;
        }
        let _ = avx2;
        backward_item(p, g, d, words, first_row, lk, keep_scale);
    });
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use half::{bf16, f16};

    const KEY: Key = Key { seed: 7, stream: 3 };

    fn logits(n: usize, seed: u64) -> Vec<f64> {
        // A small LCG: deterministic values in [-4, 4).
        let mut s = seed.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1);
        (0..n)
            .map(|_| {
                s = s
                    .wrapping_mul(6_364_136_223_846_793_005)
                    .wrapping_add(1_442_695_040_888_963_407);
                ((s >> 11) as f64 / (1u64 << 53) as f64) * 8.0 - 4.0
            })
            .collect()
    }

    fn dropout(keep: f64, first_block: u64) -> WeightDropout {
        WeightDropout {
            key: KEY,
            first_block,
            threshold: rng::threshold_for(keep),
            scale: if keep > 0.0 { 1.0 / keep } else { 0.0 },
        }
    }

    /// The definition, in f64: softmax of `scale * x` over the visible keys, then the mask.
    fn naive(x: &[f64], rows: Rows, scale: f64, words: &[u64], ks: f64) -> (Vec<f64>, Vec<f64>) {
        let mut p = vec![0.0; x.len()];
        let mut d = vec![0.0; x.len()];
        for (r, row) in x.chunks(rows.lk).enumerate() {
            let vis = rows.visible(r);
            let m = row[..vis]
                .iter()
                .map(|v| v * scale)
                .fold(f64::NEG_INFINITY, f64::max);
            if m == f64::NEG_INFINITY {
                continue;
            }
            let sum: f64 = row[..vis].iter().map(|v| (v * scale - m).exp()).sum();
            for (j, v) in row[..vis].iter().enumerate() {
                let e = r * rows.lk + j;
                p[e] = (v * scale - m).exp() / sum;
                d[e] = if bit(words, e) { p[e] * ks } else { 0.0 };
            }
        }
        (p, d)
    }

    #[test]
    fn exp_f32_is_close_to_exp() {
        let mut worst = 0.0f64;
        let mut x = -87.0f32;
        while x <= 0.0 {
            let want = (x as f64).exp();
            let got = exp_f32(x) as f64;
            worst = worst.max(((got - want) / want).abs());
            x += 0.001_37;
        }
        assert!(
            worst < 3.0 * f32::EPSILON as f64,
            "worst relative error {worst}"
        );
        assert_eq!(exp_f32(f32::NEG_INFINITY), 0.0);
        assert_eq!(exp_f32(-200.0), 0.0);
        assert_eq!(exp_f32(0.0), 1.0);
        assert!(exp_f32(f32::NAN).is_nan());
    }

    #[test]
    fn forward_is_softmax_then_the_element_mask() {
        for (lq, lk, causal) in [
            (5, 7, false),
            (13, 197, false),
            (6, 6, true),
            (9, 4, true),
            (3, 512, false),
        ] {
            let rows = Rows { lq, lk, causal };
            let n = 2 * 3 * lq * lk;
            let x = logits(n, lk as u64);
            let drop = dropout(0.8, 1000);
            let mut s: Vec<f64> = x.clone();
            let mut d = vec![7.0; n];
            let mut w = vec![0u64; mask_words(n)];
            softmax_dropout_forward(&mut s, &mut d, &mut w, rows, 0.25, &drop).unwrap();
            // The bits are exactly the element mask of the flat weights.
            assert_eq!(w, kernel::bernoulli_words(KEY, 1000, drop.threshold, n));
            let (p, dd) = naive(&x, rows, 0.25, &w, 1.25);
            for e in 0..n {
                assert!((s[e] - p[e]).abs() <= 1e-15, "{lq}x{lk} {causal} P[{e}]");
                assert!((d[e] - dd[e]).abs() <= 1e-15, "{lq}x{lk} {causal} D[{e}]");
            }
            // f32 within float tolerance of the f64 definition.
            let mut s32: Vec<f32> = x.iter().map(|&v| v as f32).collect();
            let mut d32 = vec![0f32; n];
            let mut w32 = vec![0u64; mask_words(n)];
            softmax_dropout_forward(&mut s32, &mut d32, &mut w32, rows, 0.25, &drop).unwrap();
            assert_eq!(w32, w);
            for e in 0..n {
                assert!(
                    (s32[e] as f64 - p[e]).abs() <= 1e-6 * p[e].max(1e-3),
                    "P[{e}]"
                );
                assert!(
                    (d32[e] as f64 - dd[e]).abs() <= 2e-6 * dd[e].max(1e-3),
                    "D[{e}]"
                );
            }
        }
    }

    #[test]
    fn half_types_round_the_f32_result() {
        let rows = Rows {
            lq: 4,
            lk: 33,
            causal: false,
        };
        let n = 4 * 33;
        let x = logits(n, 5);
        let drop = dropout(0.5, 0);
        let mut s32: Vec<f32> = x.iter().map(|&v| v as f32).collect();
        let mut d32 = vec![0f32; n];
        let mut w = vec![0u64; mask_words(n)];
        softmax_dropout_forward(&mut s32, &mut d32, &mut w, rows, 1.0, &drop).unwrap();
        let mut sh: Vec<bf16> = x.iter().map(|&v| bf16::from_f64(v)).collect();
        let mut dh = vec![bf16::ZERO; n];
        let mut wh = vec![0u64; mask_words(n)];
        softmax_dropout_forward(&mut sh, &mut dh, &mut wh, rows, 1.0, &drop).unwrap();
        assert_eq!(w, wh);
        for e in 0..n {
            assert!((sh[e].to_f32() - s32[e]).abs() <= 0.02 * s32[e] + 1e-3);
            let kept = bit(&w, e);
            assert_eq!(dh[e].to_f32() != 0.0, kept && sh[e].to_f32() != 0.0);
        }
        let mut s16: Vec<f16> = x.iter().map(|&v| f16::from_f64(v)).collect();
        let mut d16 = vec![f16::ZERO; n];
        softmax_dropout_forward(&mut s16, &mut d16, &mut wh, rows, 1.0, &drop).unwrap();
        let total: f32 = s16[..33].iter().map(|v| v.to_f32()).sum();
        assert!((total - 1.0).abs() < 0.01);
    }

    #[test]
    fn masked_rows_are_zero_and_keep_all_is_plain_softmax() {
        let rows = Rows {
            lq: 2,
            lk: 3,
            causal: false,
        };
        let mut s = vec![
            f64::NEG_INFINITY,
            f64::NEG_INFINITY,
            f64::NEG_INFINITY,
            0.0,
            0.0,
            0.0,
        ];
        let mut d = vec![1.0; 6];
        let mut w = vec![0u64; 1];
        softmax_dropout_forward(&mut s, &mut d, &mut w, rows, 1.0, &dropout(1.0, 0)).unwrap();
        assert_eq!(&s[..3], &[0.0; 3]);
        assert_eq!(&d[..3], &[0.0; 3]);
        for v in &s[3..] {
            assert!((v - 1.0 / 3.0).abs() < 1e-15);
        }
        assert_eq!(&s[3..], &d[3..]);
        assert_eq!(w[0], 0b11_1111);
        // Nothing kept: every dropped weight is 0, the softmax is still computed.
        let mut s = vec![0.0f32; 6];
        let mut d = vec![1.0f32; 6];
        softmax_dropout_forward(&mut s, &mut d, &mut w, rows, 1.0, &dropout(0.0, 0)).unwrap();
        assert_eq!(d, vec![0.0; 6]);
        assert_eq!(w[0], 0);
        assert!((s[0] - 1.0 / 3.0).abs() < 1e-7);
    }

    #[test]
    fn bad_shapes_are_errors() {
        let rows = Rows {
            lq: 3,
            lk: 4,
            causal: false,
        };
        let mut s = vec![0f32; 10];
        let mut d = vec![0f32; 10];
        let mut w = vec![0u64; 1];
        assert!(
            softmax_dropout_forward(&mut s, &mut d, &mut w, rows, 1.0, &dropout(0.5, 0)).is_err()
        );
        let mut s = vec![0f32; 12];
        let mut d = vec![0f32; 11];
        assert!(
            softmax_dropout_forward(&mut s, &mut d, &mut w, rows, 1.0, &dropout(0.5, 0)).is_err()
        );
        let mut g = vec![0f32; 12];
        assert!(softmax_dropout_backward(&s, &mut g, &mut d, &w, 4, 2.0).is_err());
        assert!(softmax_dropout_backward(&s, &mut g, &mut d, &w, 0, 2.0).is_err());
    }

    #[test]
    fn backward_is_the_gradient() {
        // Check the gradient of L = sum(G * dropped(x)) against central differences in f64.
        let rows = Rows {
            lq: 3,
            lk: 70,
            causal: true,
        };
        let n = 2 * 3 * 70;
        let x = logits(n, 11);
        let gd = logits(n, 12);
        let drop = dropout(0.7, 64);
        let scale = 0.5;
        let run = |x: &[f64]| {
            let mut s = x.to_vec();
            let mut d = vec![0.0; n];
            let mut w = vec![0u64; mask_words(n)];
            softmax_dropout_forward(&mut s, &mut d, &mut w, rows, scale, &drop).unwrap();
            (s, d, w)
        };
        let (p, d, w) = run(&x);
        let mut g = gd.clone();
        let mut d2 = vec![0.0; n];
        softmax_dropout_backward(&p, &mut g, &mut d2, &w, rows.lk, drop.scale).unwrap();
        assert_eq!(d, d2);
        let loss = |x: &[f64]| -> f64 { run(x).1.iter().zip(&gd).map(|(a, b)| a * b).sum() };
        let h = 1e-6;
        for e in (0..n).step_by(7) {
            let (mut a, mut b) = (x.clone(), x.clone());
            a[e] += h;
            b[e] -= h;
            // The kernel's gradient is with respect to the scaled logits: d/dx = scale * g.
            let fd = (loss(&a) - loss(&b)) / (2.0 * h);
            assert!(
                (fd - scale * g[e]).abs() < 1e-7,
                "e={e}: {fd} vs {}",
                scale * g[e]
            );
        }
    }

    #[test]
    fn paths_agree() {
        // The AVX2 and portable loops give the same bits (the sums run in a fixed order).
        let rows = Rows {
            lq: 7,
            lk: 197,
            causal: false,
        };
        let n = 7 * 197 * 3;
        let x: Vec<f32> = logits(n, 3).iter().map(|&v| v as f32).collect();
        let drop = dropout(0.9, 5);
        let mut a = x.clone();
        let mut da = vec![0f32; n];
        let mut wa = vec![0u64; mask_words(n)];
        forward_item(&mut a, &mut da, &mut wa, 0, rows, 0.125, &drop, 5);
        #[cfg(target_arch = "x86_64")]
        if use_avx2() {
            let mut b = x.clone();
            let mut db = vec![0f32; n];
            let mut wb = vec![0u64; mask_words(n)];
            // SAFETY: use_avx2 saw AVX2.
            unsafe { forward_item_avx2(&mut b, &mut db, &mut wb, 0, rows, 0.125, &drop, 5) };
            assert_eq!(a, b);
            assert_eq!(da, db);
            let (mut ga, mut gb) = (x.clone(), x.clone());
            let (mut ea, mut eb) = (vec![0f32; n], vec![0f32; n]);
            backward_item(&a, &mut ga, &mut ea, &wa, 0, 197, drop.scale);
            // SAFETY: as above.
            unsafe { backward_item_avx2(&a, &mut gb, &mut eb, &wa, 0, 197, drop.scale) };
            assert_eq!(ga, gb);
            assert_eq!(ea, eb);
        }
    }
}
