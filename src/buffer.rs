//! A small cache of large output buffers.
//!
//! An out-of-place call on a large array needs a fresh output, and fresh memory from the OS must
//! be faulted in and zeroed page by page: for a 256 MiB float32 array that costs about as much as
//! the dropout itself (the allocator hands such sizes straight back to the OS on free, so every
//! call pays again). In a training loop the previous step's output is usually gone by the next
//! call, so keeping a few freed buffers and handing one of the same size back makes the call
//! cost what the copy costs. No allocator crate does this for a caller-chosen size class with an
//! explicit cap and flush, so it is written here: a mutex around a short list.
//!
//! Buffers are whole 2 MiB multiples, 2 MiB aligned (so transparent huge pages can back them),
//! handed out uninitialised exactly as `np.empty` would be. The cache holds at most
//! `cap` bytes (`FASTDROP_CACHE_BYTES`, default 1 GiB; 0 turns it off) and evicts the oldest.

use crate::env::{self, Setting};
use std::alloc::{alloc, dealloc, Layout};
use std::ptr::NonNull;
use std::sync::{Mutex, OnceLock};

/// Alignment and size granule of pooled buffers: one x86-64 huge page.
const GRANULE: usize = 2 << 20;
/// Buffers kept at most, whatever their size: a handful of live shapes per loop.
const MAX_BUFFERS: usize = 8;
/// Default byte cap of the cache.
const DEFAULT_CAP: usize = 1 << 30;

/// An uninitialised, 2 MiB aligned allocation of `len` bytes (a multiple of 2 MiB). It is freed
/// (or cached) by [`give`]; dropping it without that leaks it, never frees it twice.
#[derive(Debug)]
pub struct Buffer {
    ptr: NonNull<u8>,
    len: usize,
}

// SAFETY: a Buffer owns its allocation exclusively (nothing else holds the pointer until it is
// handed out, and then the holder owns it), so moving it to another thread is sound.
unsafe impl Send for Buffer {}
// SAFETY: `&Buffer` only reads the pointer and length; it never touches the memory.
unsafe impl Sync for Buffer {}

impl Buffer {
    /// The start of the allocation.
    pub fn as_ptr(&self) -> *mut u8 {
        self.ptr.as_ptr()
    }

    /// Its size in bytes (at least what was asked for).
    pub fn len(&self) -> usize {
        self.len
    }

    /// Never true: buffers are at least one granule.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    fn layout(len: usize) -> Layout {
        // `len` is a non-zero multiple of GRANULE below isize::MAX (checked in take).
        Layout::from_size_align(len, GRANULE).expect("valid buffer layout")
    }
}

struct Pool {
    cap: usize,
    /// Freed buffers, oldest first.
    free: Vec<Buffer>,
}

/// The variable that caps the cache.
pub const CAP_VAR: &str = "FASTDROP_CACHE_BYTES";

/// Parses a byte count: a whole number, optionally followed by `K`, `M`, `G` or `T` (or `KiB`,
/// `MiB`, `GiB`, `TiB`), powers of 1024, case ignored. Decimal units (`GB`), fractions and
/// exponents (`1e9`) are refused rather than guessed at.
pub fn parse_bytes(value: &str) -> Result<usize, String> {
    const ACCEPTED: &str = "expected a whole number of bytes, optionally with a K, M, G or T suffix (powers of 1024, also written KiB ... TiB), e.g. 536870912 or 512M; 0 turns the cache off";
    let v = value.trim();
    let split = v.find(|c: char| !c.is_ascii_digit()).unwrap_or(v.len());
    let (digits, unit) = v.split_at(split);
    let shift = match unit.trim().to_ascii_lowercase().as_str() {
        "" => 0,
        "k" | "kib" => 10,
        "m" | "mib" => 20,
        "g" | "gib" => 30,
        "t" | "tib" => 40,
        _ => return Err(format!("is not a byte count: {ACCEPTED}")),
    };
    if digits.is_empty() {
        return Err(format!("is not a byte count: {ACCEPTED}"));
    }
    digits
        .parse::<usize>()
        .ok()
        .and_then(|n| n.checked_mul(1usize << shift))
        .ok_or_else(|| format!("is more bytes than this machine can address: {ACCEPTED}"))
}

/// The cache's byte cap, read once.
pub fn cap_setting() -> &'static Setting<usize> {
    static SETTING: OnceLock<Setting<usize>> = OnceLock::new();
    SETTING.get_or_init(|| env::read(CAP_VAR, DEFAULT_CAP, "the default 1 GiB", parse_bytes))
}

fn pool() -> &'static Mutex<Pool> {
    static POOL: OnceLock<Mutex<Pool>> = OnceLock::new();
    POOL.get_or_init(|| {
        Mutex::new(Pool {
            cap: cap_setting().value,
            free: Vec::new(),
        })
    })
}

