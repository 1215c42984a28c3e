//! The one generic routine every variant runs: walk a strided input in logical (C) order, look
//! up each element's keep decision in a bit mask of a broadcastable shape, and write the mask's
//! application (scale, affine, noise; optionally plus a residual) to a strided output.
//!
//! Element-granularity masks are generated chunk by chunk inside the same pass (the bits never
//! leave L1 unless the caller wants them stored); coarser masks (channel, sample, block) are
//! generated first, they are small.

use crate::rng::{self, Key};
use crate::simd::{Linear, RunMask};
use half::{bf16, f16};
use std::ops::{Add, Mul};

/// Elements per parallel work item. A multiple of the generator's 256-decision group, so that
/// every chunk starts on a mask word and a group, and small enough that a chunk's bits
/// (512 words) stay in L1.
pub const CHUNK: usize = 1 << 15;
/// Elements whose keep bits are drawn just before they are applied: small enough that the
/// generator's arithmetic overlaps the memory traffic of the loads and stores around it instead
/// of leaving the memory system idle while a whole chunk's bits are drawn, and a whole number of
/// the generator's windows (16 groups of 256 decisions), whose last planes fill SIMD batches
/// only when several groups are still open together.
const SUB: usize = 4096;
const _: () = assert!(SUB.is_multiple_of(rng::GROUP) && CHUNK.is_multiple_of(SUB));
/// Out-of-place outputs at least this large (bytes) are written with non-temporal stores: they
/// cannot stay in cache anyway, and streaming them saves the read-for-ownership of every output
/// line, a third of the memory traffic of the call.
pub const STREAM_MIN_BYTES: usize = 16 << 20;

// The element loops' instruction set is chosen with the generator's, from one probe (`cpu`).
pub use crate::cpu::{best_isa, isa, Isa};

/// The arithmetic type an element is computed in (torch's "opmath": f32 for 16-bit floats).
pub trait OpFloat:
    Copy + Send + Sync + PartialEq + Add<Output = Self> + Mul<Output = Self> + 'static
{
    const ZERO: Self;
    fn from_f64(v: f64) -> Self;
}

impl OpFloat for f32 {
    const ZERO: Self = 0.0;
    fn from_f64(v: f64) -> Self {
        v as f32
    }
}

impl OpFloat for f64 {
    const ZERO: Self = 0.0;
    fn from_f64(v: f64) -> Self {
        v
    }
}

/// A floating-point element type the kernels run over.
pub trait Element: Copy + Send + Sync + 'static {
    type Op: OpFloat;
    fn to_op(self) -> Self::Op;
    fn from_op(v: Self::Op) -> Self;

    /// The AVX2 loop for a contiguous run of this type (`simd::apply_f32` and kin); false when
    /// the type has none and the caller must run the portable loop.
    ///
    /// # Safety
    /// As `simd::apply_f32`: AVX2 and F16C present, pointers valid for `len` elements.
    #[inline(always)]
    #[allow(clippy::too_many_arguments)]
    unsafe fn apply_run(
        _lin: Linear<Self::Op>,
        _dropped: Self,
        _mask: RunMask,
        _src: *const Self,
        _dst: *mut Self,
        _res: Option<*const Self>,
        _len: usize,
        _stream: bool,
    ) -> bool {
        false
    }
}

impl Element for f32 {
    type Op = f32;
    #[inline(always)]
    fn to_op(self) -> f32 {
        self
    }
    #[inline(always)]
    fn from_op(v: f32) -> Self {
        v
    }
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn apply_run(
        lin: Linear<f32>,
        dropped: f32,
        mask: RunMask,
        src: *const f32,
        dst: *mut f32,
        res: Option<*const f32>,
        len: usize,
        stream: bool,
    ) -> bool {
        crate::simd::apply_f32(lin, dropped, mask, src, dst, res, len, stream);
        true
    }
}

impl Element for f64 {
    type Op = f64;
    #[inline(always)]
    fn to_op(self) -> f64 {
        self
    }
    #[inline(always)]
    fn from_op(v: f64) -> Self {
        v
    }
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn apply_run(
        lin: Linear<f64>,
        dropped: f64,
        mask: RunMask,
        src: *const f64,
        dst: *mut f64,
        res: Option<*const f64>,
        len: usize,
        stream: bool,
    ) -> bool {
        crate::simd::apply_f64(lin, dropped, mask, src, dst, res, len, stream);
        true
    }
}

impl Element for f16 {
    type Op = f32;
    #[inline(always)]
    fn to_op(self) -> f32 {
        self.to_f32()
    }
    #[inline(always)]
    fn from_op(v: f32) -> Self {
        f16::from_f32(v)
    }
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn apply_run(
        lin: Linear<f32>,
        dropped: f16,
        mask: RunMask,
        src: *const f16,
        dst: *mut f16,
        res: Option<*const f16>,
        len: usize,
        stream: bool,
    ) -> bool {
        crate::simd::apply_f16(lin, dropped, mask, src, dst, res, len, stream);
        true
    }
}

impl Element for bf16 {
    type Op = f32;
    #[inline(always)]
    fn to_op(self) -> f32 {
        self.to_f32()
    }
    #[inline(always)]
    fn from_op(v: f32) -> Self {
        bf16::from_f32(v)
    }
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn apply_run(
        lin: Linear<f32>,
        dropped: bf16,
        mask: RunMask,
        src: *const bf16,
        dst: *mut bf16,
        res: Option<*const bf16>,
        len: usize,
        stream: bool,
    ) -> bool {
        crate::simd::apply_bf16(lin, dropped, mask, src, dst, res, len, stream);
        true
    }
}

/// What a mask does to the elements it covers. Constants are given in f64 and rounded once to
/// the element's arithmetic type, as torch rounds its scalar operands.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Application {
    /// kept: `x * scale`; dropped: 0.
    Scale { scale: f64 },
    /// kept: `x * a + shift` (two roundings, as torch's `mul` then `add_`); dropped: `dropped`.
    Affine { a: f64, shift: f64, dropped: f64 },
    /// kept: `x * scale`; dropped: a standard normal deviate drawn for the element's mask index m
    /// from block `first_block + m / 2` of `key`, so elements sharing a decision (channels of a
    /// coupled DropBlock mask) share their noise, as timm's mask-shaped noise does.
    Noise {
        scale: f64,
        key: Key,
        first_block: u64,
    },
}

