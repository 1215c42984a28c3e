//! Borrowing torch's intra-op threads: a call's chunks shared among the threads of an OpenMP
//! runtime that is already loaded in the process, instead of fastdrop's own helpers.
//!
//! Inside a torch program the cores belong to torch's intra-op pool: OpenMP threads that spin
//! for a while after each op, waiting for the next. fastdrop's own helpers then find no core
//! free, and a call with 2 threads runs as slowly as with 1 or slower (measured, issue 14). A
//! parallel region of torch's own runtime runs on those very threads, already awake, the way
//! torch's next op would: nothing competes, and the team is as large as torch's thread count
//! (`torch.set_num_threads`), so fastdrop never uses more threads than the program allowed.
//!
//! The runtime is found by the Python package (it knows which library torch loaded) and handed
//! over as a path; it is opened with `RTLD_NOLOAD`, so only a library already in the process
//! is ever used, and only through the GOMP entry points that both GNU's libgomp and LLVM's and
//! Intel's OpenMP export. No crate wraps a runtime loaded by someone else, hence the few
//! `dlopen`/`dlsym` calls by hand.
//!
//! A forked child inherits the runtime's thread pool but none of its threads (a parallel
//! region there can wait forever), so the team is used only in the process that shared it;
//! a child falls back to fastdrop's own pool, which it builds afresh.

use std::any::Any;
use std::ffi::{c_int, c_uint, c_void, CString};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// `GOMP_parallel(fn, data, num_threads, flags)`: runs `fn(data)` on every thread of a team of
/// `num_threads` (the caller is thread 0) and returns when all are done.
type Parallel = unsafe extern "C" fn(extern "C" fn(*mut c_void), *mut c_void, c_uint, c_uint);
/// `omp_get_thread_num`, `omp_get_max_threads`, `omp_in_parallel`.
type Query = unsafe extern "C" fn() -> c_int;

/// The entry points of a shared runtime, and the process that shared it.
#[derive(Clone, Copy)]
struct Runtime {
    parallel: Parallel,
    thread_num: Query,
    max_threads: Query,
    in_parallel: Query,
    pid: u32,
}

static SHARED: Mutex<Option<Runtime>> = Mutex::new(None);

/// Shares the OpenMP runtime at `path` if the process has already loaded it and it exports the
/// GOMP entry points; returns whether it is shared now. Never loads a library.
#[cfg(unix)]
pub fn share(path: &str) -> bool {
    let Ok(name) = CString::new(path) else {
        return false;
    };
    // SAFETY: `name` is a valid C string; RTLD_NOLOAD returns a handle only to a library that
    // is already loaded (running no initialiser), or null.
    let handle = unsafe { libc::dlopen(name.as_ptr(), libc::RTLD_NOLOAD | libc::RTLD_LAZY) };
    // SAFETY: `handle` is null or a handle from dlopen that is never closed.
    let Some(runtime) = (unsafe { Runtime::from_handle(handle) }) else {
        return false;
    };
    *SHARED.lock().unwrap_or_else(|e| e.into_inner()) = Some(runtime);
    true
}

#[cfg(not(unix))]
pub fn share(_path: &str) -> bool {
    false
}

/// Stops using a shared runtime: calls go back to fastdrop's own threads.
pub fn unshare() {
    *SHARED.lock().unwrap_or_else(|e| e.into_inner()) = None;
}

/// Whether a runtime is shared with this process (a forked child's inherited one is not).
pub fn is_shared() -> bool {
    current().is_some()
}

fn current() -> Option<Runtime> {
    let r = (*SHARED.lock().unwrap_or_else(|e| e.into_inner()))?;
    (r.pid == std::process::id()).then_some(r)
}

/// How a call went on a shared runtime.
pub(crate) enum Outcome {
    /// No runtime is shared with this process: nothing ran.
    Unshared,
    /// The calling thread ran every chunk: the runtime allows it one thread
    /// (`torch.set_num_threads(1)`), or it is already a thread of a parallel region.
    Alone,
    /// A team ran the chunks.
    Team(TeamRun),
}

/// How a team call went, for the caller's judgement of whether helpers pay (`threads`).
pub(crate) struct TeamRun {
    /// The call's wall time.
    pub total: Duration,
    /// The time the calling thread spent on its own chunks, and how many it ran.
    pub worked: Duration,
    pub mine: usize,
}