fn lock() -> std::sync::MutexGuard<'static, Pool> {
    // A panic while holding the lock cannot leave the list inconsistent (each operation is one
    // push or remove), so a poisoned lock is still usable.
    pool().lock().unwrap_or_else(|e| e.into_inner())
}

/// A buffer of at least `bytes` bytes: a cached one of the same rounded size if there is one,
/// else a fresh allocation. `None` if the cache is turned off (the caller allocates as it would
/// without one), `bytes` is 0 or absurdly large, or the allocation fails.
pub fn take(bytes: usize) -> Option<Buffer> {
    let len = bytes.checked_next_multiple_of(GRANULE)?;
    if len == 0 || len > isize::MAX as usize - GRANULE {
        return None;
    }
    {
        let mut p = lock();
        if p.cap == 0 {
            return None;
        }
        if let Some(i) = p.free.iter().rposition(|b| b.len == len) {
            return Some(p.free.remove(i));
        }
    }
    // SAFETY: the layout has a non-zero size.
    let ptr = NonNull::new(unsafe { alloc(Buffer::layout(len)) })?;
    Some(Buffer { ptr, len })
}

/// Returns a buffer: cached for the next [`take`] of its size if the cache has room, else freed.
pub fn give(buf: Buffer) {
    let mut evicted = Vec::new();
    {
        let mut p = lock();
        if buf.len > p.cap {
            evicted.push(buf);
        } else {
            p.free.push(buf);
            while p.free.len() > MAX_BUFFERS || p.free.iter().map(|b| b.len).sum::<usize>() > p.cap
            {
                evicted.push(p.free.remove(0));
            }
        }
    }
    for b in evicted {
        release(b);
    }
}

/// Frees every cached buffer; returns how many bytes went back to the allocator.
pub fn empty_cache() -> usize {
    let freed: Vec<Buffer> = std::mem::take(&mut lock().free);
    let bytes = freed.iter().map(|b| b.len).sum();
    freed.into_iter().for_each(release);
    bytes
}

/// Bytes held by the cache now.
pub fn cached_bytes() -> usize {
    lock().free.iter().map(|b| b.len).sum()
}

fn release(b: Buffer) {
    // SAFETY: `b` came from `alloc` with this exact layout in `take` and is owned (not aliased):
    // a Buffer is only ever moved, and this consumes it.
    unsafe { dealloc(b.ptr.as_ptr(), Buffer::layout(b.len)) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_counts_are_whole_numbers_with_binary_suffixes() {
        for (v, want) in [
            ("0", 0),
            ("1073741824", 1 << 30),
            (" 512M ", 512 << 20),
            ("512 MiB", 512 << 20),
            ("2g", 2 << 30),
            ("1T", 1 << 40),
            ("3k", 3 << 10),
        ] {
            assert_eq!(parse_bytes(v), Ok(want), "{v}");
        }
        for v in ["-1", "abc", "12GB", "1e9", "1.5G", "G", "0x10", "+5"] {
            let e = parse_bytes(v).unwrap_err();
            assert!(e.starts_with("is not a byte count"), "{v}: {e}");
        }
        for v in ["99999999999999999999", "20000000T"] {
            let e = parse_bytes(v).unwrap_err();
            assert!(e.contains("more bytes than"), "{v}: {e}");
        }
    }

    // One test, because the pool is process-wide and tests run in parallel.
    #[test]
    fn a_freed_buffer_of_the_same_size_is_handed_back() {
        empty_cache();
        let a = take(3 << 20).expect("alloc");
        assert_eq!(a.len(), 4 << 20);
        assert_eq!(a.as_ptr() as usize % GRANULE, 0);
        let addr = a.as_ptr();
        give(a);
        assert_eq!(cached_bytes(), 4 << 20);
        let other = take(9 << 20).expect("alloc");
        assert_ne!(
            other.as_ptr(),
            addr,
            "a different size is a different buffer"
        );
        let again = take(4 << 20).expect("alloc");
        assert_eq!(again.as_ptr(), addr, "same rounded size reuses the buffer");
        assert_eq!(cached_bytes(), 0);
        give(again);
        give(other);
        for _ in 0..2 * MAX_BUFFERS {
            let b = take(2 << 20).expect("alloc");
            let c = take(2 << 20).expect("alloc");
            give(b);
            give(c);
        }
        assert!(lock().free.len() <= MAX_BUFFERS);
        assert!(empty_cache() >= 4 << 20);
        assert_eq!(cached_bytes(), 0);
        assert!(take(0).is_none());
        assert!(take(usize::MAX).is_none());
    }
}
