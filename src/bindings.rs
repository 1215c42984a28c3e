//! The PyO3 layer: reads NumPy arrays and DLPack capsules into `View`s and `_spec.py`'s
//! dataclasses into a `Spec`, hands them to `call` (which checks, reserves counters and runs the
//! kernel), releases the GIL around the prepared work, and maps `DropError` to Python exceptions
//! in one place. No maths and no call logic here.

use crate::attention;
use crate::buffer::{self, Buffer};
use crate::call::{self, Operands, StoredMask};
use crate::error::{DropError, ErrorKind};
use crate::generator::{blocks_for_decisions, blocks_for_normals, fork_stream, GeneratorState};
use crate::kernel;
use crate::rng::{self, threshold_for};
use crate::spec::{self, Application, Mask, Spec};
use crate::view::{c_strides, check_dense, Dtype, View};
use half::{bf16, f16};
use numpy::npyffi::{
    get_type_object, npy_intp, objects::_PyArray_GET_ITEM_DATA, NpyTypes, PyArrayObject,
    PyArray_CheckExact, NPY_ARRAY_CARRAY, NPY_ARRAY_FARRAY, NPY_ARRAY_OWNDATA, NPY_ARRAY_WRITEABLE,
    NPY_ORDER, PY_ARRAY_API,
};
use numpy::{PyArrayDescr, PyArrayDescrMethods, PyUntypedArray, PyUntypedArrayMethods};
use pyo3::exceptions::{PyMemoryError, PyOverflowError, PyTypeError, PyValueError};
use pyo3::intern;
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyCapsule, PyString, PyTuple, PyWeakrefReference};

/// The one place a core error becomes a Python exception: by its kind, with its message.
impl From<DropError> for PyErr {
    fn from(e: DropError) -> PyErr {
        let message = e.to_string();
        match e.kind() {
            ErrorKind::Value => PyValueError::new_err(message),
            ErrorKind::Type => PyTypeError::new_err(message),
            ErrorKind::Memory => PyMemoryError::new_err(message),
        }
    }
}

/// Most dimensions an input may have (NumPy's own limit is 64).
const MAX_DIMS: usize = 64;

// --- integer arguments ----------------------------------------------------------------------

fn type_name(v: &Bound<'_, PyAny>) -> String {
    v.get_type()
        .name()
        .map_or_else(|_| "?".into(), |n| n.to_string())
}

/// A Python int in [0, 2**64): a `ValueError` naming the range for any other int (PyO3 alone
/// would raise `OverflowError`), a `TypeError` for anything that is not an int.
fn u64_arg(name: &str, v: &Bound<'_, PyAny>) -> PyResult<u64> {
    v.extract::<u64>().map_err(|e| {
        if e.is_instance_of::<PyOverflowError>(v.py()) {
            PyValueError::new_err(format!("{name} must be in [0, 2**64), got {v}"))
        } else {
            PyTypeError::new_err(format!("{name} must be an int, got {}", type_name(v)))
        }
    })
}

/// A shape: a sequence of at most `MAX_DIMS` ints, each in [0, 2**63) as NumPy's are.
fn shape_arg(name: &str, v: &Bound<'_, PyAny>) -> PyResult<Vec<usize>> {
    let range_err = || {
        PyValueError::new_err(format!(
            "{name} must have at most {MAX_DIMS} dimensions, each in [0, 2**63), got {}",
            v.repr().map_or_else(|_| "?".to_string(), |r| r.to_string())
        ))
    };
    let shape = match v.extract::<Vec<usize>>() {
        Ok(shape) => shape,
        Err(_) => {
            let items: Vec<Bound<'_, PyAny>> = v.extract().map_err(|_| {
                PyTypeError::new_err(format!(
                    "{name} must be a sequence of ints, got {}",
                    type_name(v)
                ))
            })?;
            for d in &items {
                if let Err(e) = d.extract::<u64>() {
                    if !e.is_instance_of::<PyOverflowError>(v.py()) {
                        return Err(PyTypeError::new_err(format!(
                            "{name} must be a sequence of ints, got a {} in it",
                            type_name(d)
                        )));
                    }
                }
            }
            return Err(range_err());
        }
    };
    if shape.len() > MAX_DIMS || shape.iter().any(|&d| d > isize::MAX as usize) {
        return Err(range_err());
    }
    Ok(shape)
}

