//! Errors are values inside the core; the bindings turn them into Python exceptions in one place.

use std::fmt;

/// What went wrong, in the words a user needs: what was received and what was expected.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DropError {
    /// A bad value or shape (becomes `ValueError`).
    Value(String),
    /// A bad type or dtype (becomes `TypeError`).
    Type(String),
    /// Memory the call needs could not be allocated (becomes `MemoryError`).
    Memory(String),
}

impl fmt::Display for DropError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DropError::Value(m) | DropError::Type(m) | DropError::Memory(m) => f.write_str(m),
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
