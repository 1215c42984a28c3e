//! The PyO3 layer: turns NumPy arrays into checked strided operands, dispatches on dtype,
//! releases the GIL around kernels and maps `DropError` to Python exceptions. No maths here.

use crate::buffer::{self, Buffer};
use crate::error::DropError;
use crate::generator::{blocks_for_decisions, blocks_for_normals, fork_stream, GeneratorState};
use crate::kernel::{self, Application, Bits, Operand};
use crate::mask::{block_keep_words, BlockGeometry};
use crate::rng::{self, threshold_for, Key};
use half::{bf16, f16};
use numpy::npyffi::{
    get_type_object, npy_intp, objects::_PyArray_GET_ITEM_DATA, NpyTypes, PyArrayObject,
    PyArray_CheckExact, NPY_ARRAY_CARRAY, NPY_ARRAY_FARRAY, NPY_ARRAY_WRITEABLE, NPY_ORDER,
    PY_ARRAY_API,
};
use numpy::{PyArrayDescr, PyArrayDescrMethods, PyUntypedArray, PyUntypedArrayMethods};
use pyo3::exceptions::{PyMemoryError, PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyCapsule, PyString, PyTuple};

impl From<DropError> for PyErr {
    fn from(e: DropError) -> PyErr {
        match e {
            DropError::Value(m) => PyValueError::new_err(m),
            DropError::Type(m) => PyTypeError::new_err(m),
        }
    }
}

/// Most dimensions an input may have (NumPy's own limit is 64).
const MAX_DIMS: usize = 64;

// --- the generator --------------------------------------------------------------------------

/// Converts a Python int to 64 bits the way torch.manual_seed does: negatives wrap mod 2^64.
fn seed_bits(seed: &Bound<'_, PyAny>) -> PyResult<u64> {
    if let Ok(v) = seed.extract::<u64>() {
        return Ok(v);
    }
    match seed.extract::<i64>() {
        Ok(v) => Ok(v as u64),
        Err(_) if seed.extract::<i128>().is_ok() => Err(PyValueError::new_err(format!(
            "seed must be in [-2**63, 2**64), got {seed}"
        ))),
        Err(_) => Err(PyTypeError::new_err(format!(
            "seed must be an int, got {}",
            seed.get_type().name()?
        ))),
    }
}

fn entropy_seed() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    // RandomState is keyed from the OS's entropy source; hashing the time mixes in more.
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos()),
    );
    h.finish()
}

/// A counter-based ARS-5 generator: masks are a pure function of (seed, stream, offset, index).
#[pyclass(name = "Generator", module = "fastdrop._core", frozen)]
pub struct Generator {
    state: GeneratorState,
}

#[pymethods]
impl Generator {
    #[new]
    #[pyo3(signature = (seed = None, stream = 0))]
    fn new(seed: Option<&Bound<'_, PyAny>>, stream: u64) -> PyResult<Self> {
        let seed = match seed {
            Some(s) if !s.is_none() => seed_bits(s)?,
            _ => entropy_seed(),
        };
        Ok(Generator {
            state: GeneratorState::new(seed, stream, 0),
        })
    }

    /// The 64-bit seed.
    #[getter]
    fn seed(&self) -> u64 {
        self.state.state().0
    }

    /// The stream id (0 unless forked).
    #[getter]
    fn stream(&self) -> u64 {
        self.state.state().1
    }

    /// The next counter block a call will use.
    #[getter]
    fn offset(&self) -> u64 {
        self.state.offset()
    }

    /// Reseeds in place (stream kept, offset reset); returns the generator.
    fn manual_seed<'py>(
        slf: Bound<'py, Self>,
        seed: &Bound<'py, PyAny>,
    ) -> PyResult<Bound<'py, Self>> {
        let s = seed_bits(seed)?;
        let stream = slf.get().state.state().1;
        slf.get().state.set_state(s, stream, 0);
        Ok(slf)
    }

    /// `(seed, stream, offset)`: pass it to `set_state` to replay the following calls.
    fn get_state(&self) -> (u64, u64, u64) {
        self.state.state()
    }

    fn set_state(&self, state: &Bound<'_, PyAny>) -> PyResult<()> {
        let (seed, stream, offset) = state.extract::<(u64, u64, u64)>().map_err(|_| {
            PyTypeError::new_err(format!(
                "state must be a (seed, stream, offset) tuple of three non-negative ints as returned by get_state(), got {}",
                state.repr().map_or_else(|_| "?".to_string(), |r| r.to_string())
            ))
        })?;
        self.state.set_state(seed, stream, offset);
        Ok(())
    }

    /// A generator with the same seed on an independent stream, e.g. one per distributed rank:
    /// `Generator(seed).fork(rank)`. Forking twice with the same index gives the same stream.
    fn fork(&self, index: u64) -> Self {
        let (seed, stream, _) = self.state.state();
        Generator {
            state: GeneratorState::new(seed, fork_stream(stream, index), 0),
        }
    }

    /// Takes `blocks` counter blocks as one call would; returns the first.
    fn _reserve(&self, blocks: u64) -> u64 {
        self.state.reserve(blocks).1
    }

    fn __reduce__<'py>(
        slf: &Bound<'py, Self>,
    ) -> PyResult<(Bound<'py, PyAny>, Bound<'py, PyTuple>)> {
        let py = slf.py();
        let rebuild = py
            .import("fastdrop._core")?
            .getattr("_generator_from_state")?;
        Ok((rebuild, PyTuple::new(py, [slf.get().state.state()])?))
    }

    fn __repr__(&self) -> String {
        let (seed, stream, offset) = self.state.state();
        format!("Generator(seed={seed}, stream={stream}, offset={offset})")
    }
}

