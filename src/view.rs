//! A strided view of someone else's memory (a NumPy array, a DLPack tensor, a `Vec` in a test)
//! and the checks that make a call's views safe to hand to the kernel: an output that can be
//! written, whose elements are distinct, and that overlaps no input unless it is that input.
//!
//! The bindings (and the fuzz targets) make views; everything else only reads them.

use crate::error::{DropError, Result};
use crate::kernel::Operand;
use half::{bf16, f16};
use std::marker::PhantomData;

/// The element types the kernels run over.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dtype {
    F16,
    BF16,
    F32,
    F64,
}

impl Dtype {
    pub fn itemsize(self) -> usize {
        match self {
            Dtype::F16 | Dtype::BF16 => 2,
            Dtype::F32 => 4,
            Dtype::F64 => 8,
        }
    }
}

/// A Rust element type and its [`Dtype`].
pub trait HasDtype: Copy {
    const DTYPE: Dtype;
}
impl HasDtype for f16 {
    const DTYPE: Dtype = Dtype::F16;
}
impl HasDtype for bf16 {
    const DTYPE: Dtype = Dtype::BF16;
}
impl HasDtype for f32 {
    const DTYPE: Dtype = Dtype::F32;
}
impl HasDtype for f64 {
    const DTYPE: Dtype = Dtype::F64;
}

/// Elements of `dtype` at `ptr` plus byte strides, alive for `'a`. Only [`View::new`] (unsafe,
/// for foreign memory) and [`View::of`] / [`View::of_mut`] (safe, over slices) make one, so a
/// view always addresses valid elements; the checks below decide whether it may be written.
/// Not `Clone`: two writeable handles on the same elements, given to two calls on two threads,
/// would be a data race reached without `unsafe` (an in-place call gets its second handle
/// from `call::Operands::in_place`, which never lets it out).
#[derive(Debug)]
pub struct View<'a> {
    ptr: *mut u8,
    shape: Vec<usize>,
    strides: Vec<isize>,
    dtype: Dtype,
    writeable: bool,
    memory: PhantomData<&'a [u8]>,
}

// SAFETY: a view is an address and its layout; `View::new`'s contract keeps the memory valid for
// 'a wherever the view goes. Whether several threads may touch it is the kernel's business: it
// splits the elements of a call by index range, one writer each.
unsafe impl Send for View<'_> {}
// SAFETY: as above; `&View` gives no access to the memory but through the kernel's contract.
unsafe impl Sync for View<'_> {}

