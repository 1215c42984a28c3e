//! Dispatch: a call's application becomes a rule, its path and thread count a [`Config`], its
//! mask bits are drawn here chunk by chunk (element masks) or given (spread to element bits
//! when their runs are short), and the chunks are shared among fastdrop's threads.

use super::application::{AffineRule, Application, NoiseRule, Rule, ScaleRule};
use super::element::{Element, OpFloat};
use super::loops::apply_range;
#[cfg(target_arch = "x86_64")]
use super::loops::apply_range_avx2;
use super::walk::{self, Plan};
use super::{Bits, Call, CHUNK, STREAM_MIN_BYTES, SUB};
use crate::cpu::{best_isa, isa, Isa};
use crate::mask::{clear_tail, spread, words_for};
use crate::rng::{self, Key};
use crate::simd::Fast;
use crate::threads::{for_each_chunk, for_each_word_chunk, get_num_threads};

/// Runs `call`: writes `dst = application(mask, src) [+ res]` for every element of its shape.
///
/// # Safety
/// As [`Call`] says: the operands address valid elements of type `T` for every index of the
/// shape, `dst` is written at distinct addresses that overlap no other operand unless it is the
/// very same view as `src` (in place), and the bits are as many as the mask needs.
pub unsafe fn run<T: Element>(call: Call) {
    // SAFETY: the caller's contract is `run_with`'s.
    unsafe { run_with::<T>(Config::current(), call) }
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
pub unsafe fn run_with<T: Element>(config: Config, call: Call) {
    let op = |v: f64| T::Op::from_f64(v);
    let config = Config {
        isa: if config.isa == best_isa() {
            config.isa
        } else {
            Isa::Portable
        },
        threads: config.threads.max(1),
    };
    match call.app {
        // SAFETY (each arm): the caller's contract; `config.isa` is one this CPU runs.
        Application::Scale { scale } => unsafe {
            run_rule::<T, _>(config, call, &ScaleRule(op(scale)))
        },
        Application::Affine { a, shift, dropped } => {
            let rule = AffineRule {
                a: op(a),
                shift: op(shift),
                dropped: op(dropped),
            };
            unsafe { run_rule::<T, _>(config, call, &rule) }
        }
        Application::Noise {
            scale,
            key,
            first_block,
        } => {
            let rule = NoiseRule {
                scale: op(scale),
                key,
                first_block,
            };
            unsafe { run_rule::<T, _>(config, call, &rule) }
        }
    }
}

/// [`run_with`] once the application is `rule` (`call.app` is not read again).
///
/// # Safety
/// As [`run`], and `config.isa` must be one this CPU runs.
unsafe fn run_rule<T: Element, R: Rule<T>>(config: Config, call: Call, rule: &R) {
    let Call {
        shape,
        mask_shape,
        src,
        dst,
        res,
        ..
    } = call;
    let n: usize = shape.iter().product();
    if n == 0 {
        return;
    }
    // Given bits may be visited in any order: an output whose memory order is not the logical
    // one (channels-last) is walked in memory order, where its runs are long, instead of
    // spreading the mask over logical runs that stride across it.
    let reordered = match call.bits {
        Bits::Given(_) => walk::memory_order(shape, dst.strides),
        Bits::Fresh { .. } => None,
    };
    if let (Bits::Given(words), true, None) = (&call.bits, R::CONST_DROPPED, &reordered) {
        // One decision per run of fewer than 256 elements (the channels of small maps, the
        // samples of small inputs), or a mask broadcast over a middle dimension whose runs are
        // that short (a channel-coupled DropBlock mask over 10x10 maps): spread the decisions to
        // one bit per element first, so the vector loops see whole mask words instead of a
        // scalar loop per short run. The dropped value does not depend on the mask index here,
        // so nothing else changes.
        if let Some(spread) = spread::element_bits_of_short_runs(words, shape, mask_shape) {
            let call = Call {
                mask_shape: shape,
                bits: Bits::Given(&spread),
                ..call
            };
            // SAFETY: the same operands, with an element mask of the whole shape.
            return unsafe { run_rule::<T, R>(config, call, rule) };
        }
    }
    let zeros = vec![0isize; shape.len()];
    let order = reordered.unwrap_or_else(|| walk::logical_order(shape));
    let plan = Plan::in_order(
        shape,
        mask_shape,
        &order,
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
    match call.bits {
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