/// How an element's value is produced, monomorphised per application so the inner loops see
/// constants.
trait Rule<T: Element>: Sync {
    /// Whether `dropped` ignores the mask index, which lets the fast loop select between two
    /// values.
    const CONST_DROPPED: bool;
    fn kept(&self, x: T::Op) -> T::Op;
    /// The value of a dropped element whose decision is mask bit `mask_index`.
    fn dropped(&self, mask_index: usize) -> T::Op;
    /// `kept` as the vector loops compute it, when it is a multiply and maybe an add.
    fn linear(&self) -> Option<Linear<T::Op>>;
}

struct ScaleRule<F>(F);
impl<T: Element> Rule<T> for ScaleRule<T::Op> {
    const CONST_DROPPED: bool = true;
    #[inline(always)]
    fn kept(&self, x: T::Op) -> T::Op {
        x * self.0
    }
    #[inline(always)]
    fn dropped(&self, _: usize) -> T::Op {
        T::Op::ZERO
    }
    fn linear(&self) -> Option<Linear<T::Op>> {
        Some(Linear {
            mul: self.0,
            add: None,
        })
    }
}

struct AffineRule<F> {
    a: F,
    shift: F,
    dropped: F,
}
impl<T: Element> Rule<T> for AffineRule<T::Op> {
    const CONST_DROPPED: bool = true;
    #[inline(always)]
    fn kept(&self, x: T::Op) -> T::Op {
        x * self.a + self.shift
    }
    #[inline(always)]
    fn dropped(&self, _: usize) -> T::Op {
        self.dropped
    }
    fn linear(&self) -> Option<Linear<T::Op>> {
        Some(Linear {
            mul: self.a,
            add: Some(self.shift),
        })
    }
}

struct NoiseRule<F> {
    scale: F,
    key: Key,
    first_block: u64,
}
impl<T: Element> Rule<T> for NoiseRule<T::Op> {
    const CONST_DROPPED: bool = false;
    #[inline(always)]
    fn kept(&self, x: T::Op) -> T::Op {
        x * self.scale
    }
    fn dropped(&self, mask_index: usize) -> T::Op {
        T::Op::from_f64(normal_at(self.key, self.first_block, mask_index))
    }
    fn linear(&self) -> Option<Linear<T::Op>> {
        None
    }
}

