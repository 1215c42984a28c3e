//! ARS-5: the counter-based generator `ars4x32` of Random123 (D. E. Shaw Research, `ars.h`)
//! with 5 rounds, plus the dropout keep-mask kernels built on it.
//!
//! A counter-based generator lets every element's random word be computed from
//! `(key, element index)` alone, so masks are reproducible regardless of how the work is split
//! across threads, ranks or SIMD widths; that is why every backend here must be bit-identical.
//!
//! One ARS block maps a 128-bit counter and a 128-bit key to 128 random bits:
//!
//! ```text
//! kweyl = (lo64 0x9E3779B97F4A7C15, hi64 0xBB67AE8584CAA73B)
//! kk = key; v = ctr ^ kk
//! R-1 times: kk += kweyl (two independent 64-bit adds); v = aesenc(v, kk)
//! kk += kweyl; v = aesenclast(v, kk)
//! ```
//!
//! Lanes are little-endian `u32`s (lane 0 is the low 32 bits of the 128-bit value), matching
//! Random123's `ars4x32_R`, whose `_mm_set_epi32(c.v[3], .., c.v[0])` puts `v[0]` lowest.

use crate::cpu::{self, Simd};
use std::sync::OnceLock;

/// Key of the generator: a 64-bit seed and a 64-bit stream id (for fork/per-rank streams).
///
/// As the ARS key it is laid out as `u32` lanes `[seed_lo, seed_hi, stream_lo, stream_hi]`, so
/// two streams of one seed never share a key and hence never share output.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Key {
    /// The user-visible seed.
    pub seed: u64,
    /// Distinguishes independent streams under one seed (forked workers, distributed ranks).
    pub stream: u64,
}

impl Key {
    /// The key as ARS `u32` lanes; private because the lane layout is part of the stream
    /// definition and must not drift independently of it.
    fn lanes(self) -> [u32; 4] {
        [
            self.seed as u32,
            (self.seed >> 32) as u32,
            self.stream as u32,
            (self.stream >> 32) as u32,
        ]
    }
}

/// Number of ARS rounds we ship. Random123's authors report no statistical flaws (BigCrush)
/// from 5 rounds on; their default of 7 buys margin we trade for speed.
pub const ROUNDS: usize = 5;

/// Largest round count the SIMD kernels are instantiated for (their round-key arrays are this
/// long plus one); Random123 itself stops at 10.
const MAX_SIMD_ROUNDS: usize = 15;

/// Weyl increment of the ARS key schedule, low 64 bits (golden ratio).
const KWEYL_LO: u64 = 0x9E37_79B9_7F4A_7C15;
/// Weyl increment of the ARS key schedule, high 64 bits (sqrt(3) - 1).
const KWEYL_HI: u64 = 0xBB67_AE85_84CA_A73B;

/// Keep decisions per bit-sliced group: one 256-bit *plane* (two ARS blocks) holds bit k of
/// the 32-bit uniform word of each of them.
pub const GROUP: usize = 256;
/// Keep words (64 decisions each) per group.
const WORDS_PER_GROUP: usize = GROUP / 64;
/// Bits of each element's uniform word, hence planes per group.
const PLANES: u32 = 32;
/// Counter blocks a group owns: 32 planes of two blocks, the same 32 bits per decision a
/// word-per-decision scheme would use, so the counter range of a mask does not depend on how
/// many planes a call happens to need.
pub const BLOCKS_PER_GROUP: u64 = 64;
/// Groups whose decisions are worked out together (their state lives on the stack): enough
/// that the planes still needed after the first few fill whole SIMD batches.
const WINDOW: usize = 16;
/// Planes drawn for every group before any group is checked for being decided: about
/// log2(256) + 1.3 planes decide all 256 elements of a group on average, so drawing the first
/// ones blindly keeps the AES units busy with independent work.
const FIRST_PLANES: u32 = 12;
/// Planes drawn per pass for each group still open after the leading ones: about one group in
/// five is open after 10 planes, one in sixty after 14.
const LATER_PLANES: usize = 4;

/// An implementation of the same ARS-5 stream; they differ only in speed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    /// Plain Rust via `aes::hazmat` round functions; runs everywhere and is the reference.
    Portable,
    /// x86-64 AES-NI, one block per 128-bit register, 8 blocks in flight.
    AesNi,
    /// x86-64 VAES + AVX2, two blocks per 256-bit register, 16 blocks in flight; where the CPU
    /// also has AVX-512F, the keep decisions draw four blocks (one plane of two groups) per
    /// 512-bit register.
    Vaes,
}

/// The backends this CPU runs (`cpu::features`, probed once), slowest first.
fn detected() -> &'static [Backend] {
    static AVAILABLE: OnceLock<Vec<Backend>> = OnceLock::new();
    AVAILABLE.get_or_init(|| backends_for(cpu::features()))
}

/// The backends a CPU with `f` runs, slowest first: AES-NI needs AES and SSE4.1, VAES also AVX2.
fn backends_for(f: cpu::Features) -> Vec<Backend> {
    let mut v = vec![Backend::Portable];
    if cfg!(target_arch = "x86_64") && f.aes && f.sse41 {
        v.push(Backend::AesNi);
        if f.vaes && f.avx2 {
            v.push(Backend::Vaes);
        }
    }
    v
}

/// Backends this CPU can run (for tests that prove all paths agree).
pub fn available_backends() -> Vec<Backend> {
    detected().to_vec()
}

/// The fastest backend in `avail` (the list is ordered slowest first).
fn best(avail: &[Backend]) -> Backend {
    avail.last().copied().unwrap_or(Backend::Portable)
}

/// Maps a `FASTDROP_SIMD` request to a backend this CPU can run. Split from `backend()` so the
/// policy can be unit-tested without mutating the process environment.
fn choose_backend(request: Simd, avail: &[Backend]) -> Backend {
    let wanted = match request {
        Simd::Portable => Backend::Portable,
        Simd::AesNi => Backend::AesNi,
        Simd::Vaes => Backend::Vaes,
        Simd::Auto => return best(avail),
    };
    if avail.contains(&wanted) {
        wanted
    } else {
        best(avail)
    }
}

/// The backend in use: chosen once from the CPU's features (`cpu::features`, probed once),
/// overridable with the environment variable `FASTDROP_SIMD` (see `cpu`), so that
/// users can rule out (or benchmark) a SIMD path without rebuilding. A request for a backend
/// the CPU lacks falls back to the best available one. The variable is read once per process.
pub fn backend() -> Backend {
    static CHOSEN: OnceLock<Backend> = OnceLock::new();
    *CHOSEN.get_or_init(|| choose_backend(cpu::simd(), detected()))
}

/// Turns a caller's backend request into one that is safe to run here: the `*_with` functions
/// are safe, so an unsupported request must degrade instead of executing illegal instructions.
fn resolve(requested: Backend) -> Backend {
    let avail = detected();
    if avail.contains(&requested) {
        requested
    } else {
        best(avail)
    }
}

// ---------------------------------------------------------------------------------------------
// Bit-sliced keep decisions (shared by every backend)
// ---------------------------------------------------------------------------------------------
//
// Element e of a mask has a 32-bit uniform word U(e); it is kept iff U(e) < threshold. The
// words are stored transposed: e lies in group g = e / 256 at position j = e % 256, and bit
// 31 - k (k = 0 is the most significant bit) of U(e) is bit j of plane k of group g, where plane
// k is the 256 bits of ARS blocks `first_block + 64 g + 2 k` (bits 0..127, lane 0 lowest) and
// `+ 2 k + 1` (bits 128..255). [`uniform_words`] spells this out.
//
// The point of the transposition is that the comparison can run most significant bit first
// for 256 elements at once and stop as soon as every element is decided: an element whose bit
// differs from the threshold's is decided by that bit, so each plane halves the undecided ones
// and about 9-10 planes settle a group, instead of the 32 words a plain compare needs. It also
// stops at the threshold's lowest set bit, below which nothing can be kept (p = 0.5: one plane).
// The planes that are skipped could not have changed any decision, so every backend and every
// batching gives the same bits, and the decisions are exactly those of the full 32-bit compare.

/// One plane: 256 bits as four little-endian words (word i = bits 64 i .. 64 i + 63).
type Plane = [u64; 4];

/// The decisions of up to `WINDOW` groups in flight.
struct Window {
    /// Plane k's threshold bit, spread to a whole word (all ones or all zeros).
    thr_bits: [u64; PLANES as usize],
    /// Kept so far (decided and below the threshold).
    keep: [Plane; WINDOW],
    /// Not decided yet: every bit drawn so far equals the threshold's.
    open: [Plane; WINDOW],
}