impl<'a> View<'a> {
    /// # Safety
    /// - `strides` has `shape.len()` entries; for every index of `shape`, `ptr` plus the
    ///   index's byte offset (the dot product with `strides`) addresses an initialised element
    ///   of `dtype`, possibly unaligned, that stays allocated for `'a`;
    /// - the extent of the view (see [`View::extent`]) does not overflow `isize`;
    /// - when `writeable`, those elements may be written through the view for `'a`: nothing
    ///   else reads or writes them while a kernel holds the view, except other views checked
    ///   by [`check_output`].
    pub unsafe fn new(
        ptr: *mut u8,
        shape: Vec<usize>,
        strides: Vec<isize>,
        dtype: Dtype,
        writeable: bool,
    ) -> View<'a> {
        debug_assert_eq!(shape.len(), strides.len());
        View {
            ptr,
            shape,
            strides,
            dtype,
            writeable,
            memory: PhantomData,
        }
    }

    /// A read-only C-ordered view of `data` as `shape`.
    pub fn of<T: HasDtype>(data: &'a [T], shape: &[usize]) -> Result<View<'a>> {
        check_len(data.len(), shape)?;
        // SAFETY: C strides over a slice of exactly prod(shape) elements of T.
        Ok(unsafe {
            View::new(
                data.as_ptr() as *mut u8,
                shape.to_vec(),
                c_strides(shape, T::DTYPE.itemsize()),
                T::DTYPE,
                false,
            )
        })
    }

    /// A writeable C-ordered view of `data` as `shape`.
    pub fn of_mut<T: HasDtype>(data: &'a mut [T], shape: &[usize]) -> Result<View<'a>> {
        check_len(data.len(), shape)?;
        // SAFETY: as in `of`; the exclusive borrow makes this view the only way to the data.
        Ok(unsafe {
            View::new(
                data.as_mut_ptr() as *mut u8,
                shape.to_vec(),
                c_strides(shape, T::DTYPE.itemsize()),
                T::DTYPE,
                true,
            )
        })
    }

    /// A second handle on the same elements, for an in-place call's input (see the type's
    /// documentation for why this is not `Clone`).
    pub(crate) fn alias(&self) -> View<'a> {
        View {
            ptr: self.ptr,
            shape: self.shape.clone(),
            strides: self.strides.clone(),
            dtype: self.dtype,
            writeable: self.writeable,
            memory: PhantomData,
        }
    }

    pub fn ptr(&self) -> *mut u8 {
        self.ptr
    }

    pub fn shape(&self) -> &[usize] {
        &self.shape
    }

    pub fn strides(&self) -> &[isize] {
        &self.strides
    }

    pub fn dtype(&self) -> Dtype {
        self.dtype
    }

    pub fn writeable(&self) -> bool {
        self.writeable
    }

    pub fn itemsize(&self) -> usize {
        self.dtype.itemsize()
    }

    /// Elements in the view: 0 when any dimension is, whatever the others (whose product alone
    /// need not fit a `usize`; a non-empty view's does, its extent fits an `isize`).
    pub fn len(&self) -> usize {
        if self.shape.contains(&0) {
            0
        } else {
            self.shape.iter().product()
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn operand(&self) -> Operand<'_> {
        Operand {
            ptr: self.ptr,
            strides: &self.strides,
        }
    }

    /// The byte range [lo, hi) the view can touch.
    pub fn extent(&self) -> (usize, usize) {
        let (mut lo, mut hi) = (self.ptr as isize, self.ptr as isize);
        if self.shape.contains(&0) {
            return (lo as usize, lo as usize);
        }
        for (&n, &s) in self.shape.iter().zip(&self.strides) {
            let span = s * (n as isize - 1);
            if span < 0 {
                lo += span;
            } else {
                hi += span;
            }
        }
        (lo as usize, hi as usize + self.itemsize())
    }

    /// Whether two distinct elements may share bytes. Sufficient rather than exact: sorted by
    /// stride, each dimension must step past the whole span of the dimensions inside it. Every
    /// C, Fortran, transposed, sliced or reversed view passes; an exotic interleaving is refused.
    pub fn elements_may_overlap(&self) -> bool {
        // On the stack for the ranks arrays have: this runs on every call.
        let (mut stack, mut heap) = ([(0usize, 0usize); 16], Vec::new());
        let dims = (self.shape.iter().zip(&self.strides))
            .filter(|&(&n, _)| n > 1)
            .map(|(&n, &s)| (s.unsigned_abs(), n));
        let dims: &mut [(usize, usize)] = if self.shape.len() <= stack.len() {
            let mut k = 0;
            for d in dims {
                stack[k] = d;
                k += 1;
            }
            &mut stack[..k]
        } else {
            heap.extend(dims);
            &mut heap
        };
        dims.sort_unstable();
        let mut span = self.itemsize();
        for &mut (stride, n) in dims {
            if stride < span {
                return true;
            }
            span += stride * (n - 1);
        }
        false
    }

    /// The very same elements in the same order (an in-place call).
    pub fn same_view(&self, other: &View<'_>) -> bool {
        self.ptr == other.ptr && self.shape == other.shape && self.strides == other.strides
    }

    pub fn overlaps(&self, other: &View<'_>) -> bool {
        let (a, b) = (self.extent(), other.extent());
        a.0 < b.1 && b.0 < a.1 && a.0 < a.1 && b.0 < b.1
    }

    /// Whether the view is C-contiguous (size-1 dimensions may have any stride).
    pub fn is_c_contiguous(&self) -> bool {
        if self.shape.contains(&0) {
            return true;
        }
        let mut acc = self.itemsize() as isize;
        for (&n, &s) in self.shape.iter().zip(&self.strides).rev() {
            if n != 1 && s != acc {
                return false;
            }
            acc *= n as isize;
        }
        true
    }
}

fn check_len(len: usize, shape: &[usize]) -> Result<()> {
    let n = shape.iter().try_fold(1usize, |a, &d| a.checked_mul(d));
    if n != Some(len) {
        return crate::value_err!("{len} elements cannot be viewed as shape {shape:?}");
    }
    Ok(())
}

/// Row-major byte strides of `shape`.
pub fn c_strides(shape: &[usize], itemsize: usize) -> Vec<isize> {
    let mut acc = itemsize as isize;
    let mut out = vec![0isize; shape.len()];
    for d in (0..shape.len()).rev() {
        out[d] = acc;
        acc = acc.wrapping_mul(shape[d] as isize);
    }
    out
}

/// Checks that `out` can be written as the result of reading `inputs`: writeable, every element
/// at its own bytes, and each input of its shape and dtype, either the very same view (in
/// place) or disjoint from it.
pub fn check_output(out: &View<'_>, inputs: &[&View<'_>]) -> Result<()> {
    if !out.writeable {
        return Err(DropError::ReadOnlyOutput);
    }
    let empty = out.shape.contains(&0);
    for (&n, &s) in out.shape.iter().zip(&out.strides) {
        if n > 1 && s == 0 && !empty {
            return Err(DropError::ZeroStrideOutput);
        }
    }
    if !empty && out.elements_may_overlap() {
        return Err(DropError::OverlappingOutput {
            shape: out.shape.clone(),
            strides: out.strides.clone(),
        });
    }
    for v in inputs {
        if v.shape != out.shape {
            return Err(DropError::ShapeMismatch {
                input: v.shape.clone(),
                output: out.shape.clone(),
            });
        }
        if v.dtype != out.dtype {
            return Err(DropError::DtypeMismatch {
                input: v.dtype,
                output: out.dtype,
            });
        }
        if !v.same_view(out) && v.overlaps(out) {
            return Err(DropError::OutputOverlapsInput);
        }
    }
    Ok(())
}