/// Runs `f(chunk)` for chunk in 0..chunks on a team of at most `threads` threads of the shared
/// runtime (see [`Outcome`]).
pub(crate) fn for_each_chunk<F: Fn(usize) + Sync>(threads: usize, chunks: usize, f: &F) -> Outcome {
    match current() {
        None => Outcome::Unshared,
        Some(rt) => rt.for_each_chunk(threads, chunks, f),
    }
}

impl Runtime {
    /// The entry points of the runtime behind `handle`, if it has them all.
    ///
    /// # Safety
    /// `handle` is null or a live handle from `dlopen` that is never closed (the functions are
    /// called for the rest of the process's life).
    #[cfg(unix)]
    unsafe fn from_handle(handle: *mut c_void) -> Option<Runtime> {
        if handle.is_null() {
            return None;
        }
        let symbol = |s: &str| {
            let s = CString::new(s).expect("symbol names have no NUL");
            // SAFETY: `handle` is a live handle (the caller's promise), `s` a valid C string.
            let p = unsafe { libc::dlsym(handle, s.as_ptr()) };
            (!p.is_null()).then_some(p)
        };
        let (p, t, m, i) = (
            symbol("GOMP_parallel")?,
            symbol("omp_get_thread_num")?,
            symbol("omp_get_max_threads")?,
            symbol("omp_in_parallel")?,
        );
        // SAFETY: each symbol is the runtime's function of that name, whose C signature the
        // OpenMP ABI fixes as the type it is cast to; the library stays loaded (never closed).
        unsafe {
            Some(Runtime {
                parallel: std::mem::transmute::<*mut c_void, Parallel>(p),
                thread_num: std::mem::transmute::<*mut c_void, Query>(t),
                max_threads: std::mem::transmute::<*mut c_void, Query>(m),
                in_parallel: std::mem::transmute::<*mut c_void, Query>(i),
                pid: std::process::id(),
            })
        }
    }

    fn for_each_chunk<F: Fn(usize) + Sync>(&self, threads: usize, chunks: usize, f: &F) -> Outcome {
        // SAFETY: plain queries of the runtime's state for the calling thread.
        let (inside, max) = unsafe { ((self.in_parallel)(), (self.max_threads)()) };
        let size = threads.min(max.max(1) as usize).min(chunks);
        if inside != 0 || size < 2 {
            (0..chunks).for_each(f);
            return Outcome::Alone;
        }
        let job = Job {
            f,
            thread_num: self.thread_num,
            next: AtomicUsize::new(0),
            chunks,
            start: Instant::now(),
            caller: Mutex::new((Duration::ZERO, 0)),
            panic: Mutex::new(None),
        };
        let data = &job as *const Job<'_, F> as *mut c_void;
        // SAFETY: `run::<F>` reads `data` as the `Job<F>` it is, which lives until
        // GOMP_parallel returns, after every thread of the team has returned from `run`; `run`
        // never unwinds (it catches panics) and shares the job only through atomics and mutexes.
        unsafe { (self.parallel)(run::<F>, data, size as c_uint, 0) };
        if let Some(p) = job.panic.into_inner().unwrap_or_else(|e| e.into_inner()) {
            std::panic::resume_unwind(p);
        }
        let (worked, mine) = job.caller.into_inner().unwrap_or_else(|e| e.into_inner());
        Outcome::Team(TeamRun {
            total: job.start.elapsed(),
            worked,
            mine,
        })
    }
}

/// One team call's shared state.
struct Job<'a, F> {
    f: &'a F,
    thread_num: Query,
    next: AtomicUsize,
    chunks: usize,
    start: Instant,
    /// The calling thread's (thread 0's) time on its chunks and their count.
    caller: Mutex<(Duration, usize)>,
    /// The first panic of any thread, re-raised on the calling thread.
    panic: Mutex<Option<Box<dyn Any + Send>>>,
}