#[pyfunction]
fn _generator_from_state(state: (u64, u64, u64)) -> Generator {
    Generator {
        state: GeneratorState::new(state.0, state.1, state.2),
    }
}

// --- masks ----------------------------------------------------------------------------------

/// Packed keep bits (1 = kept), C-ordered over `shape`.
#[pyclass(name = "MaskBits", module = "fastdrop._core", frozen)]
pub struct MaskBits {
    shape: Vec<usize>,
    words: Vec<u64>,
}

impl MaskBits {
    fn len(&self) -> usize {
        self.shape.iter().product()
    }
}

#[pymethods]
impl MaskBits {
    /// A mask of `shape` with every decision equal to `keep`.
    #[staticmethod]
    fn filled(shape: Vec<usize>, keep: bool) -> PyResult<Self> {
        // A broadcast view can be far larger than memory: a failed allocation must be a
        // MemoryError, not an abort of the interpreter.
        let n = (shape.iter().try_fold(1usize, |a, &d| a.checked_mul(d))).ok_or_else(|| {
            PyValueError::new_err(format!("mask shape {shape:?} has more than 2**64 elements"))
        })?;
        let mut words = Vec::new();
        words.try_reserve_exact(kernel::words_for(n)).map_err(|_| {
            PyMemoryError::new_err(format!(
                "cannot allocate a mask of {n} bits for shape {shape:?}"
            ))
        })?;
        words.resize(kernel::words_for(n), if keep { u64::MAX } else { 0 });
        kernel::clear_tail(&mut words, n);
        Ok(MaskBits { shape, words })
    }

    #[getter]
    fn shape<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyTuple>> {
        PyTuple::new(py, &self.shape)
    }

    /// Bytes of the packed bits.
    #[getter]
    fn nbytes(&self) -> usize {
        self.words.len() * 8
    }

    /// How many decisions keep their element.
    fn count_kept(&self) -> usize {
        self.words.iter().map(|w| w.count_ones() as usize).sum()
    }

    /// The bits as little-endian bytes (bit i of the mask is bit i % 8 of byte i / 8).
    fn to_bytes<'py>(&self, py: Python<'py>) -> Bound<'py, PyBytes> {
        let bytes: Vec<u8> = self.words.iter().flat_map(|w| w.to_le_bytes()).collect();
        PyBytes::new(py, &bytes[..self.len().div_ceil(8)])
    }
}

// --- arrays ---------------------------------------------------------------------------------

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Dtype {
    F16,
    BF16,
    F32,
    F64,
}

struct View {
    ptr: *mut u8,
    shape: Vec<usize>,
    strides: Vec<isize>,
    dtype: Dtype,
    writeable: bool,
}

// SAFETY: a View is only moved into the GIL-free section of the call that made it, while the
// Python objects it points into are kept alive by that call's borrowed references.
unsafe impl Send for View {}

impl View {
    fn itemsize(&self) -> usize {
        match self.dtype {
            Dtype::F16 | Dtype::BF16 => 2,
            Dtype::F32 => 4,
            Dtype::F64 => 8,
        }
    }

