//! The one generic routine every variant runs: walk a strided input in logical (C) order, look
//! up each element's keep decision in a bit mask of a broadcastable shape, and write the mask's
//! application (scale, affine, noise; optionally plus a residual) to a strided output.
//!
//! Element-granularity masks are generated chunk by chunk inside the same pass (the bits never
//! leave L1 unless the caller wants them stored); coarser masks (channel, sample, block) are
//! generated first (`mask`), they are small.
//!
//! One call, top to bottom: [`run`] takes a [`Call`] (this module: shape, mask shape, operands,
//! bits and [`Application`]), compiles the application into a rule and shares the call's
//! chunks among the threads (`dispatch`); each chunk walks a merged plan of the strides
//! (`walk`) and runs the inner loops over it (`loops`), per element type (`element`). The safe
//! fronts over slices are in `contiguous`.

mod application;
mod contiguous;
mod dispatch;
mod element;
mod loops;
pub(crate) mod walk;

pub use application::Application;
pub use contiguous::{apply_contiguous, apply_in_place, Contiguous};
pub use dispatch::{run, run_with, Config};
pub use element::{Element, OpFloat};

use crate::rng::{self, Key};

// What a call needs beside `run`, reachable through `kernel` as before the split (and for the
// core module that lays out a call): each lives with its concept, the instruction set in `cpu`,
// the threads in `threads`, mask drawing and DropBlock in `mask`, counter ranges and keep
// thresholds in `generator` and `rng`, normal deviates in `noise`.
pub use crate::cpu::{best_isa, isa, Isa};
pub use crate::generator::{blocks_for_call, blocks_for_decisions};
pub use crate::mask::{bernoulli_words, block_keep_words, clear_tail, words_for, BlockGeometry};
pub use crate::noise::normal_at;
pub use crate::rng::threshold_for;
pub(crate) use crate::threads::for_each_chunk;
pub use crate::threads::{get_num_threads, set_num_threads, PARALLEL_MIN};

/// Elements per parallel work item. A multiple of the generator's 256-decision group, so that
/// every chunk starts on a mask word and a group, and small enough that a chunk's bits
/// (512 words) stay in L1.
pub const CHUNK: usize = 1 << 15;
/// Elements whose keep bits are drawn just before they are applied: a whole number of the
/// generator's windows (16 groups of 256 decisions), whose last planes fill SIMD batches only
/// when several groups are still open together, and large enough that what each piece costs
/// beside its elements (the generator's set-up, the walk's, the vector loop's head and tail)
/// stays small: a whole chunk. Measured one thread, in cache (criterion `incache`), against
/// 16384: 64K elements 9.63 -> 8.63 us at p = 0.1 and 6.76 -> 5.73 us at p = 0.5, 1M 164.8 ->
/// 156.3 us and 111.0 -> 104.7 us (and 16384 had been faster than 4096). The bits stay in L1
/// (512 words); the elements' loads and stores go their own way (prefetching a piece's lines
/// before drawing its bits, or applying finished windows between the generator's groups,
/// measured slower).
const SUB: usize = CHUNK;
const _: () = assert!(SUB.is_multiple_of(rng::GROUP) && CHUNK.is_multiple_of(SUB));
/// Out-of-place outputs at least this large (bytes) are written with non-temporal stores: they
/// cannot stay in cache anyway, and streaming them saves the read-for-ownership of every output
/// line, a third of the memory traffic of the call.
pub const STREAM_MIN_BYTES: usize = 16 << 20;

/// One call of the kernel: everything [`run`] reads.
///
/// # Contract
/// What [`run`] takes on trust (the safe fronts check it; the bindings check it on the arrays):
/// - `src`, `dst` and `res` (if any) address, through their byte strides, valid and properly
///   initialised elements of the kernel's type for every index of `shape` (pointers may be
///   unaligned); the strides have `shape.len()` entries.
/// - Distinct indices of `dst` are distinct addresses (no zero or overlapping strides), and
///   `dst` does not overlap `src` or `res` unless it is exactly the same view (in place).
/// - `Bits::Given` holds at least `prod(mask_shape)` bits and a `store` at least
///   `ceil(prod(shape) / 64)` words.
pub struct Call<'a> {
    /// The logical shape of every operand.
    pub shape: &'a [usize],
    /// The rank of `shape`, each dimension equal to it or 1 (broadcast); equal to `shape` for
    /// `Bits::Fresh` (element granularity).
    pub mask_shape: &'a [usize],
    pub src: Operand<'a>,
    pub dst: Operand<'a>,
    /// Added to the masked value when given (`residual + dropout(x)`).
    pub res: Option<Operand<'a>>,
    pub bits: Bits<'a>,
    pub app: Application,
}

/// A strided operand: a base pointer and per-dimension strides in bytes (NumPy's convention).
#[derive(Clone, Copy, Debug)]
pub struct Operand<'a> {
    pub ptr: *mut u8,
    pub strides: &'a [isize],
}

/// Where the keep decisions come from.
pub enum Bits<'a> {
    /// An element-granularity mask drawn here, chunk by chunk, from `first_block` of `key`
    /// (decision i is `keep_words` bit i); stored into `store` (one bit per element) when given.
    Fresh {
        key: Key,
        first_block: u64,
        threshold: u64,
        store: Option<&'a mut [u64]>,
    },
    /// A mask already drawn, C-ordered over the mask shape.
    Given(&'a [u64]),
}

#[cfg(test)]
mod tests;
