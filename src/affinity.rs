//! Keeping the pool's helpers off the calling thread's CPU while a call runs.
//!
//! A helper sleeps between calls, and the caller wakes it as the call begins. Linux often
//! queues a woken thread on the CPU of the thread that woke it (wake-affine placement), and
//! here that CPU is busy with the caller's own share of the call: measured on the 2-core
//! machine, back-to-back 800K-element calls saw the helper start only after the caller had
//! done every chunk (about 300 us in), so two threads ran no faster than one; with the helper
//! kept off the caller's CPU it started 20-35 us in and the call took 210 us.
//!
//! So before a parallel call, when the caller is on a CPU the helpers may still use, the
//! helpers' CPU sets become the caller's own set minus that CPU. This narrows nothing the
//! process was given (the set is the caller's, which a user's `taskset` or cgroup already
//! bounds), touches only fastdrop's threads, and is skipped when the caller has a single CPU.
//! Nothing here changes a result: which thread runs a chunk never does. Failures are ignored
//! (the call still runs, only perhaps slower). No crate sets another thread's affinity (the
//! affinity crates pin the calling thread), hence the few libc calls by hand.

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Mutex;

/// The kernel thread ids of a pool's helpers, and the CPU they were last steered away from.
pub(crate) struct Helpers {
    tids: Mutex<Vec<i32>>,
    /// `cpu << 32 | helpers steered`, or -1 before the first steering.
    steered: AtomicI64,
}

impl Helpers {
    pub(crate) const fn new() -> Helpers {
        Helpers {
            tids: Mutex::new(Vec::new()),
            steered: AtomicI64::new(-1),
        }
    }

    /// Records the calling thread as one of the helpers (from the pool's start handler).
    pub(crate) fn register_current(&self) {
        if let Some(tid) = current_tid() {
            self.tids
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push(tid);
        }
    }

    /// Keeps the helpers off the CPU the calling thread runs on, if they are not already: an
    /// uncontended lock and a compare when the caller has not moved, syscalls when it has.
    pub(crate) fn steer_away_from_caller(&self) {
        let Some(cpu) = current_cpu() else { return };
        let tids = self.tids.lock().unwrap_or_else(|e| e.into_inner());
        let tag = (i64::from(cpu) << 32) | tids.len() as i64;
        if self.steered.load(Ordering::Relaxed) == tag {
            return;
        }
        // Store first: a failure below is not retried on every call.
        self.steered.store(tag, Ordering::Relaxed);
        set_others(&tids, cpu);
    }
}

#[cfg(target_os = "linux")]
fn current_tid() -> Option<i32> {
    // SAFETY: gettid has no preconditions and cannot fail.
    Some(unsafe { libc::gettid() })
}

#[cfg(target_os = "linux")]
fn current_cpu() -> Option<u32> {
    // SAFETY: sched_getcpu has no preconditions; it returns -1 on error.
    let cpu = unsafe { libc::sched_getcpu() };
    u32::try_from(cpu).ok()
}

/// Sets each of `tids`' CPU sets to the calling thread's own minus `cpu`, unless that leaves
/// nothing.
#[cfg(target_os = "linux")]
fn set_others(tids: &[i32], cpu: u32) {
    let size = std::mem::size_of::<libc::cpu_set_t>();
    // SAFETY: an all-zero cpu_set_t is the empty set (CPU_ZERO writes the same).
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: `set` is a valid, writable cpu_set_t of `size` bytes; 0 is the calling thread.
    if unsafe { libc::sched_getaffinity(0, size, &mut set) } != 0 {
        return;
    }
    let cpu = cpu as usize;
    // SAFETY (both): CPU_ISSET and CPU_CLR bound-check `cpu` against the set's size.
    if !unsafe { libc::CPU_ISSET(cpu, &set) } {
        return;
    }
    unsafe { libc::CPU_CLR(cpu, &mut set) };
    // SAFETY: reads the set only.
    if unsafe { libc::CPU_COUNT(&set) } == 0 {
        return;
    }
    for &tid in tids {
        // SAFETY: `set` is a valid cpu_set_t of `size` bytes. A tid of a thread that has
        // exited (or was reused) only sets that thread's affinity or fails with ESRCH; the
        // pool's threads live as long as the pool that recorded them.
        unsafe { libc::sched_setaffinity(tid, size, &set) };
    }
}

#[cfg(not(target_os = "linux"))]
fn current_tid() -> Option<i32> {
    None
}

#[cfg(not(target_os = "linux"))]
fn current_cpu() -> Option<u32> {
    None
}

#[cfg(not(target_os = "linux"))]
fn set_others(_tids: &[i32], _cpu: u32) {}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    use super::*;

    fn allowed(tid: i32) -> Vec<usize> {
        let status = std::fs::read_to_string(format!("/proc/self/task/{tid}/status")).unwrap();
        let line = status
            .lines()
            .find(|l| l.starts_with("Cpus_allowed_list:"))
            .unwrap();
        let mut cpus = Vec::new();
        for part in line.split(':').nth(1).unwrap().trim().split(',') {
            let mut ends = part.split('-').map(|v| v.parse::<usize>().unwrap());
            let lo = ends.next().unwrap();
            let hi = ends.next().unwrap_or(lo);
            cpus.extend(lo..=hi);
        }
        cpus
    }

    #[test]
    fn a_helper_is_steered_off_the_callers_cpu_and_keeps_the_rest() {
        let helpers = std::sync::Arc::new(Helpers::new());
        let (tx, rx) = std::sync::mpsc::channel();
        let (stop_tx, stop_rx) = std::sync::mpsc::channel::<()>();
        let h = helpers.clone();
        let thread = std::thread::spawn(move || {
            h.register_current();
            tx.send(current_tid().unwrap()).unwrap();
            stop_rx.recv().unwrap();
        });
        let tid = rx.recv().unwrap();
        let mine = allowed(current_tid().unwrap());
        helpers.steer_away_from_caller();
        let theirs = allowed(tid);
        if mine.len() > 1 {
            // The caller may have moved between the steering and `current_cpu` above; the
            // steering took the CPU it ran on then, which is the one missing.
            assert_eq!(theirs.len(), mine.len() - 1);
            assert!(theirs.iter().all(|c| mine.contains(c)));
            let missing: Vec<_> = mine.iter().filter(|c| !theirs.contains(c)).collect();
            assert_eq!(missing.len(), 1);
        } else {
            assert_eq!(theirs, mine); // one CPU: nothing to steer to
        }
        stop_tx.send(()).unwrap();
        thread.join().unwrap();
    }
}