    fn operand(&self) -> Operand<'_> {
        Operand {
            ptr: self.ptr,
            strides: &self.strides,
        }
    }

    /// The byte range [lo, hi) the view can touch.
    fn extent(&self) -> (usize, usize) {
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
    fn elements_may_overlap(&self) -> bool {
        let mut dims: Vec<(usize, usize)> = (self.shape.iter().zip(&self.strides))
            .filter(|&(&n, _)| n > 1)
            .map(|(&n, &s)| (s.unsigned_abs(), n))
            .collect();
        dims.sort_unstable();
        let mut span = self.itemsize();
        for (stride, n) in dims {
            if stride < span {
                return true;
            }
            span += stride * (n - 1);
        }
        false
    }

    fn same_view(&self, other: &View) -> bool {
        self.ptr == other.ptr && self.shape == other.shape && self.strides == other.strides
    }

    fn overlaps(&self, other: &View) -> bool {
        let (a, b) = (self.extent(), other.extent());
        a.0 < b.1 && b.0 < a.1 && a.0 < a.1 && b.0 < b.1
    }
}

// --- DLPack ---------------------------------------------------------------------------------
// The C structs of dlpack.h (v0.8 legacy and v1.x versioned), read from a producer's capsule.
// Written out by hand: they are a dozen plain fields and no maintained crate offers just them
// for PyO3 0.30. The capsule is borrowed, never consumed: it is not renamed, so the producer's
// own destructor frees it, and the caller keeps the tensor alive for the whole call.

#[repr(C)]
struct DLDevice {
    device_type: i32,
    device_id: i32,
}

#[repr(C)]
struct DLDataType {
    code: u8,
    bits: u8,
    lanes: u16,
}

#[repr(C)]
struct DLTensor {
    data: *mut std::ffi::c_void,
    device: DLDevice,
    ndim: i32,
    dtype: DLDataType,
    shape: *const i64,
    strides: *const i64,
    byte_offset: u64,
}

#[repr(C)]
struct DLManagedTensor {
    dl_tensor: DLTensor,
    manager_ctx: *mut std::ffi::c_void,
    deleter: Option<unsafe extern "C" fn(*mut DLManagedTensor)>,
}

#[repr(C)]
struct DLManagedTensorVersioned {
    version: [u32; 2],
    manager_ctx: *mut std::ffi::c_void,
    deleter: Option<unsafe extern "C" fn(*mut DLManagedTensorVersioned)>,
    flags: u64,
    dl_tensor: DLTensor,
}

const DL_CPU: i32 = 1;
const DL_FLAG_READ_ONLY: u64 = 1;

fn dlpack_view(name: &str, cap: &Bound<'_, PyCapsule>) -> PyResult<View> {
    // SAFETY: a capsule named "dltensor" / "dltensor_versioned" holds a live DLManagedTensor
    // (Versioned) by the DLPack protocol; the producer keeps it valid until the capsule dies,
    // and `cap` is borrowed for this whole call.
    let (t, writeable) = unsafe {
        if cap.is_valid_checked(Some(c"dltensor")) {
            let m = cap.pointer_checked(Some(c"dltensor"))?.as_ptr() as *const DLManagedTensor;
            (&(*m).dl_tensor, true)
        } else if cap.is_valid_checked(Some(c"dltensor_versioned")) {
            let m = cap.pointer_checked(Some(c"dltensor_versioned"))?.as_ptr()
                as *const DLManagedTensorVersioned;
            if (*m).version[0] != 1 {
                return Err(PyTypeError::new_err(format!(
                    "{name}: DLPack major version {} is not supported (1 is)",
                    (*m).version[0]
                )));
            }
            (&(*m).dl_tensor, (*m).flags & DL_FLAG_READ_ONLY == 0)
        } else {
            return Err(PyTypeError::new_err(format!(
                "{name}: expected an unconsumed DLPack capsule named 'dltensor' or 'dltensor_versioned'"
            )));
        }
    };
    if t.device.device_type != DL_CPU {
        return Err(PyTypeError::new_err(format!(
            "{name}: DLPack tensor is on device type {} (id {}); only CPU memory is read here",
            t.device.device_type, t.device.device_id
        )));
    }
    let dtype = match (t.dtype.code, t.dtype.bits, t.dtype.lanes) {
        (2, 16, 1) => Dtype::F16,
        (2, 32, 1) => Dtype::F32,
        (2, 64, 1) => Dtype::F64,
        (4, 16, 1) => Dtype::BF16,
        (c, b, l) => {
            return Err(PyTypeError::new_err(format!(
                "{name} must be a float16, bfloat16, float32 or float64 tensor, got DLPack dtype (code {c}, {b} bits, {l} lanes)"
            )))
        }
    };
    let ndim = usize::try_from(t.ndim).unwrap_or(usize::MAX);
    if ndim > MAX_DIMS {
        return Err(PyValueError::new_err(format!(
            "{name} has {} dimensions; at most {MAX_DIMS} are supported",
            t.ndim
        )));
    }
    // SAFETY: DLPack guarantees `shape` (and `strides`, unless NULL) point to `ndim` int64s.
    let (shape, elem_strides) = unsafe {
        let shape: Vec<i64> = (0..ndim).map(|d| *t.shape.add(d)).collect();
        let strides: Option<Vec<i64>> =
            (!t.strides.is_null()).then(|| (0..ndim).map(|d| *t.strides.add(d)).collect());
        (shape, strides)
    };
    if shape.iter().any(|&n| n < 0) {
        return Err(PyValueError::new_err(format!(
            "{name}: negative DLPack shape {shape:?}"
        )));
    }
    let shape: Vec<usize> = shape.iter().map(|&n| n as usize).collect();
    let itemsize = (t.dtype.bits / 8) as isize;
    let strides: Vec<isize> = match elem_strides {
        Some(s) => s.iter().map(|&e| e as isize * itemsize).collect(),
        None => {
            // NULL strides: compact row-major.
            let mut acc = itemsize;
            let mut out = vec![0isize; ndim];
            for d in (0..ndim).rev() {
                out[d] = acc;
                acc *= shape[d] as isize;
            }
            out
        }
    };
    let ptr = (t.data as *mut u8).wrapping_add(t.byte_offset as usize);
    Ok(View {
        ptr,
        shape,
        strides,
        dtype,
        writeable,
    })
}