/// `(seed, stream, offset)` as `get_state` returns it.
fn state_arg(state: &Bound<'_, PyAny>) -> PyResult<(u64, u64, u64)> {
    if let Ok(s) = state.extract::<(u64, u64, u64)>() {
        return Ok(s);
    }
    let type_err = || {
        PyTypeError::new_err(format!(
            "state must be a (seed, stream, offset) tuple of three non-negative ints as returned by get_state(), got {}",
            state.repr().map_or_else(|_| "?".to_string(), |r| r.to_string())
        ))
    };
    let (a, b, c) = state
        .extract::<(Bound<'_, PyAny>, Bound<'_, PyAny>, Bound<'_, PyAny>)>()
        .map_err(|_| type_err())?;
    let field = |name: &str, v: &Bound<'_, PyAny>| {
        u64_arg(&format!("state's {name}"), v).map_err(|e| {
            if e.is_instance_of::<PyTypeError>(v.py()) {
                type_err()
            } else {
                e
            }
        })
    };
    Ok((
        field("seed", &a)?,
        field("stream", &b)?,
        field("offset", &c)?,
    ))
}

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
    #[pyo3(signature = (seed = None, stream = None))]
    fn new(seed: Option<&Bound<'_, PyAny>>, stream: Option<&Bound<'_, PyAny>>) -> PyResult<Self> {
        let seed = match seed {
            Some(s) if !s.is_none() => seed_bits(s)?,
            _ => entropy_seed(),
        };
        let stream = stream.map_or(Ok(0), |s| u64_arg("stream", s))?;
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
        let (seed, stream, offset) = state_arg(state)?;
        self.state.set_state(seed, stream, offset);
        Ok(())
    }

    /// A generator with the same seed on an independent stream, e.g. one per distributed rank:
    /// `Generator(seed).fork(rank)`. Forking twice with the same index gives the same stream.
    fn fork(&self, index: &Bound<'_, PyAny>) -> PyResult<Self> {
        let index = u64_arg("fork index", index)?;
        let (seed, stream, _) = self.state.state();
        Ok(Generator {
            state: GeneratorState::new(seed, fork_stream(stream, index), 0),
        })
    }

    /// Takes `blocks` counter blocks as one call would; returns the first.
    fn _reserve(&self, blocks: &Bound<'_, PyAny>) -> PyResult<u64> {
        let blocks = u64_arg("blocks", blocks)?;
        Ok(self.state.reserve(blocks)?.1)
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
fn _generator_from_state(state: &Bound<'_, PyAny>) -> PyResult<Generator> {
    let (seed, stream, offset) = state_arg(state)?;
    Ok(Generator {
        state: GeneratorState::new(seed, stream, offset),
    })
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

impl From<StoredMask> for MaskBits {
    fn from(m: StoredMask) -> Self {
        MaskBits {
            shape: m.shape,
            words: m.words,
        }
    }
}

#[pymethods]
impl MaskBits {
    /// A mask of `shape` with every decision equal to `keep`.
    #[staticmethod]
    fn filled(shape: &Bound<'_, PyAny>, keep: bool) -> PyResult<Self> {
        let shape = shape_arg("shape", shape)?;
        // A broadcast view can be far larger than memory: a failed allocation must be a
        // MemoryError, not an abort of the interpreter.
        let n = (shape.iter().try_fold(1usize, |a, &d| a.checked_mul(d))).ok_or_else(|| {
            PyValueError::new_err(format!("mask shape {shape:?} has more than 2**64 elements"))
        })?;
        let mut words = call::zeroed_words(n, &shape)?;
        if keep {
            words.fill(u64::MAX);
        }
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

fn dlpack_view<'a>(name: &str, cap: &'a Bound<'_, PyCapsule>) -> PyResult<View<'a>> {
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
    if ndim > 0 && t.shape.is_null() {
        return Err(PyValueError::new_err(format!(
            "{name}: DLPack tensor of {ndim} dimensions has no shape"
        )));
    }
    // SAFETY: DLPack guarantees `shape` (and `strides`, unless NULL) point to `ndim` int64s;
    // a NULL shape was refused above.
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
    let too_large = || {
        PyValueError::new_err(format!(
            "{name}: DLPack shape {shape:?} with strides {elem_strides:?} spans more bytes than an address space has"
        ))
    };
    // Only a hand-made capsule can fail these (torch's tensors fit in memory); without them the
    // extent and stride arithmetic below could wrap.
    if !shape.contains(&0) {
        shape
            .iter()
            .try_fold(itemsize as usize, |a, &d| a.checked_mul(d))
            .filter(|&b| b <= isize::MAX as usize)
            .ok_or_else(too_large)?;
    }
    let strides: Vec<isize> = match &elem_strides {
        Some(s) => s
            .iter()
            .map(|&e| {
                isize::try_from(e)
                    .ok()
                    .and_then(|e| e.checked_mul(itemsize))
            })
            .collect::<Option<Vec<isize>>>()
            .ok_or_else(too_large)?,
        // NULL strides: compact row-major.
        None => c_strides(&shape, itemsize as usize),
    };
    if !shape.contains(&0) {
        let mut span = itemsize;
        for (&n, &s) in shape.iter().zip(&strides) {
            span = s
                .checked_abs()
                .and_then(|s| s.checked_mul(n as isize - 1))
                .and_then(|step| span.checked_add(step))
                .ok_or_else(too_large)?;
        }
    }
    // torch exports a ZeroTensor (an autograd zero with no storage) with a NULL data pointer;
    // reading its elements there would be a segmentation fault.
    if t.data.is_null() && !shape.contains(&0) {
        return Err(PyValueError::new_err(format!(
            "{name}: DLPack tensor of shape {shape:?} has no data (a NULL pointer, as torch \
             exports a ZeroTensor); materialise it first"
        )));
    }
    let ptr = (t.data as *mut u8).wrapping_add(t.byte_offset as usize);
    // SAFETY: by the DLPack protocol the tensor's elements lie at data + byte_offset plus the
    // index times the strides, and the producer keeps them alive while the capsule lives,
    // which the borrowed `cap` does for 'a; the extent was checked to fit an isize above; a
    // versioned tensor flagged read-only is not writeable (a legacy one has no such flag).
    Ok(unsafe { View::new(ptr, shape, strides, dtype, writeable) })
}

/// Keeps the memory of a NumPy operand where it is until `pins` is dropped, so that it cannot be
/// freed while a kernel runs on it with the GIL released.
///
/// The only way NumPy frees an array's memory under a live array is `ndarray.resize` on the
/// array that owns it (views refuse to resize). It refuses an array that has a weak reference,
/// even with `refcheck=False`; a PEP 3118 buffer export does not stop it. So the owner (the end
/// of the chain of `base` arrays) gets a weak reference for the length of the call. Memory that
/// another kind of object owns (a `bytearray`, an `mmap`, fastdrop's cache) is held by the array
/// through a buffer export or a reference, and lives at least as long as the array the call holds.
/// A DLPack capsule needs nothing: it holds its own reference to the tensor's storage.
fn pin_memory<'py>(
    arr: &Bound<'py, PyUntypedArray>,
    pins: &mut Vec<Bound<'py, PyAny>>,
) -> PyResult<()> {
    let py = arr.py();
    let mut owner = arr.clone();
    loop {
        // SAFETY: `owner` is a live ndarray; reading a header field, as NumPy's accessors do.
        let base = unsafe { (*_PyArray_GET_ITEM_DATA(owner.as_array_ptr())).base };
        if base.is_null() {
            break;
        }
        // SAFETY: `base` is a live object: the array holds a reference to it.
        let base = unsafe { Bound::from_borrowed_ptr(py, base) };
        match base.cast_into::<PyUntypedArray>() {
            Ok(b) => owner = b,
            Err(_) => return Ok(()),
        }
    }
    // SAFETY: as above.
    let flags = unsafe { (*_PyArray_GET_ITEM_DATA(owner.as_array_ptr())).flags };
    if flags & NPY_ARRAY_OWNDATA != 0 {
        pins.push(PyWeakrefReference::new(&owner)?.into_any());
    }
    Ok(())
}

/// Reads an operand: a NumPy array or a CPU DLPack capsule. An array large enough that the kernel
/// will release the GIL is pinned into `pins` first (see `pin_memory`), before anything is read,
/// so that what is read stays valid.
fn view<'a, 'py>(
    name: &str,
    arr: &'a Bound<'py, PyAny>,
    pins: &mut Vec<Bound<'py, PyAny>>,
) -> PyResult<View<'a>> {
    if let Ok(cap) = arr.cast::<PyCapsule>() {
        return dlpack_view(name, cap);
    }
    let arr = arr.cast::<PyUntypedArray>().map_err(|_| {
        PyTypeError::new_err(format!(
            "{name} must be a numpy.ndarray, got {}",
            type_name(arr)
        ))
    })?;
    if arr.len() >= RELEASE_GIL_MIN {
        pin_memory(arr, pins)?;
    }
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
    // SAFETY: NumPy's own invariant: an ndarray's data pointer, shape and strides address its
    // elements, within an extent that fits an isize; the borrowed `arr` keeps them alive for
    // 'a, and `pin_memory` keeps a large array's memory from being resized away while the GIL
    // is released; NumPy's WRITEABLE flag says whether they may be written.
    Ok(unsafe {
        View::new(
            ptr,
            arr.shape().to_vec(),
            arr.strides().to_vec(),
            dtype,
            flags & NPY_ARRAY_WRITEABLE != 0,
        )
    })
}

/// Reads a call's operands (`x` under the name `x_name`), pinned into `pins` as `view` does.
fn operands<'a, 'py>(
    x_name: &str,
    x: &'a Bound<'py, PyAny>,
    out: &'a Bound<'py, PyAny>,
    residual: Option<&'a Bound<'py, PyAny>>,
    pins: &mut Vec<Bound<'py, PyAny>>,
) -> PyResult<Operands<'a>> {
    Ok(Operands::new(
        view(x_name, x, pins)?,
        view("out", out, pins)?,
        residual.map(|r| view("residual", r, pins)).transpose()?,
    ))
}

/// Below this many elements the kernel takes less time than releasing and retaking the GIL.
const RELEASE_GIL_MIN: usize = 1 << 14;

/// Outputs this large are worth backing with transparent huge pages.
const HUGE_PAGE_MIN: usize = 4 << 20;

/// Asks the OS to back a fresh output with transparent huge pages before the kernel's first
/// write faults it in. NumPy advises its own large allocations this way, torch's CPU allocator
/// does not: with 4 KiB pages, faulting in a 256 MiB tensor costs about three times the copy.
/// Only the whole 2 MiB pages inside the output's extent are advised; it is a hint, and an
/// error (e.g. THP disabled) changes nothing.
fn advise_huge_pages(out: &View<'_>) {
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

/// Runs a prepared call, with the GIL released when it is large enough to be worth it. Only a
/// call that large had its NumPy operands pinned (`view`), so a smaller one keeps the GIL: its
/// operands must not change meanwhile.
///
/// A call on torch's storage (`x` a DLPack capsule) may run on torch's threads (`team`).
fn run_call(py: Python<'_>, x: &Bound<'_, PyAny>, call: call::Call<'_>) -> call::Applied {
    let ops = call.operands();
    if !ops.is_in_place() {
        advise_huge_pages(ops.out());
    }
    if call.len() >= RELEASE_GIL_MIN {
        let torch = x.cast::<PyCapsule>().is_ok();
        py.detach(move || crate::threads::on_torch_storage(torch, || call.run()))
    } else {
        call.run()
    }
}

/// Outputs at least this large (bytes) come from the buffer cache (`buffer`): smaller ones are
/// recycled well enough by the allocator's own heap. From 4 MiB it cut timm DropPath rows of
/// 2.4-3.2 MiB from 0.97-1.00x to 1.02-1.13x of timm's speed (medians of 9 alternating
/// `bench --layers` runs; glibc's heap hands such sizes back to the OS and faults them in
/// again); a buffer is a whole number of 2 MiB granules, so one of 1 MiB reserves twice its size.
const CACHED_OUTPUT_MIN: usize = 1 << 20;

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
    let dtype = x.dtype();
    check_plain_dtype("empty_like: x", &dtype)?;
    let bytes = x.len() * dtype.itemsize();
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
    array_on(py, buf, &dtype, x.shape(), !c)
}

/// A new uninitialised C-ordered array of `shape` and `dtype` on a cached buffer, or `None`
/// when the cache does not serve it (too small, the cache turned off, or no memory): torch's
/// large CPU outputs are built on it (`torch.from_numpy`), the rest come from torch.
#[pyfunction]
fn cached_empty<'py>(
    py: Python<'py>,
    shape: &Bound<'py, PyAny>,
    dtype: &Bound<'py, PyArrayDescr>,
) -> PyResult<Option<Bound<'py, PyAny>>> {
    let shape = shape_arg("cached_empty: shape", shape)?;
    check_plain_dtype("cached_empty: dtype", dtype)?;
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

