//! One call, from a checked spec to written elements: everything between the bindings'
//! "operands read" and "result returned". [`prepare`] checks the spec against the operands,
//! allocates what the call keeps, and reserves its counters; [`Call::run`] draws the mask (or
//! lets the kernel draw it on the fly), counts DropBlock's kept positions for its scale, keys the
//! noise after the mask's counters and runs the kernel.
//!
//! Two steps rather than one function taking a "release the interpreter lock" closure: every
//! check and the reservation happen in `prepare`, which is cheap and may fail; `run` cannot fail
//! and touches nothing but the views and the bits, so the bindings release the GIL around
//! exactly `run`, decided by its size ([`Call::len`]), and the core never learns what a GIL is.

use crate::error::{DropError, Result};
use crate::generator::{blocks_for_call, blocks_for_decisions, GeneratorState};
use crate::kernel::{self, Bits};
use crate::mask::{block_keep_words, BlockGeometry};
use crate::rng::{threshold_for, Key};
use crate::spec::{Application, Mask, Spec};
use crate::view::{check_mask_shape, check_output, Dtype, View};
use half::{bf16, f16};

/// The arrays of a call: `out = application(mask, x) [+ residual]`. `out` may be `x` itself
/// (in place); otherwise it must overlap no input. The fields are private so that an in-place
/// call's second handle on its array never gets out (see [`View`]).
#[derive(Debug)]
pub struct Operands<'a> {
    x: View<'a>,
    out: View<'a>,
    residual: Option<View<'a>>,
}

impl<'a> Operands<'a> {
    pub fn new(x: View<'a>, out: View<'a>, residual: Option<View<'a>>) -> Self {
        Operands { x, out, residual }
    }

    /// `x` written in place.
    pub fn in_place(x: View<'a>, residual: Option<View<'a>>) -> Self {
        Operands {
            x: x.alias(),
            out: x,
            residual,
        }
    }

    pub fn x(&self) -> &View<'a> {
        &self.x
    }

    pub fn out(&self) -> &View<'a> {
        &self.out
    }

    pub fn residual(&self) -> Option<&View<'a>> {
        self.residual.as_ref()
    }

    /// [`check_output`] for `out` against `x` and the residual.
    pub fn check(&self) -> Result<()> {
        match &self.residual {
            Some(r) => check_output(&self.out, &[&self.x, r]),
            None => check_output(&self.out, &[&self.x]),
        }
    }

    /// Whether `out` is `x` (an in-place call).
    pub fn is_in_place(&self) -> bool {
        self.x.same_view(&self.out)
    }
}

/// Packed keep bits (1 = kept), C-ordered over `shape`; bits past the mask are 0.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoredMask {
    pub shape: Vec<usize>,
    pub words: Vec<u64>,
}

impl StoredMask {
    pub fn count_kept(&self) -> usize {
        self.words.iter().map(|w| w.count_ones() as usize).sum()
    }
}

/// What a call did, for its backward or its replay.
#[derive(Clone, Debug, PartialEq)]
pub struct Applied {
    /// The mask, when the caller asked to store it, and always for DropBlock (its dilated bits
    /// cost more to recompute than to keep).
    pub bits: Option<StoredMask>,
    /// The first counter block the call reserved: a generator set to (seed, stream, this)
    /// draws the same mask again.
    pub first_block: u64,
    /// What kept elements were multiplied by: for `ScaleByKept` the computed numel / kept,
    /// for `Affine` its `a`, else the application's scale.
    pub scale: f64,
}

/// Where a call's keep decisions come from.
enum Source<'a> {
    /// Element masks drawn inside the kernel, chunk by chunk, optionally stored.
    Fused {
        threshold: u64,
        store: Option<Vec<u64>>,
    },
    /// A Bernoulli mask drawn first (broadcast, or counted for `ScaleByKept`).
    Drawn { threshold: u64, store: bool },
    /// DropBlock: seeds drawn, then grown to blocks.
    Blocks {
        threshold: u64,
        geometry: BlockGeometry,
    },
    /// A mask drawn earlier (the backward, a replay).
    Given(&'a [u64]),
}

/// A checked call whose counters are reserved: [`Call::run`] does the work.
pub struct Call<'a> {
    ops: Operands<'a>,
    mask_shape: &'a [usize],
    source: Source<'a>,
    application: Application,
    key: Key,
    first_block: u64,
}

