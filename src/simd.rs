//! AVX2 (+ F16C) loops for the kernel's hot case: a contiguous run with one keep bit per element
//! (or one decision for the whole run) and a kept value `x * mul (+ add)`.
//!
//! They compute exactly what the portable loops in `kernel` compute, operation for operation
//! (a multiply, then an add when there is one, never a fused multiply-add; 16-bit floats widened
//! to f32 and rounded back to nearest-even), so the output bits never depend on the path.
//! `kernel` chooses the path once per call; nothing here is reached without AVX2 and F16C.

/// `x * mul`, then `+ add` when there is one (two roundings, as torch's `mul` then `add_`).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Linear<F> {
    pub mul: F,
    pub add: Option<F>,
}

/// What the vector loops write: kept elements `x * mul (+ add)` (`lin`, in the arithmetic type
/// `F`), dropped ones `dropped`; streamed past the cache (non-temporal stores) when `stream`.
///
/// The loops are 256-bit only. 512-bit forms (AVX-512F, which this project's Zen 4 machines
/// have) were measured and removed: in a tight loop of calls they were no faster (a 1M-element
/// float32 dropout 93.6 us against 93.3 us, 64K 11.7 against 11.5 us), and where a call follows
/// torch's own operations, as in a training step, they were up to twice as slow while the
/// vector units woke up: a (8, 2048, 5, 5) drop_path after `torch.randn` took 126 us against
/// 62 us, the converted encoder and vit_tiny steps 640 and 1077 ms against 620 and 1074 ms.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Fast<T, F> {
    pub lin: Linear<F>,
    pub dropped: T,
    pub stream: bool,
}

/// A contiguous run of `len` elements: where they are read and written, and their decisions.
#[derive(Clone, Copy, Debug)]
pub struct Run<'a, T> {
    pub mask: RunMask<'a>,
    pub src: *const T,
    pub dst: *mut T,
    /// Added to the masked value when given.
    pub res: Option<*const T>,
    pub len: usize,
}

/// Runs at least this long start with a short head that brings their stores to a boundary of
/// the store width ([`Run::head_to_align`]). A head costs a group on a stack copy, a tail (the
/// run no longer ends on a whole word) and the bits read across word boundaries: measured on
/// rows of 1024 and 2048 float32 elements 16 bytes off, that cost as much as or more than the
/// aligned stores saved (one thread, in cache), so shorter runs keep their alignment.
const ALIGN_MIN_LEN: usize = 8192;

impl<'a, T> Run<'a, T> {
    /// How many leading elements to run on their own so that the rest's stores start on an
    /// `align`-byte boundary (0 when they do already, when the run is shorter than
    /// [`ALIGN_MIN_LEN`], or when `dst` is not even aligned to its element, which no head can
    /// fix). A vector store that straddles two cache lines costs about two: in cache, where
    /// the loops run at the speed of the stores, applying given bits to 1M float32 elements of
    /// a NumPy-like buffer (16-byte aligned, as `malloc` gives) took 1.07-1.13x the time of a
    /// 32-byte aligned one (one thread, 2-core AMD EPYC).
    pub fn head_to_align(&self, align: usize) -> usize {
        let size = std::mem::size_of::<T>();
        let addr = self.dst as usize;
        if self.len < ALIGN_MIN_LEN || size == 0 || !addr.is_multiple_of(size) {
            return 0;
        }
        (align - addr % align) % align / size
    }

    /// The run's first `k` elements (k <= len) and the rest, with the rest's decisions from bit
    /// `first + k` (or the same whole-run decision).
    pub fn split(self, k: usize) -> (Run<'a, T>, Run<'a, T>) {
        debug_assert!(k <= self.len);
        let head = Run { len: k, ..self };
        let mask = match self.mask {
            RunMask::Bits { words, first } => RunMask::Bits {
                words,
                first: first + k,
            },
            all => all,
        };
        let rest = Run {
            mask,
            src: self.src.wrapping_add(k),
            dst: self.dst.wrapping_add(k),
            res: self.res.map(|r| r.wrapping_add(k)),
            len: self.len - k,
        };
        (head, rest)
    }
}

/// The keep decisions of a run.
#[derive(Clone, Copy, Debug)]
pub enum RunMask<'a> {
    /// Element j's decision is bit `first + j` of `words` (bit b is bit b % 64 of word b / 64).
    Bits { words: &'a [u64], first: usize },
    /// One decision for every element.
    All(bool),
}

/// The 64 bits starting at bit `first` of `words`, zeros past the end.
#[inline(always)]
pub fn word_at(words: &[u64], first: usize) -> u64 {
    let (w, s) = (first / 64, first % 64);
    let lo = words.get(w).copied().unwrap_or(0);
    if s == 0 {
        lo
    } else {
        (lo >> s) | (words.get(w + 1).copied().unwrap_or(0) << (64 - s))
    }
}

#[cfg(target_arch = "x86_64")]
pub use x86::{apply_bf16, apply_f16, apply_f32, apply_f64};