/// Refuses a dtype the cache must not serve: its buffers are uninitialised, which is harmless
/// only for plain numbers (every bit pattern is a value), never for object or structured dtypes
/// (reading an object array over recycled bytes dereferences garbage). The four the kernels
/// use are served: float16, float32, float64 and uint16 (bfloat16's words, for torch).
fn check_plain_dtype(name: &str, dtype: &Bound<'_, PyArrayDescr>) -> PyResult<()> {
    match (dtype.kind(), dtype.itemsize()) {
        (b'f', 2 | 4 | 8) | (b'u', 2) => Ok(()),
        _ => Err(PyTypeError::new_err(format!(
            "{name} must be float16, float32, float64 or uint16, got dtype {}",
            dtype.str().map_or_else(|_| "?".into(), |s| s.to_string())
        ))),
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

// --- one call: the spec -----------------------------------------------------------------------

/// `obj.name`, a `TypeError` naming the field when `obj` has none. Names are interned
/// (`intern!`): a call reads about eight fields, and making each name afresh would cost as much
/// as a small call's kernel.
fn field<'py>(
    obj: &Bound<'py, PyAny>,
    path: &str,
    name: &Bound<'py, PyString>,
) -> PyResult<Bound<'py, PyAny>> {
    obj.getattr(name).map_err(|_| {
        PyTypeError::new_err(format!("{path} ({}) has no field '{name}'", type_name(obj)))
    })
}

