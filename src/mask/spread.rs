//! Bit spreading: a mask broadcast in runs shorter than a mask word (the channels of small maps,
//! the samples of small inputs, a channel-coupled DropBlock mask over 5x5 maps) becomes the
//! element mask it stands for, one bit per element, so the kernel's vector loops see whole mask
//! words instead of a scalar loop per short run.

use super::{bit, words_for};
use crate::kernel::walk::mask_bit_strides;

/// The element mask of `shape` that `words` (C-ordered over `mask_shape`, which broadcasts to
/// `shape`) stands for, when the mask's runs are short enough that the kernel is faster over it
/// than over `words`; `None` when they are not.
// Inlined into each caller, as the checks were before they moved here: a call would cost the
// kernel's smallest calls (1K elements) a few percent.
#[inline(always)]
pub(crate) fn element_bits_of_short_runs(
    words: &[u64],
    shape: &[usize],
    mask_shape: &[usize],
) -> Option<Vec<u64>> {
    match short_broadcast_run(shape, mask_shape) {
        Some(run) if run < 64 => Some(spread_bits(
            words,
            shape.iter().product::<usize>() / run,
            run,
        )),
        Some(_) => Some(expand_bits(words, shape, mask_shape)),
        None => short_mask_runs(shape, mask_shape).then(|| expand_bits(words, shape, mask_shape)),
    }
}

/// Mask runs shorter than this are spread to element bits (runs of fewer than 64 elements a
/// word at a time, longer ones run by run). Each run the kernel walks costs a call into the
/// vector loop with its set-up, head and tail; measured on the AVX-512 machine, one thread,
/// float32 dropout2d against the spread: runs of 100 (8, 1024, 10, 10) 280 -> 163 us (copy
/// 85 us), 256 144 -> 129 us, 196 even, 400 97 <- 103 us, 784 87 <- 93 us, 1024 56 <- 62 us.
const SPREAD_BELOW: usize = 256;

/// The length of the broadcast run if `mask_shape` is `shape` with a trailing block of
/// dimensions set to 1 (one decision per run of that many consecutive logical elements) and
/// the run is shorter than `SPREAD_BELOW`; `None` otherwise.
fn short_broadcast_run(shape: &[usize], mask_shape: &[usize]) -> Option<usize> {
    let k = mask_shape
        .iter()
        .rposition(|&d| d != 1)
        .map_or(0, |i| i + 1);
    if mask_shape[..k] != shape[..k] {
        return None;
    }
    let run: usize = shape[k..].iter().product();
    (run > 1 && run < SPREAD_BELOW).then_some(run)
}

/// Whether a mask that broadcasts over some dimension other than trailing ones (those are
/// `short_broadcast_run`'s) leaves the kernel runs shorter than `SPREAD_BELOW` elements that
/// an element mask of the whole shape would merge into longer ones.
fn short_mask_runs(shape: &[usize], mask_shape: &[usize]) -> bool {
    if mask_shape == shape {
        return false;
    }
    let inner = |mask: &[usize]| {
        let strides = mask_bit_strides(shape, mask);
        let dims = shape.len();
        let mut run = 1usize;
        // The innermost dimensions merge while each one's stride is the product of those
        // inside it (for a broadcast dimension: all strides 0).
        for d in (0..dims).rev() {
            if shape[d] == 1 {
                continue;
            }
            let merged = if strides[d] == 0 {
                (d + 1..dims).all(|e| shape[e] == 1 || strides[e] == 0)
            } else {
                strides[d] == run as isize
            };
            if !merged {
                break;
            }
            run *= shape[d];
        }
        run
    };
    let run = inner(mask_shape);
    run < SPREAD_BELOW && inner(shape) > run
}

/// The element mask of `shape` that `words` (C-ordered over `mask_shape`, which broadcasts to
/// `shape`) stands for: bit i is the decision of logical element i.
///
/// Dimension by dimension from the outside: a dimension the mask broadcasts over is filled at
/// its first index and then copied, doubling, a word at a time; the innermost dimensions the
/// mask does not broadcast over are one range of its bits, and the innermost ones it broadcasts
/// over one bit repeated. A walk run by run (the kernel's) took 5.7 us of a 42 us backward of
/// `DropBlock2d(0.1, 3)` on (8, 512, 5, 5): 4,096 runs of 25 bits, each a call.
fn expand_bits(words: &[u64], shape: &[usize], mask_shape: &[usize]) -> Vec<u64> {
    let n: usize = shape.iter().product();
    let mut out = vec![0u64; words_for(n)];
    if n == 0 {
        return out;
    }
    let dims = shape.len();
    // Elements and mask bits inside each dimension (C order).
    let (mut below, mut mask_below) = (vec![1usize; dims + 1], vec![1usize; dims + 1]);
    for d in (0..dims).rev() {
        below[d] = below[d + 1] * shape[d];
        mask_below[d] = mask_below[d + 1] * mask_shape[d];
    }
    // The first of the innermost dimensions where every mask dimension is `like`'s.
    let from = |like: &dyn Fn(usize) -> usize| {
        (0..dims)
            .rposition(|d| mask_shape[d] != like(d))
            .map_or(0, |d| d + 1)
    };
    let expand = Expand {
        words,
        shape,
        mask_shape,
        below: &below,
        mask_below: &mask_below,
        same_from: from(&|d| shape[d]),
        ones_from: from(&|_| 1),
    };
    expand.fill(&mut out, 0, 0, 0);
    out
}

