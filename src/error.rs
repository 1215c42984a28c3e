//! Errors are values inside the core; the bindings turn them into Python exceptions in one place
//! (`impl From<DropError> for PyErr`), by [`DropError::kind`].
//!
//! The checks of a call (`view`, `spec`, `call`) return the typed variants, which carry what was
//! received so that a Rust caller can match on them; their messages are the ones Python users
//! see. `Value`, `Type` and `Memory` carry a message already written, for the rest of the crate.

use crate::view::Dtype;
use std::fmt;

/// What went wrong, in the words a user needs: what was received and what was expected.
#[derive(Debug, Clone, PartialEq)]
pub enum DropError {
    /// A bad value or shape (becomes `ValueError`).
    Value(String),
    /// A bad type or dtype (becomes `TypeError`).
    Type(String),
    /// Memory the call needs could not be allocated (becomes `MemoryError`).
    Memory(String),
    /// A probability outside [0, 1], or NaN: `name` says which one.
    Probability { name: &'static str, value: f64 },
    /// A DropBlock block of `kh` x `kw` that does not fit the mask's `h` x `w` map (or is empty).
    BlockDoesNotFit {
        kh: usize,
        kw: usize,
        h: usize,
        w: usize,
    },
    /// DropBlock's mask needs a 4-D (N, C, H, W) input.
    NotFourD { shape: Vec<usize> },
    /// A mask shape that does not broadcast to the input's: same rank, each entry equal or 1.
    MaskShape { mask: Vec<usize>, input: Vec<usize> },
    /// The output view cannot be written.
    ReadOnlyOutput,
    /// The output has a zero stride over a dimension longer than 1 (a broadcast view).
    ZeroStrideOutput,
    /// Distinct elements of the output may share bytes.
    OverlappingOutput {
        shape: Vec<usize>,
        strides: Vec<isize>,
    },
    /// An input's shape differs from the output's.
    ShapeMismatch {
        input: Vec<usize>,
        output: Vec<usize>,
    },
    /// An input's dtype differs from the output's (becomes `TypeError`).
    DtypeMismatch { input: Dtype, output: Dtype },
    /// The output shares bytes with an input without being the very same view.
    OutputOverlapsInput,
    /// The bits of a mask of `shape` could not be allocated (becomes `MemoryError`).
    MaskAllocation { bits: usize, shape: Vec<usize> },
}

/// Which Python exception a [`DropError`] becomes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    Value,
    Type,
    Memory,
}

impl DropError {
    pub fn kind(&self) -> ErrorKind {
        match self {
            DropError::Type(_) | DropError::DtypeMismatch { .. } => ErrorKind::Type,
            DropError::Memory(_) | DropError::MaskAllocation { .. } => ErrorKind::Memory,
            DropError::Value(_)
            | DropError::Probability { .. }
            | DropError::BlockDoesNotFit { .. }
            | DropError::NotFourD { .. }
            | DropError::MaskShape { .. }
            | DropError::ReadOnlyOutput
            | DropError::ZeroStrideOutput
            | DropError::OverlappingOutput { .. }
            | DropError::ShapeMismatch { .. }
            | DropError::OutputOverlapsInput => ErrorKind::Value,
        }
    }
}

impl fmt::Display for DropError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DropError::Value(m) | DropError::Type(m) | DropError::Memory(m) => f.write_str(m),
            DropError::Probability { name, value } => {
                write!(f, "{name} has to be between 0 and 1, but got {value}")
            }
            DropError::BlockDoesNotFit { kh, kw, h, w } => {
                write!(f, "block {kh}x{kw} does not fit a {h}x{w} map")
            }
            DropError::NotFourD { shape } => write!(
                f,
                "drop_block_2d expects a 4-D (N, C, H, W) input, got shape {shape:?}"
            ),
            DropError::MaskShape { mask, input } => {
                write!(f, "mask shape {mask:?} does not broadcast to {input:?}")
            }
            DropError::ReadOnlyOutput => f.write_str(
                "the output array is read-only; pass a writeable array or use inplace=False",
            ),
            DropError::ZeroStrideOutput => f.write_str(
                "cannot write into an array with a zero stride (a broadcast view): several elements share one address; use inplace=False or pass a copy",
            ),
            DropError::OverlappingOutput { shape, strides } => write!(
                f,
                "cannot write into an array whose elements overlap (shape {shape:?}, strides {strides:?} bytes): several elements share bytes; use inplace=False or pass a copy"
            ),
            DropError::ShapeMismatch { input, output } => {
                write!(f, "shape mismatch: input {input:?} vs output {output:?}")
            }
            DropError::DtypeMismatch { input, output } => {
                write!(f, "dtype mismatch: {input:?} vs {output:?}")
            }
            DropError::OutputOverlapsInput => f.write_str(
                "the output overlaps an input without being the same view; pass a fresh output",
            ),
            DropError::MaskAllocation { bits, shape } => write!(
                f,
                "cannot allocate a mask of {bits} bits for shape {shape:?}"
            ),
        }
    }
}

impl std::error::Error for DropError {}

pub type Result<T> = std::result::Result<T, DropError>;

/// Shorthand for `Err(DropError::Value(..))` with `format!` arguments.
#[macro_export]
macro_rules! value_err {
    ($($arg:tt)*) => { Err($crate::error::DropError::Value(format!($($arg)*))) };
}
