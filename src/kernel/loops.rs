//! The inner loops: one logical range of a [`Plan`], run by run, each run to the vector loops
//! (`simd`, through [`Element::apply_run`]) when it is contiguous and the rule is linear, else to
//! a portable loop: one decision for the run, one bit per element from a word boundary, or any
//! stride.

use super::application::Rule;
use super::element::Element;
use super::walk::Plan;
use crate::mask::bit;
use crate::simd::{Fast, Run, RunMask};

/// [`apply_range`] compiled for AVX2 and F16C, with contiguous runs going to the vector loops.
///
/// # Safety
/// As [`apply_range`], and the CPU must have AVX2 and F16C.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,f16c")]
pub(super) unsafe fn apply_range_avx2<T: Element, R: Rule<T>>(
    plan: &Plan,
    rule: &R,
    start: usize,
    end: usize,
    words: &[u64],
    base: usize,
    fast: Fast<T, T::Op>,
) {
    // SAFETY: this function's contract is `apply_range`'s, and this CPU has AVX2 and F16C.
    unsafe { apply_range::<T, R>(plan, rule, start, end, words, base, Some(fast)) };
    if fast.stream {
        // Once per range (a chunk, or a sub-range of a fresh element mask), before the pool
        // hears the range is done (see `fence_streams`).
        crate::simd::fence_streams();
    }
}

/// Applies `rule` to the logical range [start, end). `words` holds mask bit `m` at position
/// `m - base`. With `fast`, contiguous runs go to `T::apply_run`.
///
/// # Safety
/// The plan's pointers and strides must address valid elements of type `T` for every index in
/// the range, and no other thread may touch the destination elements of this range; `fast` only
/// on a CPU with AVX2 and F16C.
#[inline(always)]
pub(super) unsafe fn apply_range<T: Element, R: Rule<T>>(
    plan: &Plan,
    rule: &R,
    start: usize,
    end: usize,
    words: &[u64],
    base: usize,
    fast: Option<Fast<T, T::Op>>,
) {
    let nd = plan.shape.len();
    let [s_in, d_in, r_in, m_in] = [0, 1, 2, 3].map(|k| plan.strides[k][nd - 1]);
    let size = std::mem::size_of::<T>() as isize;
    plan.walk(start, end, |off, mbit, len| {
        // SAFETY: `walk` gives the byte offsets of the run's first element in each operand,
        // which addresses an element of it (the caller's contract), so the offsets stay inside.
        let (src, dst, res) = unsafe {
            (
                plan.src.offset(off[0]),
                plan.dst.offset(off[1]),
                plan.res.map(|r| r.offset(off[2])),
            )
        };
        let m0 = (mbit as usize).wrapping_sub(base);
        let contiguous = s_in == size && d_in == size && (res.is_none() || r_in == size);
        // Runs shorter than a mask word are not worth the vector loop's set-up and tail copy.
        if let Some(f) = fast.filter(|_| contiguous && (m_in == 0 || m_in == 1) && len >= 64) {
            let mask = if m_in == 0 {
                RunMask::All(bit(words, m0))
            } else {
                RunMask::Bits { words, first: m0 }
            };
            let run = Run {
                mask,
                src: src as *const T,
                dst: dst as *mut T,
                res: res.map(|r| r as *const T),
                len,
            };
            // SAFETY: `fast` is only given on a CPU with AVX2 and F16C; the run is `len`
            // contiguous elements of each operand, and its mask bits are in `words`.
            if unsafe { T::apply_run(f, run) } {
                return;
            }
        }
        if m_in == 0 {
            // One decision for the whole run: channel, sample and broadcast masks.
            let keep = bit(words, m0);
            if contiguous {
                // SAFETY: the run is `len` contiguous elements of each operand.
                unsafe {
                    run_const::<T, R>(
                        rule,
                        keep,
                        src as *const T,
                        dst as *mut T,
                        res.map(|r| r as *const T),
                        mbit as usize,
                        len,
                    )
                };
            } else {
                for j in 0..len as isize {
                    // SAFETY: element j of the run is `j * stride` bytes on in each operand.
                    unsafe {
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
            }
        } else if contiguous && m_in == 1 && m0.is_multiple_of(64) && R::CONST_DROPPED {
            // SAFETY: the run is `len` contiguous elements of each operand.
            unsafe {
                run_words::<T, R>(
                    rule,
                    &words[m0 / 64..],
                    src as *const T,
                    dst as *mut T,
                    res.map(|r| r as *const T),
                    len,
                )
            };
        } else {
            for j in 0..len as isize {
                let keep = bit(words, (m0 as isize + j * m_in) as usize);
                // SAFETY: element j of the run is `j * stride` bytes on in each operand.
                unsafe {
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
        }
    });
}

/// The element `byte_offset` bytes from `p`, widened.
///
/// # Safety
/// `p + byte_offset` must address a valid element of type `T` (maybe unaligned).
#[inline(always)]
unsafe fn read<T: Element>(p: *const u8, byte_offset: isize) -> T::Op {
    // SAFETY: the caller's contract.
    unsafe { (p.offset(byte_offset) as *const T).read_unaligned().to_op() }
}

/// Writes `v` `byte_offset` bytes from `p`.
///
/// # Safety
/// `p + byte_offset` must address an element of type `T` (maybe unaligned) that nothing else
/// reads or writes meanwhile.
#[inline(always)]
unsafe fn write<T: Element>(p: *mut u8, byte_offset: isize, v: T) {
    // SAFETY: the caller's contract.
    unsafe { (p.offset(byte_offset) as *mut T).write_unaligned(v) }
}

/// Rounds the masked value to `T` and adds the residual, so a fused `residual + dropout(x)` gives
/// the bits of the unfused pair for every dtype.
///
/// # Safety
/// `res`, when given, must address a valid element of type `T` (maybe unaligned).
#[inline(always)]
unsafe fn finish<T: Element>(v: T::Op, res: Option<*const u8>) -> T {
    let v = T::from_op(v);
    match res {
        None => v,
        // SAFETY: the caller's contract.
        Some(r) => T::from_op(unsafe { (r as *const T).read_unaligned() }.to_op() + v.to_op()),
    }
}

/// A contiguous run with one decision (mask bit `mask_index`): a dropped run never reads `src`.
///
/// # Safety
/// `src` (read only when `keep`) and `res` (when given) must be valid for `len` reads and `dst`
/// for `len` writes (maybe unaligned); `dst` may be `src`, but overlap no other way.
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
                // SAFETY: j < len (the caller's contract).
                unsafe {
                    dst.add(j)
                        .write_unaligned(T::from_op(rule.kept(src.add(j).read_unaligned().to_op())))
                };
            }
        }
        (true, Some(r)) => {
            for j in 0..len {
                // SAFETY: j < len (the caller's contract).
                unsafe {
                    let v = T::from_op(rule.kept(src.add(j).read_unaligned().to_op()));
                    dst.add(j)
                        .write_unaligned(T::from_op(r.add(j).read_unaligned().to_op() + v.to_op()));
                }
            }
        }
        (false, _) if R::CONST_DROPPED => {
            let v = T::from_op(rule.dropped(mask_index));
            match res {
                // SAFETY: j < len (the caller's contract).
                None => (0..len).for_each(|j| unsafe { dst.add(j).write_unaligned(v) }),
                // SAFETY: j < len (the caller's contract).
                Some(r) => (0..len).for_each(|j| unsafe {
                    dst.add(j)
                        .write_unaligned(T::from_op(r.add(j).read_unaligned().to_op() + v.to_op()))
                }),
            }
        }
        (false, _) => {
            for j in 0..len {
                let v = T::from_op(rule.dropped(mask_index));
                // SAFETY: j < len (the caller's contract).
                unsafe {
                    let v = match res {
                        None => v,
                        Some(r) => T::from_op(r.add(j).read_unaligned().to_op() + v.to_op()),
                    };
                    dst.add(j).write_unaligned(v);
                }
            }
        }
    }
}

