//! Normal deviates: [`normal_at`] is deviate `i` of a key's counter blocks from `first_block`, a
//! pure function of (key, first_block, i) like every other random value here (Gaussian dropout's
//! noise and `Application::Noise`'s dropped values). [`fill_normals`] writes it for every index
//! `i` of a slice, drawing the counter blocks a chunk at a time (the vector ARS-5
//! paths) instead of one block per deviate, in parallel by index range. Gaussian dropout's
//! multiplicative noise comes from here; deviate `i` never depends on the thread count.

use crate::rng::{self, Key};
use crate::threads::{for_each_chunk, get_num_threads};
use std::sync::Mutex;

/// Deviates per chunk: even, so every chunk starts on a counter block (two deviates a block).
const CHUNK: usize = 1 << 14;

/// A float type a deviate is rounded to.
pub trait Deviate: Copy + Send + Sync {
    fn from_f64(v: f64) -> Self;
}

impl Deviate for f32 {
    #[inline(always)]
    fn from_f64(v: f64) -> Self {
        v as f32
    }
}

impl Deviate for f64 {
    #[inline(always)]
    fn from_f64(v: f64) -> Self {
        v
    }
}

/// Box-Muller on two 32-bit words: `(w0 + 0.5) / 2^32` lies in (0, 1), so the logarithm is
/// finite.
#[inline(always)]
fn box_muller(w0: u32, w1: u32) -> f64 {
    let u1 = (w0 as f64 + 0.5) * (1.0 / 4294967296.0);
    let u2 = w1 as f64 * (1.0 / 4294967296.0);
    (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
}

/// The standard normal deviate of logical index `index` (Box-Muller on words 0-1 or 2-3 of
/// counter block `first_block + index / 2`).
pub fn normal_at(key: Key, first_block: u64, index: usize) -> f64 {
    let mut words = [0u32; 4];
    rng::fill_u32(
        key,
        first_block.wrapping_add((index / 2) as u64),
        &mut words,
    );
    let lane = 2 * (index % 2);
    box_muller(words[lane], words[lane + 1])
}

/// `out[i] = normal_at(key, first_block, i)` rounded to `T`, for every `i`. Uses
/// `generator::blocks_for_normals(out.len())` counter blocks from `first_block`.
pub fn fill_normals<T: Deviate>(key: Key, first_block: u64, out: &mut [T]) {
    let n = out.len();
    // Each chunk's slice is taken out of its slot by whichever thread runs the chunk.
    let slots: Vec<Mutex<Option<&mut [T]>>> =
        out.chunks_mut(CHUNK).map(|c| Mutex::new(Some(c))).collect();
    for_each_chunk(get_num_threads(), n, slots.len(), |c| {
        let taken = slots[c].lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(o) = taken {
            fill_range(key, first_block.wrapping_add((c * CHUNK / 2) as u64), o);
        }
    });
}

/// Deviates 0.. of `out` from counter blocks `first_block`.. (two a block: lanes 0-1 and 2-3).
fn fill_range<T: Deviate>(key: Key, first_block: u64, out: &mut [T]) {
    let mut words = vec![0u32; 4 * out.len().div_ceil(2)];
    rng::fill_u32(key, first_block, &mut words);
    for (i, o) in out.iter_mut().enumerate() {
        let lane = 4 * (i / 2) + 2 * (i % 2);
        *o = T::from_f64(box_muller(words[lane], words[lane + 1]));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::threads::set_num_threads;

    #[test]
    fn deviates_are_normal_at_for_any_length_offset_and_thread_count() {
        let key = Key {
            seed: 0x1234_5678_9abc_def0,
            stream: 7,
        };
        let n = 3 * CHUNK + 5; // several chunks and an odd tail
        let first = u64::MAX - 10; // the counter wraps inside the call
        let mut one = vec![0f64; n];
        set_num_threads(1).unwrap();
        fill_normals(key, first, &mut one);
        for (i, &v) in one.iter().enumerate() {
            assert_eq!(v.to_bits(), normal_at(key, first, i).to_bits(), "index {i}");
        }
        set_num_threads(3).unwrap();
        let mut three = vec![0f64; n];
        fill_normals(key, first, &mut three);
        assert_eq!(one, three);
        let mut single = vec![0f32; 7];
        fill_normals(key, first, &mut single);
        for (i, &v) in single.iter().enumerate() {
            assert_eq!(v, normal_at(key, first, i) as f32);
        }
    }

    #[test]
    fn deviates_have_mean_zero_and_unit_variance() {
        let mut v = vec![0f64; 1 << 18];
        fill_normals(Key { seed: 3, stream: 0 }, 0, &mut v);
        let n = v.len() as f64;
        let mean = v.iter().sum::<f64>() / n;
        let var = v.iter().map(|x| (x - mean) * (x - mean)).sum::<f64>() / (n - 1.0);
        // Six standard errors: sd(mean) = 1/sqrt(n), sd(var) = sqrt(2/(n-1)).
        assert!(mean.abs() < 6.0 / n.sqrt(), "mean {mean}");
        assert!(
            (var - 1.0).abs() < 6.0 * (2.0 / (n - 1.0)).sqrt(),
            "variance {var}"
        );
    }
}