/// A float field, a `TypeError` naming it when it is not a number.
fn float_field<'py>(
    obj: &Bound<'py, PyAny>,
    path: &str,
    name: &Bound<'py, PyString>,
) -> PyResult<f64> {
    let v = field(obj, path, name)?;
    v.extract::<f64>().map_err(|_| {
        PyTypeError::new_err(format!(
            "{path}.{name} must be a float, got {}",
            type_name(&v)
        ))
    })
}

/// A spec part's `kind` (a string class attribute in `_spec.py`).
fn kind_of<'py>(
    obj: &Bound<'py, PyAny>,
    path: &str,
    expected: &str,
) -> PyResult<Bound<'py, PyString>> {
    let bad = || {
        PyTypeError::new_err(format!(
            "{path} must be {expected}, got {}",
            obj.repr()
                .map_or_else(|_| "?".to_string(), |r| r.to_string())
        ))
    };
    let kind = obj.getattr(intern!(obj.py(), "kind")).map_err(|_| bad())?;
    kind.cast_into::<PyString>().map_err(|_| bad())
}

fn mask_arg(mask: &Bound<'_, PyAny>) -> PyResult<Mask> {
    const P: &str = "spec.mask";
    const EXPECTED: &str = "a Bernoulli or a Blocks (kind 'bernoulli' or 'blocks')";
    let py = mask.py();
    let shape = || shape_arg("spec.mask.shape", &field(mask, P, intern!(py, "shape"))?);
    match kind_of(mask, P, EXPECTED)?.to_cow()?.as_ref() {
        "bernoulli" => Ok(Mask::Bernoulli {
            shape: shape()?,
            keep: float_field(mask, P, intern!(py, "keep"))?,
        }),
        "blocks" => {
            let shape: [usize; 4] = shape()?.try_into().map_err(|s: Vec<usize>| {
                PyValueError::new_err(format!(
                    "spec.mask.shape of a Blocks mask must be (N, C or 1, H, W), got {s:?}"
                ))
            })?;
            let size = |path: &str, name: &Bound<'_, PyString>| -> PyResult<usize> {
                let v = u64_arg(path, &field(mask, P, name)?)?;
                usize::try_from(v)
                    .map_err(|_| PyValueError::new_err(format!("{path} is too large: {v}")))
            };
            Ok(Mask::Blocks {
                shape,
                gamma: float_field(mask, P, intern!(py, "gamma"))?,
                kh: size("spec.mask.kh", intern!(py, "kh"))?,
                kw: size("spec.mask.kw", intern!(py, "kw"))?,
            })
        }
        other => Err(PyTypeError::new_err(format!(
            "{P} must be {EXPECTED}, got kind '{other}'"
        ))),
    }
}

