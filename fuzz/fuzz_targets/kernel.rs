//! `kernel::run` on Vec-backed strided views: random shapes (0-d to 5-d, empty, and now and then
//! big enough for the parallel path), permuted, stepped, reversed and misaligned strides,
//! broadcast (zero-stride) sources and residuals, in place or not, every dtype, every mask
//! granularity and application, 1 to 4 threads. Checks each element against a naive reference
//! (bit for bit), that no byte outside the output view changes, that inputs stay untouched, and
//! that a stored mask holds exactly the documented keep decisions. The operands are the crate's
//! own `View`s, which `view::check_output` must accept: every layout made here is a legal one.
#![no_main]

use fastdrop::kernel::{self, Application, Bits, Element, OpFloat, PARALLEL_MIN};
use fastdrop::rng::{self, Key};
use fastdrop::view::{check_output, HasDtype, View};
use half::f16;
use libfuzzer_sys::arbitrary::{Result, Unstructured};
use libfuzzer_sys::fuzz_target;

const GUARD: usize = 16;

trait FuzzFloat: Element + HasDtype {
    fn bits(self) -> u64;
    fn is_nan(self) -> bool;
}
impl FuzzFloat for f16 {
    fn bits(self) -> u64 {
        self.to_bits() as u64
    }
    fn is_nan(self) -> bool {
        f16::is_nan(self)
    }
}
impl FuzzFloat for f32 {
    fn bits(self) -> u64 {
        self.to_bits() as u64
    }
    fn is_nan(self) -> bool {
        f32::is_nan(self)
    }
}
impl FuzzFloat for f64 {
    fn bits(self) -> u64 {
        self.to_bits()
    }
    fn is_nan(self) -> bool {
        f64::is_nan(self)
    }
}

/// A byte buffer with a strided layout inside it: byte strides, the byte offset of index 0.
struct Strided {
    strides: Vec<isize>,
    offset: usize,
    buf: Vec<u8>,
}

impl Strided {
    fn new(u: &mut Unstructured, shape: &[usize], item: usize, allow_zero: bool) -> Result<Strided> {
        let nd = shape.len();
        let mut order: Vec<usize> = (0..nd).collect();
        for i in (1..nd).rev() {
            let j = u.int_in_range(0..=i)?;
            order.swap(i, j);
        }
        let mut strides = vec![0isize; nd];
        let mut span = item as isize; // bytes covered by the dimensions inside this one
        for &d in &order {
            let step = u.int_in_range(if allow_zero { 0..=3 } else { 1..=3 })? as isize;
            let sign = if u.arbitrary::<bool>()? { -1 } else { 1 };
            strides[d] = sign * step * span;
            if step > 0 {
                span = step * span * shape[d].max(1) as isize;
            }
        }
        let empty = shape.contains(&0);
        let (mut lo, mut hi) = (0isize, 0isize);
        if !empty {
            for d in 0..nd {
                let ext = strides[d] * (shape[d] as isize - 1);
                if ext < 0 {
                    lo += ext
                } else {
                    hi += ext
                }
            }
        }
        let misalign = u.int_in_range(0..=item - 1)?;
        let offset = GUARD + (-lo) as usize + misalign;
        let len = offset + hi as usize + item + GUARD;
        let mut buf = vec![0u8; len];
        let seed: u64 = u.arbitrary()?;
        let mut s = seed | 1;
        for b in buf.iter_mut() {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            *b = s as u8;
        }
        Ok(Strided {
            strides,
            offset,
            buf,
        })
    }

    fn byte_offset(&self, idx: &[usize]) -> usize {
        let o: isize = idx
            .iter()
            .zip(&self.strides)
            .map(|(&i, &s)| i as isize * s)
            .sum();
        (self.offset as isize + o) as usize
    }

    /// The layout as a writeable `View` of `T` over `shape`.
    fn view<T: HasDtype>(&mut self, shape: &[usize]) -> View<'_> {
        // SAFETY: `new` sized the buffer so that every index of `shape` lies inside it, past
        // the guard bytes, and the exclusive borrow makes the view the only way to the bytes.
        unsafe {
            View::new(
                self.buf.as_mut_ptr().add(self.offset),
                shape.to_vec(),
                self.strides.clone(),
                T::DTYPE,
                true,
            )
        }
    }
}