/// The hot loop: contiguous data, one mask bit per element starting on a word boundary.
///
/// # Safety
/// As [`run_const`] (with `src` always read), and `words` must hold `len` bits.
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
        // SAFETY: w * 64 + 64 <= len, so every element of this word is in the run.
        let (s, d) = unsafe { (src.add(w * 64), dst.add(w * 64)) };
        match res {
            None => {
                for j in 0..64 {
                    // SAFETY: j < 64, inside this word's elements.
                    unsafe {
                        let x = s.add(j).read_unaligned().to_op();
                        let kept = T::from_op(rule.kept(x));
                        d.add(j)
                            .write_unaligned(if (word >> j) & 1 == 1 { kept } else { dropped });
                    }
                }
            }
            Some(r) => {
                // SAFETY: as for `s` and `d`.
                let r = unsafe { r.add(w * 64) };
                for j in 0..64 {
                    // SAFETY: j < 64, inside this word's elements.
                    unsafe {
                        let x = s.add(j).read_unaligned().to_op();
                        let v = if (word >> j) & 1 == 1 {
                            T::from_op(rule.kept(x))
                        } else {
                            dropped
                        };
                        d.add(j).write_unaligned(T::from_op(
                            r.add(j).read_unaligned().to_op() + v.to_op(),
                        ));
                    }
                }
            }
        }
    }
    for j in full * 64..len {
        // SAFETY: j < len.
        unsafe {
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
}