fn application_arg(app: &Bound<'_, PyAny>) -> PyResult<Application> {
    const P: &str = "spec.application";
    const EXPECTED: &str = "a Scale, ScaleByKept, Affine or Noise (kind 'scale', 'scale_by_kept', 'affine' or 'noise')";
    let py = app.py();
    let float = |name: &Bound<'_, PyString>| float_field(app, P, name);
    match kind_of(app, P, EXPECTED)?.to_cow()?.as_ref() {
        "scale" => Ok(Application::Scale {
            scale: float(intern!(py, "scale"))?,
        }),
        "scale_by_kept" => Ok(Application::ScaleByKept),
        "affine" => Ok(Application::Affine {
            a: float(intern!(py, "a"))?,
            shift: float(intern!(py, "shift"))?,
            dropped: float(intern!(py, "dropped"))?,
        }),
        "noise" => Ok(Application::Noise {
            scale: float(intern!(py, "scale"))?,
        }),
        other => Err(PyTypeError::new_err(format!(
            "{P} must be {EXPECTED}, got kind '{other}'"
        ))),
    }
}

/// A `fastdrop._spec.Spec` (or any object with its fields): read by each part's `kind` and its
/// field names. `grad_scale` and `origin` are Python's business and are not read.
impl<'a, 'py> FromPyObject<'a, 'py> for Spec {
    type Error = PyErr;

    fn extract(obj: Borrowed<'a, 'py, PyAny>) -> PyResult<Self> {
        let (obj, py) = (obj.to_owned(), obj.py());
        Ok(Spec {
            mask: mask_arg(&field(&obj, "spec", intern!(py, "mask"))?)?,
            application: application_arg(&field(&obj, "spec", intern!(py, "application"))?)?,
        })
    }
}

// --- one call: the entry points ---------------------------------------------------------------

/// What `_core.apply` returns: the mask's bits (when stored, and always for DropBlock), the first
/// counter block the call reserved, and the scale applied to kept elements.
#[pyclass(name = "Applied", module = "fastdrop._core", frozen)]
pub struct Applied {
    /// The mask (a `MaskBits`), or None when only its key was kept.
    #[pyo3(get)]
    bits: Option<Py<MaskBits>>,
    /// The first counter block the call reserved: a generator set to (seed, stream, this)
    /// draws the same mask again.
    #[pyo3(get)]
    first_block: u64,
    /// What kept elements were multiplied by (for `ScaleByKept`, numel / kept).
    #[pyo3(get)]
    scale: f64,
}

#[pymethods]
impl Applied {
    fn __repr__(&self) -> String {
        let bits = match &self.bits {
            Some(_) => "MaskBits",
            None => "None",
        };
        format!(
            "Applied(bits={bits}, first_block={}, scale={:?})",
            self.first_block, self.scale
        )
    }
}

