//! The element types the kernel runs over (f16, bf16, f32, f64), each made by one macro line:
//! how it widens to the type it is computed in, how it rounds back, and which vector loop runs
//! its contiguous runs.

use crate::simd::{Fast, Run};
use half::{bf16, f16};
use std::ops::{Add, Mul};

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
    /// As `simd::apply_f32`: AVX2 and F16C present, the run's pointers valid for `len` elements.
    #[inline(always)]
    unsafe fn apply_run(_fast: Fast<Self, Self::Op>, _run: Run<Self>) -> bool {
        false
    }
}

/// `element!(T, Op, |x| widen, |v| narrow, vector loop)` implements [`Element`] for `T`.
macro_rules! element {
    ($t:ty, $op:ty, |$x:ident| $to_op:expr, |$v:ident| $from_op:expr, $simd:ident) => {
        impl Element for $t {
            type Op = $op;
            #[inline(always)]
            fn to_op(self) -> $op {
                let $x = self;
                $to_op
            }
            #[inline(always)]
            fn from_op($v: $op) -> Self {
                $from_op
            }
            #[cfg(target_arch = "x86_64")]
            #[inline(always)]
            unsafe fn apply_run(fast: Fast<$t, $op>, run: Run<$t>) -> bool {
                // SAFETY: the caller's contract is the vector loop's.
                unsafe { crate::simd::$simd(fast, run) };
                true
            }
        }
    };
}

element!(f32, f32, |x| x, |v| v, apply_f32);
element!(f64, f64, |x| x, |v| v, apply_f64);
element!(f16, f32, |x| x.to_f32(), |v| f16::from_f32(v), apply_f16);
element!(bf16, f32, |x| x.to_f32(), |v| bf16::from_f32(v), apply_bf16);