/// The standard normal deviate of logical index `index` (Box-Muller on two 32-bit words), a pure
/// function of (key, first_block, index) like every other random value here.
pub fn normal_at(key: Key, first_block: u64, index: usize) -> f64 {
    let mut words = [0u32; 4];
    rng::fill_u32(
        key,
        first_block.wrapping_add((index / 2) as u64),
        &mut words,
    );
    let lane = 2 * (index % 2);
    // (w + 0.5) / 2^32 lies in (0, 1), so the logarithm is finite.
    let u1 = (words[lane] as f64 + 0.5) * (1.0 / 4294967296.0);
    let u2 = words[lane + 1] as f64 * (1.0 / 4294967296.0);
    (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
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

// --- threads -------------------------------------------------------------------------------

// The pool and the thread count live in `threads`; these names stay here for the callers.
pub(crate) use crate::threads::{for_each_chunk, for_each_word_chunk};
pub use crate::threads::{get_num_threads, set_num_threads, PARALLEL_MIN};

// --- mask generation ------------------------------------------------------------------------

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

// --- the strided walk -----------------------------------------------------------------------

/// Dimensions after dropping size-1 dimensions and merging neighbours that are contiguous in
/// every operand and in the mask, so a C-contiguous element dropout becomes one flat loop.
struct Plan {
    shape: Vec<usize>,
    // strides[k][d]: 0 = src, 1 = dst, 2 = residual (bytes), 3 = mask (bits)
    strides: [Vec<isize>; 4],
    src: *const u8,
    dst: *mut u8,
    res: Option<*const u8>,
}

// SAFETY: a Plan only carries the caller's pointers between the threads of one call; every
// thread writes a disjoint range of logical indices and `run`'s contract is that distinct logical
// indices of `dst` are distinct addresses and `dst` overlaps no other operand unless it is the
// very same view as `src` (in place), where each element is read and written by one thread.
unsafe impl Send for Plan {}
unsafe impl Sync for Plan {}

fn mask_bit_strides(shape: &[usize], mask_shape: &[usize]) -> Vec<isize> {
    let mut strides = vec![0isize; shape.len()];
    let mut acc = 1isize;
    for d in (0..shape.len()).rev() {
        strides[d] = if mask_shape[d] == 1 { 0 } else { acc };
        acc *= mask_shape[d] as isize;
    }
    strides
}

impl Plan {
    fn new(
        shape: &[usize],
        mask_shape: &[usize],
        ops: [&[isize]; 3],
        src: *const u8,
        dst: *mut u8,
        res: Option<*const u8>,
    ) -> Plan {
        let mask = mask_bit_strides(shape, mask_shape);
        let mut out_shape: Vec<usize> = Vec::with_capacity(shape.len());
        let mut out: [Vec<isize>; 4] = Default::default();
        for d in 0..shape.len() {
            if shape[d] == 1 {
                continue;
            }
            let st = [ops[0][d], ops[1][d], ops[2][d], mask[d]];
            if let Some(&inner) = out_shape.last() {
                // This dim is inner to the last kept one: merge when last stride == this stride * size.
                let last = out_shape.len() - 1;
                if (0..4).all(|k| out[k][last] == st[k] * shape[d] as isize) {
                    out_shape[last] = inner * shape[d];
                    for (k, s) in st.iter().enumerate() {
                        out[k][last] = *s;
                    }
                    continue;
                }
            }
            out_shape.push(shape[d]);
            for (k, s) in st.iter().enumerate() {
                out[k].push(*s);
            }
        }
        if out_shape.is_empty() {
            out_shape.push(1);
            for v in out.iter_mut() {
                v.push(0);
            }
        }
        Plan {
            shape: out_shape,
            strides: out,
            src,
            dst,
            res,
        }
    }

    /// Calls `seg(offsets, mask_bit, len)` for each innermost run of the logical index range
    /// [start, end).
    fn walk(&self, start: usize, end: usize, mut seg: impl FnMut([isize; 4], isize, usize)) {
        let nd = self.shape.len();
        let inner = self.shape[nd - 1];
        // Merged plans rarely have many dimensions: keep the index off the heap.
        let mut fixed = [0usize; 16];
        let mut heap = Vec::new();
        let idx: &mut [usize] = if nd <= fixed.len() {
            &mut fixed[..nd]
        } else {
            heap.resize(nd, 0);
            &mut heap
        };
        let mut rem = start;
        for d in (0..nd).rev() {
            idx[d] = rem % self.shape[d];
            rem /= self.shape[d];
        }
        // Offsets follow the index incrementally: short rows (a channel mask over small
        // planes) would otherwise pay a product per dimension per row.
        let st = &self.strides;
        let mut off = [0isize; 4];
        for (k, o) in off.iter_mut().enumerate() {
            *o = (0..nd).map(|d| idx[d] as isize * st[k][d]).sum();
        }
        let mut pos = start;
        while pos < end {
            let len = (inner - idx[nd - 1]).min(end - pos);
            seg([off[0], off[1], off[2], 0], off[3], len);
            pos += len;
            for (k, o) in off.iter_mut().enumerate() {
                *o -= idx[nd - 1] as isize * st[k][nd - 1];
            }
            idx[nd - 1] = 0;
            for d in (0..nd - 1).rev() {
                idx[d] += 1;
                for (k, o) in off.iter_mut().enumerate() {
                    *o += st[k][d];
                }
                if idx[d] < self.shape[d] {
                    break;
                }
                for (k, o) in off.iter_mut().enumerate() {
                    *o -= self.shape[d] as isize * st[k][d];
                }
                idx[d] = 0;
            }
        }
    }
}

#[inline(always)]
fn bit(words: &[u64], m: usize) -> bool {
    (words[m / 64] >> (m % 64)) & 1 == 1
}

/// What the vector loops need of a rule: its kept map, its constant dropped value, and whether
/// to stream the output.
#[derive(Clone, Copy)]
struct Fast<T: Element> {
    lin: Linear<T::Op>,
    dropped: T,
    stream: bool,
}

/// [`apply_range`] compiled for AVX2 and F16C, with contiguous runs going to the vector loops.
///
/// # Safety
/// As [`apply_range`], and the CPU must have AVX2 and F16C.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,f16c")]
unsafe fn apply_range_avx2<T: Element, R: Rule<T>>(
    plan: &Plan,
    rule: &R,
    start: usize,
    end: usize,
    words: &[u64],
    base: usize,
    fast: Fast<T>,
) {
    apply_range::<T, R>(plan, rule, start, end, words, base, Some(fast))
}

/// Applies `rule` to the logical range [start, end). `words` holds mask bit `m` at position
/// `m - base`. With `fast`, contiguous runs go to `T::apply_run`.
///
/// # Safety
/// The plan's pointers and strides must address valid elements of type `T` for every index in
/// the range, and no other thread may touch the destination elements of this range; `fast` only
/// on a CPU with AVX2 and F16C.
#[inline(always)]
unsafe fn apply_range<T: Element, R: Rule<T>>(
    plan: &Plan,
    rule: &R,
    start: usize,
    end: usize,
    words: &[u64],
    base: usize,
    fast: Option<Fast<T>>,
) {
    let nd = plan.shape.len();
    let [s_in, d_in, r_in, m_in] = [0, 1, 2, 3].map(|k| plan.strides[k][nd - 1]);
    let size = std::mem::size_of::<T>() as isize;
    plan.walk(start, end, |off, mbit, len| {
        let src = plan.src.offset(off[0]);
        let dst = plan.dst.offset(off[1]);
        let res = plan.res.map(|r| r.offset(off[2]));
        let m0 = (mbit as usize).wrapping_sub(base);
        let contiguous = s_in == size && d_in == size && (res.is_none() || r_in == size);
        // Runs shorter than a mask word are not worth the vector loop's set-up and tail copy.
        if let Some(f) = fast.filter(|_| contiguous && (m_in == 0 || m_in == 1) && len >= 64) {
            let mask = if m_in == 0 {
                RunMask::All(bit(words, m0))
            } else {
                RunMask::Bits { words, first: m0 }
            };
            if T::apply_run(
                f.lin,
                f.dropped,
                mask,
                src as *const T,
                dst as *mut T,
                res.map(|r| r as *const T),
                len,
                f.stream,
            ) {
                return;
            }
        }
        if m_in == 0 {
            // One decision for the whole run: channel, sample and broadcast masks.
            let keep = bit(words, m0);
            if contiguous {
                run_const::<T, R>(
                    rule,
                    keep,
                    src as *const T,
                    dst as *mut T,
                    res.map(|r| r as *const T),
                    mbit as usize,
                    len,
                );
            } else {
                for j in 0..len as isize {
                    let v = if keep {
                        rule.kept(read::<T>(src, j * s_in))
                    } else {
                        rule.dropped(mbit as usize)
                    };
                    write(
                        dst,
                        j * d_in,
                        finish::<T>(v, res.map(|r| r.offset(j * r_in))),
                    );
                }
            }
        } else if contiguous && m_in == 1 && m0.is_multiple_of(64) && R::CONST_DROPPED {
            run_words::<T, R>(
                rule,
                &words[m0 / 64..],
                src as *const T,
                dst as *mut T,
                res.map(|r| r as *const T),
                len,
            );
        } else {
            for j in 0..len as isize {
                let keep = bit(words, (m0 as isize + j * m_in) as usize);
                let v = if keep {
                    rule.kept(read::<T>(src, j * s_in))
                } else {
                    rule.dropped((mbit + j * m_in) as usize)
                };
                write(
                    dst,
                    j * d_in,
                    finish::<T>(v, res.map(|r| r.offset(j * r_in))),
                );
            }
        }
    });
}

#[inline(always)]
unsafe fn read<T: Element>(p: *const u8, byte_offset: isize) -> T::Op {
    (p.offset(byte_offset) as *const T).read_unaligned().to_op()
}

#[inline(always)]
unsafe fn write<T: Element>(p: *mut u8, byte_offset: isize, v: T) {
    (p.offset(byte_offset) as *mut T).write_unaligned(v)
}

/// Rounds the masked value to `T` and adds the residual, so a fused `residual + dropout(x)` gives
/// the bits of the unfused pair for every dtype.
#[inline(always)]
unsafe fn finish<T: Element>(v: T::Op, res: Option<*const u8>) -> T {
    let v = T::from_op(v);
    match res {
        None => v,
        Some(r) => T::from_op((r as *const T).read_unaligned().to_op() + v.to_op()),
    }
}

/// A contiguous run with one decision (mask bit `mask_index`): a dropped run never reads `src`.
#[inline(always)]
unsafe fn run_const<T: Element, R: Rule<T>>(
    rule: &R,
    keep: bool,
    src: *const T,
    dst: *mut T,
    res: Option<*const T>,
    mask_index: usize,
    len: usize,
) {
    match (keep, res) {
        (true, None) => {
            for j in 0..len {
                dst.add(j)
                    .write_unaligned(T::from_op(rule.kept(src.add(j).read_unaligned().to_op())));
            }
        }
        (true, Some(r)) => {
            for j in 0..len {
                let v = T::from_op(rule.kept(src.add(j).read_unaligned().to_op()));
                dst.add(j)
                    .write_unaligned(T::from_op(r.add(j).read_unaligned().to_op() + v.to_op()));
            }
        }
        (false, _) if R::CONST_DROPPED => {
            let v = T::from_op(rule.dropped(mask_index));
            match res {
                None => (0..len).for_each(|j| dst.add(j).write_unaligned(v)),
                Some(r) => (0..len).for_each(|j| {
                    dst.add(j)
                        .write_unaligned(T::from_op(r.add(j).read_unaligned().to_op() + v.to_op()))
                }),
            }
        }
        (false, _) => {
            for j in 0..len {
                let v = T::from_op(rule.dropped(mask_index));
                let v = match res {
                    None => v,
                    Some(r) => T::from_op(r.add(j).read_unaligned().to_op() + v.to_op()),
                };
                dst.add(j).write_unaligned(v);
            }
        }
    }
}

/// The hot loop: contiguous data, one mask bit per element starting on a word boundary.
#[inline(always)]
unsafe fn run_words<T: Element, R: Rule<T>>(
    rule: &R,
    words: &[u64],
    src: *const T,
    dst: *mut T,
    res: Option<*const T>,
    len: usize,
) {
    let dropped = T::from_op(rule.dropped(0));
    let full = len / 64;
    for (w, &word) in words[..full].iter().enumerate() {
        let (s, d) = (src.add(w * 64), dst.add(w * 64));
        match res {
            None => {
                for j in 0..64 {
                    let x = s.add(j).read_unaligned().to_op();
                    let kept = T::from_op(rule.kept(x));
                    d.add(j)
                        .write_unaligned(if (word >> j) & 1 == 1 { kept } else { dropped });
                }
            }
            Some(r) => {
                let r = r.add(w * 64);
                for j in 0..64 {
                    let x = s.add(j).read_unaligned().to_op();
                    let v = if (word >> j) & 1 == 1 {
                        T::from_op(rule.kept(x))
                    } else {
                        dropped
                    };
                    d.add(j)
                        .write_unaligned(T::from_op(r.add(j).read_unaligned().to_op() + v.to_op()));
                }
            }
        }
    }
    for j in full * 64..len {
        let v = if bit(words, j) {
            T::from_op(rule.kept(src.add(j).read_unaligned().to_op()))
        } else {
            dropped
        };
        let v = match res {
            None => v,
            Some(r) => T::from_op(r.add(j).read_unaligned().to_op() + v.to_op()),
        };
        dst.add(j).write_unaligned(v);
    }
}

/// Writes `dst = application(mask, src) [+ res]` for every element of `shape`.
///
/// `mask_shape` has the rank of `shape`, each dimension equal to it or 1 (broadcast). With
/// `Bits::Fresh` it must equal `shape` (element granularity).
///
/// # Safety
/// - `src`, `dst` and `res` (if any) must address, through their byte strides, valid and
///   properly initialised elements of type `T` for every index of `shape` (pointers may be
///   unaligned); the strides have `shape.len()` entries.
/// - Distinct indices of `dst` must be distinct addresses (no zero or overlapping strides), and
///   `dst` must not overlap `src` or `res` unless it is exactly the same view (in place).
/// - `Bits::Given` must hold at least `prod(mask_shape)` bits and a `store` at least
///   `ceil(prod(shape) / 64)` words.
pub unsafe fn run<T: Element>(
    shape: &[usize],
    mask_shape: &[usize],
    src: Operand,
    dst: Operand,
    res: Option<Operand>,
    bits: Bits,
    app: &Application,
) {
    run_with::<T>(
        Config::current(),
        shape,
        mask_shape,
        src,
        dst,
        res,
        bits,
        app,
    )
}

/// How a call runs; the output never depends on it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Config {
    pub isa: Isa,
    pub threads: usize,
}

impl Config {
    /// [`isa`] and [`get_num_threads`].
    pub fn current() -> Config {
        Config {
            isa: isa(),
            threads: get_num_threads(),
        }
    }
}

/// [`run`] on a chosen path and thread count (for tests and benchmarks that compare them). An
/// `isa` this CPU lacks falls back to the portable loops.
///
/// # Safety
/// As [`run`].
#[allow(clippy::too_many_arguments)]
pub unsafe fn run_with<T: Element>(
    config: Config,
    shape: &[usize],
    mask_shape: &[usize],
    src: Operand,
    dst: Operand,
    res: Option<Operand>,
    bits: Bits,
    app: &Application,
) {
    let op = |v: f64| T::Op::from_f64(v);
    let config = Config {
        isa: if config.isa == best_isa() {
            config.isa
        } else {
            Isa::Portable
        },
        threads: config.threads.max(1),
    };
    match *app {
        Application::Scale { scale } => run_rule::<T, _>(
            config,
            shape,
            mask_shape,
            src,
            dst,
            res,
            bits,
            &ScaleRule(op(scale)),
        ),
        Application::Affine { a, shift, dropped } => run_rule::<T, _>(
            config,
            shape,
            mask_shape,
            src,
            dst,
            res,
            bits,
            &AffineRule {
                a: op(a),
                shift: op(shift),
                dropped: op(dropped),
            },
        ),
        Application::Noise {
            scale,
            key,
            first_block,
        } => run_rule::<T, _>(
            config,
            shape,
            mask_shape,
            src,
            dst,
            res,
            bits,
            &NoiseRule {
                scale: op(scale),
                key,
                first_block,
            },
        ),
    }
}

#[allow(clippy::too_many_arguments)]
unsafe fn run_rule<T: Element, R: Rule<T>>(
    config: Config,
    shape: &[usize],
    mask_shape: &[usize],
    src: Operand,
    dst: Operand,
    res: Option<Operand>,
    bits: Bits,
    rule: &R,
) {
    let n: usize = shape.iter().product();
    if n == 0 {
        return;
    }
    if let (Bits::Given(words), true) = (&bits, R::CONST_DROPPED) {
        // One decision per run of fewer than 64 elements (the channels of small maps, the
        // samples of small inputs), or a mask broadcast over a middle dimension whose runs are
        // that short (a channel-coupled DropBlock mask over 5x5 maps): spread the decisions to
        // one bit per element first, so the vector loops see whole mask words instead of a
        // scalar loop per short run. The dropped value does not depend on the mask index here,
        // so nothing else changes.
        let spread = match short_broadcast_run(shape, mask_shape) {
            Some(run) => Some(spread_bits(words, n / run, run)),
            None => {
                short_mask_runs(shape, mask_shape).then(|| expand_bits(words, shape, mask_shape))
            }
        };
        if let Some(spread) = spread {
            return run_rule::<T, R>(
                config,
                shape,
                shape,
                src,
                dst,
                res,
                Bits::Given(&spread),
                rule,
            );
        }
    }
    let zeros = vec![0isize; shape.len()];
    let plan = Plan::new(
        shape,
        mask_shape,
        [
            src.strides,
            dst.strides,
            res.map_or(&zeros[..], |r| r.strides),
        ],
        src.ptr,
        dst.ptr,
        res.map(|r| r.ptr as *const u8),
    );
    let fast = match (config.isa, rule.linear()) {
        (Isa::Avx2, Some(lin)) if R::CONST_DROPPED => {
            let stream = !std::ptr::eq(plan.dst, plan.src)
                && n * std::mem::size_of::<T>() >= STREAM_MIN_BYTES;
            Some(Fast {
                lin,
                dropped: T::from_op(rule.dropped(0)),
                stream,
            })
        }
        _ => None,
    };
    let range = |start: usize, end: usize, words: &[u64], base: usize| {
        #[cfg(target_arch = "x86_64")]
        if let Some(fast) = fast {
            // SAFETY: chunks are disjoint logical ranges and the caller vouched for the views;
            // `fast` is only set when `config.isa` is `Avx2`, which `run_with` allows only
            // when this CPU has AVX2 and F16C.
            unsafe { apply_range_avx2::<T, R>(&plan, rule, start, end, words, base, fast) };
            return;
        }
        // SAFETY: as above, with the portable loops.
        unsafe { apply_range::<T, R>(&plan, rule, start, end, words, base, None) }
    };
    let chunks = n.div_ceil(CHUNK);
    match bits {
        Bits::Given(words) => for_each_chunk(config.threads, n, chunks, |c| {
            range(c * CHUNK, ((c + 1) * CHUNK).min(n), words, 0)
        }),
        Bits::Fresh {
            key,
            first_block,
            threshold,
            store: Some(store),
        } => {
            let store = &mut store[..words_for(n)];
            for_each_word_chunk(config.threads, n, store, |c, w| {
                let end = ((c + 1) * CHUNK).min(n);
                draw_and_apply(key, first_block, threshold, c * CHUNK, end, w, &range);
                if end == n {
                    clear_tail(w, n - c * CHUNK);
                }
            });
        }
        Bits::Fresh {
            key,
            first_block,
            threshold,
            store: None,
        } => for_each_chunk(config.threads, n, chunks, |c| {
            // Bits that are not kept need only one sub-range's worth of room.
            let mut local = [0u64; SUB / 64];
            for s in (c * CHUNK..((c + 1) * CHUNK).min(n)).step_by(SUB) {
                let e = (s + SUB).min(n);
                let w = &mut local[..words_for(e - s)];
                rng::keep_words(key, first_block.wrapping_add((s / 4) as u64), threshold, w);
                range(s, e, w, s);
            }
        }),
    }
}

/// Mask runs shorter than this are spread to element bits (see `run_rule`).
const SPREAD_BELOW: usize = 64;

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
fn expand_bits(words: &[u64], shape: &[usize], mask_shape: &[usize]) -> Vec<u64> {
    let n: usize = shape.iter().product();
    let mut out = vec![0u64; words_for(n)];
    let zeros = vec![0isize; shape.len()];
    // A walk over the mask strides alone: runs are the innermost merged dimension.
    let plan = Plan::new(
        shape,
        mask_shape,
        [&zeros, &zeros, &zeros],
        std::ptr::null(),
        std::ptr::null_mut(),
        None,
    );
    let m_in = plan.strides[3][plan.shape.len() - 1];
    let mut pos = 0usize;
    plan.walk(0, n, |_, mbit, len| {
        let mbit = mbit as usize;
        match m_in {
            0 => {
                if bit(words, mbit) {
                    or_ones(&mut out, pos, len);
                }
            }
            1 => copy_bits(words, mbit, &mut out, pos, len),
            _ => {
                for j in 0..len {
                    if bit(words, (mbit as isize + j as isize * m_in) as usize) {
                        out[(pos + j) / 64] |= 1 << ((pos + j) % 64);
                    }
                }
            }
        }
        pos += len;
    });
    out
}

/// ORs `len` one bits into `dst` from bit `to` on.
fn or_ones(dst: &mut [u64], to: usize, len: usize) {
    let mut at = to;
    let end = to + len;
    while at < end {
        let take = (64 - at % 64).min(end - at);
        dst[at / 64] |= (u64::MAX >> (64 - take)) << (at % 64);
        at += take;
    }
}

/// ORs bits `from .. from + len` of `src` into `dst` from bit `to` on.
fn copy_bits(src: &[u64], from: usize, dst: &mut [u64], to: usize, len: usize) {
    let mut done = 0;
    while done < len {
        let at = to + done;
        let take = (64 - at % 64).min(len - done);
        let bits = crate::simd::word_at(src, from + done) & (u64::MAX >> (64 - take));
        dst[at / 64] |= bits << (at % 64);
        done += take;
    }
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

/// Draws the keep bits of elements [start, end) into `words` (bit i - start for element i; start
/// a multiple of `SUB`) and applies them, `SUB` elements at a time. Every piece starts on a
/// generator group, so element i's decision is that of `rng::keep_words` over the whole mask
/// however the range is cut (the mask-free path above cuts it the same way).
fn draw_and_apply(
    key: Key,
    first_block: u64,
    threshold: u64,
    start: usize,
    end: usize,
    words: &mut [u64],
    range: &impl Fn(usize, usize, &[u64], usize),
) {
    for s in (start..end).step_by(SUB) {
        let e = (s + SUB).min(end);
        let w = &mut words[(s - start) / 64..words_for(e - start)];
        rng::keep_words(key, first_block.wrapping_add((s / 4) as u64), threshold, w);
        range(s, e, w, s);
    }
}

// --- safe fronts ----------------------------------------------------------------------------

/// Checks what the safe fronts promise [`run`]: buffers of `prod(shape)` elements, a mask shape
/// that broadcasts, and enough mask bits.
fn check_contiguous(shape: &[usize], mask_shape: &[usize], lens: &[usize], bits: &Bits) {
    let n: usize = shape.iter().product();
    assert!(
        lens.iter().all(|&l| l == n),
        "buffers of {lens:?} elements for shape {shape:?}"
    );
    assert!(
        mask_shape.len() == shape.len()
            && shape
                .iter()
                .zip(mask_shape)
                .all(|(&s, &m)| m == s || m == 1),
        "mask shape {mask_shape:?} does not broadcast to {shape:?}"
    );
    let m: usize = mask_shape.iter().product();
    match bits {
        Bits::Given(words) => assert!(
            words.len() >= words_for(m),
            "{} mask words for {m} decisions",
            words.len()
        ),
        Bits::Fresh { store, .. } => {
            assert_eq!(mask_shape, shape, "fresh masks are element masks");
            assert!(
                store.as_ref().is_none_or(|s| s.len() >= words_for(n)),
                "mask store too small"
            );
        }
    }
}

fn c_strides<T>(shape: &[usize]) -> Vec<isize> {
    let mut strides = vec![0isize; shape.len()];
    let mut acc = std::mem::size_of::<T>() as isize;
    for d in (0..shape.len()).rev() {
        strides[d] = acc;
        acc *= shape[d] as isize;
    }
    strides
}

/// `dst = app(mask, src) [+ res]` over C-contiguous buffers of `shape`: [`run_with`] without
/// the pointers, for tests, benchmarks and Rust callers.
///
/// # Panics
/// When a buffer does not hold `prod(shape)` elements, `mask_shape` does not broadcast to
/// `shape`, a fresh mask is not element-granular or given bits are too few.
#[allow(clippy::too_many_arguments)]
pub fn apply_contiguous<T: Element>(
    config: Config,
    shape: &[usize],
    mask_shape: &[usize],
    src: &[T],
    dst: &mut [T],
    res: Option<&[T]>,
    bits: Bits,
    app: &Application,
) {
    check_contiguous(
        shape,
        mask_shape,
        &[src.len(), dst.len(), res.map_or(src.len(), <[T]>::len)],
        &bits,
    );
    let strides = c_strides::<T>(shape);
    let op = |p: *const T| Operand {
        ptr: p as *mut u8,
        strides: &strides,
    };
    // SAFETY: every buffer holds prod(shape) elements laid out C-contiguously, `dst` is a
    // unique borrow (so it overlaps neither input), and `check_contiguous` sized the mask.
    unsafe {
        run_with::<T>(
            config,
            shape,
            mask_shape,
            op(src.as_ptr()),
            op(dst.as_mut_ptr()),
            res.map(|r| op(r.as_ptr())),
            bits,
            app,
        )
    }
}

/// [`apply_contiguous`] writing over its input.
///
/// # Panics
/// As [`apply_contiguous`].
pub fn apply_in_place<T: Element>(
    config: Config,
    shape: &[usize],
    mask_shape: &[usize],
    data: &mut [T],
    res: Option<&[T]>,
    bits: Bits,
    app: &Application,
) {
    check_contiguous(
        shape,
        mask_shape,
        &[data.len(), res.map_or(data.len(), <[T]>::len)],
        &bits,
    );
    let strides = c_strides::<T>(shape);
    let p = data.as_mut_ptr() as *mut u8;
    let op = Operand {
        ptr: p,
        strides: &strides,
    };
    let res = res.map(|r| Operand {
        ptr: r.as_ptr() as *mut u8,
        strides: &strides,
    });
    // SAFETY: as in `apply_contiguous`; source and destination are the very same view.
    unsafe { run_with::<T>(config, shape, mask_shape, op, op, res, bits, app) }
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: Key = Key {
        seed: 0x5eed,
        stream: 3,
    };
    const PORTABLE: Config = Config {
        isa: Isa::Portable,
        threads: 1,
    };

    /// Deterministic awkward values: signed zeros, infinities, tiny and huge magnitudes, NaN.
    fn values(n: usize, salt: u64) -> Vec<f64> {
        let special = [
            0.0,
            -0.0,
            f64::INFINITY,
            f64::NEG_INFINITY,
            1e-7,
            -6e-8,
            65504.0,
            3.0e38,
            1e-300,
            f64::NAN,
        ];
        (0..n as u64)
            .map(|i| {
                let mut z = (i ^ salt.rotate_left(17)).wrapping_mul(0x9E37_79B9_7F4A_7C15);
                z = (z ^ (z >> 29)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
                if z.is_multiple_of(13) {
                    special[(z >> 8) as usize % special.len()]
                } else {
                    ((z >> 11) as f64 / (1u64 << 53) as f64 - 0.5) * 8.0
                }
            })
            .collect()
    }

    trait Probe: Element + std::fmt::Debug {
        fn from_f64(v: f64) -> Self;
        fn same(a: Self, b: Self) -> bool;
    }
    impl Probe for f32 {
        fn from_f64(v: f64) -> Self {
            v as f32
        }
        fn same(a: Self, b: Self) -> bool {
            a.to_bits() == b.to_bits() || (a.is_nan() && b.is_nan())
        }
    }
    impl Probe for f64 {
        fn from_f64(v: f64) -> Self {
            v
        }
        fn same(a: Self, b: Self) -> bool {
            a.to_bits() == b.to_bits() || (a.is_nan() && b.is_nan())
        }
    }
    impl Probe for f16 {
        fn from_f64(v: f64) -> Self {
            f16::from_f64(v)
        }
        fn same(a: Self, b: Self) -> bool {
            a.to_bits() == b.to_bits() || (a.is_nan() && b.is_nan())
        }
    }
    impl Probe for bf16 {
        fn from_f64(v: f64) -> Self {
            bf16::from_f64(v)
        }
        fn same(a: Self, b: Self) -> bool {
            a.to_bits() == b.to_bits() || (a.is_nan() && b.is_nan())
        }
    }

    fn assert_same<T: Probe>(want: &[T], got: &[T], what: &str) {
        assert_eq!(want.len(), got.len());
        for (i, (&a, &b)) in want.iter().zip(got).enumerate() {
            assert!(T::same(a, b), "{what}: element {i}: {a:?} vs {b:?}");
        }
    }

    fn apps() -> Vec<Application> {
        vec![
            Application::Scale { scale: 1.0 / 0.7 },
            Application::Affine {
                a: 0.8,
                shift: 0.3,
                dropped: -1.1,
            },
            Application::Noise {
                scale: 2.0,
                key: KEY,
                first_block: 1 << 20,
            },
        ]
    }

    /// A strided view into a buffer: `shape` with C-ordered element strides stretched by
    /// `pad` along the last-but-one axis (rows padded) and `start` elements of offset, so runs
    /// start misaligned and rows are not mergeable.
    struct Layout {
        shape: Vec<usize>,
        strides: Vec<isize>,
        start: usize,
        len: usize,
    }

    fn layout<T>(shape: &[usize], pad: usize, start: usize) -> Layout {
        let mut strides = vec![0isize; shape.len()];
        let mut acc = 1usize;
        for d in (0..shape.len()).rev() {
            strides[d] = acc as isize;
            acc *= shape[d] + if d + 1 == shape.len() { pad } else { 0 };
        }
        let size = std::mem::size_of::<T>() as isize;
        Layout {
            shape: shape.to_vec(),
            strides: strides.iter().map(|s| s * size).collect(),
            start,
            len: start + acc,
        }
    }

    /// Runs one call on fresh copies of `x` (and `r`): out of place into a zeroed buffer, or in
    /// place; returns the whole output buffer and the stored mask.
    #[allow(clippy::too_many_arguments)]
    fn call<T: Probe>(
        config: Config,
        l: &Layout,
        mask_shape: &[usize],
        x: &[T],
        r: Option<&[T]>,
        given: Option<&[u64]>,
        app: &Application,
        in_place: bool,
    ) -> (Vec<T>, Vec<u64>) {
        let n: usize = l.shape.iter().product();
        let mut src = x.to_vec();
        let mut dst = if in_place {
            Vec::new()
        } else {
            vec![T::from_f64(0.0); x.len()]
        };
        let mut store = vec![0u64; words_for(n)];
        let bits = match given {
            Some(w) => Bits::Given(w),
            None => Bits::Fresh {
                key: KEY,
                first_block: 77,
                threshold: rng::threshold_for(0.6),
                store: Some(&mut store),
            },
        };
        let base = |v: &mut Vec<T>| unsafe {
            (v.as_mut_ptr() as *mut u8).add(l.start * std::mem::size_of::<T>())
        };
        let sp = base(&mut src);
        let dp = if in_place { sp } else { base(&mut dst) };
        let mut res = r.map(|r| r.to_vec());
        let rp = res.as_mut().map(|v| Operand {
            ptr: base(v),
            strides: &l.strides,
        });
        // SAFETY: the layout addresses elements start .. len of buffers of len elements, rows
        // never overlap (pad >= 0), and in place the two operands are the same view.
        unsafe {
            run_with::<T>(
                config,
                &l.shape,
                mask_shape,
                Operand {
                    ptr: sp,
                    strides: &l.strides,
                },
                Operand {
                    ptr: dp,
                    strides: &l.strides,
                },
                rp,
                bits,
                app,
            );
        }
        (if in_place { src } else { dst }, store)
    }

    /// Every path and thread count against the portable single-threaded one.
    fn check_paths<T: Probe>(shape: &[usize], pad: usize, start: usize) {
        let l = layout::<T>(shape, pad, start);
        let x: Vec<T> = values(l.len, 1).into_iter().map(T::from_f64).collect();
        let r: Vec<T> = values(l.len, 2).into_iter().map(T::from_f64).collect();
        let n: usize = shape.iter().product();
        let nd = shape.len();
        let channel: Vec<usize> = shape
            .iter()
            .enumerate()
            .map(|(d, &s)| if d + 1 < nd || nd == 1 { s } else { 1 })
            .collect();
        let sample: Vec<usize> = shape
            .iter()
            .enumerate()
            .map(|(d, &s)| if d == 0 { s } else { 1 })
            .collect();
        let mask_words = bernoulli_words(KEY, 5, rng::threshold_for(0.5), n);
        let configs = [
            Config {
                isa: best_isa(),
                threads: 1,
            },
            Config {
                isa: best_isa(),
                threads: 2,
            },
            Config {
                isa: Isa::Portable,
                threads: 3,
            },
        ];
        for app in apps() {
            for res in [None, Some(&r[..])] {
                for (ms, given) in [
                    (shape, None),
                    (shape, Some(&mask_words[..])),
                    (&channel[..], Some(&mask_words[..])),
                    (&sample[..], Some(&mask_words[..])),
                ] {
                    let what = format!(
                        "{} {shape:?} pad {pad} start {start} {app:?} res {} mask {ms:?} given {}",
                        std::any::type_name::<T>(),
                        res.is_some(),
                        given.is_some()
                    );
                    let (want, want_mask) =
                        call::<T>(PORTABLE, &l, ms, &x, res, given, &app, false);
                    for config in configs {
                        for in_place in [false, true] {
                            let (got, got_mask) =
                                call::<T>(config, &l, ms, &x, res, given, &app, in_place);
                            assert_eq!(want_mask, got_mask, "{what}: mask on {config:?}");
                            if in_place {
                                // Outside the view the buffer keeps the input's values.
                                let (mut w, _) =
                                    call::<T>(PORTABLE, &l, ms, &x, res, given, &app, true);
                                w.truncate(got.len());
                                assert_same(&w, &got, &format!("{what} in place on {config:?}"));
                            } else {
                                assert_same(&want, &got, &format!("{what} on {config:?}"));
                            }
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn vector_loops_match_the_portable_ones_on_odd_lengths_and_offsets() {
        for (shape, pad, start) in [
            (&[1][..], 0, 0),
            (&[63], 0, 1),
            (&[64], 0, 0),
            (&[65], 0, 3),
            (&[1000], 0, 1),
            (&[CHUNK + 77], 0, 5),
            (&[3, 5, 131], 0, 2),
            (&[4, 7, 67], 3, 1),
            (&[2, 3, 200], 1, 0),
        ] {
            check_paths::<f32>(shape, pad, start);
            check_paths::<f64>(shape, pad, start);
            check_paths::<f16>(shape, pad, start);
            check_paths::<bf16>(shape, pad, start);
        }
    }

    #[test]
    fn short_runs_are_spread_bit_for_bit() {
        assert_eq!(short_broadcast_run(&[4, 3, 2, 2], &[4, 3, 1, 1]), Some(4));
        assert_eq!(short_broadcast_run(&[4, 3, 2, 2], &[4, 1, 1, 1]), Some(12));
        assert_eq!(short_broadcast_run(&[4, 3, 8, 8], &[4, 3, 1, 1]), None);
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
    fn broadcast_reference(words: &[u64], shape: &[usize], mask_shape: &[usize]) -> Vec<bool> {
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

    #[test]
    fn masks_broadcast_over_a_middle_dimension_expand_bit_for_bit() {
        // (shape, mask shape, expanded before the kernel?)
        let cases: [(&[usize], &[usize], bool); 8] = [
            (&[8, 2048, 5, 5], &[8, 1, 5, 5], true),
            (&[3, 5, 2, 3], &[3, 1, 2, 3], true),
            (&[3, 2, 7], &[1, 2, 7], true),
            (&[2, 3, 4, 5], &[2, 1, 4, 1], true),
            (&[4, 9, 1, 7], &[4, 1, 1, 7], true),
            (&[2, 3, 10, 10], &[2, 1, 10, 10], false),
            (&[4, 3, 2, 2], &[4, 3, 1, 1], true), // spread_bits takes this one first
            (&[4, 3, 2, 2], &[4, 3, 2, 2], false),
        ];
        for (shape, mask_shape, expands) in cases {
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
            // The kernel gives, on every path and thread count, what the element mask gives.
            let element: Vec<u64> = (0..words_for(n))
                .map(|w| {
                    (0..64)
                        .filter(|b| want.get(64 * w + b) == Some(&true))
                        .fold(0u64, |acc, b| acc | 1 << b)
                })
                .collect();
            let x: Vec<f32> = values(n, 4).into_iter().map(|v| v as f32).collect();
            let app = Application::Scale { scale: 1.25 };
            let mut want_out = vec![0f32; n];
            apply_contiguous(
                PORTABLE,
                shape,
                shape,
                &x,
                &mut want_out,
                None,
                Bits::Given(&element),
                &app,
            );
            for threads in [1, 2] {
                for isa in [best_isa(), Isa::Portable] {
                    let mut out = vec![0f32; n];
                    let config = Config { isa, threads };
                    let bits = Bits::Given(&words);
                    apply_contiguous(config, shape, mask_shape, &x, &mut out, None, bits, &app);
                    assert_same(
                        &want_out,
                        &out,
                        &format!("{shape:?} {mask_shape:?} {config:?}"),
                    );
                }
            }
        }
    }

    #[test]
    fn threads_split_large_calls_without_changing_a_bit() {
        check_paths::<f32>(&[3, PARALLEL_MIN / 2 + 33], 0, 1);
        check_paths::<f16>(&[PARALLEL_MIN + 100], 0, 0);
        check_paths::<f64>(&[5, 4, PARALLEL_MIN / 16 + 3], 2, 0);
    }

    #[test]
    fn streamed_outputs_match() {
        let n = STREAM_MIN_BYTES / 4 + 1000;
        for start in [0, 1, 4] {
            let l = layout::<f32>(&[n], 0, start);
            let x: Vec<f32> = values(l.len, 9).into_iter().map(|v| v as f32).collect();
            let r: Vec<f32> = values(l.len, 8).into_iter().map(|v| v as f32).collect();
            for res in [None, Some(&r[..])] {
                let app = Application::Scale { scale: 2.5 };
                let (want, _) = call::<f32>(PORTABLE, &l, &[n], &x, res, None, &app, false);
                let (got, _) = call::<f32>(
                    Config {
                        isa: best_isa(),
                        threads: 2,
                    },
                    &l,
                    &[n],
                    &x,
                    res,
                    None,
                    &app,
                    false,
                );
                assert_same(&want, &got, "streamed f32");
            }
        }
    }

    #[test]
    fn every_f16_value_gets_the_same_bits_on_every_path() {
        let x: Vec<f16> = (0..=u16::MAX).map(f16::from_bits).collect();
        let r: Vec<f16> = x.iter().rev().copied().collect();
        let n = x.len();
        let keep_all = vec![u64::MAX; words_for(n)];
        let half_kept = bernoulli_words(KEY, 0, rng::threshold_for(0.5), n);
        for app in [
            Application::Scale { scale: 1.0 / 0.9 },
            Application::Scale { scale: 3.0 },
            Application::Affine {
                a: 0.8,
                shift: -0.25,
                dropped: 0.1,
            },
        ] {
            for words in [&keep_all, &half_kept] {
                for res in [None, Some(&r[..])] {
                    let mut want = vec![f16::ZERO; n];
                    let mut got = vec![f16::ZERO; n];
                    apply_contiguous(
                        PORTABLE,
                        &[n],
                        &[n],
                        &x,
                        &mut want,
                        res,
                        Bits::Given(words),
                        &app,
                    );
                    apply_contiguous(
                        Config {
                            isa: best_isa(),
                            threads: 1,
                        },
                        &[n],
                        &[n],
                        &x,
                        &mut got,
                        res,
                        Bits::Given(words),
                        &app,
                    );
                    assert_same(
                        &want,
                        &got,
                        &format!("f16 {app:?} residual {}", res.is_some()),
                    );
                }
            }
        }
    }

    #[test]
    fn the_safe_fronts_agree_with_each_other() {
        let n = 5000;
        let x: Vec<f32> = values(n, 4).into_iter().map(|v| v as f32).collect();
        let mut out = vec![0f32; n];
        let mut inplace = x.clone();
        let fresh = || Bits::Fresh {
            key: KEY,
            first_block: 9,
            threshold: rng::threshold_for(0.3),
            store: None,
        };
        let app = Application::Scale { scale: 1.0 / 0.3 };
        apply_contiguous(
            Config::current(),
            &[n],
            &[n],
            &x,
            &mut out,
            None,
            fresh(),
            &app,
        );
        apply_in_place(
            Config::current(),
            &[n],
            &[n],
            &mut inplace,
            None,
            fresh(),
            &app,
        );
        assert_same(&out, &inplace, "in place vs out of place");
        let kept = out.iter().filter(|v| **v != 0.0).count();
        assert!(
            (1200..1800).contains(&kept),
            "kept {kept} of {n} at keep 0.3"
        );
    }

    #[test]
    #[should_panic(expected = "does not broadcast")]
    fn the_safe_front_refuses_a_bad_mask_shape() {
        let x = vec![0f32; 6];
        let mut out = vec![0f32; 6];
        apply_contiguous(
            PORTABLE,
            &[2, 3],
            &[3, 1],
            &x,
            &mut out,
            None,
            Bits::Given(&[0]),
            &Application::Scale { scale: 1.0 },
        );
    }
}
