//! The one generic routine every variant runs: walk a strided input in logical (C) order, look
//! up each element's keep decision in a bit mask of a broadcastable shape, and write the mask's
//! application (scale, affine, noise; optionally plus a residual) to a strided output.
//!
//! Element-granularity masks are generated chunk by chunk inside the same pass (the bits never
//! leave L1 unless the caller wants them stored); coarser masks (channel, sample, block) are
//! generated first, they are small.

use crate::rng::{self, Key};
use half::{bf16, f16};
use rayon::prelude::*;
use std::ops::{Add, Mul};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

/// Elements per parallel work item. A multiple of 64 so that every chunk starts on a mask word,
/// and small enough that a chunk's bits (512 words) stay in L1.
pub const CHUNK: usize = 1 << 15;
/// Below this many elements a call runs on the calling thread: waking the pool costs more.
pub const PARALLEL_MIN: usize = 1 << 17;

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
    Noise { scale: f64, key: Key, first_block: u64 },
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
}

/// The standard normal deviate of logical index `index` (Box-Muller on two 32-bit words), a pure
/// function of (key, first_block, index) like every other random value here.
pub fn normal_at(key: Key, first_block: u64, index: usize) -> f64 {
    let mut words = [0u32; 4];
    rng::fill_u32(key, first_block.wrapping_add((index / 2) as u64), &mut words);
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
    Fresh { key: Key, first_block: u64, threshold: u64, store: Option<&'a mut [u64]> },
    /// A mask already drawn, C-ordered over the mask shape.
    Given(&'a [u64]),
}

// --- threads -------------------------------------------------------------------------------

static NUM_THREADS: AtomicUsize = AtomicUsize::new(0);
static POOL: Mutex<Option<(usize, Arc<rayon::ThreadPool>)>> = Mutex::new(None);

fn default_threads() -> usize {
    std::env::var("FASTDROP_NUM_THREADS")
        .ok()
        .and_then(|v| v.trim().parse::<usize>().ok())
        .filter(|&n| n > 0)
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
}

/// Threads the kernels use (`FASTDROP_NUM_THREADS`, else the CPUs available).
pub fn get_num_threads() -> usize {
    match NUM_THREADS.load(Ordering::Relaxed) {
        0 => default_threads(),
        n => n,
    }
}

/// Sets the threads the kernels use; results never depend on it.
pub fn set_num_threads(n: usize) -> crate::error::Result<()> {
    if n == 0 {
        return crate::value_err!("num_threads must be at least 1, got 0");
    }
    NUM_THREADS.store(n, Ordering::Relaxed);
    Ok(())
}

fn pool() -> Arc<rayon::ThreadPool> {
    let n = get_num_threads();
    let mut guard = POOL.lock().unwrap_or_else(|e| e.into_inner());
    match &*guard {
        Some((m, p)) if *m == n => p.clone(),
        _ => {
            let p = Arc::new(
                rayon::ThreadPoolBuilder::new()
                    .num_threads(n)
                    .thread_name(|i| format!("fastdrop-{i}"))
                    .build()
                    .expect("building a rayon pool only fails when threads cannot be spawned"),
            );
            *guard = Some((n, p.clone()));
            p
        }
    }
}

/// Runs `f(chunk)` for chunk in 0..chunks, in parallel when `elements` is large enough.
fn for_each_chunk(elements: usize, chunks: usize, f: impl Fn(usize) + Sync + Send) {
    if elements < PARALLEL_MIN || get_num_threads() == 1 {
        (0..chunks).for_each(f);
    } else {
        pool().install(|| (0..chunks).into_par_iter().for_each(f));
    }
}

/// Runs `f(chunk, words)` over `words` split into chunks of `CHUNK / 64` words.
fn for_each_word_chunk(elements: usize, words: &mut [u64], f: impl Fn(usize, &mut [u64]) + Sync + Send) {
    let per = CHUNK / 64;
    if elements < PARALLEL_MIN || get_num_threads() == 1 {
        words.chunks_mut(per).enumerate().for_each(|(c, w)| f(c, w));
    } else {
        pool().install(|| words.par_chunks_mut(per).enumerate().for_each(|(c, w)| f(c, w)));
    }
}

// --- mask generation ------------------------------------------------------------------------

/// Words needed for `n` bits.
pub fn words_for(n: usize) -> usize {
    n.div_ceil(64)
}

/// Clears the bits past `n` in the last word, so that counts and exports see only real decisions.
pub fn clear_tail(words: &mut [u64], n: usize) {
    if n % 64 != 0 {
        if let Some(last) = words.get_mut(n / 64) {
            *last &= (1u64 << (n % 64)) - 1;
        }
    }
}

/// `n` Bernoulli(threshold / 2^32) keep decisions drawn from `first_block` of `key`.
pub fn bernoulli_words(key: Key, first_block: u64, threshold: u64, n: usize) -> Vec<u64> {
    let mut words = vec![0u64; words_for(n)];
    for_each_word_chunk(n, &mut words, |c, w| {
        rng::keep_words(key, first_block.wrapping_add((c * CHUNK / 4) as u64), threshold, w)
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
    fn new(shape: &[usize], mask_shape: &[usize], ops: [&[isize]; 3], src: *const u8, dst: *mut u8, res: Option<*const u8>) -> Plan {
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
        Plan { shape: out_shape, strides: out, src, dst, res }
    }

    /// Calls `seg(offsets, mask_bit, len)` for each innermost run of the logical index range
    /// [start, end).
    fn walk(&self, start: usize, end: usize, mut seg: impl FnMut([isize; 4], isize, usize)) {
        let nd = self.shape.len();
        let inner = self.shape[nd - 1];
        let mut idx = vec![0usize; nd];
        let mut rem = start;
        for d in (0..nd).rev() {
            idx[d] = rem % self.shape[d];
            rem /= self.shape[d];
        }
        let mut pos = start;
        while pos < end {
            let len = (inner - idx[nd - 1]).min(end - pos);
            let mut off = [0isize; 4];
            for (k, o) in off.iter_mut().enumerate() {
                *o = (0..nd).map(|d| idx[d] as isize * self.strides[k][d]).sum();
            }
            seg([off[0], off[1], off[2], 0], off[3], len);
            pos += len;
            idx[nd - 1] = 0;
            for d in (0..nd - 1).rev() {
                idx[d] += 1;
                if idx[d] < self.shape[d] {
                    break;
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

/// Applies `rule` to the logical range [start, end). `words` holds mask bit `m` at position
/// `m - base`.
///
/// # Safety
/// The plan's pointers and strides must address valid elements of type `T` for every index in
/// the range, and no other thread may touch the destination elements of this range.
#[inline(always)]
unsafe fn apply_range<T: Element, R: Rule<T>>(plan: &Plan, rule: &R, start: usize, end: usize, words: &[u64], base: usize) {
    let nd = plan.shape.len();
    let [s_in, d_in, r_in, m_in] = [0, 1, 2, 3].map(|k| plan.strides[k][nd - 1]);
    let size = std::mem::size_of::<T>() as isize;
    plan.walk(start, end, |off, mbit, len| {
        let src = plan.src.offset(off[0]);
        let dst = plan.dst.offset(off[1]);
        let res = plan.res.map(|r| r.offset(off[2]));
        let m0 = (mbit as usize).wrapping_sub(base);
        let contiguous = s_in == size && d_in == size && (res.is_none() || r_in == size);
        if m_in == 0 {
            // One decision for the whole run: channel, sample and broadcast masks.
            let keep = bit(words, m0);
            if contiguous {
                run_const::<T, R>(rule, keep, src as *const T, dst as *mut T, res.map(|r| r as *const T), mbit as usize, len);
            } else {
                for j in 0..len as isize {
                    let v = if keep { rule.kept(read::<T>(src, j * s_in)) } else { rule.dropped(mbit as usize) };
                    write(dst, j * d_in, finish::<T>(v, res.map(|r| r.offset(j * r_in))));
                }
            }
        } else if contiguous && m_in == 1 && m0 % 64 == 0 && R::CONST_DROPPED {
            run_words::<T, R>(rule, &words[m0 / 64..], src as *const T, dst as *mut T, res.map(|r| r as *const T), len);
        } else {
            for j in 0..len as isize {
                let keep = bit(words, (m0 as isize + j * m_in) as usize);
                let v = if keep { rule.kept(read::<T>(src, j * s_in)) } else { rule.dropped((mbit + j * m_in) as usize) };
                write(dst, j * d_in, finish::<T>(v, res.map(|r| r.offset(j * r_in))));
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
unsafe fn run_const<T: Element, R: Rule<T>>(rule: &R, keep: bool, src: *const T, dst: *mut T, res: Option<*const T>, mask_index: usize, len: usize) {
    match (keep, res) {
        (true, None) => {
            for j in 0..len {
                dst.add(j).write_unaligned(T::from_op(rule.kept(src.add(j).read_unaligned().to_op())));
            }
        }
        (true, Some(r)) => {
            for j in 0..len {
                let v = T::from_op(rule.kept(src.add(j).read_unaligned().to_op()));
                dst.add(j).write_unaligned(T::from_op(r.add(j).read_unaligned().to_op() + v.to_op()));
            }
        }
        (false, _) if R::CONST_DROPPED => {
            let v = T::from_op(rule.dropped(mask_index));
            match res {
                None => (0..len).for_each(|j| dst.add(j).write_unaligned(v)),
                Some(r) => (0..len).for_each(|j| dst.add(j).write_unaligned(T::from_op(r.add(j).read_unaligned().to_op() + v.to_op()))),
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
unsafe fn run_words<T: Element, R: Rule<T>>(rule: &R, words: &[u64], src: *const T, dst: *mut T, res: Option<*const T>, len: usize) {
    let dropped = T::from_op(rule.dropped(0));
    let full = len / 64;
    for (w, &word) in words[..full].iter().enumerate() {
        let (s, d) = (src.add(w * 64), dst.add(w * 64));
        match res {
            None => {
                for j in 0..64 {
                    let x = s.add(j).read_unaligned().to_op();
                    let kept = T::from_op(rule.kept(x));
                    d.add(j).write_unaligned(if (word >> j) & 1 == 1 { kept } else { dropped });
                }
            }
            Some(r) => {
                let r = r.add(w * 64);
                for j in 0..64 {
                    let x = s.add(j).read_unaligned().to_op();
                    let v = if (word >> j) & 1 == 1 { T::from_op(rule.kept(x)) } else { dropped };
                    d.add(j).write_unaligned(T::from_op(r.add(j).read_unaligned().to_op() + v.to_op()));
                }
            }
        }
    }
    for j in full * 64..len {
        let v = if bit(words, j) { T::from_op(rule.kept(src.add(j).read_unaligned().to_op())) } else { dropped };
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
pub unsafe fn run<T: Element>(shape: &[usize], mask_shape: &[usize], src: Operand, dst: Operand, res: Option<Operand>, bits: Bits, app: &Application) {
    let op = |v: f64| T::Op::from_f64(v);
    match *app {
        Application::Scale { scale } => run_rule::<T, _>(shape, mask_shape, src, dst, res, bits, &ScaleRule(op(scale))),
        Application::Affine { a, shift, dropped } => {
            run_rule::<T, _>(shape, mask_shape, src, dst, res, bits, &AffineRule { a: op(a), shift: op(shift), dropped: op(dropped) })
        }
        Application::Noise { scale, key, first_block } => {
            run_rule::<T, _>(shape, mask_shape, src, dst, res, bits, &NoiseRule { scale: op(scale), key, first_block })
        }
    }
}

unsafe fn run_rule<T: Element, R: Rule<T>>(shape: &[usize], mask_shape: &[usize], src: Operand, dst: Operand, res: Option<Operand>, bits: Bits, rule: &R) {
    let n: usize = shape.iter().product();
    if n == 0 {
        return;
    }
    let zeros = vec![0isize; shape.len()];
    let plan = Plan::new(
        shape,
        mask_shape,
        [src.strides, dst.strides, res.map_or(&zeros[..], |r| r.strides)],
        src.ptr,
        dst.ptr,
        res.map(|r| r.ptr as *const u8),
    );
    let chunks = n.div_ceil(CHUNK);
    match bits {
        Bits::Given(words) => for_each_chunk(n, chunks, |c| {
            // SAFETY: chunks are disjoint logical ranges; the caller vouched for the views.
            unsafe { apply_range::<T, R>(&plan, rule, c * CHUNK, ((c + 1) * CHUNK).min(n), words, 0) }
        }),
        Bits::Fresh { key, first_block, threshold, store: Some(store) } => {
            let store = &mut store[..words_for(n)];
            for_each_word_chunk(n, store, |c, w| {
                rng::keep_words(key, first_block.wrapping_add((c * CHUNK / 4) as u64), threshold, w);
                let end = ((c + 1) * CHUNK).min(n);
                if end == n {
                    clear_tail(w, n - c * CHUNK);
                }
                // SAFETY: as above.
                unsafe { apply_range::<T, R>(&plan, rule, c * CHUNK, end, w, c * CHUNK) }
            });
        }
        Bits::Fresh { key, first_block, threshold, store: None } => for_each_chunk(n, chunks, |c| {
            let mut local = [0u64; CHUNK / 64];
            let end = ((c + 1) * CHUNK).min(n);
            let w = &mut local[..words_for(end - c * CHUNK)];
            rng::keep_words(key, first_block.wrapping_add((c * CHUNK / 4) as u64), threshold, w);
            // SAFETY: as above.
            unsafe { apply_range::<T, R>(&plan, rule, c * CHUNK, end, w, c * CHUNK) }
        }),
    }
}