/// Orders every non-temporal store this thread issued (the `stream` runs of `apply_f32` and
/// kin) before any store it issues after this call. A thread that streamed a range of the
/// output calls it once, after its last run of the range and before it reports the range done.
///
/// Why once per range is enough: streaming stores are weakly ordered only against *other*
/// stores (and other threads' view of them); the thread that issued them reads its own writes in
/// program order, and no other thread reads the range until the pool hands it the "range done"
/// report, a store that this fence orders after every streaming store before it. Nothing reads
/// the output between two runs of one range, so a fence per run (one per channel of a channel
/// mask: 25,088 on a (32, 28, 28, 256) input) bought nothing but the wait.
#[inline]
pub fn fence_streams() {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: SFENCE is part of SSE, which every x86-64 CPU has; it touches no memory.
    unsafe {
        std::arch::x86_64::_mm_sfence()
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    //! Safety, for the whole module: everything here is reached only through the `apply_*`
    //! functions, which are `#[target_feature(enable = "avx2,f16c")]` and whose callers promise
    //! a CPU with AVX2 and F16C. The helpers are `#[inline(always)]` (which a `#[target_feature]`
    //! function cannot be) so that each is compiled into its caller with those features; in them
    //! even an intrinsic that takes no pointer is an unsafe call, whose SAFETY comment reads
    //! "AVX2 and F16C (see the module)".

    use super::{word_at, Fast, Linear, Run, RunMask};
    use half::{bf16, f16};
    use std::arch::x86_64::*;

    /// Which decisions a loop sees, as a const parameter so each case gets its own loop.
    const BITS: u8 = 0;
    const KEEP_ALL: u8 = 1;
    const DROP_ALL: u8 = 2;

    /// `$f::<$pre MODE, RES $post>($args)` with MODE the kind of `$mask` (bits, all kept, all
    /// dropped) and RES whether `$res` (a bool) says there is a residual: the six loops a short
    /// piece of a run may need.
    macro_rules! by_mask {
        ($mask:expr, $res:expr, $f:ident [$($pre:tt)*] [$($post:tt)*] ($($arg:expr),* $(,)?)) => {
            match ($mask, $res) {
                (RunMask::Bits { .. }, false) => $f::<$($pre)* BITS, false $($post)*>($($arg),*),
                (RunMask::Bits { .. }, true) => $f::<$($pre)* BITS, true $($post)*>($($arg),*),
                (RunMask::All(true), false) => $f::<$($pre)* KEEP_ALL, false $($post)*>($($arg),*),
                (RunMask::All(true), true) => $f::<$($pre)* KEEP_ALL, true $($post)*>($($arg),*),
                (RunMask::All(false), false) => $f::<$($pre)* DROP_ALL, false $($post)*>($($arg),*),
                (RunMask::All(false), true) => $f::<$($pre)* DROP_ALL, true $($post)*>($($arg),*),
            }
        };
    }

    /// Eight lanes of f32 arithmetic over an element type stored as f32 or f16.
    ///
    /// # Safety
    /// Every method needs a CPU with AVX2 and F16C; `load` and `store` need `p` valid for eight
    /// elements (reads, or writes), and a streaming store a 16-byte aligned `p`.
    trait Lanes8: Copy {
        /// # Safety
        /// See the trait.
        unsafe fn load(p: *const Self) -> __m256;
        /// # Safety
        /// See the trait.
        unsafe fn store<const STREAM: bool>(p: *mut Self, v: __m256);
        /// Rounds to the element type and back (identity for f32).
        ///
        /// # Safety
        /// See the trait.
        unsafe fn round(v: __m256) -> __m256;
    }

    impl Lanes8 for f32 {
        #[inline(always)]
        unsafe fn load(p: *const f32) -> __m256 {
            // SAFETY: `p` is valid for eight f32 reads (the trait's contract); AVX2.
            unsafe { _mm256_loadu_ps(p) }
        }
        #[inline(always)]
        unsafe fn store<const STREAM: bool>(p: *mut f32, v: __m256) {
            if STREAM {
                // SAFETY: `p` is valid for eight f32 writes and, when streaming, 16-byte aligned
                // (checked in `apply_lanes8`), so are both halves; AVX2 (see the module).
                unsafe {
                    _mm_stream_ps(p, _mm256_castps256_ps128(v));
                    _mm_stream_ps(p.add(4), _mm256_extractf128_ps::<1>(v));
                }
            } else {
                // SAFETY: `p` is valid for eight f32 writes; AVX2 (see the module).
                unsafe { _mm256_storeu_ps(p, v) }
            }
        }
        #[inline(always)]
        unsafe fn round(v: __m256) -> __m256 {
            v
        }
    }

    impl Lanes8 for f16 {
        #[inline(always)]
        unsafe fn load(p: *const f16) -> __m256 {
            // SAFETY: `p` is valid for eight f16 (16 bytes) reads; F16C (see the module).
            unsafe { _mm256_cvtph_ps(_mm_loadu_si128(p as *const __m128i)) }
        }
        #[inline(always)]
        unsafe fn store<const STREAM: bool>(p: *mut f16, v: __m256) {
            // SAFETY: F16C (see the module).
            let h = unsafe { _mm256_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(v) };
            if STREAM {
                // SAFETY: `p` is valid for 16 bytes of writes and 16-byte aligned when streaming.
                unsafe { _mm_stream_si128(p as *mut __m128i, h) }
            } else {
                // SAFETY: `p` is valid for 16 bytes of writes.
                unsafe { _mm_storeu_si128(p as *mut __m128i, h) }
            }
        }
        #[inline(always)]
        unsafe fn round(v: __m256) -> __m256 {
            // SAFETY: F16C (see the module).
            unsafe { _mm256_cvtph_ps(_mm256_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(v)) }
        }
    }

    /// f32 -> bfloat16 bits in the low 16 bits of each lane, exactly as `half::bf16::from_f32`:
    /// round to nearest even (`x + 0x7FFF + lsb`, carrying into the exponent up to infinity),
    /// and a NaN keeps its top mantissa bits with the quiet bit set.
    ///
    /// # Safety
    /// The CPU must have AVX2.
    #[inline(always)]
    unsafe fn bf16_bits(v: __m256) -> __m256i {
        // SAFETY: AVX2 and F16C (see the module); no memory is touched.
        unsafe {
            let x = _mm256_castps_si256(v);
            let lsb = _mm256_and_si256(_mm256_srli_epi32::<16>(x), _mm256_set1_epi32(1));
            let rounded = _mm256_srli_epi32::<16>(_mm256_add_epi32(
                x,
                _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7FFF)),
            ));
            let quiet = _mm256_or_si256(_mm256_srli_epi32::<16>(x), _mm256_set1_epi32(0x0040));
            let abs = _mm256_and_si256(x, _mm256_set1_epi32(0x7FFF_FFFF));
            let nan = _mm256_cmpgt_epi32(abs, _mm256_set1_epi32(0x7F80_0000));
            _mm256_blendv_epi8(rounded, quiet, nan)
        }
    }

    impl Lanes8 for bf16 {
        #[inline(always)]
        unsafe fn load(p: *const bf16) -> __m256 {
            // bfloat16 is the top half of an f32: widen and shift up.
            // SAFETY: `p` is valid for eight bf16 (16 bytes) reads; AVX2 (see the module).
            unsafe {
                let h = _mm256_cvtepu16_epi32(_mm_loadu_si128(p as *const __m128i));
                _mm256_castsi256_ps(_mm256_slli_epi32::<16>(h))
            }
        }
        #[inline(always)]
        unsafe fn store<const STREAM: bool>(p: *mut bf16, v: __m256) {
            // SAFETY: AVX2 (see the module); no memory is touched.
            let h = unsafe {
                let b = bf16_bits(v);
                // Every lane is <= 0xFFFF, so the unsigned-saturating pack is exact.
                _mm_packus_epi32(_mm256_castsi256_si128(b), _mm256_extracti128_si256::<1>(b))
            };
            if STREAM {
                // SAFETY: `p` is valid for 16 bytes of writes and 16-byte aligned when streaming.
                unsafe { _mm_stream_si128(p as *mut __m128i, h) }
            } else {
                // SAFETY: `p` is valid for 16 bytes of writes.
                unsafe { _mm_storeu_si128(p as *mut __m128i, h) }
            }
        }
        #[inline(always)]
        unsafe fn round(v: __m256) -> __m256 {
            // SAFETY: AVX2 (see the module); no memory is touched.
            unsafe { _mm256_castsi256_ps(_mm256_slli_epi32::<16>(bf16_bits(v))) }
        }
    }

    /// One group of eight: `sel`'s lane sign bits are the keep decisions (for `BITS`).
    ///
    /// # Safety
    /// AVX2 and F16C; `src` (unless `DROP_ALL`) and `res` (if `RES`) valid for eight reads, `dst`
    /// for eight writes (16-byte aligned if `STREAM`).
    #[inline(always)]
    unsafe fn group8<T: Lanes8, const MODE: u8, const RES: bool, const STREAM: bool>(
        mul: __m256,
        add: Option<__m256>,
        dropped: __m256,
        sel: __m256,
        src: *const T,
        dst: *mut T,
        res: *const T,
    ) {
        let v = if MODE == DROP_ALL {
            dropped
        } else {
            // SAFETY: `src` is valid for eight reads here; AVX2 (see the module).
            let mut kept = unsafe { _mm256_mul_ps(T::load(src), mul) };
            if let Some(a) = add {
                // SAFETY: AVX2 (see the module).
                kept = unsafe { _mm256_add_ps(kept, a) };
            }
            if MODE == KEEP_ALL {
                kept
            } else {
                // SAFETY: AVX2 (see the module).
                unsafe { _mm256_blendv_ps(dropped, kept, sel) }
            }
        };
        if RES {
            // SAFETY: `res` is valid for eight reads and `dst` for eight writes; AVX2 and F16C.
            unsafe { T::store::<STREAM>(dst, _mm256_add_ps(T::load(res), T::round(v))) };
        } else {
            // SAFETY: `dst` is valid for eight writes; AVX2 and F16C.
            unsafe { T::store::<STREAM>(dst, v) };
        }
    }

    /// Runs of 64 elements; the caller handles the tail.
    ///
    /// # Safety
    /// AVX2 and F16C; `src` (unless `DROP_ALL`) and `res` (if `RES`) valid for `64 * full`
    /// reads, `dst` for as many writes (16-byte aligned if `STREAM`).
    #[inline(always)]
    unsafe fn words8<T: Lanes8, const MODE: u8, const RES: bool, const STREAM: bool>(
        lin: Linear<f32>,
        dropped: __m256,
        mask: RunMask,
        src: *const T,
        dst: *mut T,
        res: *const T,
        full: usize,
    ) {
        for w in 0..full {
            let word = match mask {
                RunMask::Bits { words, first } if MODE == BITS => word_at(words, first + 64 * w),
                _ => 0,
            };
            let e = 64 * w;
            // SAFETY: e + 64 <= 64 * full, so every operand is valid for the word's 64 elements
            // (`res` is only offset when `RES`).
            unsafe {
                groups8::<T, MODE, RES, STREAM>(
                    lin,
                    dropped,
                    word,
                    src.add(e),
                    dst.add(e),
                    if RES { res.add(e) } else { res },
                    8,
                );
            }
        }
    }

    /// [`apply_f32`] for any [`Lanes8`] type: a short head when that brings the stores to a
    /// 32-byte boundary (`Run::head_to_align`; 16 bytes, a whole store, for 16-bit types), the
    /// vector loop over whole words of 64, then the tail.
    ///
    /// # Safety
    /// As [`apply_f32`].
    #[inline(always)]
    unsafe fn apply_lanes8<T: Lanes8 + Default>(fast: Fast<f32, f32>, run: Run<T>) {
        let Fast {
            lin,
            dropped,
            stream,
            ..
        } = fast;
        // SAFETY: AVX2 (see the module).
        let dropped_v = unsafe { _mm256_set1_ps(dropped) };
        let store_bytes = 8 * std::mem::size_of::<T>();
        let run = match run.head_to_align(store_bytes.min(32)) {
            0 => run,
            k => {
                let (head, rest) = run.split(k);
                // SAFETY: the head is the run's first k < 8 elements, valid as the run is.
                unsafe { head8(lin, dropped_v, head) };
                rest
            }
        };
        let Run {
            mask,
            src,
            dst,
            res,
            len,
        } = run;
        let full = len / 64;
        let stream = stream && (dst as usize).is_multiple_of(16) && full > 0;
        let r = res.unwrap_or(std::ptr::null());
        macro_rules! go {
            ($mode:expr) => {
                match (res.is_some(), stream) {
                    (false, false) => words8::<T, { $mode }, false, false>(
                        lin, dropped_v, mask, src, dst, r, full,
                    ),
                    (false, true) => {
                        words8::<T, { $mode }, false, true>(lin, dropped_v, mask, src, dst, r, full)
                    }
                    (true, false) => {
                        words8::<T, { $mode }, true, false>(lin, dropped_v, mask, src, dst, r, full)
                    }
                    (true, true) => {
                        words8::<T, { $mode }, true, true>(lin, dropped_v, mask, src, dst, r, full)
                    }
                }
            };
        }
        // SAFETY: the run's operands are valid for `len >= 64 * full` elements (the caller),
        // `res` is passed on only when there is one, and `dst` streams only when aligned.
        unsafe {
            match mask {
                RunMask::Bits { .. } => go!(BITS),
                RunMask::All(true) => go!(KEEP_ALL),
                RunMask::All(false) => go!(DROP_ALL),
            }
        }
        // No fence here: a run's non-temporal stores are ordered once per range the caller
        // walks, by its `fence_streams` (a fence per run cost one per channel of a channel
        // mask).
        if len > 64 * full {
            // SAFETY: the last `len - 64 * full` (< 64) elements of the run.
            unsafe { short8(lin, dropped_v, run.split(64 * full).1) };
        }
    }

    /// A head of fewer than 8 elements: one group of the loop on stack copies, so it gets the
    /// same bits and arithmetic as the rest of its run, at a fraction of `short8`'s cost (a
    /// head runs once per run of every call on a misaligned buffer).
    ///
    /// # Safety
    /// AVX2 and F16C; `run.len < 8` and its operands valid for `run.len` elements.
    #[inline(always)]
    unsafe fn head8<T: Lanes8 + Default>(lin: Linear<f32>, dropped_v: __m256, run: Run<T>) {
        let Run {
            mask,
            src,
            dst,
            res,
            len: k,
        } = run;
        debug_assert!(k < 8);
        let (mut s, mut d, mut q) = ([T::default(); 8], [T::default(); 8], [T::default(); 8]);
        // SAFETY: `src` and `res` are valid for `k` < 8 reads, which fit `s` and `q`.
        unsafe {
            std::ptr::copy_nonoverlapping(src, s.as_mut_ptr(), k);
            if let Some(rp) = res {
                std::ptr::copy_nonoverlapping(rp, q.as_mut_ptr(), k);
            }
        }
        let word = match mask {
            RunMask::Bits { words, first } => word_at(words, first),
            RunMask::All(_) => 0,
        };
        let (sp, dp, qp) = (s.as_ptr(), d.as_mut_ptr(), q.as_ptr());
        // SAFETY: AVX2 and F16C (see the module); the stack copies hold eight elements each,
        // never streamed. Lane i of `sel` has bit i of `word` in its sign, as in `words8`.
        unsafe {
            let mul = _mm256_set1_ps(lin.mul);
            let add = lin.add.map(|a| _mm256_set1_ps(a));
            let sel = _mm256_castsi256_ps(_mm256_sllv_epi32(
                _mm256_set1_epi32(word as u32 as i32),
                _mm256_setr_epi32(31, 30, 29, 28, 27, 26, 25, 24),
            ));
            let has_res = res.is_some();
            by_mask!(mask, has_res, group8 [T,] [, false] (mul, add, dropped_v, sel, sp, dp, qp));
            std::ptr::copy_nonoverlapping(d.as_ptr(), dst, k);
        }
    }

    /// A run of fewer than 64 elements (a tail): its whole groups of eight straight from memory,
    /// the last few elements as a `head8`, with the bits and arithmetic of the vector loop.
    ///
    /// # Safety
    /// AVX2 and F16C; `run.len < 64` and its operands valid for `run.len` elements.
    #[inline(always)]
    unsafe fn short8<T: Lanes8 + Default>(lin: Linear<f32>, dropped_v: __m256, run: Run<T>) {
        debug_assert!(run.len < 64);
        let groups = run.len / 8;
        let (whole, last) = run.split(8 * groups);
        if groups > 0 {
            let Run {
                mask,
                src,
                dst,
                res,
                ..
            } = whole;
            let word = match mask {
                RunMask::Bits { words, first } => word_at(words, first),
                RunMask::All(_) => 0,
            };
            let r = res.unwrap_or(std::ptr::null());
            // SAFETY: the operands are valid for the `8 * groups` elements of `whole`.
            unsafe {
                let (has_res, d) = (res.is_some(), dropped_v);
                by_mask!(mask, has_res, groups8 [T,] [, false] (lin, d, word, src, dst, r, groups));
            }
        }
        if last.len > 0 {
            // SAFETY: fewer than eight elements, valid as the run is.
            unsafe { head8(lin, dropped_v, last) };
        }
    }

    /// The first `groups` (up to 8) groups of eight of a word's 64 elements, `word` their bits:
    /// a whole word of `words8`, or the groups of a tail. Lane i of group g moves bit 8g + i of a
    /// 32-bit half into its sign bit. Written out: a closure would not inherit the caller's
    /// target features and stay uninlined.
    ///
    /// # Safety
    /// AVX2 and F16C; `src` (unless `DROP_ALL`) and `res` (if `RES`) valid for `8 * groups`
    /// reads, `dst` for as many writes (16-byte aligned if `STREAM`).
    #[inline(always)]
    unsafe fn groups8<T: Lanes8, const MODE: u8, const RES: bool, const STREAM: bool>(
        lin: Linear<f32>,
        dropped: __m256,
        word: u64,
        src: *const T,
        dst: *mut T,
        res: *const T,
        groups: usize,
    ) {
        // SAFETY: AVX2 (see the module); no memory is touched.
        let (mul, add, halves, shifts) = unsafe {
            (
                _mm256_set1_ps(lin.mul),
                lin.add.map(|a| _mm256_set1_ps(a)),
                [
                    _mm256_set1_epi32(word as u32 as i32),
                    _mm256_set1_epi32((word >> 32) as u32 as i32),
                ],
                [
                    _mm256_setr_epi32(31, 30, 29, 28, 27, 26, 25, 24),
                    _mm256_setr_epi32(23, 22, 21, 20, 19, 18, 17, 16),
                    _mm256_setr_epi32(15, 14, 13, 12, 11, 10, 9, 8),
                    _mm256_setr_epi32(7, 6, 5, 4, 3, 2, 1, 0),
                ],
            )
        };
        for g in 0..groups {
            let e = 8 * g;
            // SAFETY: e + 8 <= 8 * groups, within the operands (the caller); AVX2 and F16C.
            unsafe {
                let sel = _mm256_castsi256_ps(_mm256_sllv_epi32(halves[g / 4], shifts[g % 4]));
                group8::<T, MODE, RES, STREAM>(
                    mul,
                    add,
                    dropped,
                    sel,
                    src.add(e),
                    dst.add(e),
                    if RES { res.add(e) } else { res },
                );
            }
        }
    }

    /// `dst[j] = keep(j) ? src[j] * mul (+ add) : dropped`, then `res[j] +` that when given, for
    /// j < len, in f32. With `stream` the stores may be non-temporal and are not fenced: call
    /// [`fence_streams`](super::fence_streams) before another thread may read `dst`.
    ///
    /// # Safety
    /// The CPU must have AVX2 and F16C; `src`, `dst` and `res` must be valid for `len` elements
    /// (`dst` may equal `src`, but no other overlap); `Bits` must cover bits `first..first + len`.
    #[target_feature(enable = "avx2,f16c")]
    pub unsafe fn apply_f32(fast: Fast<f32, f32>, run: Run<f32>) {
        // SAFETY: this function's own contract.
        unsafe { apply_lanes8::<f32>(fast, run) }
    }

    /// [`apply_f32`] for f16 storage: widened to f32, computed, rounded to nearest-even; with a
    /// residual the masked value is rounded to f16 before the add, as the unfused pair would.
    ///
    /// # Safety
    /// As [`apply_f32`].
    #[target_feature(enable = "avx2,f16c")]
    pub unsafe fn apply_f16(fast: Fast<f16, f32>, run: Run<f16>) {
        let fast = Fast {
            lin: fast.lin,
            dropped: fast.dropped.to_f32(),
            stream: fast.stream,
        };
        // SAFETY: this function's own contract.
        unsafe { apply_lanes8::<f16>(fast, run) }
    }

    /// [`apply_f32`] for bfloat16 storage, as [`apply_f16`] for float16 (round to nearest
    /// even, torch's conversion).
    ///
    /// # Safety
    /// As [`apply_f32`].
    #[target_feature(enable = "avx2,f16c")]
    pub unsafe fn apply_bf16(fast: Fast<bf16, f32>, run: Run<bf16>) {
        let fast = Fast {
            lin: fast.lin,
            dropped: fast.dropped.to_f32(),
            stream: fast.stream,
        };
        // SAFETY: this function's own contract.
        unsafe { apply_lanes8::<bf16>(fast, run) }
    }

    /// One group of four f64.
    ///
    /// # Safety
    /// As [`group8`], for four f64.
    #[inline(always)]
    unsafe fn group4<const MODE: u8, const RES: bool, const STREAM: bool>(
        mul: __m256d,
        add: Option<__m256d>,
        dropped: __m256d,
        sel: __m256d,
        src: *const f64,
        dst: *mut f64,
        res: *const f64,
    ) {
        let v = if MODE == DROP_ALL {
            dropped
        } else {
            // SAFETY: `src` is valid for four reads here; AVX (see the module).
            let mut kept = unsafe { _mm256_mul_pd(_mm256_loadu_pd(src), mul) };
            if let Some(a) = add {
                // SAFETY: AVX (see the module).
                kept = unsafe { _mm256_add_pd(kept, a) };
            }
            if MODE == KEEP_ALL {
                kept
            } else {
                // SAFETY: AVX (see the module).
                unsafe { _mm256_blendv_pd(dropped, kept, sel) }
            }
        };
        let v = if RES {
            // SAFETY: `res` is valid for four reads when `RES`; AVX (see the module).
            unsafe { _mm256_add_pd(_mm256_loadu_pd(res), v) }
        } else {
            v
        };
        if STREAM {
            // SAFETY: `dst` is valid for four writes and 16-byte aligned when streaming, so are
            // both halves; AVX (see the module).
            unsafe {
                _mm_stream_pd(dst, _mm256_castpd256_pd128(v));
                _mm_stream_pd(dst.add(2), _mm256_extractf128_pd::<1>(v));
            }
        } else {
            // SAFETY: `dst` is valid for four writes; AVX (see the module).
            unsafe { _mm256_storeu_pd(dst, v) };
        }
    }

    /// Runs of 64 f64; the caller handles the tail.
    ///
    /// # Safety
    /// As [`words8`].
    #[inline(always)]
    unsafe fn words4<const MODE: u8, const RES: bool, const STREAM: bool>(
        lin: Linear<f64>,
        dropped: __m256d,
        mask: RunMask,
        src: *const f64,
        dst: *mut f64,
        res: *const f64,
        full: usize,
    ) {
        for w in 0..full {
            let word = match mask {
                RunMask::Bits { words, first } if MODE == BITS => word_at(words, first + 64 * w),
                _ => 0,
            };
            let e = 64 * w;
            // SAFETY: e + 64 <= 64 * full, so every operand is valid for the word's 64 elements
            // (`res` is only offset when `RES`).
            unsafe {
                groups4::<MODE, RES, STREAM>(
                    lin,
                    dropped,
                    word,
                    src.add(e),
                    dst.add(e),
                    if RES { res.add(e) } else { res },
                    16,
                );
            }
        }
    }

    /// [`apply_f32`] for f64.
    ///
    /// # Safety
    /// As [`apply_f32`].
    #[target_feature(enable = "avx2,f16c")]
    pub unsafe fn apply_f64(fast: Fast<f64, f64>, run: Run<f64>) {
        // SAFETY: this function's own contract.
        unsafe { apply4_f64(fast, run) }
    }

    /// [`apply_f64`] in 256-bit registers, with a head and a tail as `apply_lanes8`'s.
    ///
    /// # Safety
    /// As [`apply_f32`].
    #[target_feature(enable = "avx2,f16c")]
    unsafe fn apply4_f64(fast: Fast<f64, f64>, run: Run<f64>) {
        let Fast {
            lin,
            dropped,
            stream,
            ..
        } = fast;
        let dropped_v = _mm256_set1_pd(dropped);
        let run = match run.head_to_align(32) {
            0 => run,
            k => {
                let (head, rest) = run.split(k);
                // SAFETY: the head is the run's first k < 4 elements, valid as the run is.
                unsafe { head4(lin, dropped_v, head) };
                rest
            }
        };
        let Run {
            mask,
            src,
            dst,
            res,
            len,
        } = run;
        let full = len / 64;
        let stream = stream && (dst as usize).is_multiple_of(16) && full > 0;
        let r = res.unwrap_or(std::ptr::null());
        macro_rules! go {
            ($mode:expr) => {
                match (res.is_some(), stream) {
                    (false, false) => {
                        words4::<{ $mode }, false, false>(lin, dropped_v, mask, src, dst, r, full)
                    }
                    (false, true) => {
                        words4::<{ $mode }, false, true>(lin, dropped_v, mask, src, dst, r, full)
                    }
                    (true, false) => {
                        words4::<{ $mode }, true, false>(lin, dropped_v, mask, src, dst, r, full)
                    }
                    (true, true) => {
                        words4::<{ $mode }, true, true>(lin, dropped_v, mask, src, dst, r, full)
                    }
                }
            };
        }
        // SAFETY: the run's operands are valid for `len >= 64 * full` elements (the caller),
        // `res` is passed on only when there is one, and `dst` streams only when aligned.
        unsafe {
            match mask {
                RunMask::Bits { .. } => go!(BITS),
                RunMask::All(true) => go!(KEEP_ALL),
                RunMask::All(false) => go!(DROP_ALL),
            }
        }
        // Fenced by the caller, once per range: see `apply_lanes8`.
        if len > 64 * full {
            // SAFETY: the last `len - 64 * full` (< 64) elements of the run.
            unsafe { short4(lin, dropped_v, run.split(64 * full).1) };
        }
    }

    /// [`head8`] for f64: fewer than 4 elements, one group of four.
    ///
    /// # Safety
    /// AVX2; `run.len < 4` and its operands valid for `run.len` elements.
    #[inline(always)]
    unsafe fn head4(lin: Linear<f64>, dropped_v: __m256d, run: Run<f64>) {
        let Run {
            mask,
            src,
            dst,
            res,
            len: k,
        } = run;
        debug_assert!(k < 4);
        let (mut s, mut d, mut q) = ([0f64; 4], [0f64; 4], [0f64; 4]);
        // SAFETY: `src` and `res` are valid for `k` < 4 reads, which fit `s` and `q`.
        unsafe {
            std::ptr::copy_nonoverlapping(src, s.as_mut_ptr(), k);
            if let Some(rp) = res {
                std::ptr::copy_nonoverlapping(rp, q.as_mut_ptr(), k);
            }
        }
        let word = match mask {
            RunMask::Bits { words, first } => word_at(words, first),
            RunMask::All(_) => 0,
        };
        let (sp, dp, qp) = (s.as_ptr(), d.as_mut_ptr(), q.as_ptr());
        // SAFETY: AVX2 (see the module); the stack copies hold four elements each, never
        // streamed. Lane i of `sel` has bit i of `word` in its sign, as in `words4`.
        unsafe {
            let mul = _mm256_set1_pd(lin.mul);
            let add = lin.add.map(|a| _mm256_set1_pd(a));
            let sel = _mm256_castsi256_pd(_mm256_sllv_epi64(
                _mm256_set1_epi64x(word as i64),
                _mm256_setr_epi64x(63, 62, 61, 60),
            ));
            let has_res = res.is_some();
            by_mask!(mask, has_res, group4 [] [, false] (mul, add, dropped_v, sel, sp, dp, qp));
            std::ptr::copy_nonoverlapping(d.as_ptr(), dst, k);
        }
    }

    /// [`short8`] for f64: whole groups of four, then a `head4`.
    ///
    /// # Safety
    /// As [`short8`].
    #[inline(always)]
    unsafe fn short4(lin: Linear<f64>, dropped_v: __m256d, run: Run<f64>) {
        debug_assert!(run.len < 64);
        let groups = run.len / 4;
        let (whole, last) = run.split(4 * groups);
        if groups > 0 {
            let Run {
                mask,
                src,
                dst,
                res,
                ..
            } = whole;
            let word = match mask {
                RunMask::Bits { words, first } => word_at(words, first),
                RunMask::All(_) => 0,
            };
            let r = res.unwrap_or(std::ptr::null());
            // SAFETY: the operands are valid for the `4 * groups` elements of `whole`.
            unsafe {
                let (has_res, d) = (res.is_some(), dropped_v);
                by_mask!(mask, has_res, groups4 [] [, false] (lin, d, word, src, dst, r, groups));
            }
        }
        if last.len > 0 {
            // SAFETY: fewer than four elements, valid as the run is.
            unsafe { head4(lin, dropped_v, last) };
        }
    }

    /// [`groups8`] for f64: the first `groups` (up to 16) groups of four; lane i moves bit i of
    /// the (shifted) word into its sign bit.
    ///
    /// # Safety
    /// As [`groups8`], for `4 * groups` elements.
    #[inline(always)]
    unsafe fn groups4<const MODE: u8, const RES: bool, const STREAM: bool>(
        lin: Linear<f64>,
        dropped: __m256d,
        word: u64,
        src: *const f64,
        dst: *mut f64,
        res: *const f64,
        groups: usize,
    ) {
        // SAFETY: AVX2 (see the module); no memory is touched.
        let (mul, add, shifts, mut bits) = unsafe {
            (
                _mm256_set1_pd(lin.mul),
                lin.add.map(|a| _mm256_set1_pd(a)),
                _mm256_setr_epi64x(63, 62, 61, 60),
                _mm256_set1_epi64x(word as i64),
            )
        };
        for g in 0..groups {
            let e = 4 * g;
            // SAFETY: e + 4 <= 4 * groups, within the operands (the caller); AVX2.
            unsafe {
                let sel = _mm256_castsi256_pd(_mm256_sllv_epi64(bits, shifts));
                bits = _mm256_srli_epi64::<4>(bits);
                group4::<MODE, RES, STREAM>(
                    mul,
                    add,
                    dropped,
                    sel,
                    src.add(e),
                    dst.add(e),
                    if RES { res.add(e) } else { res },
                );
            }
        }
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        /// The vector f32 -> bfloat16 conversion against `half`'s, bit for bit, over every
        /// exponent, sign and NaN class and a dense sample of mantissas (ties included).
        #[test]
        fn bf16_rounding_is_halfs() {
            if crate::cpu::best_isa() != crate::cpu::Isa::Avx2 {
                return;
            }
            #[target_feature(enable = "avx2,f16c")]
            fn check(bits: &[u32; 8]) {
                let v = f32::from_bits;
                let lanes: [f32; 8] = core::array::from_fn(|i| v(bits[i]));
                let mut out = [bf16::ZERO; 8];
                // SAFETY: 8 lanes in and out, in bounds; the CPU has AVX2 and F16C.
                unsafe {
                    <bf16 as Lanes8>::store::<false>(
                        out.as_mut_ptr(),
                        _mm256_loadu_ps(lanes.as_ptr()),
                    )
                };
                for (o, l) in out.iter().zip(lanes) {
                    assert_eq!(
                        o.to_bits(),
                        bf16::from_f32(l).to_bits(),
                        "{:#010x}",
                        l.to_bits()
                    );
                }
            }
            let mut batch = [0u32; 8];
            let mut i = 0;
            let mut push = |x: u32| {
                batch[i] = x;
                i += 1;
                if i == 8 {
                    // SAFETY: `best_isa` found AVX2 and F16C above.
                    unsafe { check(&batch) };
                    i = 0;
                }
            };
            for hi in 0..=0x1FFu32 {
                // sign + exponent, then low bits around the rounding point and a spread.
                for lo in [
                    0u32, 1, 0x7FFF, 0x8000, 0x8001, 0xFFFF, 0x1_7FFF, 0x1_8000, 0x7F_FFFF,
                ] {
                    push(hi << 23 | lo);
                }
                for k in 0..256u32 {
                    push(hi << 23 | k.wrapping_mul(0x9E37_79B9) >> 9);
                }
            }
            for x in [
                0x7F80_0001u32,
                0x7FC0_0000,
                0xFFFF_FFFF,
                0x7F7F_FFFF,
                0xFF7F_8000,
                0x7F7F_8000,
            ] {
                push(x);
            }
            for _ in 0..8 {
                push(0);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run_at<T>(addr: usize, len: usize) -> Run<'static, T> {
        // The pointers are only compared and offset, never read.
        Run {
            mask: RunMask::Bits {
                words: &[],
                first: 5,
            },
            src: (addr + 4096) as *const T,
            dst: addr as *mut T,
            res: Some((addr + 8192) as *const T),
            len,
        }
    }

    #[test]
    fn the_head_reaches_the_next_store_boundary_of_a_long_enough_run() {
        assert_eq!(run_at::<f32>(0x1010, 10000).head_to_align(32), 4);
        assert_eq!(run_at::<f32>(0x101c, 10000).head_to_align(32), 1);
        assert_eq!(run_at::<f32>(0x1020, 10000).head_to_align(32), 0);
        assert_eq!(run_at::<f64>(0x1008, 10000).head_to_align(32), 3);
        assert_eq!(run_at::<u16>(0x1006, 10000).head_to_align(16), 5);
        // Too short a run, or a destination not aligned to its own element: no head.
        assert_eq!(
            run_at::<f32>(0x1010, ALIGN_MIN_LEN - 1).head_to_align(32),
            0
        );
        assert_eq!(run_at::<f32>(0x1012, 10000).head_to_align(32), 0);
    }

    #[test]
    fn a_split_run_goes_on_from_the_heads_last_element_and_bit() {
        let (head, rest) = run_at::<f32>(0x1010, 10000).split(4);
        assert_eq!((head.len, head.dst as usize), (4, 0x1010));
        assert_eq!((rest.len, rest.dst as usize), (9996, 0x1020));
        assert_eq!(rest.src as usize, 0x1010 + 4096 + 16);
        assert_eq!(rest.res.map(|r| r as usize), Some(0x1010 + 8192 + 16));
        assert!(matches!(head.mask, RunMask::Bits { first: 5, .. }));
        assert!(matches!(rest.mask, RunMask::Bits { first: 9, .. }));
        let whole = Run {
            mask: RunMask::All(true),
            ..run_at::<f32>(0x1010, 10000)
        };
        assert!(matches!(whole.split(4).1.mask, RunMask::All(true)));
    }
}
