//! Generator state: a key and an atomic block offset.
//!
//! Every call reserves a disjoint range of counter blocks with one `fetch_add`, whose length
//! depends only on the size of the mask it draws, so the bits a call sees are a pure function of
//! (key, offset at the call, logical index), and two calls never share bits, even when several
//! threads share one generator.

use crate::rng::{self, Key};
use std::sync::Mutex;

/// (key, next free block). A mutex rather than atomics because `set_state` replaces both at once
/// and a reservation must never see half of it; uncontended it costs a few nanoseconds a call.
#[derive(Debug)]
pub struct GeneratorState {
    inner: Mutex<(Key, u64)>,
}

impl GeneratorState {
    pub fn new(seed: u64, stream: u64, offset: u64) -> Self {
        GeneratorState {
            inner: Mutex::new((Key { seed, stream }, offset)),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, (Key, u64)> {
        // A panic cannot happen while the lock is held (plain integer updates), but poisoning
        // must never turn into a panic across the FFI boundary either.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// (seed, stream, offset).
    pub fn state(&self) -> (u64, u64, u64) {
        let g = self.lock();
        (g.0.seed, g.0.stream, g.1)
    }

    pub fn set_state(&self, seed: u64, stream: u64, offset: u64) {
        *self.lock() = (Key { seed, stream }, offset);
    }

    pub fn offset(&self) -> u64 {
        self.lock().1
    }

    /// Takes `blocks` counter blocks for one call: the key and the first block.
    pub fn reserve(&self, blocks: u64) -> (Key, u64) {
        let mut g = self.lock();
        let start = g.1;
        g.1 = start.wrapping_add(blocks);
        (g.0, start)
    }
}

/// A stream id for the `index`-th fork of `stream`: splitmix64 finalisers, so forks of forks and
/// neighbouring ranks land on unrelated streams.
pub fn fork_stream(stream: u64, index: u64) -> u64 {
    fn mix(mut z: u64) -> u64 {
        z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    mix(stream ^ mix(index.wrapping_add(1)))
}

/// Counter blocks that `n` keep decisions use: whole bit-sliced groups of 256 decisions, 64
/// blocks each (see `rng::keep_words`).
pub fn blocks_for_decisions(n: usize) -> u64 {
    (n as u64).div_ceil(rng::GROUP as u64) * rng::BLOCKS_PER_GROUP
}

/// Counter blocks that `n` normal deviates use (two 32-bit words each, two deviates a block).
pub fn blocks_for_normals(n: usize) -> u64 {
    (n as u64).div_ceil(2)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reservations_are_disjoint_and_sized_by_the_mask() {
        let g = GeneratorState::new(1, 0, 10);
        assert_eq!(g.reserve(blocks_for_decisions(1)).1, 10);
        assert_eq!(g.offset(), 74);
        assert_eq!(g.reserve(blocks_for_decisions(0)).1, 74);
        assert_eq!(g.reserve(blocks_for_decisions(257)).1, 74);
        assert_eq!(g.offset(), 202);
    }

    #[test]
    fn reservations_from_many_threads_never_overlap() {
        let g = std::sync::Arc::new(GeneratorState::new(1, 0, 0));
        let starts: Vec<u64> = (0..8)
            .map(|_| {
                let g = g.clone();
                std::thread::spawn(move || (0..1000).map(|_| g.reserve(16).1).collect::<Vec<_>>())
            })
            .flat_map(|h| h.join().unwrap())
            .collect();
        let mut sorted = starts.clone();
        sorted.sort_unstable();
        sorted.dedup();
        assert_eq!(sorted.len(), 8000);
        assert_eq!(g.offset(), 8000 * 16);
    }

    #[test]
    fn forks_differ_from_each_other_and_from_the_parent() {
        let s: Vec<u64> = (0..100).map(|r| fork_stream(0, r)).collect();
        let mut d = s.clone();
        d.sort_unstable();
        d.dedup();
        assert_eq!(d.len(), 100);
        assert!(!s.contains(&0));
        assert_ne!(fork_stream(fork_stream(0, 0), 0), fork_stream(0, 1));
    }
}