fn view(name: &str, arr: &Bound<'_, PyAny>) -> PyResult<View> {
    if let Ok(cap) = arr.cast::<PyCapsule>() {
        return dlpack_view(name, cap);
    }
    let arr = arr.cast::<PyUntypedArray>().map_err(|_| {
        PyTypeError::new_err(format!(
            "{name} must be a numpy.ndarray, got {}",
            arr.get_type()
                .name()
                .map_or_else(|_| "?".into(), |n| n.to_string())
        ))
    })?;
    let dt = arr.dtype();
    let (kind, size) = (dt.kind(), dt.itemsize());
    let dtype = match (kind, size) {
        (b'f', 2) => Dtype::F16,
        (b'f', 4) => Dtype::F32,
        (b'f', 8) => Dtype::F64,
        _ => {
            return Err(PyTypeError::new_err(format!(
                "{name} must be a float16, float32 or float64 array, got dtype {}",
                dt.str().map_or_else(|_| "?".into(), |s| s.to_string())
            )))
        }
    };
    if dt.is_native_byteorder() == Some(false) {
        return Err(PyTypeError::new_err(format!(
            "{name} has non-native byte order ({}); convert it with .astype(x.dtype.newbyteorder('='))",
            dt.str()?
        )));
    }
    if arr.ndim() > MAX_DIMS {
        return Err(PyValueError::new_err(format!(
            "{name} has {} dimensions; at most {MAX_DIMS} are supported",
            arr.ndim()
        )));
    }
    // SAFETY: `arr` is a live ndarray; reading its header fields is what every NumPy C API
    // accessor does.
    let (ptr, flags) = unsafe {
        let fields = _PyArray_GET_ITEM_DATA(arr.as_array_ptr());
        ((*fields).data as *mut u8, (*fields).flags)
    };
    Ok(View {
        ptr,
        shape: arr.shape().to_vec(),
        strides: arr.strides().to_vec(),
        dtype,
        writeable: flags & NPY_ARRAY_WRITEABLE != 0,
    })
}

/// Checks that `out` can be written as the result of reading `inputs`.
fn check_output(out: &View, inputs: &[&View]) -> PyResult<()> {
    if !out.writeable {
        return Err(PyValueError::new_err(
            "the output array is read-only; pass a writeable array or use inplace=False",
        ));
    }
    let empty = out.shape.contains(&0);
    for (&n, &s) in out.shape.iter().zip(&out.strides) {
        if n > 1 && s == 0 && !empty {
            return Err(PyValueError::new_err(
                "cannot write into an array with a zero stride (a broadcast view): several elements share one address; use inplace=False or pass a copy",
            ));
        }
    }
    if !empty && out.elements_may_overlap() {
        return Err(PyValueError::new_err(format!(
            "cannot write into an array whose elements overlap (shape {:?}, strides {:?} bytes): several elements share bytes; use inplace=False or pass a copy",
            out.shape, out.strides
        )));
    }
    for v in inputs {
        if v.shape != out.shape {
            return Err(PyValueError::new_err(format!(
                "shape mismatch: input {:?} vs output {:?}",
                v.shape, out.shape
            )));
        }
        if v.dtype != out.dtype {
            return Err(PyTypeError::new_err(format!(
                "dtype mismatch: {:?} vs {:?}",
                v.dtype, out.dtype
            )));
        }
        if !v.same_view(out) && v.overlaps(out) {
            return Err(PyValueError::new_err(
                "the output overlaps an input without being the same view; pass a fresh output",
            ));
        }
    }
    Ok(())
}

