//! Applications: what a mask does to the elements it covers (scale, affine, noise), given as
//! [`Application`] and compiled into a [`Rule`] per element type, so the inner loops see
//! constants.

use super::element::{Element, OpFloat};
use crate::noise::normal_at;
use crate::rng::Key;
use crate::simd::Linear;

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
pub(super) trait Rule<T: Element>: Sync {
    /// Whether `dropped` ignores the mask index, which lets the fast loop select between two
    /// values.
    const CONST_DROPPED: bool;
    fn kept(&self, x: T::Op) -> T::Op;
    /// The value of a dropped element whose decision is mask bit `mask_index`.
    fn dropped(&self, mask_index: usize) -> T::Op;
    /// `kept` as the vector loops compute it, when it is a multiply and maybe an add.
    fn linear(&self) -> Option<Linear<T::Op>>;
}

pub(super) struct ScaleRule<F>(pub(super) F);
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

pub(super) struct AffineRule<F> {
    pub(super) a: F,
    pub(super) shift: F,
    pub(super) dropped: F,
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

pub(super) struct NoiseRule<F> {
    pub(super) scale: F,
    pub(super) key: Key,
    pub(super) first_block: u64,
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