/// Checks `spec` against `ops` and reserves the call's counters from `generator`. Nothing is
/// written and the generator is untouched when it fails: the checks and every allocation the
/// call keeps come before the reservation.
pub fn prepare<'a>(
    spec: &'a Spec,
    ops: Operands<'a>,
    generator: &GeneratorState,
    store_mask: bool,
) -> Result<Call<'a>> {
    prepare_with(spec, ops, generator, store_mask, true)
}

/// [`prepare`] then [`Call::run`].
pub fn apply(
    spec: &Spec,
    ops: Operands<'_>,
    generator: &GeneratorState,
    store_mask: bool,
) -> Result<Applied> {
    Ok(prepare(spec, ops, generator, store_mask)?.run())
}

/// `allow_fused: false` draws element masks first too: the tests compare both paths.
fn prepare_with<'a>(
    spec: &'a Spec,
    ops: Operands<'a>,
    generator: &GeneratorState,
    store_mask: bool,
    allow_fused: bool,
) -> Result<Call<'a>> {
    spec.mask.check()?;
    ops.check()?;
    spec.mask.check_input(ops.x.shape())?;
    let mask_shape = spec.mask.shape();
    // The mask broadcasts to x, so it has no more decisions than x has elements.
    let m = numel(mask_shape);
    let source = match spec.mask {
        Mask::Bernoulli { keep, .. } => {
            let threshold = threshold_for(keep);
            // ScaleByKept counts the decisions before applying them, so they are drawn first.
            let fused = allow_fused
                && mask_shape == ops.x.shape()
                && spec.application != Application::ScaleByKept;
            if fused {
                // Allocated before the reservation, so that a failure leaves the generator as
                // it was.
                let store = if store_mask {
                    Some(zeroed_words(m, mask_shape)?)
                } else {
                    None
                };
                Source::Fused { threshold, store }
            } else {
                Source::Drawn {
                    threshold,
                    store: store_mask,
                }
            }
        }
        Mask::Blocks {
            shape: [n, c, h, w],
            gamma,
            kh,
            kw,
        } => Source::Blocks {
            threshold: threshold_for(gamma),
            geometry: BlockGeometry {
                maps: n * c,
                h,
                w,
                kh,
                kw,
            },
        },
    };
    let with_noise = matches!(spec.application, Application::Noise { .. });
    let (key, first_block) = generator.reserve(blocks_for_call(m, with_noise))?;
    Ok(Call {
        ops,
        mask_shape,
        source,
        application: spec.application,
        key,
        first_block,
    })
}

/// `out = x * mask * scale [+ residual]` with a mask drawn earlier (`words`, C-ordered over
/// `mask_shape`): the backward of every variant, and the forward replay of a saved mask. Takes
/// no counters; its [`Applied`] has no bits and first block 0.
pub fn replay<'a>(
    mask_shape: &'a [usize],
    words: &'a [u64],
    scale: f64,
    ops: Operands<'a>,
) -> Result<Call<'a>> {
    ops.check()?;
    check_mask_shape(ops.x.shape(), mask_shape)?;
    let m = numel(mask_shape);
    if words.len() < kernel::words_for(m) {
        return crate::value_err!(
            "{} words of bits for a mask of shape {mask_shape:?}, which needs {}",
            words.len(),
            kernel::words_for(m)
        );
    }
    Ok(Call {
        ops,
        mask_shape,
        source: Source::Given(words),
        application: Application::Scale { scale },
        key: Key { seed: 0, stream: 0 },
        first_block: 0,
    })
}