/// `out = application(mask, x) [+ residual]` for the call `spec` describes, with its mask drawn
/// from `generator`: the one entry point every dropout variant goes through.
#[pyfunction]
#[pyo3(signature = (x, out, residual, spec, generator, store_mask))]
fn apply<'py>(
    py: Python<'py>,
    x: &Bound<'py, PyAny>,
    out: &Bound<'py, PyAny>,
    residual: Option<&Bound<'py, PyAny>>,
    spec: Spec,
    generator: &Generator,
    store_mask: bool,
) -> PyResult<Applied> {
    let mut pins = Vec::new();
    let ops = operands("x", x, out, residual, &mut pins)?;
    let done = run_call(
        py,
        x,
        call::prepare(&spec, ops, &generator.state, store_mask)?,
    );
    Ok(Applied {
        bits: done
            .bits
            .map(|b| Py::new(py, MaskBits::from(b)))
            .transpose()?,
        first_block: done.first_block,
        scale: done.scale,
    })
}

/// `out = x * mask * scale [+ residual]`: the backward of every variant, and the forward replay
/// of a saved mask.
#[pyfunction]
#[pyo3(signature = (mask, x, out, scale, residual = None))]
fn mask_apply<'py>(
    py: Python<'py>,
    mask: &MaskBits,
    x: &Bound<'py, PyAny>,
    out: &Bound<'py, PyAny>,
    scale: f64,
    residual: Option<&Bound<'py, PyAny>>,
) -> PyResult<()> {
    let mut pins = Vec::new();
    let ops = operands("grad", x, out, residual, &mut pins)?;
    run_call(py, x, call::replay(&mask.shape, &mask.words, scale, ops)?);
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

#[pyfunction]
fn share_openmp(path: &str) -> bool {
    crate::team::share(path)
}

#[pyfunction]
fn unshare_openmp() {
    crate::team::unshare()
}

#[pyfunction]
fn shares_openmp() -> bool {
    crate::team::is_shared()
}

/// What was wrong with fastdrop's environment variables, one message each (each variable is
/// read once per process, at the latest now); `fastdrop` warns with them when it is imported.
#[pyfunction]
fn _env_warnings() -> Vec<String> {
    let mut messages = crate::env::diagnostics();
    messages.extend(crate::threads::num_threads_env_warning());
    messages
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

// --- attention: softmax and dropout over the weights -----------------------------------------

/// The attention weights' operands, read and checked by `view::check_dense`.
fn weight_views<'a, 'py>(
    read: &[(&str, &'a Bound<'py, PyAny>)],
    written: &[(&str, &'a Bound<'py, PyAny>)],
    pins: &mut Vec<Bound<'py, PyAny>>,
) -> PyResult<(Vec<View<'a>>, Vec<View<'a>>)> {
    let mut to_views = |list: &[(&str, &'a Bound<'py, PyAny>)]| -> PyResult<Vec<View<'a>>> {
        list.iter().map(|(name, a)| view(name, a, pins)).collect()
    };
    let (r, w) = (to_views(read)?, to_views(written)?);
    let rn: Vec<(&str, &View<'a>)> = read.iter().map(|(n, _)| *n).zip(&r).collect();
    let wn: Vec<(&str, &View<'a>)> = written.iter().map(|(n, _)| *n).zip(&w).collect();
    check_dense(&rn, &wn)?;
    Ok((r, w))
}

/// A C-contiguous view's elements as a slice.
///
/// # Safety
/// `v` must be C-contiguous, of element type `T`, and alive (with nothing else writing it) for
/// `'a`.
unsafe fn slice_of<'a, T>(v: &View<'_>) -> &'a [T] {
    let n = v.len();
    if n == 0 {
        return &[];
    }
    // SAFETY: the caller vouches that `v` is C-contiguous `T`s, `n` of them from `v.ptr()`,
    // alive and not written elsewhere for 'a.
    unsafe { std::slice::from_raw_parts(v.ptr() as *const T, n) }
}

/// As [`slice_of`], writeable.
///
/// # Safety
/// As [`slice_of`], and no other reference to the view's memory may exist for `'a`.
unsafe fn slice_of_mut<'a, T>(v: &View<'_>) -> &'a mut [T] {
    let n = v.len();
    if n == 0 {
        return &mut [];
    }
    // SAFETY: as in `slice_of`, and the caller vouches nothing else references the memory.
    unsafe { std::slice::from_raw_parts_mut(v.ptr() as *mut T, n) }
}