impl Window {
    fn new(thr: u32) -> Self {
        Self {
            thr_bits: core::array::from_fn(|k| 0u64.wrapping_sub(u64::from((thr >> (31 - k)) & 1))),
            keep: [[0; 4]; WINDOW],
            open: [[u64::MAX; 4]; WINDOW],
        }
    }

    /// Folds plane `k` of group `g` in (planes of a group must come in increasing k). Where the
    /// threshold bit t is 1, an open element drawing 0 is below the threshold (kept); where t
    /// is 0, one drawing 1 is above it (dropped); an element drawing t stays open.
    #[inline(always)]
    fn fold(&mut self, g: usize, k: usize, plane: &Plane) {
        let t = self.thr_bits[k];
        let (keep, open) = (&mut self.keep[g], &mut self.open[g]);
        for i in 0..4 {
            keep[i] |= open[i] & !plane[i] & t;
            open[i] &= !(plane[i] ^ t);
        }
    }

    /// Back to no decisions for the first `groups` groups, as `new` leaves them.
    fn reset(&mut self, groups: usize) {
        self.keep[..groups].fill([0; 4]);
        self.open[..groups].fill([u64::MAX; 4]);
    }

    fn is_open(&self, g: usize) -> bool {
        self.open[g] != [0; 4]
    }
}

/// Keep words for `thr` in [1, 2^32 - 1] from groups starting at `first_block`. `draw(first, n,
/// out)` fills `out[i]` with the plane whose first block is `first[i]`, for i < n (it may
/// compute all `B` and the caller ignores the rest). `lead(first, groups, planes, thr_bits,
/// keep, open)` may instead draw and fold the leading `planes` planes (`FIRST_PLANES`, or all
/// the threshold needs when that is fewer) of the `groups` consecutive groups whose first one
/// starts at block `first` (group g into `keep[g]` and `open[g]`, which it overwrites: they hold
/// the previous window's state on entry) in one go, keeping the planes in registers, and return
/// true; returning false (having written nothing) leaves it to `draw`.
///
/// Every group first draws its leading planes in one batch of consecutive counters; the few
/// groups still open after that are continued together, one plane level at a time, so that the
/// batches stay full of independent work rather than waiting on one group's AES latency.
#[inline(always)]
fn bitsliced<const B: usize>(
    thr: u32,
    first_block: u64,
    words: &mut [u64],
    mut draw: impl FnMut(&[u64; B], usize, &mut [Plane; B]),
    mut lead_groups: impl FnMut(
        u64,
        usize,
        usize,
        &[u64; PLANES as usize],
        &mut [Plane; WINDOW],
        &mut [Plane; WINDOW],
    ) -> bool,
) {
    // Below the threshold's lowest set bit an open element can only end >= thr: dropped.
    let last = (PLANES - thr.trailing_zeros()) as usize;
    let lead = (FIRST_PLANES as usize).min(last);
    let mut out = [[0u64; 4]; B];
    let mut first = [0u64; B];
    let mut group = [0usize; B];
    let mut plane = [0usize; B];
    // One window's state serves them all: `lead_groups` overwrites each group's planes, and
    // only a window it leaves alone starts from `Window::new`'s. Built and moved per window,
    // it cost a tenth of a 64K-element call in memset and memcpy.
    let mut w = Window::new(thr);
    for (wi, win) in words.chunks_mut(WINDOW * WORDS_PER_GROUP).enumerate() {
        let groups = win.len().div_ceil(WORDS_PER_GROUP);
        let base = first_block.wrapping_add((wi * WINDOW) as u64 * BLOCKS_PER_GROUP);
        let at = |g: usize, k: usize| base.wrapping_add(g as u64 * BLOCKS_PER_GROUP + 2 * k as u64);
        // Unless `lead_groups` took them, the leading planes, in batches that run across
        // groups: with few planes to draw (p = 0.5 needs one) a batch per group would mostly
        // compute planes nobody folds. Each group's planes still fold in increasing order.
        let mut n = 0;
        let led = lead_groups(
            at(0, 0),
            groups,
            lead,
            &w.thr_bits,
            &mut w.keep,
            &mut w.open,
        );
        if !led {
            w.reset(groups);
        }
        for g in (0..groups).filter(|_| !led) {
            for k in 0..lead {
                (first[n], group[n], plane[n]) = (at(g, k), g, k);
                n += 1;
                if n == B {
                    draw(&first, n, &mut out);
                    for i in 0..n {
                        w.fold(group[i], plane[i], &out[i]);
                    }
                    n = 0;
                }
            }
        }
        if n > 0 {
            draw(&first, n, &mut out);
            for i in 0..n {
                w.fold(group[i], plane[i], &out[i]);
            }
        }
        // The groups still open take `LATER_PLANES` planes each per pass rather than one: a
        // pass of one plane has too few open groups to fill a batch, and waits on the AES
        // latency of each; a plane drawn for a group that an earlier one of the pass already
        // closed folds to nothing.
        let mut k = lead;
        while k < last {
            let upto = (k + LATER_PLANES).min(last);
            let mut n = 0;
            for g in 0..groups {
                if !w.is_open(g) {
                    continue;
                }
                for j in k..upto {
                    (first[n], group[n], plane[n]) = (at(g, j), g, j);
                    n += 1;
                    if n == B {
                        draw(&first, n, &mut out);
                        for i in 0..n {
                            w.fold(group[i], plane[i], &out[i]);
                        }
                        n = 0;
                    }
                }
            }
            if n > 0 {
                draw(&first, n, &mut out);
                for i in 0..n {
                    w.fold(group[i], plane[i], &out[i]);
                }
            }
            k = upto;
            if !(0..groups).any(|g| w.is_open(g)) {
                break;
            }
        }
        // One copy for the window (a copy per group called memmove for each 32 bytes).
        win.copy_from_slice(&w.keep.as_flattened()[..win.len()]);
    }
}

