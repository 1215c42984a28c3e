//! The safe fronts: [`apply_contiguous`] and [`apply_in_place`] run the kernel over
//! C-contiguous slices, checking what [`run`](super::run) would otherwise take on trust (for
//! tests, benchmarks and Rust callers).

use super::application::Application;
use super::dispatch::{run_with, Config};
use super::element::Element;
use super::{Bits, Call, Operand};
use crate::mask::words_for;

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

/// A call over C-contiguous buffers of `shape`: a [`Call`] without the pointers; the input and
/// output buffers are the fronts' own arguments.
pub struct Contiguous<'a, T> {
    pub shape: &'a [usize],
    pub mask_shape: &'a [usize],
    pub res: Option<&'a [T]>,
    pub bits: Bits<'a>,
    pub app: Application,
}

/// `dst = app(mask, src) [+ res]` over C-contiguous buffers: [`run_with`] without the
/// pointers, for tests, benchmarks and Rust callers.
///
/// # Panics
/// When a buffer does not hold `prod(shape)` elements, `mask_shape` does not broadcast to
/// `shape`, a fresh mask is not element-granular or given bits are too few.
pub fn apply_contiguous<T: Element>(config: Config, call: Contiguous<T>, src: &[T], dst: &mut [T]) {
    let Contiguous {
        shape,
        mask_shape,
        res,
        bits,
        app,
    } = call;
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
    let call = Call {
        shape,
        mask_shape,
        src: op(src.as_ptr()),
        dst: op(dst.as_mut_ptr()),
        res: res.map(|r| op(r.as_ptr())),
        bits,
        app,
    };
    // SAFETY: every buffer holds prod(shape) elements laid out C-contiguously, `dst` is a
    // unique borrow (so it overlaps neither input), and `check_contiguous` sized the mask.
    unsafe { run_with::<T>(config, call) }
}

/// [`apply_contiguous`] writing over its input.
///
/// # Panics
/// As [`apply_contiguous`].
pub fn apply_in_place<T: Element>(config: Config, call: Contiguous<T>, data: &mut [T]) {
    let Contiguous {
        shape,
        mask_shape,
        res,
        bits,
        app,
    } = call;
    check_contiguous(
        shape,
        mask_shape,
        &[data.len(), res.map_or(data.len(), <[T]>::len)],
        &bits,
    );
    let strides = c_strides::<T>(shape);
    let op = Operand {
        ptr: data.as_mut_ptr() as *mut u8,
        strides: &strides,
    };
    let res = res.map(|r| Operand {
        ptr: r.as_ptr() as *mut u8,
        strides: &strides,
    });
    let call = Call {
        shape,
        mask_shape,
        src: op,
        dst: op,
        res,
        bits,
        app,
    };
    // SAFETY: as in `apply_contiguous`; source and destination are the very same view.
    unsafe { run_with::<T>(config, call) }
}