/// Attention's forward between its two products: `scores` (`(..., lq, lk)` logits) becomes the
/// softmax `P` of `logit_scale * scores` (queries past the diagonal masked when `causal`),
/// `dropped` receives `P * mask / keep`, and the Bernoulli(keep) mask over the weights, drawn
/// from `generator`, is returned.
#[pyfunction]
#[pyo3(signature = (scores, dropped, logit_scale, causal, keep, generator))]
fn softmax_dropout_forward(
    py: Python<'_>,
    scores: &Bound<'_, PyAny>,
    dropped: &Bound<'_, PyAny>,
    logit_scale: f64,
    causal: bool,
    keep: f64,
    generator: &Generator,
) -> PyResult<MaskBits> {
    spec::check_probability("keep probability", keep)?;
    // Pinned for the call: the kernel runs with the GIL released.
    let mut pins = Vec::new();
    let (_, w) = weight_views(&[], &[("scores", scores), ("dropped", dropped)], &mut pins)?;
    let (sv, dv) = (&w[0], &w[1]);
    let shape = sv.shape().to_vec();
    if shape.len() < 2 {
        return Err(PyValueError::new_err(format!(
            "attention weights need (..., lq, lk) dimensions, got shape {shape:?}"
        )));
    }
    let rows = attention::Rows {
        lq: shape[shape.len() - 2],
        lk: shape[shape.len() - 1],
        causal,
    };
    let n: usize = shape.iter().product();
    let (key, first_block) = generator.state.reserve(blocks_for_decisions(n))?;
    let drop = attention::WeightDropout {
        key,
        first_block,
        threshold: threshold_for(keep),
        scale: if keep > 0.0 { 1.0 / keep } else { 0.0 },
    };
    let mut words = vec![0u64; attention::mask_words(n)];
    let dtype = sv.dtype();
    let (sp, dp) = (sv.ptr() as usize, dv.ptr() as usize);
    let work = |words: &mut [u64]| -> crate::error::Result<()> {
        macro_rules! go {
            ($t:ty) => {{
                // SAFETY: `weight_views` checked both views C-contiguous of this dtype, writeable
                // and disjoint; the tensors they view are kept alive by this call's arguments.
                let (s, d) = unsafe {
                    (
                        std::slice::from_raw_parts_mut(sp as *mut $t, n),
                        std::slice::from_raw_parts_mut(dp as *mut $t, n),
                    )
                };
                attention::softmax_dropout_forward::<$t>(s, d, words, rows, logit_scale, &drop)
            }};
        }
        if n == 0 {
            return Ok(());
        }
        match dtype {
            Dtype::F16 => go!(f16),
            Dtype::BF16 => go!(bf16),
            Dtype::F32 => go!(f32),
            Dtype::F64 => go!(f64),
        }
    };
    if n >= RELEASE_GIL_MIN {
        let torch = scores.cast::<PyCapsule>().is_ok();
        py.detach(|| crate::threads::on_torch_storage(torch, || work(&mut words)))?;
    } else {
        work(&mut words)?;
    }
    Ok(MaskBits { shape, words })
}

/// Attention's backward between its two products: `grad` (of the dropped weights) becomes the
/// gradient of the logits, and `dropped` receives `probs * mask * keep_scale` again.
#[pyfunction]
#[pyo3(signature = (probs, grad, dropped, mask, keep_scale))]
fn softmax_dropout_backward(
    py: Python<'_>,
    probs: &Bound<'_, PyAny>,
    grad: &Bound<'_, PyAny>,
    dropped: &Bound<'_, PyAny>,
    mask: &MaskBits,
    keep_scale: f64,
) -> PyResult<()> {
    // Pinned for the call: the kernel runs with the GIL released.
    let mut pins = Vec::new();
    let (r, w) = weight_views(
        &[("probs", probs)],
        &[("grad", grad), ("dropped", dropped)],
        &mut pins,
    )?;
    let (pv, gv, dv) = (&r[0], &w[0], &w[1]);
    if pv.shape() != mask.shape || pv.shape().len() < 2 {
        return Err(PyValueError::new_err(format!(
            "probs of shape {:?} do not match the mask's {:?}",
            pv.shape(),
            mask.shape
        )));
    }
    let lk = pv.shape()[pv.shape().len() - 1];
    let n = pv.len();
    if n == 0 {
        return Ok(());
    }
    let work = || -> crate::error::Result<()> {
        macro_rules! go {
            ($t:ty) => {{
                // SAFETY: `weight_views` checked the views C-contiguous of this dtype, the
                // written ones writeable and disjoint from each other and from `probs`; the
                // tensors are kept alive by this call's arguments.
                let (p, g, d) = unsafe {
                    (
                        slice_of::<$t>(pv),
                        slice_of_mut::<$t>(gv),
                        slice_of_mut::<$t>(dv),
                    )
                };
                attention::softmax_dropout_backward::<$t>(p, g, d, &mask.words, lk, keep_scale)
            }};
        }
        match pv.dtype() {
            Dtype::F16 => go!(f16),
            Dtype::BF16 => go!(bf16),
            Dtype::F32 => go!(f32),
            Dtype::F64 => go!(f64),
        }
    };
    struct Send_<F>(F);
    // SAFETY: the closure only carries the views' addresses into the GIL-free section of this
    // call, whose arguments keep the memory alive.
    unsafe impl<F> Send for Send_<F> {}
    let job = Send_(work);
    if n >= RELEASE_GIL_MIN {
        let torch = probs.cast::<PyCapsule>().is_ok();
        py.detach(move || {
            let job = job;
            crate::threads::on_torch_storage(torch, || (job.0)())
        })?;
    } else {
        (job.0)()?;
    }
    Ok(())
}