impl Call<'_> {
    /// Elements the call writes: what its cost scales with.
    pub fn len(&self) -> usize {
        self.ops.x.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn operands(&self) -> &Operands<'_> {
        &self.ops
    }

    /// Draws the mask where the kernel does not, and writes the output.
    pub fn run(self) -> Applied {
        let Call {
            ops,
            mask_shape,
            source,
            application,
            key,
            first_block,
        } = self;
        let m = numel(mask_shape);
        // The noise of dropped elements comes from the call's counters after the mask's.
        let noise_block = first_block.wrapping_add(blocks_for_decisions(m));
        let kernel_app = |by_kept: f64| match application {
            Application::Scale { scale } => kernel::Application::Scale { scale },
            Application::ScaleByKept => kernel::Application::Scale { scale: by_kept },
            Application::Affine { a, shift, dropped } => {
                kernel::Application::Affine { a, shift, dropped }
            }
            Application::Noise { scale } => kernel::Application::Noise {
                scale,
                key,
                first_block: noise_block,
            },
        };
        let scale_of = |by_kept: f64| match application {
            Application::Scale { scale } | Application::Noise { scale } => scale,
            Application::ScaleByKept => by_kept,
            Application::Affine { a, .. } => a,
        };
        let stored = |words| {
            Some(StoredMask {
                shape: mask_shape.to_vec(),
                words,
            })
        };
        let (bits, by_kept) = match source {
            Source::Fused {
                threshold,
                mut store,
            } => {
                let bits = Bits::Fresh {
                    key,
                    first_block,
                    threshold,
                    store: store.as_deref_mut(),
                };
                run_kernel(&ops, mask_shape, bits, kernel_app(1.0));
                (store.and_then(stored), 1.0)
            }
            Source::Drawn { threshold, store } => {
                let words = kernel::bernoulli_words(key, first_block, threshold, m);
                let by_kept = if application == Application::ScaleByKept {
                    scale_by_kept(m, count_ones(&words))
                } else {
                    1.0
                };
                run_kernel(&ops, mask_shape, Bits::Given(&words), kernel_app(by_kept));
                (if store { stored(words) } else { None }, by_kept)
            }
            Source::Blocks {
                threshold,
                geometry,
            } => {
                let (words, kept) = if m == 0 {
                    (Vec::new(), 0)
                } else {
                    block_keep_words(key, first_block, threshold, geometry)
                };
                let by_kept = scale_by_kept(m, kept);
                run_kernel(&ops, mask_shape, Bits::Given(&words), kernel_app(by_kept));
                (stored(words), by_kept)
            }
            Source::Given(words) => {
                run_kernel(&ops, mask_shape, Bits::Given(words), kernel_app(1.0));
                (None, 1.0)
            }
        };
        Applied {
            bits,
            first_block,
            scale: scale_of(by_kept),
        }
    }
}

/// numel / kept, or 1 when nothing is kept (everything is zero then anyway), as timm's
/// `scale_by_keep`.
fn scale_by_kept(numel: usize, kept: usize) -> f64 {
    if kept > 0 {
        numel as f64 / kept as f64
    } else {
        1.0
    }
}

fn count_ones(words: &[u64]) -> usize {
    words.iter().map(|w| w.count_ones() as usize).sum()
}

/// Elements of `shape`; 0 when any dimension is, whatever the others (their product may not
/// fit a `usize` then).
fn numel(shape: &[usize]) -> usize {
    if shape.contains(&0) {
        0
    } else {
        shape.iter().product()
    }
}

/// Zeroed words for `n` mask bits: a `MemoryError` when they cannot be allocated (a broadcast
/// view can be far larger than memory), never an abort of the interpreter.
pub fn zeroed_words(n: usize, shape: &[usize]) -> Result<Vec<u64>> {
    let mut words = Vec::new();
    words
        .try_reserve_exact(kernel::words_for(n))
        .map_err(|_| DropError::MaskAllocation {
            bits: n,
            shape: shape.to_vec(),
        })?;
    words.resize(kernel::words_for(n), 0);
    Ok(words)
}

