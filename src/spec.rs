//! What one call does, as one typed value: the Rust mirror of `python/fastdrop/_spec.py`.
//!
//! A spec is a mask (which keep decisions a call draws, and how many) and an application (what a
//! kept and a dropped element become). The backward's `grad_scale` is Python's business and has
//! no field here. The bindings read the Python dataclasses into these types by their `kind` and
//! field names; `call::prepare` checks a spec against its input and runs it.

use crate::error::{DropError, Result};
use crate::view::check_mask_shape;

/// Which keep decisions a call draws.
#[derive(Clone, Debug, PartialEq)]
pub enum Mask {
    /// One Bernoulli(`keep`) decision per element of `shape`, broadcast to the input.
    Bernoulli { shape: Vec<usize>, keep: f64 },
    /// DropBlock: Bernoulli(`gamma`) seeds at every position of an (N, C or 1, H, W) `shape`,
    /// each grown to a `kh` x `kw` block of dropped positions (timm's placement).
    Blocks {
        shape: [usize; 4],
        gamma: f64,
        kh: usize,
        kw: usize,
    },
}

/// What a kept and a dropped element become.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Application {
    /// Kept: `x * scale`; dropped: 0.
    Scale { scale: f64 },
    /// Kept: `x * numel / kept` over the mask's decisions (1 when none is kept); dropped: 0.
    ScaleByKept,
    /// Kept: `a * x + shift`; dropped: `dropped`.
    Affine { a: f64, shift: f64, dropped: f64 },
    /// Kept: `x * scale`; dropped: N(0, 1) noise from the call's counters after the mask's.
    Noise { scale: f64 },
}

/// One call: its mask and its application.
#[derive(Clone, Debug, PartialEq)]
pub struct Spec {
    pub mask: Mask,
    pub application: Application,
}

impl Mask {
    /// The mask's shape, which broadcasts to the input.
    pub fn shape(&self) -> &[usize] {
        match self {
            Mask::Bernoulli { shape, .. } => shape,
            Mask::Blocks { shape, .. } => shape,
        }
    }

    /// Checks what the mask says about itself: its probability in [0, 1], its blocks at least
    /// 1 x 1 and no larger than its map (an empty map takes 1 x 1 blocks).
    pub fn check(&self) -> Result<()> {
        match *self {
            Mask::Bernoulli { keep, .. } => check_probability("keep probability", keep),
            Mask::Blocks {
                shape: [_, _, h, w],
                gamma,
                kh,
                kw,
            } => {
                check_probability("gamma (the block seed rate)", gamma)?;
                if kh == 0 || kw == 0 || kh > h.max(1) || kw > w.max(1) {
                    return Err(DropError::BlockDoesNotFit { kh, kw, h, w });
                }
                Ok(())
            }
        }
    }

    /// Checks that the mask applies to an input of `shape`: it broadcasts to it (and a block
    /// mask needs a 4-D input).
    pub fn check_input(&self, shape: &[usize]) -> Result<()> {
        if matches!(self, Mask::Blocks { .. }) && shape.len() != 4 {
            return Err(DropError::NotFourD {
                shape: shape.to_vec(),
            });
        }
        check_mask_shape(shape, self.shape())
    }
}

impl Spec {
    /// [`Mask::check`], then [`Mask::check_input`] for an input of `shape`.
    pub fn check(&self, shape: &[usize]) -> Result<()> {
        self.mask.check()?;
        self.mask.check_input(shape)
    }
}

/// A probability in [0, 1] (NaN is refused too).
pub fn check_probability(name: &'static str, value: f64) -> Result<()> {
    if !(0.0..=1.0).contains(&value) {
        return Err(DropError::Probability { name, value });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn blocks(shape: [usize; 4], gamma: f64, kh: usize, kw: usize) -> Mask {
        Mask::Blocks {
            shape,
            gamma,
            kh,
            kw,
        }
    }

    #[test]
    fn probabilities_outside_zero_one_or_nan_are_refused_by_name() {
        for keep in [-0.1, 1.5, f64::NAN, f64::INFINITY] {
            let m = Mask::Bernoulli {
                shape: vec![2],
                keep,
            };
            let err = m.check().unwrap_err();
            assert!(
                err.to_string()
                    .starts_with("keep probability has to be between 0 and 1"),
                "{err}"
            );
        }
        for keep in [0.0, 0.5, 1.0] {
            let m = Mask::Bernoulli {
                shape: vec![2],
                keep,
            };
            assert_eq!(m.check(), Ok(()));
        }
        let err = blocks([1, 1, 4, 4], 1.01, 1, 1).check().unwrap_err();
        assert_eq!(
            err,
            DropError::Probability {
                name: "gamma (the block seed rate)",
                value: 1.01
            }
        );
    }

    #[test]
    fn blocks_must_fit_their_map() {
        assert_eq!(blocks([2, 3, 4, 5], 0.1, 4, 5).check(), Ok(()));
        assert_eq!(blocks([2, 3, 0, 0], 0.1, 1, 1).check(), Ok(()));
        for (kh, kw) in [(0, 1), (1, 0), (5, 1), (1, 6)] {
            let err = blocks([2, 3, 4, 5], 0.1, kh, kw).check().unwrap_err();
            assert_eq!(
                err.to_string(),
                format!("block {kh}x{kw} does not fit a 4x5 map")
            );
        }
    }

    #[test]
    fn masks_must_broadcast_to_their_input() {
        let spec = Spec {
            mask: blocks([2, 1, 4, 5], 0.1, 3, 3),
            application: Application::ScaleByKept,
        };
        assert_eq!(spec.check(&[2, 7, 4, 5]), Ok(()));
        assert!(matches!(
            spec.check(&[2, 7, 4, 6]),
            Err(DropError::MaskShape { .. })
        ));
        assert!(matches!(
            spec.check(&[2, 7, 20]),
            Err(DropError::NotFourD { .. })
        ));
        let spec = Spec {
            mask: Mask::Bernoulli {
                shape: vec![2, 1],
                keep: 0.5,
            },
            application: Application::Scale { scale: 2.0 },
        };
        assert_eq!(spec.check(&[2, 9]), Ok(()));
        assert!(spec.check(&[3, 9]).is_err());
        assert!(spec.check(&[2, 9, 1]).is_err());
    }
}