fn read<T: Element>(buf: &[u8], at: usize) -> T {
    assert!(at + std::mem::size_of::<T>() <= buf.len());
    // SAFETY: bounds checked above; read_unaligned allows any address.
    unsafe { (buf.as_ptr().add(at) as *const T).read_unaligned() }
}

fn shape_of(u: &mut Unstructured) -> Result<Vec<usize>> {
    // Explicit data only: an exhausted input draws 0 here, so short inputs stay small.
    if u.int_in_range(0u8..=15)? == 15 {
        // Big enough for the parallel path, with a ragged last chunk.
        let n = u.int_in_range(PARALLEL_MIN..=PARALLEL_MIN + 70_000)?;
        return Ok(if u.arbitrary::<bool>()? {
            vec![n]
        } else {
            vec![n / 3, 3]
        });
    }
    let nd = u.int_in_range(0..=5)?;
    (0..nd).map(|_| u.int_in_range(0..=7)).collect()
}

fn check<T: FuzzFloat>(u: &mut Unstructured) -> Result<()> {
    let item = std::mem::size_of::<T>();
    let shape = shape_of(u)?;
    let nd = shape.len();
    let n: usize = shape.iter().product();
    kernel::set_num_threads(u.int_in_range(1..=4)?).unwrap();

    let mut mask_shape: Vec<usize> = shape.clone();
    for m in mask_shape.iter_mut() {
        if u.arbitrary::<bool>()? {
            *m = 1;
        }
    }
    let fresh = mask_shape == shape && u.arbitrary::<bool>()?;
    let m_total: usize = mask_shape.iter().product();

    let key = Key {
        seed: u.arbitrary()?,
        stream: u.arbitrary()?,
    };
    let first_block: u64 = u.arbitrary()?;
    let threshold = match u.int_in_range(0..=3)? {
        0 => 0,
        1 => 1u64 << 32,
        _ => u.int_in_range(0..=(1u64 << 32))?,
    };
    let given: Vec<u64> = (0..kernel::words_for(m_total))
        .map(|_| u.arbitrary())
        .collect::<Result<_>>()?;
    let store_mask = fresh && u.arbitrary::<bool>()?;

    let app = match u.int_in_range(0..=2)? {
        0 => Application::Scale {
            scale: u.arbitrary()?,
        },
        1 => Application::Affine {
            a: u.arbitrary()?,
            shift: u.arbitrary()?,
            dropped: u.arbitrary()?,
        },
        _ => Application::Noise {
            scale: u.arbitrary()?,
            key,
            first_block: u.arbitrary()?,
        },
    };

    let inplace = u.arbitrary::<bool>()?;
    let mut src = Strided::new(u, &shape, item, !inplace)?;
    let mut dst = if inplace {
        None
    } else {
        Some(Strided::new(u, &shape, item, false)?)
    };
    let mut res = if u.arbitrary::<bool>()? {
        Some(Strided::new(u, &shape, item, true)?)
    } else {
        None
    };
    let src_before = src.buf.clone();
    let dst_before = dst.as_ref().map(|d| d.buf.clone());
    let res_before = res.as_ref().map(|r| r.buf.clone());

    let mut store = vec![u64::MAX; kernel::words_for(n) + 1];
    let bits = if fresh {
        Bits::Fresh {
            key,
            first_block,
            threshold,
            store: store_mask.then_some(&mut store[..]),
        }
    } else {
        Bits::Given(&given)
    };
    let src_view = src.view::<T>(&shape);
    // In place: the output is the source view itself.
    let dst_view = dst.as_mut().map(|d| d.view::<T>(&shape));
    let out_view = dst_view.as_ref().unwrap_or(&src_view);
    let res_view = res.as_mut().map(|r| r.view::<T>(&shape));
    let mut inputs = vec![&src_view];
    inputs.extend(res_view.as_ref());
    if let Err(e) = check_output(out_view, &inputs) {
        panic!("a legal layout was refused: {e}; shape {shape:?}");
    }
    let call = kernel::Call {
        shape: &shape,
        mask_shape: &mask_shape,
        src: src_view.operand(),
        dst: out_view.operand(),
        res: res_view.as_ref().map(View::operand),
        bits,
        app,
    };
    // SAFETY: every view lies inside its own buffer (`Strided::new` sized it), and
    // `check_output` accepted the output: writeable, non-overlapping non-zero strides, and
    // apart from every input unless in place (the same view).
    unsafe { kernel::run::<T>(call) };
    drop((src_view, dst_view, res_view));

    // The reference keep decisions: element e keeps iff its uniform word is < threshold.
    let mut words = vec![0u32; if fresh { n } else { 0 }];
    rng::uniform_words(key, first_block, &mut words);
    let keep_of = |m: usize| -> bool {
        if fresh {
            (words[m] as u64) < threshold
        } else {
            (given[m / 64] >> (m % 64)) & 1 == 1
        }
    };
    let op = |v: f64| <T::Op as OpFloat>::from_f64(v);
    let mut covered = vec![false; dst.as_ref().map_or(src.buf.len(), |d| d.buf.len())];
    let mut idx = vec![0usize; nd];
    for e in 0..n {
        let mut rem = e;
        for d in (0..nd).rev() {
            idx[d] = rem % shape[d];
            rem /= shape[d];
        }
        let mut m = 0usize;
        for d in 0..nd {
            m = m * mask_shape[d] + if mask_shape[d] == 1 { 0 } else { idx[d] };
        }
        let x: T = read(&src_before, src.byte_offset(&idx));
        let x = x.to_op();
        let keep = keep_of(m);
        let v = match app {
            Application::Scale { scale } => {
                if keep {
                    x * op(scale)
                } else {
                    op(0.0)
                }
            }
            Application::Affine { a, shift, dropped } => {
                if keep {
                    x * op(a) + op(shift)
                } else {
                    op(dropped)
                }
            }
            Application::Noise {
                scale,
                key,
                first_block,
            } => {
                if keep {
                    x * op(scale)
                } else {
                    op(kernel::normal_at(key, first_block, m))
                }
            }
        };
        let mut want = T::from_op(v);
        if let Some(r) = &res {
            let rv: T = read(res_before.as_ref().unwrap(), r.byte_offset(&idx));
            want = T::from_op(rv.to_op() + want.to_op());
        }
        let (out_buf, at) = match &dst {
            Some(d) => (&d.buf, d.byte_offset(&idx)),
            None => (&src.buf, src.byte_offset(&idx)),
        };
        let got: T = read(out_buf, at);
        assert!(
            got.bits() == want.bits() || (got.is_nan() && want.is_nan()),
            "element {e} {idx:?} (mask {m}, keep {keep}): got {:#x}, want {:#x}; shape {shape:?} mask {mask_shape:?} {app:?}",
            got.bits(),
            want.bits()
        );
        for c in covered.iter_mut().skip(at).take(item) {
            *c = true;
        }
    }
    // Nothing outside the output view was written; inputs are untouched.
    let (out_now, out_before) = match (&dst, &dst_before) {
        (Some(d), Some(b)) => (&d.buf, b),
        _ => (&src.buf, &src_before),
    };
    for (i, (&a, &b)) in out_now.iter().zip(out_before).enumerate() {
        assert!(
            covered[i] || a == b,
            "byte {i} outside the output view changed"
        );
    }
    if dst.is_some() {
        assert!(src.buf == src_before, "the source changed");
    }
    if let (Some(r), Some(b)) = (&res, &res_before) {
        assert!(&r.buf == b, "the residual changed");
    }
    if store_mask {
        for e in 0..n {
            assert_eq!(
                (store[e / 64] >> (e % 64)) & 1 == 1,
                keep_of(e),
                "stored bit {e}"
            );
        }
        if !n.is_multiple_of(64) {
            assert_eq!(store[n / 64] >> (n % 64), 0, "bits past the mask are set");
        }
        assert_eq!(
            store[kernel::words_for(n)],
            u64::MAX,
            "a word past the mask was written"
        );
    }
    Ok(())
}

fuzz_target!(|data: &[u8]| {
    let mut u = Unstructured::new(data);
    let _ = match u.int_in_range(0..=2u8) {
        Ok(0) => check::<f16>(&mut u),
        Ok(1) => check::<f32>(&mut u),
        _ => check::<f64>(&mut u),
    };
});
