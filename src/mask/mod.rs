//! Keep decisions by granularity, as packed bits (1 = kept), C-ordered over the mask shape.
//!
//! Element, channel and sample masks are Bernoulli draws of `prod(mask_shape)` decisions
//! ([`bernoulli_words`], or fused into the kernel for elements). Block masks ([`blocks`]) grow
//! Bernoulli seeds into rectangles, as timm's DropBlock does. A mask broadcast in short runs is
//! spread to one bit per element (`spread`) before the kernel applies it.

pub mod blocks;
pub(crate) mod spread;

pub use blocks::{block_keep_words, BlockGeometry};

use crate::kernel::CHUNK;
use crate::rng::{self, Key};
use crate::threads::{for_each_word_chunk, get_num_threads};

/// Bit `m` of a packed mask.
#[inline(always)]
pub(crate) fn bit(words: &[u64], m: usize) -> bool {
    (words[m / 64] >> (m % 64)) & 1 == 1
}

/// Words needed for `n` bits.
pub fn words_for(n: usize) -> usize {
    n.div_ceil(64)
}

/// Clears the bits past `n` in the last word, so that counts and exports see only real decisions.
pub fn clear_tail(words: &mut [u64], n: usize) {
    if !n.is_multiple_of(64) {
        if let Some(last) = words.get_mut(n / 64) {
            *last &= (1u64 << (n % 64)) - 1;
        }
    }
}

/// `n` Bernoulli(threshold / 2^32) keep decisions drawn from `first_block` of `key`.
pub fn bernoulli_words(key: Key, first_block: u64, threshold: u64, n: usize) -> Vec<u64> {
    let mut words = vec![0u64; words_for(n)];
    for_each_word_chunk(get_num_threads(), n, &mut words, |c, w| {
        rng::keep_words(
            key,
            first_block.wrapping_add((c * CHUNK / 4) as u64),
            threshold,
            w,
        )
    });
    clear_tail(&mut words, n);
    words
}