/// `expand_bits`'s operands and the dimensions from which the mask matches the shape
/// (`same_from`) or broadcasts over every one (`ones_from`).
struct Expand<'a> {
    words: &'a [u64],
    shape: &'a [usize],
    mask_shape: &'a [usize],
    below: &'a [usize],
    mask_below: &'a [usize],
    same_from: usize,
    ones_from: usize,
}

impl Expand<'_> {
    /// Fills the elements of dimension `d` on from bit `pos` of `out`, from mask bit `mbit`.
    fn fill(&self, out: &mut [u64], d: usize, pos: usize, mbit: usize) {
        if d >= self.same_from {
            copy_bits(self.words, mbit, out, pos, self.below[d]);
        } else if d >= self.ones_from {
            if bit(self.words, mbit) {
                or_ones(out, pos, self.below[d]);
            }
        } else if self.mask_shape[d] == 1 {
            self.fill(out, d + 1, pos, mbit);
            let (block, total) = (self.below[d + 1], self.below[d]);
            let mut done = block;
            while done < total {
                let take = done.min(total - done);
                copy_bits_within(out, pos, pos + done, take);
                done += take;
            }
        } else {
            for i in 0..self.shape[d] {
                let (at, m) = (
                    pos + i * self.below[d + 1],
                    mbit + i * self.mask_below[d + 1],
                );
                self.fill(out, d + 1, at, m);
            }
        }
    }
}

/// ORs `len` bits into `dst` from bit `to` on, a piece up to each word boundary at a time:
/// `piece(dst, done)` gives bits `done ..` of the range in its low bits (those past the piece
/// are ignored).
#[inline(always)]
fn or_bits(dst: &mut [u64], to: usize, len: usize, piece: impl Fn(&[u64], usize) -> u64) {
    let mut done = 0;
    while done < len {
        let at = to + done;
        let take = (64 - at % 64).min(len - done);
        let bits = piece(dst, done) & (u64::MAX >> (64 - take));
        dst[at / 64] |= bits << (at % 64);
        done += take;
    }
}

/// ORs `len` one bits into `dst` from bit `to` on.
fn or_ones(dst: &mut [u64], to: usize, len: usize) {
    or_bits(dst, to, len, |_, _| u64::MAX);
}

/// ORs bits `from .. from + len` of `src` into `dst` from bit `to` on.
fn copy_bits(src: &[u64], from: usize, dst: &mut [u64], to: usize, len: usize) {
    or_bits(dst, to, len, |_, done| {
        crate::simd::word_at(src, from + done)
    });
}

/// ORs bits `from .. from + len` of `bits` into it from bit `to` on (`from + len <= to`).
fn copy_bits_within(bits: &mut [u64], from: usize, to: usize, len: usize) {
    // Only bits below `from + len <= to` are read, none of which this call writes.
    or_bits(bits, to, len, |b, done| {
        crate::simd::word_at(b, from + done)
    });
}