fn check_mask_shape(shape: &[usize], mask_shape: &[usize]) -> PyResult<()> {
    if mask_shape.len() != shape.len()
        || shape
            .iter()
            .zip(mask_shape)
            .any(|(&n, &m)| m != n && m != 1)
    {
        return Err(PyValueError::new_err(format!(
            "mask shape {mask_shape:?} does not broadcast to {shape:?}"
        )));
    }
    Ok(())
}

fn parse_application(app: &Bound<'_, PyTuple>) -> PyResult<Application> {
    let kind = app.get_item(0)?;
    let kind = kind.cast::<PyString>()?.to_cow()?;
    let f = |i: usize| -> PyResult<f64> { app.get_item(i)?.extract() };
    match kind.as_ref() {
        "scale" => Ok(Application::Scale { scale: f(1)? }),
        "affine" => Ok(Application::Affine {
            a: f(1)?,
            shift: f(2)?,
            dropped: f(3)?,
        }),
        "noise" => Ok(Application::Noise {
            scale: f(1)?,
            key: Key { seed: 0, stream: 0 },
            first_block: 0,
        }),
        _ => Err(PyValueError::new_err(format!(
            "unknown application {kind:?}"
        ))),
    }
}

/// Runs the kernel for the views' dtype with the GIL released.
/// Below this many elements the kernel takes less time than releasing and retaking the GIL.
const RELEASE_GIL_MIN: usize = 1 << 14;

/// Outputs this large are worth backing with transparent huge pages.
const HUGE_PAGE_MIN: usize = 4 << 20;