/// Takes chunks from the shared counter until none is left; a panic stops the others taking
/// more and is kept for the caller (unwinding out of a C callback would abort the process).
extern "C" fn run<F: Fn(usize) + Sync>(data: *mut c_void) {
    // SAFETY: `data` is the `&Job<F>` that `for_each_chunk` passed to GOMP_parallel, alive
    // until every thread has returned.
    let job = unsafe { &*(data as *const Job<'_, F>) };
    let mut mine = 0usize;
    let worked = catch_unwind(AssertUnwindSafe(|| loop {
        let c = job.next.fetch_add(1, Ordering::Relaxed);
        if c >= job.chunks {
            break;
        }
        (job.f)(c);
        mine += 1;
    }));
    match worked {
        Ok(()) => {
            // SAFETY: a plain query of the calling thread's place in the team.
            if unsafe { (job.thread_num)() } == 0 {
                *job.caller.lock().unwrap_or_else(|e| e.into_inner()) = (job.start.elapsed(), mine);
            }
        }
        Err(p) => {
            job.next.store(job.chunks, Ordering::Relaxed);
            job.panic
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .get_or_insert(p);
        }
    }
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicU32;

    /// GCC's OpenMP runtime (every machine with gcc has it), opened as torch's would be.
    fn gnu_openmp() -> Runtime {
        let name = CString::new("libgomp.so.1").unwrap();
        // SAFETY: a valid C string; the handle is never closed.
        let handle = unsafe { libc::dlopen(name.as_ptr(), libc::RTLD_NOW | libc::RTLD_LOCAL) };
        assert!(
            !handle.is_null(),
            "libgomp.so.1 (GCC's OpenMP runtime) is not installed"
        );
        // SAFETY: a live handle, never closed.
        unsafe { Runtime::from_handle(handle) }.expect("libgomp exports the GOMP entry points")
    }

    fn counts(n: usize) -> Vec<AtomicU32> {
        (0..n).map(|_| AtomicU32::new(0)).collect()
    }

    #[test]
    fn a_team_runs_every_chunk_once_for_any_size() {
        let rt = gnu_openmp();
        for (threads, chunks) in [(2, 1), (2, 2), (2, 37), (8, 3), (3, 100)] {
            let seen = counts(chunks);
            let outcome = rt.for_each_chunk(threads, chunks, &|c| {
                seen[c].fetch_add(1, Ordering::Relaxed);
            });
            assert!(seen.iter().all(|s| s.load(Ordering::Relaxed) == 1));
            let team = chunks >= 2;
            assert_eq!(
                matches!(outcome, Outcome::Team(_)),
                team,
                "{threads} {chunks}"
            );
            if let Outcome::Team(run) = outcome {
                assert!(run.mine <= chunks && run.worked <= run.total);
            }
        }
    }

    #[test]
    fn one_thread_or_a_call_inside_a_region_runs_alone() {
        let rt = gnu_openmp();
        let seen = counts(5);
        let outcome = rt.for_each_chunk(1, 5, &|c| {
            seen[c].fetch_add(1, Ordering::Relaxed);
        });
        assert!(matches!(outcome, Outcome::Alone));
        let nested = AtomicU32::new(0);
        rt.for_each_chunk(2, 2, &|_| {
            let inner = counts(4);
            if let Outcome::Alone = rt.for_each_chunk(2, 4, &|c| {
                inner[c].fetch_add(1, Ordering::Relaxed);
            }) {
                if inner.iter().all(|s| s.load(Ordering::Relaxed) == 1) {
                    nested.fetch_add(1, Ordering::Relaxed);
                }
            }
        });
        assert_eq!(nested.load(Ordering::Relaxed), 2);
        assert!(seen.iter().all(|s| s.load(Ordering::Relaxed) == 1));
    }

    #[test]
    fn a_panicking_chunk_is_raised_on_the_caller_and_the_team_stays_usable() {
        let rt = gnu_openmp();
        let caught = catch_unwind(AssertUnwindSafe(|| {
            rt.for_each_chunk(2, 64, &|c| {
                if c == 40 {
                    panic!("chunk 40");
                }
            })
        }));
        let payload = caught.err().expect("the panic reaches the caller");
        assert_eq!(payload.downcast_ref::<&str>(), Some(&"chunk 40"));
        let seen = counts(64);
        rt.for_each_chunk(2, 64, &|c| {
            seen[c].fetch_add(1, Ordering::Relaxed);
        });
        assert!(seen.iter().all(|s| s.load(Ordering::Relaxed) == 1));
    }

    #[test]
    fn only_a_loaded_runtime_is_shared() {
        assert!(!share("/nonexistent/libgomp.so.1"));
        assert!(!share("lib\0gomp"));
        assert!(!is_shared());
    }
}