/// Bit `m * run + j` (j < run) of the result is bit `m` of `words`, for `decisions` bits and
/// `run` < 64. Each output word ORs in the few runs that overlap it; the words are independent,
/// so the loop has no carried dependency (a running 128-bit accumulator measured 3x slower).
fn spread_bits(words: &[u64], decisions: usize, run: usize) -> Vec<u64> {
    debug_assert!(run > 0 && run < 64);
    let n = decisions * run;
    let ones = (1u64 << run) - 1;
    let mut out = vec![0u64; words_for(n)];
    for (w, o) in out.iter_mut().enumerate() {
        let lo = w * 64;
        let hi = (lo + 64).min(n);
        let mut acc = 0u64;
        for m in lo / run..=(hi - 1) / run {
            let bits = 0u64.wrapping_sub(u64::from(bit(words, m))) & ones;
            // The run starts at m * run, within (lo - run, lo + 64): shift into this word.
            let start = m * run;
            acc |= if start >= lo {
                bits << (start - lo)
            } else {
                bits >> (lo - start)
            };
        }
        *o = acc;
    }
    out
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::mask::bernoulli_words;
    use crate::rng::{self, Key};

    const KEY: Key = Key {
        seed: 0x5eed,
        stream: 3,
    };

    #[test]
    fn short_runs_are_spread_bit_for_bit() {
        assert_eq!(short_broadcast_run(&[4, 3, 2, 2], &[4, 3, 1, 1]), Some(4));
        assert_eq!(short_broadcast_run(&[4, 3, 2, 2], &[4, 1, 1, 1]), Some(12));
        assert_eq!(short_broadcast_run(&[4, 3, 8, 8], &[4, 3, 1, 1]), Some(64));
        assert_eq!(
            short_broadcast_run(&[8, 1024, 10, 10], &[8, 1024, 1, 1]),
            Some(100)
        );
        assert_eq!(short_broadcast_run(&[4, 3, 16, 16], &[4, 3, 1, 1]), None);
        assert_eq!(short_broadcast_run(&[4, 3, 2, 2], &[4, 3, 2, 2]), None);
        assert_eq!(short_broadcast_run(&[4, 3, 2], &[1, 3, 1]), None);
        for run in [2usize, 3, 7, 63] {
            let decisions = 300;
            let words: Vec<u64> = (0..words_for(decisions) as u64)
                .map(|i| i.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ (i << 7))
                .collect();
            let spread = spread_bits(&words, decisions, run);
            for e in 0..decisions * run {
                assert_eq!(
                    bit(&spread, e),
                    bit(&words, e / run),
                    "run {run} element {e}"
                );
            }
            assert_eq!(
                spread
                    .iter()
                    .map(|w| w.count_ones() as usize)
                    .sum::<usize>(),
                (0..decisions).filter(|&m| bit(&words, m)).count() * run
            );
        }
    }

    /// Bit i of the element mask of `shape` that a mask of `mask_shape` broadcasts to, one
    /// element at a time.
    pub(crate) fn broadcast_reference(
        words: &[u64],
        shape: &[usize],
        mask_shape: &[usize],
    ) -> Vec<bool> {
        let n: usize = shape.iter().product();
        (0..n)
            .map(|i| {
                let (mut rem, mut m, mut stride) = (i, 0, 1);
                for d in (0..shape.len()).rev() {
                    let idx = rem % shape[d];
                    rem /= shape[d];
                    if mask_shape[d] != 1 {
                        m += idx * stride;
                    }
                    stride *= mask_shape[d];
                }
                bit(words, m)
            })
            .collect()
    }

    /// (shape, mask shape, expanded before the kernel?)
    pub(crate) const MIDDLE_CASES: [(&[usize], &[usize], bool); 11] = [
        (&[8, 2048, 5, 5], &[8, 1, 5, 5], true),
        (&[3, 5, 2, 3], &[3, 1, 2, 3], true),
        (&[3, 2, 7], &[1, 2, 7], true),
        (&[2, 3, 4, 5], &[2, 1, 4, 1], true),
        (&[4, 9, 1, 7], &[4, 1, 1, 7], true),
        (&[2, 3, 10, 10], &[2, 1, 10, 10], true),
        (&[2, 3, 16, 16], &[2, 1, 16, 16], false),
        (&[2, 5, 9, 11], &[2, 5, 1, 1], true), // runs of 99: expanded, not spread_bits'ed
        (&[4, 3, 2, 2], &[4, 3, 1, 1], true),  // spread_bits takes this one first
        (&[4, 3, 2, 2], &[4, 3, 2, 2], false),
        (&[3, 2, 300], &[3, 2, 1], false), // long runs stay runs
    ];

    #[test]
    fn every_broadcast_pattern_expands_bit_for_bit() {
        // Each subset of broadcast dimensions of a few shapes (sizes 1 included), against the
        // element-by-element reference.
        for shape in [
            &[8, 512, 5, 5][..],
            &[3, 5, 2, 3],
            &[2, 1, 7, 3],
            &[65],
            &[5, 13],
            &[2, 3, 4, 5, 6],
        ] {
            for pattern in 0..1u32 << shape.len() {
                let mask_shape: Vec<usize> = (0..shape.len())
                    .map(|d| if pattern >> d & 1 == 1 { 1 } else { shape[d] })
                    .collect();
                let m: usize = mask_shape.iter().product();
                let words = bernoulli_words(KEY, 5, rng::threshold_for(0.5), m);
                let want = broadcast_reference(&words, shape, &mask_shape);
                let got = expand_bits(&words, shape, &mask_shape);
                let n = want.len();
                assert_eq!(got.len(), words_for(n));
                for (i, &w) in want.iter().enumerate() {
                    assert_eq!(bit(&got, i), w, "{shape:?} {mask_shape:?} element {i}");
                }
                assert!(n.is_multiple_of(64) || got[n / 64] >> (n % 64) == 0);
            }
        }
    }

    #[test]
    fn masks_broadcast_over_a_middle_dimension_expand_bit_for_bit() {
        for (shape, mask_shape, expands) in MIDDLE_CASES {
            assert_eq!(
                short_mask_runs(shape, mask_shape),
                expands,
                "{shape:?} {mask_shape:?}"
            );
            let m: usize = mask_shape.iter().product();
            let words = bernoulli_words(KEY, 3, rng::threshold_for(0.5), m);
            let want = broadcast_reference(&words, shape, mask_shape);
            let got = expand_bits(&words, shape, mask_shape);
            let n = want.len();
            assert_eq!(got.len(), words_for(n));
            for (i, &w) in want.iter().enumerate() {
                assert_eq!(bit(&got, i), w, "{shape:?} {mask_shape:?} element {i}");
            }
            assert!(n.is_multiple_of(64) || got[n / 64] >> (n % 64) == 0);
        }
    }
}