/// Asks the OS to back a fresh output with transparent huge pages before the kernel's first
/// write faults it in. NumPy advises its own large allocations this way, torch's CPU allocator
/// does not: with 4 KiB pages, faulting in a 256 MiB tensor costs about three times the copy.
/// Only the whole 2 MiB pages inside the output's extent are advised; it is a hint, and an
/// error (e.g. THP disabled) changes nothing.
fn advise_huge_pages(out: &View) {
    #[cfg(target_os = "linux")]
    {
        const HUGE: usize = 2 << 20;
        let (lo, hi) = out.extent();
        let (start, end) = (lo.next_multiple_of(HUGE), hi - hi % HUGE);
        if hi - lo >= HUGE_PAGE_MIN && end > start {
            // SAFETY: [start, end) lies inside the output's own extent; MADV_HUGEPAGE only
            // changes how the kernel backs those pages, never their contents.
            unsafe {
                libc::madvise(start as *mut libc::c_void, end - start, libc::MADV_HUGEPAGE);
            }
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = (out, HUGE_PAGE_MIN);
}

fn run_kernel(
    py: Python<'_>,
    x: &View,
    out: &View,
    res: Option<&View>,
    mask_shape: &[usize],
    bits: Bits<'_>,
    app: Application,
) {
    struct Job<'a> {
        x: &'a View,
        out: &'a View,
        res: Option<&'a View>,
        mask_shape: &'a [usize],
        bits: Bits<'a>,
        app: Application,
    }
    // SAFETY: the views point into arrays this call keeps alive; raw pointers are only carried.
    unsafe impl Send for Job<'_> {}
    if !x.same_view(out) {
        advise_huge_pages(out);
    }
    let job = Job {
        x,
        out,
        res,
        mask_shape,
        bits,
        app,
    };
    let work = move || {
        let job = job;
        let (shape, ms) = (&job.x.shape, job.mask_shape);
        let (src, dst, res) = (
            job.x.operand(),
            job.out.operand(),
            job.res.map(|r| r.operand()),
        );
        // SAFETY: `view` read the pointers, shapes and strides from live ndarrays of this dtype,
        // so every index of `shape` addresses an element of the array; `check_output` refused
        // read-only and zero-stride outputs and outputs that overlap an input without being
        // the same view; mask sizes were checked by the callers below.
        unsafe {
            match job.x.dtype {
                Dtype::F16 => kernel::run::<f16>(shape, ms, src, dst, res, job.bits, &job.app),
                Dtype::BF16 => kernel::run::<bf16>(shape, ms, src, dst, res, job.bits, &job.app),
                Dtype::F32 => kernel::run::<f32>(shape, ms, src, dst, res, job.bits, &job.app),
                Dtype::F64 => kernel::run::<f64>(shape, ms, src, dst, res, job.bits, &job.app),
            }
        }
    };
    if x.shape.iter().product::<usize>() >= RELEASE_GIL_MIN {
        py.detach(work)
    } else {
        work()
    }
}

/// Outputs at least this large (bytes) come from the buffer cache (`buffer`): smaller ones are
/// recycled well enough by the allocator's own heap.
const CACHED_OUTPUT_MIN: usize = 4 << 20;

/// Owns the cached buffer under a NumPy array made by `empty_like`, as the array's base object;
/// NumPy drops it with the last array or view of the buffer, which returns it to the cache.
#[pyclass(module = "fastdrop._core", frozen)]
struct CachedBuffer {
    buf: Option<Buffer>,
}

impl Drop for CachedBuffer {
    fn drop(&mut self) {
        if let Some(b) = self.buf.take() {
            buffer::give(b);
        }
    }
}

/// `np.empty_like(x)` (order 'K', uninitialised), with large C- or Fortran-ordered outputs of a
/// plain ndarray taken from the buffer cache so that they need not be faulted in afresh.
#[pyfunction]
fn empty_like<'py>(py: Python<'py>, x: &Bound<'py, PyUntypedArray>) -> PyResult<Bound<'py, PyAny>> {
    let bytes = x.len() * x.dtype().itemsize();
    let (c, f) = (x.is_c_contiguous(), x.is_fortran_contiguous());
    // SAFETY: `x` is a live object; PyArray_CheckExact only reads its type.
    let exact = unsafe { PyArray_CheckExact(py, x.as_ptr()) } != 0;
    let cached = if bytes >= CACHED_OUTPUT_MIN && exact && (c || f) {
        buffer::take(bytes)
    } else {
        None
    };
    let Some(buf) = cached else {
        // The cache is out of reach (small, a subclass, another layout, or allocation failed).
        // SAFETY: `x` is a live ndarray; NewLikeArray returns a new reference or NULL with an
        // exception set; a NULL descr means "x's dtype".
        let arr = unsafe {
            PY_ARRAY_API.PyArray_NewLikeArray(
                py,
                x.as_array_ptr(),
                NPY_ORDER::NPY_KEEPORDER,
                std::ptr::null_mut(),
                1,
            )
        };
        // SAFETY: an owned reference or NULL, as above.
        return unsafe { Bound::from_owned_ptr_or_err(py, arr) };
    };
    array_on(py, buf, &x.dtype(), x.shape(), !c)
}

/// A new uninitialised C-ordered array of `shape` and `dtype` on a cached buffer, or `None`
/// when the cache does not serve it (too small, the cache turned off, or no memory): torch's
/// large CPU outputs are built on it (`torch.from_numpy`), the rest come from torch.
#[pyfunction]
fn cached_empty<'py>(
    py: Python<'py>,
    shape: Vec<usize>,
    dtype: &Bound<'py, PyArrayDescr>,
) -> PyResult<Option<Bound<'py, PyAny>>> {
    let bytes = shape
        .iter()
        .try_fold(dtype.itemsize(), |a, &d| a.checked_mul(d));
    match bytes {
        Some(n) if n >= CACHED_OUTPUT_MIN => match buffer::take(n) {
            Some(buf) => array_on(py, buf, dtype, &shape, false).map(Some),
            None => Ok(None),
        },
        _ => Ok(None),
    }
}

/// A NumPy array of `shape` and `dtype` (C or, `fortran`, Fortran ordered) over `buf`, which
/// must hold it; the array owns the buffer (see `CachedBuffer`).
fn array_on<'py>(
    py: Python<'py>,
    buf: Buffer,
    dtype: &Bound<'py, PyArrayDescr>,
    shape: &[usize],
    fortran: bool,
) -> PyResult<Bound<'py, PyAny>> {
    debug_assert!(shape.iter().product::<usize>() * dtype.itemsize() <= buf.len());
    let data = buf.as_ptr();
    let owner = Bound::new(py, CachedBuffer { buf: Some(buf) })?;
    let mut dims: Vec<npy_intp> = shape.iter().map(|&n| n as npy_intp).collect();
    let flags = if fortran {
        NPY_ARRAY_FARRAY
    } else {
        NPY_ARRAY_CARRAY
    };
    // SAFETY: NewFromDescr steals the descr reference we create with into_ptr; `data` points to
    // `buf`, 2 MiB aligned and large enough for the array (the callers took it for this size),
    // which `owner` keeps alive; NULL strides with these flags lay the array out C or Fortran
    // contiguous within it. SetBaseObject steals the owner reference (also on failure), tying
    // the buffer's life to the array's.
    unsafe {
        let arr = PY_ARRAY_API.PyArray_NewFromDescr(
            py,
            get_type_object(py, NpyTypes::PyArray_Type),
            dtype.clone().into_ptr().cast(),
            dims.len() as std::ffi::c_int,
            dims.as_mut_ptr(),
            std::ptr::null_mut(),
            data.cast(),
            flags,
            std::ptr::null_mut(),
        );
        let arr = Bound::from_owned_ptr_or_err(py, arr)?;
        if PY_ARRAY_API.PyArray_SetBaseObject(
            py,
            arr.as_ptr().cast::<PyArrayObject>(),
            owner.into_ptr(),
        ) < 0
        {
            return Err(PyErr::fetch(py));
        }
        Ok(arr)
    }
}