/// The 32-bit uniform word of each element, in element order: `out[e]` = U(e) of the mask whose
/// groups start at `first_block`, where `keep_words` keeps e iff U(e) < threshold. This is the
/// definition the fast paths implement (see the comment above); it draws all 32 planes, so it
/// is for tests, fuzzers and anyone who wants to check a mask by hand.
pub fn uniform_words(key: Key, first_block: u64, out: &mut [u32]) {
    let mut planes = [0u32; 4 * BLOCKS_PER_GROUP as usize];
    for (g, elems) in out.chunks_mut(GROUP).enumerate() {
        let first = first_block.wrapping_add(g as u64 * BLOCKS_PER_GROUP);
        fill_u32_with(Backend::Portable, key, first, &mut planes);
        for (j, u) in elems.iter_mut().enumerate() {
            *u = (0..PLANES as usize).fold(0u32, |acc, k| {
                // Plane k is the 8 words at 8 k; element j is bit j % 32 of word j / 32.
                let bit = (planes[8 * k + j / 32] >> (j % 32)) & 1;
                acc | bit << (31 - k)
            });
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Portable reference
// ---------------------------------------------------------------------------------------------

fn lanes_to_block(x: [u32; 4]) -> aes::Block {
    let mut b = [0u8; 16];
    for (dst, w) in b.chunks_exact_mut(4).zip(x) {
        dst.copy_from_slice(&w.to_le_bytes());
    }
    aes::Block::from(b)
}

fn block_to_lanes(b: &aes::Block) -> [u32; 4] {
    let mut out = [0u32; 4];
    for (o, src) in out.iter_mut().zip(b.chunks_exact(4)) {
        *o = u32::from_le_bytes([src[0], src[1], src[2], src[3]]);
    }
    out
}

/// `kk += kweyl` as two independent 64-bit lanes, like `_mm_add_epi64`.
fn weyl_step(k: [u32; 4]) -> [u32; 4] {
    let lo = (u64::from(k[0]) | u64::from(k[1]) << 32).wrapping_add(KWEYL_LO);
    let hi = (u64::from(k[2]) | u64::from(k[3]) << 32).wrapping_add(KWEYL_HI);
    [lo as u32, (lo >> 32) as u32, hi as u32, (hi >> 32) as u32]
}

/// AES `aesenclast`: hazmat only offers the full round, so undo its MixColumns. This is exact
/// because `cipher_round` with a zero round key is MixColumns(ShiftRows(SubBytes(v))).
fn aesenclast_portable(v: &mut aes::Block, round_key: &aes::Block) {
    aes::hazmat::cipher_round(v, &aes::Block::default());
    aes::hazmat::inv_mix_columns(v);
    for (a, k) in v.iter_mut().zip(round_key.iter()) {
        *a ^= *k;
    }
}

/// One block given precomputed round keys `rk[0..=R]` (R = rk.len() - 1 >= 1).
fn ars_block_rk(rk: &[aes::Block], ctr: [u32; 4]) -> [u32; 4] {
    let mut v = lanes_to_block(ctr);
    for (a, k) in v.iter_mut().zip(rk[0].iter()) {
        *a ^= *k;
    }
    let (last, middle) = rk[1..].split_last().expect("at least one round");
    for k in middle {
        aes::hazmat::cipher_round(&mut v, k);
    }
    aesenclast_portable(&mut v, last);
    block_to_lanes(&v)
}

/// The ARS key schedule `k, k + kweyl, .., k + rounds*kweyl`; precomputed because every block
/// of a call shares it.
fn portable_round_keys(rounds: usize, key: [u32; 4]) -> Vec<aes::Block> {
    let mut k = key;
    let mut rk = Vec::with_capacity(rounds + 1);
    rk.push(lanes_to_block(k));
    for _ in 0..rounds {
        k = weyl_step(k);
        rk.push(lanes_to_block(k));
    }
    rk
}

/// One ARS block with `rounds` rounds, portable code; the reference for KATs and cross-checks.
///
/// `rounds == 0` is treated as 1 (Random123's code always executes the final `aesenclast`), so
/// no input panics; Random123 stops at 10 rounds, larger counts simply continue the schedule.
pub fn ars_block(rounds: usize, ctr: [u32; 4], key: [u32; 4]) -> [u32; 4] {
    let rk = portable_round_keys(rounds.max(1), key);
    ars_block_rk(&rk, ctr)
}

/// Counter lanes of block `b`: the low 64 bits carry the index, the high 64 bits stay zero so
/// that the stream id lives purely in the key.
fn ctr_lanes(b: u64) -> [u32; 4] {
    [b as u32, (b >> 32) as u32, 0, 0]
}

/// Blocks per portable batch: the width of `aes::hazmat::cipher_round_par`, which amortises
/// its per-call feature dispatch (and uses AES instructions when the CPU has them).
const PORTABLE_BATCH: usize = 8;

/// The portable path's per-call state: the round keys, replicated for the parallel rounds.
struct PortableArs {
    /// Round keys 1..R-1 (the aesenc rounds), each broadcast to 8 blocks.
    middle: Vec<aes::hazmat::Block8>,
    first: aes::Block,
    last: aes::Block,
}

impl PortableArs {
    fn new(rounds: usize, key: [u32; 4]) -> Self {
        let rk = portable_round_keys(rounds.max(1), key);
        let middle = rk[1..rk.len() - 1]
            .iter()
            .map(|k| aes::hazmat::Block8::from([*k; PORTABLE_BATCH]))
            .collect();
        Self {
            middle,
            first: rk[0],
            last: rk[rk.len() - 1],
        }
    }

    /// ARS of the 8 blocks `b, b + 1, ..` (wrapping), as u32 lanes in block order.
    fn batch(&self, b: u64) -> [u32; 4 * PORTABLE_BATCH] {
        self.batch_at(&core::array::from_fn(|i| b.wrapping_add(i as u64)))
    }

    /// ARS of the blocks `blocks[0], blocks[1], ..`, as u32 lanes in that order.
    fn batch_at(&self, blocks: &[u64; PORTABLE_BATCH]) -> [u32; 4 * PORTABLE_BATCH] {
        let mut v = aes::hazmat::Block8::default();
        for (blk, &b) in v.iter_mut().zip(blocks) {
            *blk = lanes_to_block(ctr_lanes(b));
            for (a, k) in blk.iter_mut().zip(self.first.iter()) {
                *a ^= *k;
            }
        }
        for k in &self.middle {
            aes::hazmat::cipher_round_par(&mut v, k);
        }
        let mut out = [0u32; 4 * PORTABLE_BATCH];
        for (blk, o) in v.iter_mut().zip(out.chunks_exact_mut(4)) {
            aesenclast_portable(blk, &self.last);
            o.copy_from_slice(&block_to_lanes(blk));
        }
        out
    }
}

fn fill_portable(rounds: usize, key: [u32; 4], first_block: u64, out: &mut [u32]) {
    let ars = PortableArs::new(rounds, key);
    let mut b = first_block;
    for chunk in out.chunks_mut(4 * PORTABLE_BATCH) {
        chunk.copy_from_slice(&ars.batch(b)[..chunk.len()]);
        b = b.wrapping_add(PORTABLE_BATCH as u64);
    }
}

fn keep_words_portable(
    rounds: usize,
    key: [u32; 4],
    first_block: u64,
    thr: u32,
    words: &mut [u64],
) {
    const B: usize = PORTABLE_BATCH / 2;
    let ars = PortableArs::new(rounds, key);
    bitsliced::<B>(
        thr,
        first_block,
        words,
        |first, _, out| {
            let mut blocks = [0u64; PORTABLE_BATCH];
            for (pair, &f) in blocks.chunks_exact_mut(2).zip(first) {
                pair.copy_from_slice(&[f, f.wrapping_add(1)]);
            }
            let r = ars.batch_at(&blocks);
            for (plane, lanes) in out.iter_mut().zip(r.chunks_exact(8)) {
                for (word, l) in plane.iter_mut().zip(lanes.chunks_exact(2)) {
                    *word = u64::from(l[0]) | u64::from(l[1]) << 32;
                }
            }
        },
        |_, _, _, _, _, _| false,
    );
}

// ---------------------------------------------------------------------------------------------
// x86-64 SIMD kernels
// ---------------------------------------------------------------------------------------------

#[cfg(target_arch = "x86_64")]
#[clippy::msrv = "1.89"]
mod x86 {
    //! Kernels generic over the round count `R` so tests can run them against the published
    //! R = 7 vectors while the library ships `ROUNDS`; `R` is a const so the loops unroll.
    //!
    //! This module needs Rust 1.89 (the VAES intrinsics were stabilised there, and calling
    //! `#[target_feature]` helpers safely needs 1.86), newer than the crate's declared
    //! `rust-version`; the `clippy::msrv` attribute on this module tells clippy so instead of
    //! hiding the gap, and the manifest's `rust-version` should be raised to match.

    use super::{
        bitsliced, weyl_step, Plane, BLOCKS_PER_GROUP, FIRST_PLANES, MAX_SIMD_ROUNDS, PLANES,
        WINDOW,
    };
    use core::arch::x86_64::*;

    /// Blocks per AES-NI fill batch. aesenc has ~4 cycles latency and 2/cycle throughput on
    /// recent cores, so at least 8 independent blocks are needed to keep both AES units busy;
    /// 16 measured ~25% faster than 8, the extra slack hiding the store work.
    const NI_BATCH: usize = 16;
    /// 256-bit registers (2 blocks each) per VAES fill batch: 16 registers in flight measured
    /// ~60% faster than 8; more spills.
    const VA_FILL: usize = 16;
    /// Planes per batch of the keep-decision kernels (16 AES-NI or 8 VAES registers).
    const PLANE_BATCH: usize = 8;

    fn lanes_i(k: [u32; 4]) -> [i32; 4] {
        [k[0] as i32, k[1] as i32, k[2] as i32, k[3] as i32]
    }

    #[inline]
    #[target_feature(enable = "aes,sse2,sse4.1")]
    fn rk128<const R: usize>(key: [u32; 4]) -> [__m128i; MAX_SIMD_ROUNDS + 1] {
        let mut rk = [_mm_setzero_si128(); MAX_SIMD_ROUNDS + 1];
        let mut k = key;
        for slot in rk.iter_mut().take(R + 1) {
            let l = lanes_i(k);
            *slot = _mm_set_epi32(l[3], l[2], l[1], l[0]);
            k = weyl_step(k);
        }
        rk
    }

    /// ARS on `NI_BATCH` consecutive blocks starting at `b` (wrapping mod 2^64).
    #[inline]
    #[target_feature(enable = "aes,sse2,sse4.1")]
    fn batch128<const R: usize, const N: usize>(
        rk: &[__m128i; MAX_SIMD_ROUNDS + 1],
        b: u64,
    ) -> [__m128i; N] {
        // _mm_add_epi64 wraps the low lane mod 2^64 and keeps the high (zero) lane at 0, which
        // is exactly the counter semantics.
        let base = _mm_set_epi64x(0, b as i64);
        let mut v = [_mm_setzero_si128(); N];
        for (i, x) in v.iter_mut().enumerate() {
            let c = _mm_add_epi64(base, _mm_set_epi64x(0, i as i64));
            *x = _mm_xor_si128(c, rk[0]);
        }
        for k in &rk[1..R] {
            for x in v.iter_mut() {
                *x = _mm_aesenc_si128(*x, *k);
            }
        }
        for x in v.iter_mut() {
            *x = _mm_aesenclast_si128(*x, rk[R]);
        }
        v
    }

    /// Fills `out` with the ARS words of blocks `first_block..`.
    ///
    /// # Safety
    /// The CPU must support AES-NI and SSE4.1.
    #[target_feature(enable = "aes,sse2,sse4.1")]
    pub(super) unsafe fn fill_aesni<const R: usize>(
        key: [u32; 4],
        first_block: u64,
        out: &mut [u32],
    ) {
        const { assert!(R >= 1 && R <= MAX_SIMD_ROUNDS) };
        let rk = rk128::<R>(key);
        let mut b = first_block;
        let mut chunks = out.chunks_exact_mut(4 * NI_BATCH);
        for chunk in &mut chunks {
            let v = batch128::<R, NI_BATCH>(&rk, b);
            for (i, x) in v.iter().enumerate() {
                // SAFETY: the chunk holds 4 * NI_BATCH u32s, so bytes [16 i, 16 i + 16) are in
                // bounds for i < NI_BATCH; storeu has no alignment requirement.
                unsafe { _mm_storeu_si128(chunk.as_mut_ptr().add(4 * i).cast(), *x) };
            }
            b = b.wrapping_add(NI_BATCH as u64);
        }
        let rest = chunks.into_remainder();
        if !rest.is_empty() {
            let v = batch128::<R, NI_BATCH>(&rk, b);
            let mut tmp = [0u32; 4 * NI_BATCH];
            for (i, x) in v.iter().enumerate() {
                // SAFETY: tmp holds 4 * NI_BATCH u32s; see above.
                unsafe { _mm_storeu_si128(tmp.as_mut_ptr().add(4 * i).cast(), *x) };
            }
            rest.copy_from_slice(&tmp[..rest.len()]);
        }
    }

    /// The planes whose first blocks are `first[..N / 2]` (plane i = blocks first[i] and
    /// first[i] + 1) into `out[..N / 2]`.
    #[inline]
    #[target_feature(enable = "aes,sse2,sse4.1")]
    fn planes128<const R: usize, const N: usize>(
        rk: &[__m128i; MAX_SIMD_ROUNDS + 1],
        first: &[u64; PLANE_BATCH],
        out: &mut [Plane; PLANE_BATCH],
    ) {
        const { assert!(N.is_multiple_of(2) && N / 2 <= PLANE_BATCH) };
        let mut v = [_mm_setzero_si128(); N];
        for (i, x) in v.iter_mut().enumerate() {
            let c = _mm_set_epi64x(0, first[i / 2].wrapping_add((i % 2) as u64) as i64);
            *x = _mm_xor_si128(c, rk[0]);
        }
        for k in &rk[1..R] {
            for x in v.iter_mut() {
                *x = _mm_aesenc_si128(*x, *k);
            }
        }
        for (i, x) in v.iter().enumerate() {
            let y = _mm_aesenclast_si128(*x, rk[R]);
            // SAFETY: out[i / 2] is 4 u64s (32 bytes) and the 16 bytes stored start at u64 2 or
            // 0 of it, so they are in bounds; storeu has no alignment requirement.
            unsafe { _mm_storeu_si128(out[i / 2].as_mut_ptr().add(2 * (i % 2)).cast(), y) };
        }
    }

    /// Keep words for threshold `thr` in [1, 2^32 - 1] (the caller handles 0 and 2^32).
    ///
    /// # Safety
    /// The CPU must support AES-NI and SSE4.1.
    #[target_feature(enable = "aes,sse2,sse4.1")]
    pub(super) unsafe fn keep_words_aesni<const R: usize>(
        key: [u32; 4],
        first_block: u64,
        thr: u32,
        words: &mut [u64],
    ) {
        const { assert!(R >= 1 && R <= MAX_SIMD_ROUNDS) };
        let rk = rk128::<R>(key);
        bitsliced::<PLANE_BATCH>(
            thr,
            first_block,
            words,
            |first, n, out| {
                // A short batch is latency-bound either way; computing half of it is still cheaper.
                if n <= PLANE_BATCH / 2 {
                    planes128::<R, PLANE_BATCH>(&rk, first, out)
                } else {
                    planes128::<R, { 2 * PLANE_BATCH }>(&rk, first, out)
                }
            },
            |first, groups, planes, thr_bits, keep, open| {
                if planes != FIRST_PLANES as usize {
                    return false;
                }
                for g in 0..groups {
                    let at = first.wrapping_add(g as u64 * BLOCKS_PER_GROUP);
                    lead128::<R>(&rk, at, thr_bits, &mut keep[g], &mut open[g]);
                }
                true
            },
        );
    }

    #[inline]
    #[target_feature(enable = "vaes,avx2,aes")]
    fn rk256<const R: usize>(key: [u32; 4]) -> [__m256i; MAX_SIMD_ROUNDS + 1] {
        let mut rk = [_mm256_setzero_si256(); MAX_SIMD_ROUNDS + 1];
        let mut k = key;
        for slot in rk.iter_mut().take(R + 1) {
            let l = lanes_i(k);
            *slot = _mm256_broadcastsi128_si256(_mm_set_epi32(l[3], l[2], l[1], l[0]));
            k = weyl_step(k);
        }
        rk
    }

    /// ARS on `2 * N` consecutive blocks starting at `b`; register i holds blocks
    /// b + 2i (low half) and b + 2i + 1 (high half).
    #[inline]
    #[target_feature(enable = "vaes,avx2,aes")]
    fn batch256<const R: usize, const N: usize>(
        rk: &[__m256i; MAX_SIMD_ROUNDS + 1],
        b: u64,
    ) -> [__m256i; N] {
        let base = _mm256_set_epi64x(0, b.wrapping_add(1) as i64, 0, b as i64);
        let mut v = [_mm256_setzero_si256(); N];
        for (i, x) in v.iter_mut().enumerate() {
            let off = 2 * i as i64;
            let c = _mm256_add_epi64(base, _mm256_set_epi64x(0, off, 0, off));
            *x = _mm256_xor_si256(c, rk[0]);
        }
        for k in &rk[1..R] {
            for x in v.iter_mut() {
                *x = _mm256_aesenc_epi128(*x, *k);
            }
        }
        for x in v.iter_mut() {
            *x = _mm256_aesenclast_epi128(*x, rk[R]);
        }
        v
    }

    /// # Safety
    /// The CPU must support VAES, AVX2 and AES-NI.
    #[target_feature(enable = "vaes,avx2,aes")]
    pub(super) unsafe fn fill_vaes<const R: usize>(
        key: [u32; 4],
        first_block: u64,
        out: &mut [u32],
    ) {
        const { assert!(R >= 1 && R <= MAX_SIMD_ROUNDS) };
        let rk = rk256::<R>(key);
        let mut b = first_block;
        const N: usize = VA_FILL;
        let mut chunks = out.chunks_exact_mut(8 * N);
        for chunk in &mut chunks {
            let v = batch256::<R, N>(&rk, b);
            for (i, x) in v.iter().enumerate() {
                // SAFETY: the chunk holds 8 * N u32s, so the 32 bytes at u32 offset 8 i are in
                // bounds for i < N; storeu has no alignment requirement.
                unsafe { _mm256_storeu_si256(chunk.as_mut_ptr().add(8 * i).cast(), *x) };
            }
            b = b.wrapping_add(2 * N as u64);
        }
        let rest = chunks.into_remainder();
        if !rest.is_empty() {
            let v = batch256::<R, N>(&rk, b);
            let mut tmp = [0u32; 8 * N];
            for (i, x) in v.iter().enumerate() {
                // SAFETY: tmp holds 8 * N u32s; see above.
                unsafe { _mm256_storeu_si256(tmp.as_mut_ptr().add(8 * i).cast(), *x) };
            }
            rest.copy_from_slice(&tmp[..rest.len()]);
        }
    }

    /// `lead256` for AES-NI: plane k is the register pair (2k, 2k + 1) of consecutive blocks,
    /// drawn in two halves so that the blocks in flight fit the 16 registers.
    #[inline]
    #[target_feature(enable = "aes,sse2,sse4.1")]
    fn lead128<const R: usize>(
        rk: &[__m128i; MAX_SIMD_ROUNDS + 1],
        first: u64,
        thr_bits: &[u64; PLANES as usize],
        keep: &mut Plane,
        open: &mut Plane,
    ) {
        const F: usize = FIRST_PLANES as usize;
        const { assert!(F.is_multiple_of(2)) };
        let mut kept = [_mm_setzero_si128(); 2];
        let mut undecided = [_mm_set1_epi64x(-1); 2];
        for half in 0..2 {
            let v = batch128::<R, F>(rk, first.wrapping_add((half * F) as u64));
            for (pair, &t) in v.chunks_exact(2).zip(&thr_bits[half * F / 2..]) {
                let t = _mm_set1_epi64x(t as i64);
                for (i, plane) in pair.iter().enumerate() {
                    kept[i] = _mm_or_si128(
                        kept[i],
                        _mm_andnot_si128(*plane, _mm_and_si128(undecided[i], t)),
                    );
                    undecided[i] = _mm_andnot_si128(_mm_xor_si128(*plane, t), undecided[i]);
                }
            }
        }
        for i in 0..2 {
            // SAFETY: keep and open are 4 u64s (32 bytes) each; each store writes 16 bytes at
            // u64 offset 0 or 2 of one of them; storeu needs no alignment.
            unsafe {
                _mm_storeu_si128(keep.as_mut_ptr().add(2 * i).cast(), kept[i]);
                _mm_storeu_si128(open.as_mut_ptr().add(2 * i).cast(), undecided[i]);
            }
        }
    }

    /// The planes whose first blocks are `first[..N]` (register i = blocks first[i] and
    /// first[i] + 1, one plane) into `out[..N]`.
    #[inline]
    #[target_feature(enable = "vaes,avx2,aes")]
    fn planes256<const R: usize, const N: usize>(
        rk: &[__m256i; MAX_SIMD_ROUNDS + 1],
        first: &[u64; PLANE_BATCH],
        out: &mut [Plane; PLANE_BATCH],
    ) {
        const { assert!(N <= PLANE_BATCH) };
        let mut v = [_mm256_setzero_si256(); N];
        for (x, &f) in v.iter_mut().zip(first) {
            let c = _mm256_set_epi64x(0, f.wrapping_add(1) as i64, 0, f as i64);
            *x = _mm256_xor_si256(c, rk[0]);
        }
        for k in &rk[1..R] {
            for x in v.iter_mut() {
                *x = _mm256_aesenc_epi128(*x, *k);
            }
        }
        for (x, o) in v.iter().zip(out.iter_mut()) {
            let y = _mm256_aesenclast_epi128(*x, rk[R]);
            // SAFETY: o is 4 u64s, exactly the 32 bytes stored; storeu needs no alignment.
            unsafe { _mm256_storeu_si256(o.as_mut_ptr().cast(), y) };
        }
    }

    /// Draws the leading `FIRST_PLANES` planes of the group whose first block is `first` and
    /// folds them (see `Window::fold`) in registers: the bulk of the decision work.
    #[inline]
    #[target_feature(enable = "vaes,avx2,aes")]
    fn lead256<const R: usize>(
        rk: &[__m256i; MAX_SIMD_ROUNDS + 1],
        first: u64,
        thr_bits: &[u64; PLANES as usize],
        keep: &mut Plane,
        open: &mut Plane,
    ) {
        const F: usize = FIRST_PLANES as usize;
        // Plane k is blocks first + 2k and first + 2k + 1: register k of a consecutive batch.
        let v = batch256::<R, F>(rk, first);
        let mut kept = _mm256_setzero_si256();
        let mut undecided = _mm256_set1_epi64x(-1);
        for (plane, &t) in v.iter().zip(thr_bits) {
            let t = _mm256_set1_epi64x(t as i64);
            // keep |= open & !plane & t; open &= !(plane ^ t)
            kept = _mm256_or_si256(
                kept,
                _mm256_andnot_si256(*plane, _mm256_and_si256(undecided, t)),
            );
            undecided = _mm256_andnot_si256(_mm256_xor_si256(*plane, t), undecided);
        }
        // SAFETY: keep and open are 4 u64s each, exactly the 32 bytes stored; storeu needs no
        // alignment.
        unsafe {
            _mm256_storeu_si256(keep.as_mut_ptr().cast(), kept);
            _mm256_storeu_si256(open.as_mut_ptr().cast(), undecided);
        }
    }

    /// # Safety
    /// The CPU must support VAES, AVX2 and AES-NI.
    #[target_feature(enable = "vaes,avx2,aes")]
    pub(super) unsafe fn keep_words_vaes<const R: usize>(
        key: [u32; 4],
        first_block: u64,
        thr: u32,
        words: &mut [u64],
    ) {
        const { assert!(R >= 1 && R <= MAX_SIMD_ROUNDS) };
        let rk = rk256::<R>(key);
        bitsliced::<PLANE_BATCH>(
            thr,
            first_block,
            words,
            |first, n, out| {
                // A short batch is latency-bound either way; computing half of it is still cheaper.
                if n <= PLANE_BATCH / 2 {
                    planes256::<R, { PLANE_BATCH / 2 }>(&rk, first, out)
                } else {
                    planes256::<R, PLANE_BATCH>(&rk, first, out)
                }
            },
            |first, groups, planes, thr_bits, keep, open| {
                if planes != FIRST_PLANES as usize {
                    return false;
                }
                for g in 0..groups {
                    let at = first.wrapping_add(g as u64 * BLOCKS_PER_GROUP);
                    lead256::<R>(&rk, at, thr_bits, &mut keep[g], &mut open[g]);
                }
                true
            },
        );
    }

    #[inline]
    #[target_feature(enable = "vaes,avx512f")]
    fn rk512<const R: usize>(key: [u32; 4]) -> [__m512i; MAX_SIMD_ROUNDS + 1] {
        let mut rk = [_mm512_setzero_si512(); MAX_SIMD_ROUNDS + 1];
        let mut k = key;
        for slot in rk.iter_mut().take(R + 1) {
            let l = lanes_i(k);
            *slot = _mm512_broadcast_i32x4(_mm_set_epi32(l[3], l[2], l[1], l[0]));
            k = weyl_step(k);
        }
        rk
    }

    /// `lead256` for two groups at once, the groups whose first blocks are `first` and
    /// `first + BLOCKS_PER_GROUP`: register k holds plane k of both (blocks 2k and 2k + 1 of the
    /// first group in its low half, of the second in its high half), so one 512-bit AES round
    /// and one fold serve both.
    #[inline]
    #[target_feature(enable = "vaes,avx512f")]
    fn lead512_pair<const R: usize, const F: usize>(
        rk: &[__m512i; MAX_SIMD_ROUNDS + 1],
        first: u64,
        thr_bits: &[u64; PLANES as usize],
        keep: &mut [Plane],
        open: &mut [Plane],
    ) {
        let second = first.wrapping_add(BLOCKS_PER_GROUP);
        // _mm512_add_epi64 wraps each 64-bit counter mod 2^64 and keeps the zero high halves.
        let base = _mm512_set_epi64(
            0,
            second.wrapping_add(1) as i64,
            0,
            second as i64,
            0,
            first.wrapping_add(1) as i64,
            0,
            first as i64,
        );
        let mut v = [_mm512_setzero_si512(); F];
        for (k, x) in v.iter_mut().enumerate() {
            let off = 2 * k as i64;
            let c = _mm512_add_epi64(base, _mm512_set_epi64(0, off, 0, off, 0, off, 0, off));
            *x = _mm512_xor_si512(c, rk[0]);
        }
        for k in &rk[1..R] {
            for x in v.iter_mut() {
                *x = _mm512_aesenc_epi128(*x, *k);
            }
        }
        let mut kept = _mm512_setzero_si512();
        let mut undecided = _mm512_set1_epi64(-1);
        for (x, &t) in v.iter().zip(thr_bits) {
            let plane = _mm512_aesenclast_epi128(*x, rk[R]);
            let t = _mm512_set1_epi64(t as i64);
            // keep |= open & !plane & t; open &= !(plane ^ t)
            kept = _mm512_or_si512(
                kept,
                _mm512_andnot_si512(plane, _mm512_and_si512(undecided, t)),
            );
            undecided = _mm512_andnot_si512(_mm512_xor_si512(plane, t), undecided);
        }
        assert!(keep.len() >= 2 && open.len() >= 2);
        // SAFETY: keep and open hold at least two planes of 4 u64s (just checked), so the 64
        // bytes stored into each are in bounds; storeu needs no alignment.
        unsafe {
            _mm512_storeu_si512(keep.as_mut_ptr().cast(), kept);
            _mm512_storeu_si512(open.as_mut_ptr().cast(), undecided);
        }
    }

    /// [`keep_words_vaes`] drawing the leading planes of two groups per 512-bit register; the
    /// later planes of the few groups still open, and an odd last group, as `keep_words_vaes`.
    ///
    /// # Safety
    /// The CPU must support VAES, AVX-512F, AVX2 and AES-NI.
    #[target_feature(enable = "vaes,avx512f,avx2,aes")]
    pub(super) unsafe fn keep_words_vaes512<const R: usize>(
        key: [u32; 4],
        first_block: u64,
        thr: u32,
        words: &mut [u64],
    ) {
        const { assert!(R >= 1 && R <= MAX_SIMD_ROUNDS) };
        let rk = rk256::<R>(key);
        let rk4 = rk512::<R>(key);
        bitsliced::<PLANE_BATCH>(
            thr,
            first_block,
            words,
            |first, n, out| {
                if n <= PLANE_BATCH / 2 {
                    planes256::<R, { PLANE_BATCH / 2 }>(&rk, first, out)
                } else {
                    planes256::<R, PLANE_BATCH>(&rk, first, out)
                }
            },
            |first, groups, planes, thr_bits, keep, open| {
                // An odd last group is drawn with the group after it, which lies past the
                // words (its planes are computed and never read) but inside the window's state,
                // as the window holds an even number of groups.
                const { assert!(WINDOW.is_multiple_of(2)) };
                macro_rules! pairs {
                    ($planes:expr) => {
                        for g in (0..groups).step_by(2) {
                            let at = first.wrapping_add(g as u64 * BLOCKS_PER_GROUP);
                            lead512_pair::<R, { $planes }>(
                                &rk4,
                                at,
                                thr_bits,
                                &mut keep[g..],
                                &mut open[g..],
                            );
                        }
                    };
                }
                // Thresholds of fewer bits than FIRST_PLANES (p = 0.5, 0.25, 0.75, ..) draw every
                // plane they need here.
                const { assert!(FIRST_PLANES == 12) };
                match planes {
                    1 => pairs!(1),
                    2 => pairs!(2),
                    3 => pairs!(3),
                    4 => pairs!(4),
                    5 => pairs!(5),
                    6 => pairs!(6),
                    7 => pairs!(7),
                    8 => pairs!(8),
                    9 => pairs!(9),
                    10 => pairs!(10),
                    11 => pairs!(11),
                    12 => pairs!(12),
                    _ => return false,
                }
                true
            },
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Public entry points
// ---------------------------------------------------------------------------------------------

/// Random words: `out[j]` = lane `j % 4` of ARS-5(counter = `first_block + j / 4`, key). Any
/// length (a final partial block is truncated). Counter arithmetic wraps mod 2^64.
///
/// Uses [`backend()`].
pub fn fill_u32(key: Key, first_block: u64, out: &mut [u32]) {
    fill_u32_with(backend(), key, first_block, out);
}

/// [`fill_u32`] on a chosen backend (bit-identical output on all). A backend this CPU cannot
/// run is replaced by the best one it can, so this function is always safe to call.
pub fn fill_u32_with(backend: Backend, key: Key, first_block: u64, out: &mut [u32]) {
    let k = key.lanes();
    match resolve(backend) {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: resolve() returns Vaes only if runtime detection found vaes, avx2 and aes.
        Backend::Vaes => unsafe { x86::fill_vaes::<ROUNDS>(k, first_block, out) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: resolve() returns AesNi only if runtime detection found aes and sse4.1.
        Backend::AesNi => unsafe { x86::fill_aesni::<ROUNDS>(k, first_block, out) },
        _ => fill_portable(ROUNDS, k, first_block, out),
    }
}

/// Keep probability -> threshold in [0, 2^32]: `round(keep * 2^32)`, exact to 2^-32, so that a
/// random `u32` word `x` is kept iff `x < threshold`. `keep` outside [0, 1] is clamped; NaN is
/// treated as 0 (keep nothing) rather than panicking.
pub fn threshold_for(keep: f64) -> u64 {
    if keep.is_nan() {
        return 0;
    }
    // Scaling by a power of two is exact, so the only rounding is the explicit one.
    (keep.clamp(0.0, 1.0) * 4_294_967_296.0).round() as u64
}

/// Keep decisions, 64 per word: bit `j` of `words[w]` is 1 iff the uniform word U(e) of element
/// `e = 64*w + j` is `< threshold` (compared as u64). U(e) is bit-sliced over the counter
/// blocks: the 256 elements of group `e / 256` own the 64 blocks from
/// `first_block + 64 * (e / 256)`, and [`uniform_words`] gives every U(e) in full. A caller
/// cutting a mask into pieces starts each piece on a group (`first_block + e / 4`, e a multiple
/// of [`GROUP`]). `threshold = 0` -> all 0; `threshold >= 2^32` -> all 1.
///
/// Uses [`backend()`].
pub fn keep_words(key: Key, first_block: u64, threshold: u64, words: &mut [u64]) {
    keep_words_with(backend(), key, first_block, threshold, words);
}

/// [`keep_words`] on a chosen backend (bit-identical output on all). A backend this CPU cannot
/// run is replaced by the best one it can, so this function is always safe to call.
pub fn keep_words_with(
    backend: Backend,
    key: Key,
    first_block: u64,
    threshold: u64,
    words: &mut [u64],
) {
    // The edges need no random numbers, and excluding them lets the kernels work with a u32
    // threshold in [1, 2^32 - 1] where the biased signed compare is exact.
    if threshold == 0 {
        words.fill(0);
        return;
    }
    if threshold >= 1 << 32 {
        words.fill(u64::MAX);
        return;
    }
    let thr = threshold as u32;
    let k = key.lanes();
    match resolve(backend) {
        #[cfg(target_arch = "x86_64")]
        Backend::Vaes => vaes_keep_words(cpu::features().avx512f, k, first_block, thr, words),
        #[cfg(target_arch = "x86_64")]
        // SAFETY: resolve() returns AesNi only if runtime detection found aes and sse4.1.
        Backend::AesNi => unsafe { x86::keep_words_aesni::<ROUNDS>(k, first_block, thr, words) },
        _ => keep_words_portable(ROUNDS, k, first_block, thr, words),
    }
}

/// The VAES backend's keep words, drawing the leading planes of two groups per 512-bit
/// register when `wide` and the CPU has AVX-512F, else of one group per 256-bit register; the
/// bits are the same either way. The caller has checked that the CPU runs `Backend::Vaes`.
#[cfg(target_arch = "x86_64")]
fn vaes_keep_words(wide: bool, key: [u32; 4], first_block: u64, thr: u32, words: &mut [u64]) {
    debug_assert!(detected().contains(&Backend::Vaes));
    if wide && cpu::features().avx512f {
        // SAFETY: Backend::Vaes is detected (vaes, avx2, aes), and so is avx512f.
        unsafe { x86::keep_words_vaes512::<ROUNDS>(key, first_block, thr, words) }
    } else {
        // SAFETY: Backend::Vaes is detected: vaes, avx2 and aes.
        unsafe { x86::keep_words_vaes::<ROUNDS>(key, first_block, thr, words) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Known-answer vectors for `ars4x32`, format `R  CTR[0..4]  KEY[0..4]  EXPECTED[0..4]`,
    /// each word the u32 lane value (lane 0 first).
    ///
    /// R = 7 lines: a deterministic sample (every 100th `ars4x32 7` line, plus a few of the
    /// pi-digit counters) of `tests/old_kat_vectors` in DEShawResearch/random123 (commit
    /// 9545ff6). The first two lines also appear in that repository's `tests/ut_ars.c` as
    /// byte strings (`2b1623350cd214dc 7740187993411872`, `2de6b66fa461b668 f380126f32b9cd22`),
    /// which pins the lane/byte order.
    /// R = 10 lines: all three `ars4x32` lines of the current `tests/kat_vectors` there.
    const KAT: &str = "\
7 00000001 00000000 00000000 00000000 00000001 00000000 00000000 00000000 3523162b dc14d20c 79184077 72184193
7 00000100 00000000 00000000 00000000 00000001 00000000 00000000 00000000 6fb6e62d 68b661a4 6f1280f3 22cdb932
7 00010000 00000000 00000000 00000000 00010000 00000000 00000000 00000000 e5349df5 2bebd533 051d33a9 79089581
7 00000000 00000001 00000000 00000000 00000000 00000001 00000000 00000000 45a75118 f1c9f98e e1cbd902 ffa4f796
7 00000000 00010000 00000000 00000000 00000000 00010000 00000000 00000000 21987c11 f47b221c 1bd108f9 4a89ea4c
7 00000000 00000000 00000001 00000000 00000000 00000000 00000001 00000000 acbb0ca6 57d697a2 5fde660c 606d05e1
7 00000000 00000000 00010000 00000000 00000000 00000000 00010000 00000000 60caf69a ce5c0585 ebaca6c9 51b5618f
7 00000000 00000000 00000000 00000001 00000000 00000000 00000000 00000001 34d40c7a c5526b8f 0b35e113 bcd830c6
7 00000000 00000000 00000000 00010000 00000000 00000000 00000000 00010000 f4619e3a 02ded40c 9c0340eb 3b7e7721
7 0000ff00 00000000 00000000 00000000 0000ff00 00000000 00000000 00000000 35715da2 e9b679af 41d4db67 5a0d04bb
7 00ff0000 00000000 00000000 00000000 00ff0000 00000000 00000000 00000000 b8cb69c4 7c6cd1b4 fef546e2 a67ba514
7 ff000000 00000000 00000000 00000000 ff000000 00000000 00000000 00000000 8a4ef9ba b150b7b8 a89b995d 222654b3
7 00000000 000000ff 00000000 00000000 00000000 000000ff 00000000 00000000 6ffb7b5e f6433da9 546972b1 b9ba5e91
7 00000000 0000ff00 00000000 00000000 00000000 0000ff00 00000000 00000000 8c7134f8 5c101fe0 a856f137 f0b7f9e2
7 00000000 00ff0000 00000000 00000000 00000000 00ff0000 00000000 00000000 a0d5b02b 733a381c 450b339f 7cff8df1
7 00000000 ff000000 00000000 00000000 00000000 ff000000 00000000 00000000 eb301301 290c523c 45eee9c5 d64bf7a8
7 00000000 00000000 000000ff 00000000 00000000 00000000 000000ff 00000000 52fd0dfd 15561258 c6ab328b f9557afc
7 00000000 00000000 0000ff00 00000000 00000000 00000000 0000ff00 00000000 b944aa9c c45f5a12 f1ca4a9e a0456e0b
7 00000000 00000000 00ff0000 00000000 00000000 00000000 00ff0000 00000000 b269cb2b 5ea85bfb 2a8ce1ab fa783c04
7 00000000 00000000 ff000000 00000000 00000000 00000000 ff000000 00000000 f9abe8ab 34ae560f c23b89c5 ffb47ec7
7 00000000 00000000 00000000 000000ff 00000000 00000000 00000000 000000ff 2890decf 9d58b59f f578c4cd d37a5621
7 00000000 00000000 00000000 0000ff00 00000000 00000000 00000000 0000ff00 342325fa d8f20b40 c2c3aac5 65147f0a
7 00000000 00000000 00000000 00ff0000 00000000 00000000 00000000 00ff0000 04b9d323 38328c93 5b618e1f db402a8c
7 00000000 00000000 00000000 ff000000 00000000 00000000 00000000 ff000000 42a38dae 356f9800 ee54d9ce 2c8fe759
7 886a3f24 d308a385 2e8a1913 44737003 00000001 00000000 00000000 00000000 bb4006c7 33dbc0db 1ea0a1c9 7f9541e3
7 e6212845 7713d038 cf6654be 6c0ce934 00000000 01000000 00000000 00000000 753c4e79 496e5769 8b50732c d23f56d9
7 886a3f24 d308a385 2e8a1913 44737003 00000000 00000000 00000000 01000000 f3aa0390 315d0cd6 4519ebd9 fc2f7ce2
7 e6212845 7713d038 cf6654be 6c0ce934 00000000 000000ff 00000000 00000000 f584e714 00b48848 4a91baa5 3ca12024
7 886a3f24 d308a385 2e8a1913 44737003 00000000 00000000 000000ff 00000000 e16cc4ad 54f590c4 e1566ac0 32f9c6a9
7 e6212845 7713d038 cf6654be 6c0ce934 00000000 00000000 80000000 00000000 40b825de a60b3b62 f4ebf400 0e825cbf
7 886a3f24 d308a385 2e8a1913 44737003 00000000 00000000 00000000 80000000 31e3f0cc 92d1e3cc a2fdaa6c 902c741b
10 00000000 00000000 00000000 00000000 00000000 00000000 00000000 00000000 8d73ee19 506401ef 13c2dbe4 0cbe9c0d
10 243f6a88 85a308d3 13198a2e 03707344 a4093822 299f31d0 082efa98 ec4e6c89 a516e7d6 8357ad74 5b59b3ec 8763fff3
10 ffffffff ffffffff ffffffff ffffffff ffffffff ffffffff 00000000 00000000 bb3743b1 9f635551 ecbc87fc a19478a9
";

    struct Kat {
        rounds: usize,
        ctr: [u32; 4],
        key: [u32; 4],
        expected: [u32; 4],
    }

    fn kats() -> Vec<Kat> {
        KAT.lines()
            .filter(|l| !l.trim().is_empty())
            .map(|l| {
                let f: Vec<&str> = l.split_whitespace().collect();
                assert_eq!(f.len(), 13, "bad KAT line {l}");
                let w = |i: usize| u32::from_str_radix(f[i], 16).unwrap();
                Kat {
                    rounds: f[0].parse().unwrap(),
                    ctr: [w(1), w(2), w(3), w(4)],
                    key: [w(5), w(6), w(7), w(8)],
                    expected: [w(9), w(10), w(11), w(12)],
                }
            })
            .collect()
    }

    #[test]
    fn kat_portable() {
        let v = kats();
        assert_eq!(v.len(), 34);
        for k in &v {
            assert_eq!(
                ars_block(k.rounds, k.ctr, k.key),
                k.expected,
                "R={} ctr={:08x?} key={:08x?}",
                k.rounds,
                k.ctr,
                k.key
            );
        }
    }

    /// The SIMD kernels take only block counters (high 64 bits zero), so they can be checked
    /// against the KAT lines whose counter has that shape, with the real vectors' round counts.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn kat_simd_kernels() {
        let avail = available_backends();
        let mut checked = 0;
        for k in kats().iter().filter(|k| k.ctr[2] == 0 && k.ctr[3] == 0) {
            let b = u64::from(k.ctr[0]) | u64::from(k.ctr[1]) << 32;
            for &be in &avail {
                let mut out = [0u32; 4];
                match (be, k.rounds) {
                    // SAFETY: `be` is in available_backends(), so its features were detected.
                    (Backend::AesNi, 7) => unsafe { x86::fill_aesni::<7>(k.key, b, &mut out) },
                    (Backend::AesNi, 10) => unsafe { x86::fill_aesni::<10>(k.key, b, &mut out) },
                    (Backend::Vaes, 7) => unsafe { x86::fill_vaes::<7>(k.key, b, &mut out) },
                    (Backend::Vaes, 10) => unsafe { x86::fill_vaes::<10>(k.key, b, &mut out) },
                    _ => fill_portable(k.rounds, k.key, b, &mut out),
                }
                assert_eq!(out, k.expected, "{be:?} R={} ctr={:08x?}", k.rounds, k.ctr);
                checked += 1;
            }
        }
        assert!(checked >= 10);
    }

    #[test]
    fn rounds_zero_and_large_do_not_panic() {
        assert_eq!(
            ars_block(0, [1, 2, 3, 4], [5, 6, 7, 8]),
            ars_block(1, [1, 2, 3, 4], [5, 6, 7, 8])
        );
        let _ = ars_block(40, [1, 2, 3, 4], [5, 6, 7, 8]);
    }

    const KEYS: [Key; 4] = [
        Key { seed: 0, stream: 0 },
        Key { seed: 1, stream: 0 },
        Key {
            seed: 0x0123_4567_89ab_cdef,
            stream: 7,
        },
        Key {
            seed: u64::MAX,
            stream: u64::MAX,
        },
    ];
    const FIRSTS: [u64; 6] = [0, 1, 5, 1 << 32, u64::MAX - 3, u64::MAX];
    const LENS: [usize; 14] = [0, 1, 2, 3, 4, 5, 17, 31, 33, 63, 64, 65, 129, 1000];

    /// Word of element `e` straight from the reference block function.
    fn reference_word(key: Key, first_block: u64, e: usize) -> u32 {
        let b = first_block.wrapping_add((e / 4) as u64);
        ars_block(ROUNDS, ctr_lanes(b), key.lanes())[e % 4]
    }

    #[test]
    fn fill_portable_matches_ars_block() {
        for key in KEYS {
            for first in FIRSTS {
                let mut out = vec![0u32; 37];
                fill_u32_with(Backend::Portable, key, first, &mut out);
                for (e, &x) in out.iter().enumerate() {
                    assert_eq!(x, reference_word(key, first, e));
                }
            }
        }
    }

    #[test]
    fn wrap_continues_at_zero() {
        let key = KEYS[2];
        let mut a = vec![0u32; 16];
        fill_u32_with(Backend::Portable, key, u64::MAX - 1, &mut a);
        let mut b = vec![0u32; 8];
        fill_u32_with(Backend::Portable, key, 0, &mut b);
        assert_eq!(&a[8..], &b[..]);
    }

    #[test]
    fn all_backends_fill_identically() {
        for be in available_backends() {
            for key in KEYS {
                for first in FIRSTS {
                    for len in LENS {
                        let mut want = vec![0u32; len];
                        fill_u32_with(Backend::Portable, key, first, &mut want);
                        let mut got = vec![0xdead_beef; len];
                        fill_u32_with(be, key, first, &mut got);
                        assert_eq!(got, want, "{be:?} {key:?} first={first} len={len}");
                    }
                }
            }
        }
    }

    const THRESHOLDS: [u64; 15] = [
        0,
        1,
        12345,
        1 << 30,
        3 << 30,
        0xE000_0000, // 3 planes at most: drawn in one go, two groups at a time
        0x9000_0000, // 4 planes at most
        0xC800_0000, // 5 planes at most
        0xE580_0000, // 9 planes at most
        1 << 31,
        (1 << 31) + 1,
        3_865_470_566, // keep 0.9: no early stop at a low set bit
        (1 << 32) - 1,
        1 << 32,
        u64::MAX,
    ];

    /// keep_words spelled out from its definition.
    fn naive_keep(key: Key, first: u64, thr: u64, nwords: usize) -> Vec<u64> {
        let mut u = vec![0u32; 64 * nwords];
        uniform_words(key, first, &mut u);
        (0..nwords)
            .map(|w| {
                (0..64).fold(0u64, |acc, j| {
                    acc | u64::from(u64::from(u[64 * w + j]) < thr) << j
                })
            })
            .collect()
    }

    #[test]
    fn uniform_words_transpose_the_planes() {
        // Element 0 of a group is bit 0 of each plane; plane k (k = 0 most significant) is
        // blocks 2k and 2k + 1 of the group; element 255 is the top bit of block 2k + 1's lane 3.
        let key = KEYS[1];
        let mut u = vec![0u32; 2 * GROUP];
        uniform_words(key, 5, &mut u);
        for (g, e) in [(0usize, 0usize), (0, 255), (1, 37), (1, 200)] {
            let want = (0..32).fold(0u32, |acc, k| {
                let j = e;
                let block = 5 + 64 * g as u64 + 2 * k as u64 + (j / 128) as u64;
                let lane = ars_block(ROUNDS, ctr_lanes(block), key.lanes())[(j % 128) / 32];
                acc | ((lane >> (j % 32)) & 1) << (31 - k)
            });
            assert_eq!(u[GROUP * g + e], want, "group {g} element {e}");
        }
        // A uniform word is uniform: the top bit is set about half the time.
        let mut many = vec![0u32; 64 * GROUP];
        uniform_words(key, 0, &mut many);
        let top = many.iter().filter(|&&x| x >> 31 == 1).count() as f64;
        let n = many.len() as f64;
        assert!((top - n / 2.0).abs() <= 6.0 * (n / 4.0).sqrt());
    }

    #[test]
    fn keep_words_matches_naive_on_all_backends() {
        for be in available_backends() {
            for key in KEYS {
                for first in FIRSTS {
                    for thr in THRESHOLDS {
                        for nwords in [0usize, 1, 2, 3, 5, 17, 64, 65, 131] {
                            let want = naive_keep(key, first, thr, nwords);
                            let mut got = vec![0x5555_5555_5555_5555; nwords];
                            keep_words_with(be, key, first, thr, &mut got);
                            assert_eq!(
                                got, want,
                                "{be:?} {key:?} first={first} thr={thr} n={nwords}"
                            );
                        }
                    }
                }
            }
        }
    }

    /// The VAES backend runs 512-bit registers where the CPU has AVX-512F and 256-bit ones
    /// elsewhere; `keep_words_with(Vaes)` reaches only one of them here, so both are checked
    /// against the definition directly, on odd and even group counts and partial groups.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn vaes_widths_match_naive() {
        if !available_backends().contains(&Backend::Vaes) {
            return;
        }
        for wide in [false, true] {
            for key in KEYS {
                for first in FIRSTS {
                    for thr in THRESHOLDS.into_iter().filter(|&t| t != 0 && t < 1 << 32) {
                        for nwords in [1usize, 3, 4, 5, 8, 17, 64, 65, 68, 131] {
                            let want = naive_keep(key, first, thr, nwords);
                            let mut got = vec![0x5555_5555_5555_5555; nwords];
                            vaes_keep_words(wide, key.lanes(), first, thr as u32, &mut got);
                            assert_eq!(got, want, "wide={wide} {key:?} first={first} thr={thr}");
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn keep_words_long_run_agrees() {
        let key = Key {
            seed: 42,
            stream: 3,
        };
        let n = 1000;
        let mut want = vec![0u64; n];
        keep_words_with(Backend::Portable, key, u64::MAX - 3, 1 << 31, &mut want);
        for be in available_backends() {
            let mut got = vec![0u64; n];
            keep_words_with(be, key, u64::MAX - 3, 1 << 31, &mut got);
            assert_eq!(got, want, "{be:?}");
        }
        assert_eq!(want, naive_keep(key, u64::MAX - 3, 1 << 31, n));
    }

    #[test]
    fn threshold_edges() {
        assert_eq!(threshold_for(0.0), 0);
        assert_eq!(threshold_for(1.0), 1 << 32);
        assert_eq!(threshold_for(0.5), 1 << 31);
        assert_eq!(threshold_for(0.25), 1 << 30);
        assert_eq!(threshold_for(-3.0), 0);
        assert_eq!(threshold_for(7.0), 1 << 32);
        assert_eq!(threshold_for(f64::NAN), 0);
        assert_eq!(threshold_for(f64::INFINITY), 1 << 32);
        assert_eq!(threshold_for(1e-4), 429_497); // 429496.7296 rounded
        let mut w = [7u64; 3];
        keep_words(KEYS[1], 0, 0, &mut w);
        assert_eq!(w, [0; 3]);
        keep_words(KEYS[1], 0, 1 << 32, &mut w);
        assert_eq!(w, [u64::MAX; 3]);
    }

    #[test]
    fn keep_rate_small_probability() {
        let thr = threshold_for(1e-4);
        let n_words = 1 << 16; // 4M decisions
        let mut w = vec![0u64; n_words];
        keep_words(
            Key {
                seed: 2024,
                stream: 1,
            },
            0,
            thr,
            &mut w,
        );
        let kept: u64 = w.iter().map(|x| u64::from(x.count_ones())).sum();
        let n = (64 * n_words) as f64;
        let p = thr as f64 / 4_294_967_296.0;
        let mean = n * p;
        let sigma = (n * p * (1.0 - p)).sqrt();
        assert!(
            (kept as f64 - mean).abs() <= 6.0 * sigma,
            "kept {kept}, expected {mean} +- {sigma}"
        );
    }

    #[test]
    fn keep_rate_half() {
        let mut w = vec![0u64; 1 << 14];
        keep_words(Key { seed: 9, stream: 0 }, 123, 1 << 31, &mut w);
        let kept: u64 = w.iter().map(|x| u64::from(x.count_ones())).sum();
        let n = (64 << 14) as f64;
        assert!((kept as f64 - n / 2.0).abs() <= 6.0 * (n / 4.0).sqrt());
    }

    #[test]
    fn streams_and_seeds_differ() {
        let mut a = [0u32; 8];
        let mut b = [0u32; 8];
        fill_u32(Key { seed: 1, stream: 0 }, 0, &mut a);
        fill_u32(Key { seed: 1, stream: 1 }, 0, &mut b);
        assert_ne!(a, b);
        fill_u32(Key { seed: 2, stream: 0 }, 0, &mut b);
        assert_ne!(a, b);
    }

    #[test]
    fn backend_choice_policy() {
        let all = [Backend::Portable, Backend::AesNi, Backend::Vaes];
        let ni = [Backend::Portable, Backend::AesNi];
        let none = [Backend::Portable];
        assert_eq!(choose_backend(Simd::Auto, &all), Backend::Vaes);
        assert_eq!(choose_backend(Simd::Auto, &ni), Backend::AesNi);
        assert_eq!(choose_backend(Simd::Portable, &all), Backend::Portable);
        assert_eq!(choose_backend(Simd::AesNi, &all), Backend::AesNi);
        assert_eq!(choose_backend(Simd::Vaes, &ni), Backend::AesNi);
        assert_eq!(choose_backend(Simd::Vaes, &none), Backend::Portable);
        assert_eq!(choose_backend(Simd::AesNi, &none), Backend::Portable);
        assert!(available_backends().contains(&backend()));
        assert_eq!(available_backends()[0], Backend::Portable);
    }

    #[test]
    fn backends_follow_the_probed_features() {
        let f = |aes, sse41, vaes, avx2| cpu::Features {
            aes,
            sse41,
            vaes,
            avx2,
            f16c: false,
            avx512f: false,
        };
        let all = [Backend::Portable, Backend::AesNi, Backend::Vaes];
        if cfg!(target_arch = "x86_64") {
            assert_eq!(backends_for(f(true, true, true, true)), all);
            assert_eq!(backends_for(f(true, true, true, false)), all[..2]);
            assert_eq!(backends_for(f(true, true, false, true)), all[..2]);
        }
        assert_eq!(backends_for(f(true, false, true, true)), all[..1]);
        assert_eq!(backends_for(f(false, true, true, true)), all[..1]);
        assert_eq!(backends_for(cpu::features()), available_backends());
    }
}
