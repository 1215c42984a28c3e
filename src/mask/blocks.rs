//! DropBlock's masks: Bernoulli seeds at every position of each map, each grown into a
//! `kh` x `kw` block of dropped positions, as timm's DropBlock places them.

use super::{bernoulli_words, words_for};
use crate::rng::Key;
use crate::threads::{for_each_chunk, get_num_threads};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

/// Geometry of a DropBlock mask: `maps` planes of `h` x `w`, blocks of `kh` x `kw`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BlockGeometry {
    pub maps: usize,
    pub h: usize,
    pub w: usize,
    pub kh: usize,
    pub kw: usize,
}

/// One axis of timm's placement (max-pool with kernel k, padding k / 2, stride 1, and the first
/// output dropped for even k): a seed at `r` drops `[r - k / 2, r - k / 2 + k - 1]`, clipped.
/// Equivalently position `i` is dropped when a seed lies in `[i - (k - 1 - k / 2), i + k / 2]`.
fn dilate_axis(seeds: impl Fn(usize) -> bool, len: usize, k: usize, out: &mut [bool]) {
    let before = k - 1 - k / 2;
    let after = k / 2;
    for (i, o) in out.iter_mut().enumerate().take(len) {
        let lo = i.saturating_sub(before);
        let hi = (i + after).min(len - 1);
        *o = (lo..=hi).any(&seeds);
    }
}

/// DropBlock keep bits: seeds are Bernoulli(threshold / 2^32) at every position of each map,
/// drawn from `first_block` of `key` (seed i is decision i), each seed drops the block around
/// it. Returns the keep bits and how many positions were kept.
pub fn block_keep_words(
    key: Key,
    first_block: u64,
    threshold: u64,
    g: BlockGeometry,
) -> (Vec<u64>, usize) {
    let plane = g.h * g.w;
    let n = g.maps * plane;
    let seeds = bernoulli_words(key, first_block, threshold, n);
    let seed = |m: usize| (seeds[m / 64] >> (m % 64)) & 1 == 1;
    // Each plane is dilated in byte-per-pixel scratch of one plane and OR-ed straight into the
    // packed result (planes need not start on a word, hence atomics), so the temporaries are
    // one plane per thread: never a byte per pixel of the whole mask.
    let words: Vec<AtomicU64> = (0..words_for(n)).map(|_| AtomicU64::new(0)).collect();
    let plane_into_words = |map: usize| -> usize {
        let base = map * plane;
        // Separable: a rectangle of seeds is a row dilation followed by a column dilation.
        let mut rows = vec![false; plane];
        for i in 0..g.h {
            let row = base + i * g.w;
            dilate_axis(
                |j| seed(row + j),
                g.w,
                g.kw,
                &mut rows[i * g.w..(i + 1) * g.w],
            );
        }
        let mut kept = vec![false; plane];
        let mut col = vec![false; g.h];
        for j in 0..g.w {
            dilate_axis(|i| rows[i * g.w + j], g.h, g.kh, &mut col);
            for (i, &dropped) in col.iter().enumerate() {
                kept[i * g.w + j] = !dropped;
            }
        }
        let pack = |lo: usize, hi: usize| -> u64 {
            kept[lo..hi]
                .iter()
                .enumerate()
                .fold(0u64, |w, (b, &k)| w | (k as u64) << b)
        };
        let mut count = 0;
        for lo in (0..plane).step_by(64) {
            // Pixels lo..hi span at most two words of the packed result.
            let (hi, m) = ((lo + 64).min(plane), base + lo);
            let split = lo + (64 - m % 64).min(hi - lo);
            for (a, b) in [(lo, split), (split, hi)] {
                if a < b {
                    let w = pack(a, b);
                    count += w.count_ones() as usize;
                    words[(base + a) / 64].fetch_or(w << ((base + a) % 64), Ordering::Relaxed);
                }
            }
        }
        count
    };
    // On fastdrop's own threads (set_num_threads), a map per work item.
    let kept = AtomicUsize::new(0);
    for_each_chunk(get_num_threads(), n, g.maps, |map| {
        kept.fetch_add(plane_into_words(map), Ordering::Relaxed);
    });
    let kept = kept.into_inner();
    drop(seeds);
    // Same size and alignment: the collect reuses the allocation.
    let words: Vec<u64> = words.into_iter().map(AtomicU64::into_inner).collect();
    (words, kept)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bits_of(words: &[u64], n: usize) -> Vec<bool> {
        (0..n)
            .map(|m| (words[m / 64] >> (m % 64)) & 1 == 1)
            .collect()
    }

    #[test]
    fn odd_blocks_are_centred_and_even_blocks_lean_up_left() {
        // A lone seed at (3, 3) of a 7x7 plane.
        for (k, lo, hi) in [(3usize, 2usize, 4usize), (4, 1, 4), (1, 3, 3), (2, 2, 3)] {
            let mut out = vec![false; 7];
            dilate_axis(|r| r == 3, 7, k, &mut out);
            let want: Vec<bool> = (0..7).map(|i| (lo..=hi).contains(&i)).collect();
            assert_eq!(out, want, "k = {k}");
        }
    }

    #[test]
    fn blocks_are_clipped_at_the_borders() {
        let mut out = vec![false; 5];
        dilate_axis(|r| r == 0, 5, 4, &mut out);
        assert_eq!(out, [true, true, false, false, false]);
        dilate_axis(|r| r == 4, 5, 4, &mut out);
        assert_eq!(out, [false, false, true, true, true]);
    }

    #[test]
    fn gamma_one_drops_everything_and_gamma_zero_nothing() {
        let g = BlockGeometry {
            maps: 3,
            h: 5,
            w: 6,
            kh: 2,
            kw: 3,
        };
        let (w, kept) = block_keep_words(Key { seed: 1, stream: 0 }, 0, 1 << 32, g);
        assert_eq!(kept, 0);
        assert!(bits_of(&w, 90).iter().all(|b| !b));
        let (w, kept) = block_keep_words(Key { seed: 1, stream: 0 }, 0, 0, g);
        assert_eq!(kept, 90);
        assert!(bits_of(&w, 90).iter().all(|&b| b));
    }

    #[test]
    fn every_dropped_pixel_is_covered_by_a_seed_block() {
        let g = BlockGeometry {
            maps: 4,
            h: 9,
            w: 11,
            kh: 4,
            kw: 3,
        };
        let key = Key { seed: 7, stream: 0 };
        let thr = crate::rng::threshold_for(0.05);
        let (words, kept) = block_keep_words(key, 0, thr, g);
        let seeds = bits_of(&bernoulli_words(key, 0, thr, 4 * 99), 4 * 99);
        let keep = bits_of(&words, 4 * 99);
        assert_eq!(kept, keep.iter().filter(|&&b| b).count());
        for m in 0..4 {
            for i in 0..9usize {
                for j in 0..11usize {
                    let covered = (0..9usize).any(|r| {
                        (0..11usize).any(|c| {
                            seeds[m * 99 + r * 11 + c]
                                && (r as isize - 2..=r as isize + 1).contains(&(i as isize))
                                && (c as isize - 1..=c as isize + 1).contains(&(j as isize))
                        })
                    });
                    assert_eq!(!keep[m * 99 + i * 11 + j], covered, "map {m} at ({i}, {j})");
                }
            }
        }
    }
}