/// Frees the cached output buffers; returns the bytes released.
#[pyfunction]
fn empty_cache() -> usize {
    buffer::empty_cache()
}

/// Bytes of output buffers held for reuse.
#[pyfunction]
fn cached_bytes() -> usize {
    buffer::cached_bytes()
}

fn check_prob(name: &str, p: f64) -> PyResult<()> {
    if !(0.0..=1.0).contains(&p) {
        return Err(PyValueError::new_err(format!(
            "{name} has to be between 0 and 1, but got {p}"
        )));
    }
    Ok(())
}

/// `out = application(mask, x) [+ residual]` with a fresh Bernoulli(keep) mask of `mask_shape`
/// drawn from `generator`. Returns the mask when `store_mask`.
#[pyfunction]
#[pyo3(signature = (x, out, residual, mask_shape, application, keep, generator, store_mask))]
#[allow(clippy::too_many_arguments)]
fn bernoulli_apply(
    py: Python<'_>,
    x: &Bound<'_, PyAny>,
    out: &Bound<'_, PyAny>,
    residual: Option<&Bound<'_, PyAny>>,
    mask_shape: Vec<usize>,
    application: &Bound<'_, PyTuple>,
    keep: f64,
    generator: &Generator,
    store_mask: bool,
) -> PyResult<Option<MaskBits>> {
    check_prob("keep probability", keep)?;
    let (xv, ov) = (view("input", x)?, view("out", out)?);
    let rv = residual.map(|r| view("residual", r)).transpose()?;
    let mut inputs = vec![&xv];
    inputs.extend(rv.as_ref());
    check_output(&ov, &inputs)?;
    check_mask_shape(&xv.shape, &mask_shape)?;
    let mut app = parse_application(application)?;
    let n: usize = xv.shape.iter().product();
    let m: usize = mask_shape.iter().product();
    let noise_blocks = if matches!(app, Application::Noise { .. }) {
        blocks_for_normals(m)
    } else {
        0
    };
    let (key, first) = generator
        .state
        .reserve(blocks_for_decisions(m) + noise_blocks);
    if let Application::Noise {
        key: k,
        first_block,
        ..
    } = &mut app
    {
        *k = key;
        *first_block = first.wrapping_add(blocks_for_decisions(m));
    }
    let threshold = threshold_for(keep);
    if mask_shape == xv.shape {
        let mut store = if store_mask {
            vec![0u64; kernel::words_for(n)]
        } else {
            Vec::new()
        };
        let bits = Bits::Fresh {
            key,
            first_block: first,
            threshold,
            store: store_mask.then_some(&mut store[..]),
        };
        run_kernel(py, &xv, &ov, rv.as_ref(), &mask_shape, bits, app);
        Ok(store_mask.then_some(MaskBits {
            shape: mask_shape,
            words: store,
        }))
    } else {
        let words = py.detach(|| kernel::bernoulli_words(key, first, threshold, m));
        run_kernel(
            py,
            &xv,
            &ov,
            rv.as_ref(),
            &mask_shape,
            Bits::Given(&words),
            app,
        );
        Ok(store_mask.then_some(MaskBits {
            shape: mask_shape,
            words,
        }))
    }
}