/// Checks that a mask of `mask_shape` broadcasts to an input of `shape`: the same rank, each
/// entry equal to the input's or 1.
pub fn check_mask_shape(shape: &[usize], mask_shape: &[usize]) -> Result<()> {
    if mask_shape.len() != shape.len()
        || shape
            .iter()
            .zip(mask_shape)
            .any(|(&n, &m)| m != n && m != 1)
    {
        return Err(DropError::MaskShape {
            mask: mask_shape.to_vec(),
            input: shape.to_vec(),
        });
    }
    Ok(())
}

/// Checks operands that a kernel reads as flat slices (attention's weights): every one
/// C-contiguous, of one shape and dtype, and the `written` ones writeable and disjoint from
/// every other operand. Each is named in the message that refuses it.
pub fn check_dense(read: &[(&str, &View<'_>)], written: &[(&str, &View<'_>)]) -> Result<()> {
    let Some((_, first)) = written.first().or(read.first()) else {
        return crate::value_err!("no operands");
    };
    for (name, v) in read.iter().chain(written) {
        if v.shape != first.shape || v.dtype != first.dtype {
            return crate::value_err!(
                "{name}: shape {:?} {:?} does not match {:?} {:?}",
                v.shape,
                v.dtype,
                first.shape,
                first.dtype
            );
        }
        if !v.is_c_contiguous() {
            return crate::value_err!("{name} must be C-contiguous");
        }
    }
    for (i, (name, v)) in written.iter().enumerate() {
        if !v.writeable {
            return crate::value_err!("{name} is read-only");
        }
        let mut others = read.iter().chain(
            written
                .iter()
                .enumerate()
                .filter(|&(j, _)| j != i)
                .map(|(_, o)| o),
        );
        if others.any(|(_, o)| o.overlaps(v)) {
            return crate::value_err!("{name} overlaps another operand");
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A view of f32 elements at `base + offset` with element strides `strides`.
    fn strided<'a>(base: *mut f32, offset: usize, shape: &[usize], strides: &[isize]) -> View<'a> {
        // SAFETY: the tests below keep every index inside the buffer `base` points into.
        unsafe {
            View::new(
                base.add(offset) as *mut u8,
                shape.to_vec(),
                strides.iter().map(|s| s * 4).collect(),
                Dtype::F32,
                true,
            )
        }
    }

    #[test]
    fn slices_view_as_c_ordered_shapes_of_their_length() {
        let mut data = [0f32; 12];
        let v = View::of_mut(&mut data, &[3, 4]).unwrap();
        assert_eq!(v.strides(), &[16, 4]);
        assert!(v.is_c_contiguous() && v.writeable());
        assert_eq!(v.extent().1 - v.extent().0, 48);
        assert!(View::of(&data, &[5, 4]).is_err());
        assert!(!View::of(&data, &[12]).unwrap().writeable());
        assert!(View::of(&[0f32; 0], &[0, 7]).unwrap().is_empty());
        let huge_but_empty = strided(data.as_mut_ptr(), 0, &[1 << 62, 1 << 62, 0], &[0, 0, 0]);
        assert_eq!(huge_but_empty.len(), 0);
    }

    #[test]
    fn outputs_must_be_writeable_distinct_and_apart_from_their_inputs() {
        let data = [0f32; 12];
        let x = View::of(&data, &[3, 4]).unwrap();
        assert_eq!(check_output(&x, &[]), Err(DropError::ReadOnlyOutput));

        let mut buf = vec![0f32; 64];
        let out = strided(buf.as_mut_ptr(), 0, &[3, 4], &[4, 1]);
        assert_eq!(check_output(&out, &[&out.alias()]), Ok(()), "in place");
        let broadcast = strided(buf.as_mut_ptr(), 0, &[3, 4], &[0, 1]);
        assert_eq!(
            check_output(&broadcast, &[]),
            Err(DropError::ZeroStrideOutput)
        );
        // A stride of 1 over rows of 4: rows share elements.
        let smeared = strided(buf.as_mut_ptr(), 0, &[3, 4], &[1, 1]);
        assert!(matches!(
            check_output(&smeared, &[]),
            Err(DropError::OverlappingOutput { .. })
        ));
        // The transposed, reversed and sliced views of a buffer have distinct elements.
        for (offset, strides) in [(0, [1, 3]), (11, [-4, -1]), (0, [8, 2])] {
            assert_eq!(
                check_output(&strided(buf.as_mut_ptr(), offset, &[3, 4], &strides), &[]),
                Ok(())
            );
        }

        let mut buf = vec![0f32; 64];
        let out = strided(buf.as_mut_ptr(), 0, &[3, 4], &[4, 1]);
        let shifted = strided(buf.as_mut_ptr(), 1, &[3, 4], &[4, 1]);
        let apart = strided(buf.as_mut_ptr(), 12, &[3, 4], &[4, 1]);
        assert_eq!(
            check_output(&out, &[&shifted]),
            Err(DropError::OutputOverlapsInput)
        );
        assert_eq!(check_output(&out, &[&apart]), Ok(()));
        let short = strided(buf.as_mut_ptr(), 12, &[2, 4], &[4, 1]);
        assert!(matches!(
            check_output(&out, &[&short]),
            Err(DropError::ShapeMismatch { .. })
        ));
        let wide = [0f64; 12];
        let wide = View::of(&wide, &[3, 4]).unwrap();
        let err = check_output(&out, &[&wide]).unwrap_err();
        assert_eq!(err.kind(), crate::error::ErrorKind::Type);
        assert_eq!(err.to_string(), "dtype mismatch: F64 vs F32");
    }

    #[test]
    fn overlap_is_judged_alike_at_any_rank() {
        // 20 dimensions of 2 (past the 16 judged on the stack), C strides, then one smeared.
        let mut buf = vec![0f32; 1 << 20];
        let shape = vec![2usize; 20];
        let strides: Vec<isize> = (0..20).rev().map(|d| 1isize << d).collect();
        let out = strided(buf.as_mut_ptr(), 0, &shape, &strides);
        assert!(!out.elements_may_overlap());
        let mut smeared = strides.clone();
        smeared[0] = 1;
        assert!(strided(buf.as_mut_ptr(), 0, &shape, &smeared).elements_may_overlap());
        let short = strided(buf.as_mut_ptr(), 0, &shape[..3], &[1, 1, 1]);
        assert!(short.elements_may_overlap());
    }

    #[test]
    fn empty_outputs_pass_whatever_their_strides() {
        let mut buf = vec![0f32; 4];
        let out = strided(buf.as_mut_ptr(), 0, &[0, 4], &[0, 0]);
        assert_eq!(check_output(&out, &[]), Ok(()));
        assert_eq!(out.extent().0, out.extent().1);
    }

    #[test]
    fn dense_operands_are_one_contiguous_shape_and_written_ones_stand_alone() {
        let (a, b) = ([0f32; 12], [0f32; 12]);
        let mut c = [0f32; 12];
        let (a, b) = (
            View::of(&a, &[3, 4]).unwrap(),
            View::of(&b, &[3, 4]).unwrap(),
        );
        let c = View::of_mut(&mut c, &[3, 4]).unwrap();
        assert_eq!(check_dense(&[("a", &a), ("b", &b)], &[("c", &c)]), Ok(()));
        let message = |r: Result<()>| r.unwrap_err().to_string();
        assert_eq!(message(check_dense(&[], &[("b", &b)])), "b is read-only");
        assert_eq!(
            message(check_dense(&[("c2", &c.alias())], &[("c", &c)])),
            "c overlaps another operand"
        );
        let mut buf = [0f32; 24];
        let strided_view = strided(buf.as_mut_ptr(), 0, &[3, 4], &[8, 2]);
        assert_eq!(
            message(check_dense(&[("s", &strided_view)], &[("c", &c)])),
            "s must be C-contiguous"
        );
        let d = [0f32; 12];
        let d = View::of(&d, &[4, 3]).unwrap();
        assert!(message(check_dense(&[("d", &d)], &[("c", &c)])).starts_with("d: shape [4, 3]"));
        assert_eq!(message(check_dense(&[], &[])), "no operands");
    }

    #[test]
    fn masks_broadcast_by_rank_and_ones() {
        assert_eq!(check_mask_shape(&[2, 3], &[2, 1]), Ok(()));
        assert_eq!(check_mask_shape(&[2, 3], &[1, 1]), Ok(()));
        assert_eq!(check_mask_shape(&[], &[]), Ok(()));
        for bad in [&[2][..], &[2, 3, 1], &[3, 3]] {
            let err = check_mask_shape(&[2, 3], bad).unwrap_err();
            assert!(
                err.to_string().contains("does not broadcast to [2, 3]"),
                "{err}"
            );
        }
    }
}