#[pymodule]
fn _core(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<Generator>()?;
    m.add_class::<MaskBits>()?;
    m.add_class::<Applied>()?;
    m.add_function(wrap_pyfunction!(_generator_from_state, m)?)?;
    m.add_function(wrap_pyfunction!(apply, m)?)?;
    m.add_function(wrap_pyfunction!(mask_apply, m)?)?;
    m.add_function(wrap_pyfunction!(set_num_threads, m)?)?;
    m.add_function(wrap_pyfunction!(get_num_threads, m)?)?;
    m.add_function(wrap_pyfunction!(share_openmp, m)?)?;
    m.add_function(wrap_pyfunction!(unshare_openmp, m)?)?;
    m.add_function(wrap_pyfunction!(shares_openmp, m)?)?;
    m.add("MAX_THREADS", crate::threads::MAX_THREADS)?;
    m.add_function(wrap_pyfunction!(simd_backend, m)?)?;
    m.add_function(wrap_pyfunction!(_env_warnings, m)?)?;
    m.add_function(wrap_pyfunction!(empty_like, m)?)?;
    m.add_function(wrap_pyfunction!(cached_empty, m)?)?;
    m.add_function(wrap_pyfunction!(empty_cache, m)?)?;
    m.add_function(wrap_pyfunction!(cached_bytes, m)?)?;
    m.add_function(wrap_pyfunction!(softmax_dropout_forward, m)?)?;
    m.add_function(wrap_pyfunction!(softmax_dropout_backward, m)?)?;
    m.add_function(wrap_pyfunction!(normal_fill, m)?)?;
    m.add_function(wrap_pyfunction!(mask_bits_from_packed, m)?)?;
    Ok(())
}

// --- issue 16: the rest of the family ----------------------------------------------------------

/// Fills a contiguous float32 or float64 array with standard normal deviates (element i in C
/// order is `kernel::normal_at(key, first, i)` rounded to the dtype), from counter blocks
/// reserved from `generator`: Gaussian dropout's noise.
#[pyfunction]
fn normal_fill(py: Python<'_>, out: &Bound<'_, PyAny>, generator: &Generator) -> PyResult<()> {
    use numpy::PyArrayMethods;
    fn fill<T: crate::noise::Deviate + numpy::Element>(
        py: Python<'_>,
        arr: &Bound<'_, numpy::PyArrayDyn<T>>,
        generator: &Generator,
    ) -> PyResult<()> {
        // Element i in C order gets deviate i: a Fortran-ordered slice would be filled in the
        // wrong order.
        if !arr.is_c_contiguous() {
            return Err(PyValueError::new_err(
                "normal_fill needs a C-contiguous array",
            ));
        }
        let mut rw = arr
            .try_readwrite()
            .map_err(|e| PyValueError::new_err(e.to_string()))?;
        let slice = rw
            .as_slice_mut()
            .map_err(|_| PyValueError::new_err("normal_fill needs a C-contiguous array"))?;
        let (key, first) = generator.state.reserve(blocks_for_normals(slice.len()))?;
        py.detach(|| crate::noise::fill_normals(key, first, slice));
        Ok(())
    }
    if let Ok(a) = out.cast::<numpy::PyArrayDyn<f32>>() {
        fill(py, a, generator)
    } else if let Ok(a) = out.cast::<numpy::PyArrayDyn<f64>>() {
        fill(py, a, generator)
    } else {
        Err(PyTypeError::new_err(
            "normal_fill needs a float32 or float64 numpy.ndarray",
        ))
    }
}

/// A mask of `shape` from little-endian packed bits (bit i of the mask is bit i % 8 of byte
/// i / 8, as `numpy.packbits(..., bitorder="little")` packs them and `MaskBits.to_bytes`
/// returns them): for masks decided outside the kernels (torchvision's DropBlock), so that they
/// apply and differentiate through `mask_apply` like every other.
#[pyfunction]
fn mask_bits_from_packed(shape: &Bound<'_, PyAny>, packed: &[u8]) -> PyResult<MaskBits> {
    let shape = shape_arg("shape", shape)?;
    let n = (shape.iter().try_fold(1usize, |a, &d| a.checked_mul(d))).ok_or_else(|| {
        PyValueError::new_err(format!("mask shape {shape:?} has more than 2**64 elements"))
    })?;
    if packed.len() != n.div_ceil(8) {
        return Err(PyValueError::new_err(format!(
            "{} bytes of bits for a mask of shape {shape:?}, which needs {}",
            packed.len(),
            n.div_ceil(8)
        )));
    }
    let mut words = vec![0u64; kernel::words_for(n)];
    for (i, &b) in packed.iter().enumerate() {
        words[i / 8] |= (b as u64) << (8 * (i % 8));
    }
    kernel::clear_tail(&mut words, n);
    Ok(MaskBits { shape, words })
}