fn run_kernel(ops: &Operands<'_>, mask_shape: &[usize], bits: Bits<'_>, app: kernel::Application) {
    let call = kernel::Call {
        shape: ops.x.shape(),
        mask_shape,
        src: ops.x.operand(),
        dst: ops.out.operand(),
        res: ops.residual.as_ref().map(View::operand),
        bits,
        app,
    };
    // SAFETY: every view addresses valid elements of its dtype for each index of its shape
    // (`View`'s invariant); `Operands::check` (run by `prepare` and `replay`) made x, out and
    // the residual one shape and dtype, `out` writeable with distinct elements and apart from
    // every input unless it is the same view; the mask shape broadcasts to `shape` (checked),
    // equals it for `Bits::Fresh` (`prepare_with`), and the bits hold prod(mask_shape) bits
    // (`bernoulli_words`, `block_keep_words`, `replay`'s check) and a store one per element
    // (`zeroed_words(m)` with m == prod(shape)).
    unsafe {
        match ops.x.dtype() {
            Dtype::F16 => kernel::run::<f16>(call),
            Dtype::BF16 => kernel::run::<bf16>(call),
            Dtype::F32 => kernel::run::<f32>(call),
            Dtype::F64 => kernel::run::<f64>(call),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernel::normal_at;

    const SHAPE: [usize; 2] = [7, 10_003]; // several kernel chunks, a ragged last one

    fn input(n: usize) -> Vec<f32> {
        (0..n).map(|i| 1.0 + (i % 13) as f32).collect()
    }

    fn bernoulli(shape: &[usize], keep: f64) -> Mask {
        Mask::Bernoulli {
            shape: shape.to_vec(),
            keep,
        }
    }

    fn spec(mask: Mask, application: Application) -> Spec {
        Spec { mask, application }
    }

    fn bit(words: &[u64], i: usize) -> bool {
        (words[i / 64] >> (i % 64)) & 1 == 1
    }

    /// Runs `spec` out of place on `x` of `shape`: the output and what the call returned.
    fn run(
        spec: &Spec,
        x: &[f32],
        shape: &[usize],
        g: &GeneratorState,
        store: bool,
        allow_fused: bool,
    ) -> Result<(Vec<f32>, Applied)> {
        let mut out = vec![f32::NAN; x.len()];
        let ops = Operands::new(View::of(x, shape)?, View::of_mut(&mut out, shape)?, None);
        let applied = prepare_with(spec, ops, g, store, allow_fused)?.run();
        Ok((out, applied))
    }

    #[test]
    fn fused_and_predrawn_element_masks_are_the_same_mask() {
        let n = SHAPE.iter().product();
        let x = input(n);
        let s = spec(
            bernoulli(&SHAPE, 0.7),
            Application::Scale { scale: 1.0 / 0.7 },
        );
        let (fused, a) = run(&s, &x, &SHAPE, &GeneratorState::new(9, 2, 5), true, true).unwrap();
        let (drawn, b) = run(&s, &x, &SHAPE, &GeneratorState::new(9, 2, 5), true, false).unwrap();
        assert_eq!(a, b);
        assert_eq!(fused, drawn);
        let bits = a.bits.unwrap();
        let key = Key { seed: 9, stream: 2 };
        assert_eq!(
            bits.words,
            kernel::bernoulli_words(key, 5, threshold_for(0.7), n)
        );
        assert_eq!(a.first_block, 5);
        for (i, (&o, &v)) in fused.iter().zip(&x).enumerate() {
            let want = if bit(&bits.words, i) {
                v * (1.0 / 0.7f64) as f32
            } else {
                0.0
            };
            assert_eq!(o, want, "element {i}");
        }
        let kept = bits.count_kept() as f64 / n as f64;
        assert!((kept - 0.7).abs() < 0.01, "{kept}");
    }

    #[test]
    fn the_generator_advances_by_exactly_the_blocks_the_call_reserved() {
        let x = input(4 * 3 * 9 * 9);
        let shape = [4, 3, 9, 9];
        let blocks = |gamma| Mask::Blocks {
            shape: [4, 1, 9, 9],
            gamma,
            kh: 3,
            kw: 2,
        };
        let cases = [
            (
                bernoulli(&shape, 0.5),
                Application::Scale { scale: 2.0 },
                972,
                false,
            ),
            (
                bernoulli(&[4, 3, 1, 1], 0.5),
                Application::Scale { scale: 2.0 },
                12,
                false,
            ),
            (
                bernoulli(&shape, 0.5),
                Application::Affine {
                    a: 2.0,
                    shift: 1.0,
                    dropped: -1.0,
                },
                972,
                false,
            ),
            (
                bernoulli(&[4, 1, 1, 1], 0.5),
                Application::ScaleByKept,
                4,
                false,
            ),
            (
                bernoulli(&shape, 0.5),
                Application::Noise { scale: 2.0 },
                972,
                true,
            ),
            (blocks(0.1), Application::ScaleByKept, 324, false),
            (blocks(0.1), Application::Noise { scale: 1.0 }, 324, true),
        ];
        for (mask, app, m, noise) in cases {
            for store in [false, true] {
                let g = GeneratorState::new(1, 0, 1000);
                let (_, applied) =
                    run(&spec(mask.clone(), app), &x, &shape, &g, store, true).unwrap();
                assert_eq!(applied.first_block, 1000);
                assert_eq!(
                    g.offset(),
                    1000 + blocks_for_call(m, noise),
                    "{mask:?} {app:?}"
                );
                let stored = store || matches!(mask, Mask::Blocks { .. });
                assert_eq!(
                    applied.bits.is_some(),
                    stored,
                    "{mask:?} {app:?} store {store}"
                );
                if let Some(bits) = applied.bits {
                    assert_eq!(bits.shape, mask.shape());
                    assert_eq!(bits.words.len(), kernel::words_for(m));
                }
            }
        }
    }

    #[test]
    fn the_first_block_redraws_the_same_mask() {
        let x = input(6 * 50);
        let s = spec(bernoulli(&[6, 50], 0.4), Application::Scale { scale: 2.5 });
        let g = GeneratorState::new(3, 1, 0);
        run(&s, &x, &[6, 50], &g, false, true).unwrap();
        let (out, applied) = run(&s, &x, &[6, 50], &g, false, true).unwrap();
        assert!(applied.bits.is_none());
        let again = GeneratorState::new(3, 1, applied.first_block);
        let (replayed, stored) = run(&s, &x, &[6, 50], &again, true, true).unwrap();
        assert_eq!(out, replayed);
        assert_eq!(stored.first_block, applied.first_block);
    }

    #[test]
    fn a_failed_call_writes_nothing_and_leaves_the_generator_as_it_was() {
        let x = input(24);
        let good = Application::Scale { scale: 2.0 };
        let end = u64::MAX - 10;
        let failing = [
            (
                spec(bernoulli(&[4, 6], 1.5), good),
                0,
                DropError::Probability {
                    name: "keep probability",
                    value: 1.5,
                },
            ),
            (
                spec(bernoulli(&[4, 6], f64::NAN), good),
                0,
                DropError::Probability {
                    name: "keep probability",
                    value: f64::NAN,
                },
            ),
            (
                spec(bernoulli(&[3, 6], 0.5), good),
                0,
                DropError::MaskShape {
                    mask: vec![3, 6],
                    input: vec![4, 6],
                },
            ),
            (
                spec(bernoulli(&[4, 6, 1], 0.5), good),
                0,
                DropError::MaskShape {
                    mask: vec![4, 6, 1],
                    input: vec![4, 6],
                },
            ),
            (
                spec(
                    Mask::Blocks {
                        shape: [1, 1, 4, 6],
                        gamma: 0.1,
                        kh: 5,
                        kw: 1,
                    },
                    Application::ScaleByKept,
                ),
                0,
                DropError::BlockDoesNotFit {
                    kh: 5,
                    kw: 1,
                    h: 4,
                    w: 6,
                },
            ),
            (
                spec(
                    Mask::Blocks {
                        shape: [1, 1, 4, 6],
                        gamma: 0.1,
                        kh: 1,
                        kw: 1,
                    },
                    Application::ScaleByKept,
                ),
                0,
                DropError::NotFourD { shape: vec![4, 6] },
            ),
            (
                spec(bernoulli(&[4, 6], 0.5), good),
                end,
                DropError::Value(String::new()),
            ),
        ];
        for (s, offset, want) in failing {
            let g = GeneratorState::new(5, 6, offset);
            let mut out = vec![7.0f32; 24];
            let ops = Operands::new(
                View::of(&x, &[4, 6]).unwrap(),
                View::of_mut(&mut out, &[4, 6]).unwrap(),
                None,
            );
            let err = apply(&s, ops, &g, true).map(|_| ()).unwrap_err();
            match want {
                // NaN != NaN: compare the message.
                DropError::Value(_) => assert!(err.to_string().contains("exhausted"), "{err}"),
                want => assert_eq!(err.to_string(), want.to_string()),
            }
            assert_eq!(g.state(), (5, 6, offset), "{s:?}");
            assert!(out.iter().all(|&v| v == 7.0), "{s:?} wrote");
        }
        // Bad operands: a read-only output, a residual of another shape.
        let g = GeneratorState::new(5, 6, 0);
        let s = spec(bernoulli(&[4, 6], 0.5), good);
        let ops = Operands::new(
            View::of(&x, &[4, 6]).unwrap(),
            View::of(&x, &[4, 6]).unwrap(),
            None,
        );
        assert_eq!(
            apply(&s, ops, &g, false).unwrap_err(),
            DropError::ReadOnlyOutput
        );
        let mut out = vec![7.0f32; 24];
        let ops = Operands::new(
            View::of(&x, &[4, 6]).unwrap(),
            View::of_mut(&mut out, &[4, 6]).unwrap(),
            Some(View::of(&x[..12], &[2, 6]).unwrap()),
        );
        let err = apply(&s, ops, &g, false).unwrap_err();
        assert!(matches!(err, DropError::ShapeMismatch { .. }), "{err}");
        assert_eq!(g.state(), (5, 6, 0));
    }

    #[test]
    fn dropblock_scales_kept_positions_by_numel_over_kept() {
        let shape = [2, 3, 12, 13];
        let x = input(shape.iter().product());
        for coupled in [true, false] {
            let c = if coupled { 1 } else { 3 };
            let s = spec(
                Mask::Blocks {
                    shape: [2, c, 12, 13],
                    gamma: 0.05,
                    kh: 3,
                    kw: 4,
                },
                Application::ScaleByKept,
            );
            let g = GeneratorState::new(11, 0, 0);
            let (out, applied) = run(&s, &x, &shape, &g, false, true).unwrap();
            let bits = applied.bits.unwrap();
            let (m, kept) = (2 * c * 12 * 13, bits.count_kept());
            assert!(0 < kept && kept < m, "{kept} of {m}");
            assert_eq!(applied.scale, m as f64 / kept as f64);
            let key = Key {
                seed: 11,
                stream: 0,
            };
            let geometry = BlockGeometry {
                maps: 2 * c,
                h: 12,
                w: 13,
                kh: 3,
                kw: 4,
            };
            let want = block_keep_words(key, 0, threshold_for(0.05), geometry).0;
            assert_eq!(bits.words, want);
            for (i, (&o, &v)) in out.iter().zip(&x).enumerate() {
                let (n, rest) = (i / (3 * 156), i % 156);
                let mi = (n * c + if coupled { 0 } else { i / 156 % 3 }) * 156 + rest;
                let want = if bit(&bits.words, mi) {
                    v * applied.scale as f32
                } else {
                    0.0
                };
                assert_eq!(o, want, "element {i}");
            }
        }
        // Nothing kept: scale 1, as timm's.
        let s = spec(
            Mask::Blocks {
                shape: [2, 3, 12, 13],
                gamma: 1.0,
                kh: 1,
                kw: 1,
            },
            Application::ScaleByKept,
        );
        let (out, applied) =
            run(&s, &x, &shape, &GeneratorState::new(1, 0, 0), false, true).unwrap();
        assert_eq!(applied.scale, 1.0);
        assert!(out.iter().all(|&v| v == 0.0));
    }

    #[test]
    fn bernoulli_masks_scale_by_kept_too() {
        let x = input(40 * 8);
        let s = spec(bernoulli(&[40, 1], 0.5), Application::ScaleByKept);
        let (out, applied) =
            run(&s, &x, &[40, 8], &GeneratorState::new(2, 0, 0), true, true).unwrap();
        let bits = applied.bits.unwrap();
        assert_eq!(applied.scale, 40.0 / bits.count_kept() as f64);
        for (i, (&o, &v)) in out.iter().zip(&x).enumerate() {
            let want = if bit(&bits.words, i / 8) {
                v * applied.scale as f32
            } else {
                0.0
            };
            assert_eq!(o, want);
        }
    }

    #[test]
    fn noise_is_keyed_after_the_masks_blocks() {
        // Everything dropped: each element is its mask decision's deviate, and the elements
        // that share a decision share a deviate.
        let x = input(30 * 7);
        let key = Key { seed: 4, stream: 8 };
        for mask_shape in [[30, 7], [30, 1]] {
            let m = mask_shape[0] * mask_shape[1];
            let s = spec(
                bernoulli(&mask_shape, 0.0),
                Application::Noise { scale: 3.0 },
            );
            let g = GeneratorState::new(4, 8, 100);
            let (out, applied) = run(&s, &x, &[30, 7], &g, false, true).unwrap();
            assert_eq!(applied.scale, 3.0);
            let first = 100 + blocks_for_decisions(m);
            for (i, &o) in out.iter().enumerate() {
                let mi = if mask_shape[1] == 1 { i / 7 } else { i };
                assert_eq!(o, normal_at(key, first, mi) as f32, "element {i}");
            }
        }
        // DropBlock: the deviates follow the seeds' blocks, and kept positions are unscaled.
        let shape = [1, 2, 16, 16];
        let x = input(512);
        let s = spec(
            Mask::Blocks {
                shape: [1, 1, 16, 16],
                gamma: 0.1,
                kh: 3,
                kw: 3,
            },
            Application::Noise { scale: 1.0 },
        );
        let (out, applied) =
            run(&s, &x, &shape, &GeneratorState::new(4, 8, 0), false, true).unwrap();
        let bits = applied.bits.unwrap();
        let first = blocks_for_decisions(256);
        for (i, (&o, &v)) in out.iter().zip(&x).enumerate() {
            let mi = i % 256;
            let want = if bit(&bits.words, mi) {
                v
            } else {
                normal_at(key, first, mi) as f32
            };
            assert_eq!(o, want, "element {i}");
        }
    }

    #[test]
    fn affine_writes_a_x_plus_shift_and_the_dropped_value() {
        let x = input(300);
        let app = Application::Affine {
            a: 2.0,
            shift: 0.5,
            dropped: -3.0,
        };
        let s = spec(bernoulli(&[300], 0.6), app);
        let (out, applied) =
            run(&s, &x, &[300], &GeneratorState::new(1, 0, 0), true, true).unwrap();
        assert_eq!(applied.scale, 2.0);
        let bits = applied.bits.unwrap();
        for (i, (&o, &v)) in out.iter().zip(&x).enumerate() {
            assert_eq!(
                o,
                if bit(&bits.words, i) {
                    v * 2.0 + 0.5
                } else {
                    -3.0
                }
            );
        }
    }

    #[test]
    fn in_place_with_a_residual_and_a_replay_of_the_stored_mask() {
        let n = 5 * 64 + 3;
        let (x0, res) = (input(n), vec![0.25f32; n]);
        let s = spec(bernoulli(&[n], 0.5), Application::Scale { scale: 2.0 });
        let mut x = x0.clone();
        let view = View::of_mut(&mut x, &[n]).unwrap();
        let ops = Operands::in_place(view, Some(View::of(&res, &[n]).unwrap()));
        let applied = apply(&s, ops, &GeneratorState::new(3, 0, 0), true).unwrap();
        let bits = applied.bits.unwrap();
        for i in 0..n {
            let want = if bit(&bits.words, i) {
                x0[i] * 2.0
            } else {
                0.0
            } + 0.25;
            assert_eq!(x[i], want);
        }
        let mut replayed = vec![0f32; n];
        let ops = Operands::new(
            View::of(&x0, &[n]).unwrap(),
            View::of_mut(&mut replayed, &[n]).unwrap(),
            Some(View::of(&res, &[n]).unwrap()),
        );
        let again = replay(&bits.shape, &bits.words, 2.0, ops).unwrap().run();
        assert_eq!((again.bits, again.scale), (None, 2.0));
        assert_eq!(replayed, x);
        // Too few words for the mask shape.
        let ops = Operands::new(
            View::of(&x0, &[n]).unwrap(),
            View::of_mut(&mut replayed, &[n]).unwrap(),
            None,
        );
        assert!(replay(&[n], &bits.words[..2], 1.0, ops).is_err());
    }

    #[test]
    fn empty_inputs_take_no_counters_and_write_nothing() {
        let s = spec(bernoulli(&[0, 5], 0.5), Application::Noise { scale: 1.0 });
        let g = GeneratorState::new(1, 0, 7);
        let (out, applied) = run(&s, &[], &[0, 5], &g, true, true).unwrap();
        assert!(out.is_empty());
        assert_eq!(applied.bits.unwrap().words, Vec::<u64>::new());
        assert_eq!(g.offset(), 7);
    }
}
