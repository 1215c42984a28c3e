//! fastdrop's core: the ARS-5 counter-based generator, keep masks by granularity, and one
//! generic strided kernel that applies a mask to an array. Plain Rust over pointers and strides;
//! only `bindings` (behind the `python` feature) knows Python.

// Every unsafe operation sits in its own `unsafe {}` block with a SAFETY comment, also inside an
// `unsafe fn`, whose `# Safety` section says what its callers promise.
#![deny(unsafe_op_in_unsafe_fn)]

pub mod attention;
pub mod buffer;
pub mod cpu;
pub mod env;
pub mod error;
pub mod generator;
pub mod kernel;
pub mod mask;
pub mod noise;
pub mod rng;
pub mod simd;
pub mod threads;

// The bindings are being rewritten beside this change (issue 15); their two `unsafe fn`s
// (`slice_of`, `slice_of_mut`) still call `from_raw_parts` bare. Drop this allow once they use
// `unsafe {}` blocks too.
#[cfg(feature = "python")]
#[allow(unsafe_op_in_unsafe_fn)]
mod bindings;
