//! fastdrop's core: the ARS-5 counter-based generator, keep masks by granularity, and one
//! generic strided kernel that applies a mask to an array. Plain Rust over pointers and strides;
//! only `bindings` (behind the `python` feature) knows Python.
//!
//! One call, top to bottom: a `spec::Spec` says what (a mask and an application), a
//! `call::Operands` of `view::View`s says where; `call::prepare` checks both and reserves the
//! call's counters from a `generator::GeneratorState`, and `call::Call::run` draws the mask (or
//! lets `kernel::run` draw it on the fly) and applies it.

// Every unsafe operation sits in its own `unsafe {}` block with a SAFETY comment, also inside an
// `unsafe fn`, whose `# Safety` section says what its callers promise.
#![deny(unsafe_op_in_unsafe_fn)]

mod affinity;
pub mod attention;
pub mod buffer;
pub mod call;
pub mod cpu;
pub mod env;
pub mod error;
pub mod generator;
pub mod kernel;
pub mod mask;
pub mod noise;
pub mod rng;
pub mod simd;
pub mod spec;
pub mod team;
pub mod threads;
pub mod view;

#[cfg(feature = "python")]
mod bindings;