/// DropBlock on an (N, C, H, W) array: seeds Bernoulli(gamma) over (N, C or 1, H, W), grown to
/// kh x kw blocks. Kept pixels are scaled by numel / kept when `scale_by_keep` (and left as they
/// are with noise); dropped ones become 0 or, `with_noise`, N(0, 1) noise. Returns the mask.
#[pyfunction]
#[pyo3(signature = (x, out, gamma, kh, kw, couple_channels, with_noise, scale_by_keep, generator))]
#[allow(clippy::too_many_arguments)]
fn drop_block_apply(
    py: Python<'_>,
    x: &Bound<'_, PyAny>,
    out: &Bound<'_, PyAny>,
    gamma: f64,
    kh: usize,
    kw: usize,
    couple_channels: bool,
    with_noise: bool,
    scale_by_keep: bool,
    generator: &Generator,
) -> PyResult<(MaskBits, f64)> {
    check_prob("gamma (the block seed rate)", gamma)?;
    let (xv, ov) = (view("input", x)?, view("out", out)?);
    check_output(&ov, &[&xv])?;
    let [n, c, h, w] = xv.shape[..] else {
        return Err(PyValueError::new_err(format!(
            "drop_block_2d expects a 4-D (N, C, H, W) input, got shape {:?}",
            xv.shape
        )));
    };
    if kh == 0 || kw == 0 || kh > h.max(1) || kw > w.max(1) {
        return Err(PyValueError::new_err(format!(
            "block {kh}x{kw} does not fit a {h}x{w} map"
        )));
    }
    let cm = if couple_channels { 1 } else { c };
    let mask_shape = vec![n, cm, h, w];
    let g = BlockGeometry {
        maps: n * cm,
        h,
        w,
        kh,
        kw,
    };
    let m = n * cm * h * w;
    let noise_blocks = if with_noise { blocks_for_normals(m) } else { 0 };
    let (key, first) = generator
        .state
        .reserve(blocks_for_decisions(m) + noise_blocks);
    let (words, kept) = if m == 0 {
        (Vec::new(), 0)
    } else {
        py.detach(|| block_keep_words(key, first, threshold_for(gamma), g))
    };
    let scale = if !with_noise && scale_by_keep && kept > 0 {
        m as f64 / kept as f64
    } else {
        1.0
    };
    let app = if with_noise {
        Application::Noise {
            scale: 1.0,
            key,
            first_block: first.wrapping_add(blocks_for_decisions(m)),
        }
    } else {
        Application::Scale { scale }
    };
    run_kernel(py, &xv, &ov, None, &mask_shape, Bits::Given(&words), app);
    Ok((
        MaskBits {
            shape: mask_shape,
            words,
        },
        scale,
    ))
}

/// `out = x * mask * scale [+ residual]`: the backward of every variant, and the forward replay
/// of a saved mask.
#[pyfunction]
#[pyo3(signature = (mask, x, out, scale, residual = None))]
fn mask_apply(
    py: Python<'_>,
    mask: &MaskBits,
    x: &Bound<'_, PyAny>,
    out: &Bound<'_, PyAny>,
    scale: f64,
    residual: Option<&Bound<'_, PyAny>>,
) -> PyResult<()> {
    let (xv, ov) = (view("grad", x)?, view("out", out)?);
    let rv = residual.map(|r| view("residual", r)).transpose()?;
    let mut inputs = vec![&xv];
    inputs.extend(rv.as_ref());
    check_output(&ov, &inputs)?;
    check_mask_shape(&xv.shape, &mask.shape)?;
    run_kernel(
        py,
        &xv,
        &ov,
        rv.as_ref(),
        &mask.shape,
        Bits::Given(&mask.words),
        Application::Scale { scale },
    );
    Ok(())
}

#[pyfunction]
fn set_num_threads(n: usize) -> PyResult<()> {
    Ok(kernel::set_num_threads(n)?)
}

#[pyfunction]
fn get_num_threads() -> usize {
    kernel::get_num_threads()
}

/// Why `FASTDROP_NUM_THREADS` was ignored, or None; `fastdrop` warns with it at import.
#[pyfunction]
fn num_threads_env_warning() -> Option<String> {
    crate::threads::num_threads_env_warning()
}

/// The generator backend in use: "vaes", "aesni" or "portable".
#[pyfunction]
fn simd_backend() -> &'static str {
    match rng::backend() {
        rng::Backend::Vaes => "vaes",
        rng::Backend::AesNi => "aesni",
        rng::Backend::Portable => "portable",
    }
}

#[pymodule]
fn _core(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<Generator>()?;
    m.add_class::<MaskBits>()?;
    m.add_function(wrap_pyfunction!(_generator_from_state, m)?)?;
    m.add_function(wrap_pyfunction!(bernoulli_apply, m)?)?;
    m.add_function(wrap_pyfunction!(drop_block_apply, m)?)?;
    m.add_function(wrap_pyfunction!(mask_apply, m)?)?;
    m.add_function(wrap_pyfunction!(set_num_threads, m)?)?;
    m.add_function(wrap_pyfunction!(get_num_threads, m)?)?;
    m.add_function(wrap_pyfunction!(num_threads_env_warning, m)?)?;
    m.add("MAX_THREADS", crate::threads::MAX_THREADS)?;
    m.add_function(wrap_pyfunction!(simd_backend, m)?)?;
    m.add_function(wrap_pyfunction!(empty_like, m)?)?;
    m.add_function(wrap_pyfunction!(cached_empty, m)?)?;
    m.add_function(wrap_pyfunction!(empty_cache, m)?)?;
    m.add_function(wrap_pyfunction!(cached_bytes, m)?)?;
    Ok(())
}
