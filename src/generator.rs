//! Generator state: a key and an atomic block offset.
//!
//! Every call reserves a disjoint range of counter blocks with one `fetch_add`, whose length
//! depends only on the size of the mask it draws, so the bits a call sees are a pure function of
//! (key, offset at the call, logical index), and two calls never share bits, even when several
//! threads share one generator.
//!
//! A stream has 2^64 counter blocks and never wraps: a call whose range would reach the end of
//! the stream (block 2^64) is refused with the state unchanged, so no two calls of one stream
//! ever share bits and the offset after any call is a block that was never used.

use crate::error::Result;
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

    /// Takes `blocks` counter blocks for one call: the key and the first block. Refused, with
    /// the state unchanged, when the range would reach the end of the stream: the counters of a
    /// call never wrap to blocks an earlier call used.
    pub fn reserve(&self, blocks: u64) -> Result<(Key, u64)> {
        let mut g = self.lock();
        let start = g.1;
        // `None` exactly when start + blocks >= 2^64, i.e. the range reaches the stream's end.
        let Some(end) = start.checked_add(blocks) else {
            return crate::value_err!(
                "the generator's stream is exhausted: this call needs {blocks} counter blocks from offset {start}, but a stream ends at 2**64; reseed it (manual_seed), fork a new stream or set_state a smaller offset"
            );
        };
        g.1 = end;
        Ok((g.0, start))
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

/// Counter blocks of a call that draws `decisions` keep decisions and, `with_noise`, one normal
/// deviate per decision after them. At most 2^62 + 2^63 for any `usize`, so the sum cannot
/// overflow.
pub fn blocks_for_call(decisions: usize, with_noise: bool) -> u64 {
    let noise = if with_noise {
        blocks_for_normals(decisions)
    } else {
        0
    };
    blocks_for_decisions(decisions) + noise
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reservations_are_disjoint_and_sized_by_the_mask() {
        let g = GeneratorState::new(1, 0, 10);
        assert_eq!(g.reserve(blocks_for_decisions(1)).unwrap().1, 10);
        assert_eq!(g.offset(), 74);
        assert_eq!(g.reserve(blocks_for_decisions(0)).unwrap().1, 74);
        assert_eq!(g.reserve(blocks_for_decisions(257)).unwrap().1, 74);
        assert_eq!(g.offset(), 202);
        assert_eq!(blocks_for_call(257, false), 128);
        assert_eq!(blocks_for_call(257, true), 128 + 129);
        assert!(blocks_for_call(usize::MAX, true) > blocks_for_call(usize::MAX, false));
    }

    #[test]
    fn a_reservation_that_reaches_the_end_of_the_stream_is_refused_untouched() {
        // Offset 2^64 - 64: 63 blocks end at 2^64 - 1, which is allowed, and leave the offset
        // there, not at 0; 64 blocks would end at 2^64 and are refused.
        let near_end = u64::MAX - 63;
        let g = GeneratorState::new(3, 5, near_end);
        assert!(g.reserve(64).is_err());
        assert_eq!(g.state(), (3, 5, near_end));
        assert_eq!(
            g.reserve(63).unwrap(),
            (Key { seed: 3, stream: 5 }, near_end)
        );
        assert_eq!(g.state(), (3, 5, u64::MAX));
        for blocks in [1, 2, 64, u64::MAX] {
            let err = g.reserve(blocks).unwrap_err();
            assert!(err.to_string().contains("exhausted"), "{err}");
            assert_eq!(g.state(), (3, 5, u64::MAX));
        }
        // An empty call still works at the end.
        assert_eq!(g.reserve(0).unwrap().1, u64::MAX);
        let g = GeneratorState::new(3, 5, 0);
        assert_eq!(g.reserve(u64::MAX).unwrap().1, 0);
        assert_eq!(g.offset(), u64::MAX);
        assert!(g.reserve(1).is_err());
    }

    #[test]
    fn reservations_from_many_threads_never_overlap() {
        let g = std::sync::Arc::new(GeneratorState::new(1, 0, 0));
        let starts: Vec<u64> = (0..8)
            .map(|_| {
                let g = g.clone();
                std::thread::spawn(move || {
                    (0..1000)
                        .map(|_| g.reserve(16).unwrap().1)
                        .collect::<Vec<_>>()
                })
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
