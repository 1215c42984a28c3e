//! fastdrop's own threads: how many, the pool they live in, and the loop that shares a call's
//! chunks among them.
//!
//! Threads are guests. fastdrop runs inside programs whose cores belong to torch's intra-op
//! pool, data-loader workers and other processes, so:
//! - work is split by index range (a chunk's random bits depend on its index alone), so the
//!   result never depends on which thread, or how many, ran it;
//! - the calling thread works beside the helpers, and a helper that arrives after the last
//!   chunk was taken finds nothing to do and goes back to sleep;
//! - waiting for a helper's last chunk spins only briefly and then sleeps, which leaves the
//!   core to whoever can use it (a helper that another thread preempted included);
//! - a call whose helpers cost more than they saved (every core busy: torch's threads, other
//!   processes) sends the next calls to the calling thread alone, 1, 2, 4 ... up to 64 of
//!   them, before the helpers get a trial of a few calls; so N threads are not slower than one;
//! - the helpers are kept off the calling thread's CPU (`affinity`), where the scheduler would
//!   otherwise queue a woken helper behind the caller's own share of the call;
//! - a child made by `fork` (which inherits the pool but none of its threads) builds a pool of
//!   its own;
//! - where torch's OpenMP runtime is shared (`team`, the default in a torch program), a call on
//!   torch tensors runs on torch's threads instead, which are awake and hold the cores;
//! - a thread count is capped at [`MAX_THREADS`], a pool never has more threads than the
//!   machine has CPUs online (more cannot run at once; each costs a stack and a work queue), and
//!   a pool that cannot be built (threads that cannot be spawned) leaves the call on the calling
//!   thread instead of failing it.

use std::cell::Cell;
use std::sync::atomic::{AtomicI64, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use crate::affinity::Helpers;
use crate::team::Outcome;

/// Below this many elements a call runs on the calling thread: waking the pool costs more.
pub const PARALLEL_MIN: usize = 1 << 17;
/// [`PARALLEL_MIN`] for a call on torch's storage, which runs on torch's team (`team`): its
/// threads are awake then, spinning after torch's last operation, so smaller calls pay. Measured
/// forward + backward on the 2-core machine, 15 shuffled rounds, a matmul between calls or none:
/// DropBlock2d(0.1, 3) on (8, 512, 5, 5) (102K elements) 74.8 -> 68.5 us, Dropout(0.1) on 100K
/// 62.3 -> 59.8 us, DropPath on 64K 52.3 -> 48.6 us; 32K (one chunk) changed nothing more.
pub const TEAM_PARALLEL_MIN: usize = 1 << 16;
const _: () = assert!(TEAM_PARALLEL_MIN < PARALLEL_MIN);

/// The fewest elements a call on this thread shares out: fewer on torch's storage.
fn parallel_min() -> usize {
    if TORCH_STORAGE.get() {
        TEAM_PARALLEL_MIN
    } else {
        PARALLEL_MIN
    }
}

/// The most threads `set_num_threads` and `FASTDROP_NUM_THREADS` accept. Far above any
/// machine's useful count, far below what would exhaust a process's memory for thread stacks.
pub const MAX_THREADS: usize = 1024;

/// The name of the environment variable that sets the default thread count.
pub const ENV_NUM_THREADS: &str = "FASTDROP_NUM_THREADS";

static NUM_THREADS: AtomicUsize = AtomicUsize::new(0);

/// A thread count as `FASTDROP_NUM_THREADS` spells it: a decimal integer from 1 to
/// [`MAX_THREADS`], surrounding spaces allowed. The error says what was wrong and what is
/// accepted.
pub fn parse_num_threads(value: &str) -> Result<usize, String> {
    let accepted = format!("expected an integer from 1 to {MAX_THREADS}");
    match value.trim().parse::<u128>() {
        Ok(n) if (1..=MAX_THREADS as u128).contains(&n) => Ok(n as usize),
        Ok(_) => Err(format!("{value:?} is out of range: {accepted}")),
        Err(_) => Err(format!("{value:?} is not a thread count: {accepted}")),
    }
}

/// The CPUs this process may run on.
fn available_cpus() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// The CPUs the machine has online, read once (it does not change under a process, unlike
/// the CPUs it may run on): no pool is built with more threads, whatever the thread count.
fn cpus_online() -> usize {
    static ONLINE: OnceLock<usize> = OnceLock::new();
    *ONLINE.get_or_init(|| {
        // SAFETY: sysconf reads a system value and has no preconditions.
        let n = unsafe { libc::sysconf(libc::_SC_NPROCESSORS_ONLN) };
        usize::try_from(n)
            .ok()
            .filter(|&n| n > 0)
            .unwrap_or_else(available_cpus)
    })
}

/// `FASTDROP_NUM_THREADS` read once (the environment lookup costs more than a small call's
/// whole kernel): the count, or the CPUs available and the reason the variable was not used.
fn env_threads() -> &'static (usize, Option<String>) {
    static FROM_ENV: OnceLock<(usize, Option<String>)> = OnceLock::new();
    FROM_ENV.get_or_init(|| match std::env::var(ENV_NUM_THREADS) {
        Err(std::env::VarError::NotPresent) => (available_cpus(), None),
        Ok(v) if v.trim().is_empty() => (available_cpus(), None),
        Ok(v) => match parse_num_threads(&v) {
            Ok(n) => (n, None),
            Err(why) => {
                let n = available_cpus();
                let msg =
                    format!("{ENV_NUM_THREADS}={why}; using the default, {n} (the CPUs available)");
                (n, Some(msg))
            }
        },
        Err(std::env::VarError::NotUnicode(v)) => {
            let n = available_cpus();
            let msg = format!(
                "{ENV_NUM_THREADS}={v:?} is not a thread count: expected an integer from 1 to \
                 {MAX_THREADS}; using the default, {n} (the CPUs available)"
            );
            (n, Some(msg))
        }
    })
}

/// Why `FASTDROP_NUM_THREADS` was ignored, if it was set to something that is not a thread
/// count (the Python package turns this into a warning at import).
pub fn num_threads_env_warning() -> Option<String> {
    env_threads().1.clone()
}

/// Threads the kernels use (`set_num_threads`, else `FASTDROP_NUM_THREADS`, else the CPUs
/// available).
pub fn get_num_threads() -> usize {
    match NUM_THREADS.load(Ordering::Relaxed) {
        0 => env_threads().0,
        n => n,
    }
}

/// Sets the threads the kernels use, from 1 to [`MAX_THREADS`]; results never depend on it.
pub fn set_num_threads(n: usize) -> crate::error::Result<()> {
    if !(1..=MAX_THREADS).contains(&n) {
        return crate::value_err!(
            "set_num_threads expects between 1 and {MAX_THREADS} threads, got {n}"
        );
    }
    NUM_THREADS.store(n, Ordering::Relaxed);
    Ok(())
}

/// The pool of helpers, with the process that built it and its size; `None` as the pool when
/// the threads could not be spawned (the calls run on the calling thread then).
struct Pool {
    pid: u32,
    helpers: usize,
    pool: Option<Workers>,
}

/// A built pool and its threads' ids (to keep them off the caller's CPU: `affinity`).
type Workers = (Arc<rayon::ThreadPool>, Arc<Helpers>);

static POOL: Mutex<Option<Pool>> = Mutex::new(None);

/// A pool of `helpers` threads, built on first use, rebuilt when the count changes or the
/// process is a forked child of the one that built it; `None` when threads cannot be spawned.
fn pool(helpers: usize) -> Option<Workers> {
    // One getpid syscall per parallel call (well under a microsecond against the 100 us and
    // more that a call of PARALLEL_MIN elements takes); it spares a pthread_atfork handler.
    let pid = std::process::id();
    let mut guard = POOL.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(p) = &*guard {
        if p.pid == pid && p.helpers == helpers {
            return p.pool.clone();
        }
    }
    if let Some(old) = guard.take() {
        if old.pid != pid {
            // A forked child inherits the pool's memory but none of its threads; the pool's
            // Drop would signal threads that do not exist, and its registry is kept alive by
            // their (never-to-run) references anyway. Leak it: once per fork, a few KiB.
            std::mem::forget(old);
        }
        // The parent's own old pool drops here: rayon tells its threads to exit and does not
        // wait for them.
    }
    let ids = Arc::new(Helpers::new());
    let register = ids.clone();
    let built = rayon::ThreadPoolBuilder::new()
        .num_threads(helpers)
        .thread_name(|i| format!("fastdrop-{i}"))
        .start_handler(move |_| register.register_current())
        .build()
        .ok()
        .map(|p| (Arc::new(p), ids));
    *guard = Some(Pool {
        pid,
        helpers,
        pool: built.clone(),
    });
    built
}

thread_local! {
    /// Whether the calling thread's current call works on torch's storage (`on_torch_storage`).
    static TORCH_STORAGE: Cell<bool> = const { Cell::new(false) };
}

/// Runs `f` (one call) with its parallel parts on a shared OpenMP runtime (`team`) when
/// `torch` says the call works on torch's storage, else on fastdrop's own helpers. A torch
/// tensor's call sits among torch's operations, whose threads are awake then; a NumPy call in
/// a program that merely imported torch would wake them for nothing and leave them spinning
/// (GNU OpenMP's threads spin about 3 ms before they sleep).
pub fn on_torch_storage<R>(torch: bool, f: impl FnOnce() -> R) -> R {
    struct Restore(bool);
    impl Drop for Restore {
        fn drop(&mut self) {
            TORCH_STORAGE.set(self.0);
        }
    }
    let _restore = Restore(TORCH_STORAGE.replace(torch));
    f()
}

/// Spins this many times (a few microseconds) waiting for the helpers' last chunks before
/// sleeping. Measured on a loaded 2-core machine (benches/threads.py), spinning 4,096 times
/// or yielding in a loop made 2 threads 0.75-0.8x as fast as 1; sleeping soon leaves the core to
/// whoever can use it, a helper that was preempted included.
const SPINS_BEFORE_SLEEP: u32 = 256;

/// Runs `f(chunk)` for chunk in 0..chunks on up to `threads` threads, on the calling thread
/// when `elements` is too few to pay for waking the pool.
///
/// The calling thread works too, beside `threads - 1` pool threads, taking chunks from a shared
/// counter: with `install`, it would only wait while the pool's threads woke up and did all of
/// it, which on a cache-resident array costs a good part of the second thread's gain. Which
/// thread runs a chunk never matters: a chunk's random bits depend on its index alone.
pub(crate) fn for_each_chunk(
    threads: usize,
    elements: usize,
    chunks: usize,
    f: impl Fn(usize) + Sync + Send,
) {
    let threads = threads.min(MAX_THREADS).min(cpus_online());
    let helpers = threads.saturating_sub(1).min(chunks.saturating_sub(1));
    if elements < parallel_min() || helpers == 0 || BACKOFF.solo_turn() {
        (0..chunks).for_each(f);
        return;
    }
    let shared = if TORCH_STORAGE.get() {
        crate::team::for_each_chunk(threads, chunks, &f)
    } else {
        Outcome::Unshared
    };
    match shared {
        Outcome::Team(run) => {
            BACKOFF.judge(helpers_gain(run.total, run.worked, run.mine, chunks));
            return;
        }
        Outcome::Alone => return,
        Outcome::Unshared => {}
    }
    let pool = pool(threads - 1);
    let Some((pool, ids)) = pool else {
        (0..chunks).for_each(f);
        return;
    };
    ids.steer_away_from_caller();
    let next = AtomicUsize::new(0);
    let work = || {
        let mut done = 0usize;
        loop {
            let c = next.fetch_add(1, Ordering::Relaxed);
            if c >= chunks {
                break done;
            }
            f(c);
            done += 1;
        }
    };
    let pending = AtomicUsize::new(helpers);
    let caller = std::thread::current();
    let start = Instant::now();
    pool.in_place_scope(|s| {
        for _ in 0..helpers {
            s.spawn(|_| {
                // Counted down even if `f` panics (the scope then re-raises it here), so the
                // wait below always ends.
                let _done = Done(&pending, &caller);
                work();
            });
        }
        let mine = work();
        let worked = start.elapsed();
        // The helpers are at most one chunk from done: spin briefly, then sleep until the last
        // one wakes this thread (park returns at once if it already did, and may return
        // spuriously, hence the loop).
        let mut spins = 0u32;
        while pending.load(Ordering::Acquire) > 0 {
            if spins < SPINS_BEFORE_SLEEP {
                spins += 1;
                std::hint::spin_loop();
            } else {
                std::thread::park();
            }
        }
        BACKOFF.judge(helpers_gain(start.elapsed(), worked, mine, chunks));
    });
}

/// When helpers cost more than they save (every core busy with other work: torch's threads,
/// other processes), the calls after run on the calling thread alone for a while, then the
/// helpers are tried again. Which thread runs a chunk never changes a result, so this only
/// trades time.
///
/// The helpers are judged by the time they saved on balance, not call by call: a helper that
/// another thread preempted mid-chunk can cost a scheduler slice (milliseconds, measured beside
/// torch's spinning OpenMP workers) where a win saves tens of microseconds, so one such loss
/// outweighs many wins, and wins alternating with losses must not keep the helpers on.
///
/// Savings are kept as credit, though, with a long memory (up to [`MAX_CREDIT_NS`]): on a quiet
/// machine a helper is still preempted now and then (a timer, the hypervisor), measured as one
/// loss of 0.2-2.8 ms in about 100 calls that each saved ~15 us on a 410K-element drop_path.
/// With a memory of a few calls, each such loss sent the calls alone for 16 times as long, and
/// 2 threads ran no faster than 1; the credit pays for it.
///
/// The helpers get a trial of [`TRIAL_CALLS`] calls before they are judged again after a spell
/// alone, and at first: the first call of a trial wakes helpers that went to sleep, which costs
/// more than one call saves (measured 20-100 us against ~15 us saved per call of 410K
/// elements). Judged by that one call, the helpers of a quiet machine never came back once
/// they had lost (2 threads then ran at 1 thread's pace for the rest of the program).
struct Backoff {
    /// Parallel calls still to run on the calling thread alone.
    solo_left: AtomicU32,
    /// How many calls the last losing call sent to the calling thread alone.
    last: AtomicU32,
    /// A decaying sum of the nanoseconds the helpers saved (negative: lost).
    balance: AtomicI64,
    /// Until when (nanoseconds on `now_ns`'s clock) calls run alone after a loss.
    solo_until: AtomicU64,
    /// Calls of the current trial still to run before the helpers are judged.
    trial_left: AtomicU32,
    /// The nanoseconds the current trial's calls saved so far, unfaded.
    trial_sum: AtomicI64,
}

static BACKOFF: Backoff = Backoff::new();

/// The most calls in a row that run alone before the helpers are tried again.
const MAX_BACKOFF: u32 = 64;
/// The calls of a trial, judged together: the first wakes the helpers, the rest show their pace.
const TRIAL_CALLS: u32 = 8;
/// A loss past this ends a trial at once: waking sleeping helpers cost 20-100 us, so a larger
/// loss is a helper that found no free core (a busy machine), which the rest of the trial
/// would pay for again, call after call.
const TRIAL_LOSS_MAX_NS: i64 = 500_000;

/// After a loss, calls also run alone for this many times the time it lost (up to
/// [`MAX_QUIET_NS`]), so that tries cost at most about 1/16 of the time in between. A count of
/// calls alone is not enough: on a contended core torch's OpenMP team (`team`) can lose
/// milliseconds in one call (its threads spin for ~3 ms before they sleep, and one that shares
/// the caller's CPU waits a scheduler slice), against the tens of microseconds of a call alone;
/// measured beside a busy core, 64 calls between tries still left 131K-element calls 3x slower
/// than alone.
const LOSS_FACTOR: u64 = 16;
/// The longest time alone after one loss: one second.
const MAX_QUIET_NS: u64 = 1_000_000_000;
/// The most savings kept as credit against later losses: 4 ms, what a regime change (another
/// process taking a core) can cost once before the calls go alone.
const MAX_CREDIT_NS: i64 = 4_000_000;
/// Credit fades by 1/`CREDIT_FADE` per call (a memory of about a thousand calls); a deficit fades
/// by a quarter per call, so that wins after a busy spell bring the helpers back soon.
const CREDIT_FADE: i64 = 1024;

/// Nanoseconds since the first call that asked (a monotonic clock for `solo_until`).
fn now_ns() -> u64 {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    let epoch = *EPOCH.get_or_init(Instant::now);
    epoch.elapsed().as_nanos().min(u64::MAX as u128) as u64
}

impl Backoff {
    const fn new() -> Backoff {
        Backoff {
            solo_left: AtomicU32::new(0),
            last: AtomicU32::new(0),
            balance: AtomicI64::new(0),
            solo_until: AtomicU64::new(0),
            trial_left: AtomicU32::new(TRIAL_CALLS),
            trial_sum: AtomicI64::new(0),
        }
    }

    /// Whether this call runs on the calling thread alone (and counts it).
    fn solo_turn(&self) -> bool {
        self.solo_turn_at(now_ns())
    }

    /// `solo_turn` at `now` (nanoseconds on `now_ns`'s clock).
    fn solo_turn_at(&self, now: u64) -> bool {
        // Races between callers only shift a turn or two; results never depend on it.
        let left = self.solo_left.load(Ordering::Relaxed);
        if left > 0 {
            self.solo_left.store(left - 1, Ordering::Relaxed);
            return true;
        }
        self.solo_until.load(Ordering::Relaxed) > now
    }

    /// Adds a parallel call's saving (`gain_ns`, negative for a loss) to the balance, which
    /// keeps 1023/1024 of its credit (up to `MAX_CREDIT_NS`) or three quarters of its deficit.
    /// While the balance is not negative the helpers stay; otherwise the next calls run alone,
    /// twice as many as after the previous loss (up to `MAX_BACKOFF`) and for at least
    /// `LOSS_FACTOR` times what this call lost beyond the credit (up to `MAX_QUIET_NS`), then
    /// the helpers get a trial. During a trial only its last call decides, on the trial's
    /// balance, unless a call loses more than `TRIAL_LOSS_MAX_NS`, which decides at once.
    fn judge(&self, gain_ns: i64) {
        self.judge_at(gain_ns, now_ns())
    }

    /// `judge` at `now` (nanoseconds on `now_ns`'s clock).
    fn judge_at(&self, gain_ns: i64, now: u64) {
        let old = self.balance.load(Ordering::Relaxed);
        let fade = if old > 0 { old / CREDIT_FADE } else { old / 4 };
        let balance = old
            .saturating_sub(fade)
            .saturating_add(gain_ns)
            .min(MAX_CREDIT_NS);
        self.balance.store(balance, Ordering::Relaxed);
        let trial = self.trial_left.load(Ordering::Relaxed);
        let trial_sum = if trial > 0 {
            let sum = self
                .trial_sum
                .load(Ordering::Relaxed)
                .saturating_add(gain_ns);
            self.trial_sum.store(sum, Ordering::Relaxed);
            sum
        } else {
            0
        };
        if trial > 1 && gain_ns > -TRIAL_LOSS_MAX_NS {
            self.trial_left.store(trial - 1, Ordering::Relaxed);
            return;
        }
        if balance >= 0 {
            self.trial_left.store(0, Ordering::Relaxed);
            self.last.store(0, Ordering::Relaxed);
        } else {
            let b = (self.last.load(Ordering::Relaxed) * 2).clamp(1, MAX_BACKOFF);
            self.last.store(b, Ordering::Relaxed);
            self.solo_left.store(b, Ordering::Relaxed);
            // What this call lost beyond the credit it found; what a failed trial lost in all
            // (its balance fades, so a trial of many small losses would otherwise buy less
            // quiet time than it cost).
            let lost = if trial > 0 {
                balance.unsigned_abs().max(trial_sum.min(0).unsigned_abs())
            } else {
                gain_ns.min(0).unsigned_abs().min(balance.unsigned_abs())
            };
            let quiet = lost.saturating_mul(LOSS_FACTOR).min(MAX_QUIET_NS);
            self.solo_until
                .store(now.saturating_add(quiet), Ordering::Relaxed);
            // The spell alone pays for this loss: the trial that follows it (the next call
            // judged, as the calls alone are not) starts from nothing.
            self.balance.store(0, Ordering::Relaxed);
            self.trial_sum.store(0, Ordering::Relaxed);
            self.trial_left.store(TRIAL_CALLS, Ordering::Relaxed);
        }
    }
}

/// The nanoseconds a parallel call saved against the caller alone: the time the caller, at the
/// pace it kept over its own `mine` chunks (`worked`), would have taken for all `chunks`, less
/// the call's `total`. Negative when the helpers cost more than they saved; 0 when the caller
/// ran no chunk (its pace is unknown).
fn helpers_gain(total: Duration, worked: Duration, mine: usize, chunks: usize) -> i64 {
    if mine == 0 {
        return 0;
    }
    let alone = worked.as_nanos() * chunks as u128 / mine as u128;
    let clamp = |v: u128| v.min(i64::MAX as u128) as i64;
    clamp(alone) - clamp(total.as_nanos())
}

/// Counts a helper out when dropped, and wakes the caller when it was the last.
struct Done<'a>(&'a AtomicUsize, &'a std::thread::Thread);

impl Drop for Done<'_> {
    fn drop(&mut self) {
        if self.0.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.1.unpark();
        }
    }
}

/// Runs `f(chunk, words)` over `words` split into chunks of `CHUNK / 64` words, in parallel as
/// [`for_each_chunk`] does.
pub(crate) fn for_each_word_chunk(
    threads: usize,
    elements: usize,
    words: &mut [u64],
    f: impl Fn(usize, &mut [u64]) + Sync + Send,
) {
    let per = crate::kernel::CHUNK / 64;
    if elements < parallel_min() || threads == 1 || words.len() <= per {
        words.chunks_mut(per).enumerate().for_each(|(c, w)| f(c, w));
        return;
    }
    // Each chunk's slice is taken out of its slot by whichever thread runs the chunk.
    let slots: Vec<Mutex<Option<&mut [u64]>>> =
        words.chunks_mut(per).map(|w| Mutex::new(Some(w))).collect();
    for_each_chunk(threads, elements, slots.len(), |c| {
        let taken = slots[c].lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(w) = taken {
            f(c, w);
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn thread_counts_parse_in_range_only() {
        assert_eq!(parse_num_threads("4"), Ok(4));
        assert_eq!(parse_num_threads(" 1 \n"), Ok(1));
        assert_eq!(parse_num_threads("1024"), Ok(MAX_THREADS));
        for bad in [
            "0",
            "1025",
            "1000000",
            "99999999999999999999999999999999999",
        ] {
            let e = parse_num_threads(bad).unwrap_err();
            assert!(
                e.contains("out of range") && e.contains("1 to 1024"),
                "{bad}: {e}"
            );
        }
        for bad in ["-2", "abc", "", "2.0", "1e3", "+-1"] {
            let e = parse_num_threads(bad).unwrap_err();
            assert!(
                e.contains("not a thread count") && e.contains("1 to 1024"),
                "{bad}: {e}"
            );
        }
    }

    #[test]
    fn set_num_threads_refuses_counts_outside_the_cap() {
        let before = get_num_threads();
        for bad in [0, MAX_THREADS + 1, usize::MAX] {
            let e = set_num_threads(bad).unwrap_err().to_string();
            assert_eq!(
                e,
                format!("set_num_threads expects between 1 and 1024 threads, got {bad}")
            );
        }
        assert_eq!(get_num_threads(), before);
    }

    #[test]
    fn helpers_gain_what_the_call_saved_against_the_callers_own_pace() {
        let us = Duration::from_micros;
        // 32 chunks, 16 by the caller in 100 us: alone it would take 200 us.
        assert_eq!(helpers_gain(us(150), us(100), 16, 32), 50_000);
        assert_eq!(helpers_gain(us(200), us(100), 16, 32), 0);
        assert_eq!(helpers_gain(us(900), us(100), 16, 32), -700_000); // a helper was preempted
        assert_eq!(helpers_gain(us(310), us(300), 32, 32), -10_000); // the helper came too late
        assert_eq!(helpers_gain(us(10), us(0), 0, 32), 0); // the helpers did everything
    }

    /// The calls alone after a loss once its quiet time has passed (the last turn, which is not
    /// alone, begins a trial).
    fn solo_runs(b: &Backoff) -> usize {
        (0..200).take_while(|_| b.solo_turn_at(u64::MAX)).count()
    }

    /// A back-off whose helpers, after the first trial, lost 2 ms once, with the one call that
    /// sent alone taken: the next call judged begins a trial.
    fn resting_after_a_loss() -> Backoff {
        let b = Backoff::new();
        trial(&b, 0);
        b.judge_at(-2_000_000, 0);
        assert_eq!(solo_runs(&b), 1);
        b
    }

    /// Runs a trial of calls that each saved `gain_ns`; returns the calls alone after it.
    fn trial(b: &Backoff, gain_ns: i64) -> usize {
        for _ in 0..TRIAL_CALLS {
            b.judge_at(gain_ns, 0);
        }
        solo_runs(b)
    }

    #[test]
    fn losses_send_doubling_runs_of_calls_to_the_caller_alone() {
        let b = Backoff::new();
        assert_eq!(trial(&b, 0), 0); // the first calls of a process are a trial
        b.judge(-1);
        assert_eq!(solo_runs(&b), 1);
        // Each losing trial doubles the run alone.
        assert_eq!(trial(&b, -1), 2);
        assert_eq!(trial(&b, -1), 4);
        for _ in 0..10 {
            trial(&b, -1);
        }
        assert_eq!(trial(&b, -1), MAX_BACKOFF as usize);
        assert_eq!(trial(&b, 1_000), 0); // a winning trial keeps the helpers and resets the count
        assert!(!b.solo_turn_at(u64::MAX));
        b.judge_at(-1_000_000, 0); // past the trial's 8 us of credit
        assert_eq!(solo_runs(&b), 1);
    }

    #[test]
    fn one_costly_loss_outweighs_many_small_wins() {
        // Beside torch's spinning workers a preempted helper cost ~2 ms where a win saved
        // ~50 us; alternating wins and losses kept the helpers on, call after call.
        let b = Backoff::new();
        trial(&b, 0);
        b.judge_at(50_000, 0);
        b.judge_at(-2_000_000, 0);
        let mut solo = solo_runs(&b);
        for _ in 0..6 {
            // A trial: a win, then a loss that ends it.
            b.judge_at(50_000, 0);
            b.judge_at(-2_000_000, 0);
            solo += solo_runs(&b);
        }
        assert_eq!(solo, 1 + 2 + 4 + 8 + 16 + 32 + 64);
        // Losses below a trial's limit are judged with the trial's other calls.
        for _ in 0..TRIAL_CALLS / 2 {
            b.judge_at(50_000, 0);
            b.judge_at(-400_000, 0);
        }
        assert_eq!(solo_runs(&b), 64);
        // Steady wins keep the helpers.
        assert_eq!(trial(&b, 50_000), 0);
        assert!(!b.solo_turn_at(u64::MAX));
        assert!(b.balance.load(Ordering::Relaxed) > 0);
    }

    #[test]
    fn a_loss_also_keeps_calls_alone_for_sixteen_times_the_time_it_lost() {
        // Beside a busy core torch's team lost ~8 ms in a call of ~30 us; 64 calls alone between
        // tries still left such calls 3x slower than alone.
        let b = Backoff::new();
        trial(&b, 0);
        let ms = 1_000_000u64;
        b.judge_at(-8_000_000, 100 * ms);
        assert!(b.solo_turn_at(100 * ms)); // the one call the count sends alone
        assert!(b.solo_turn_at(100 * ms + 127 * ms));
        assert!(!b.solo_turn_at(100 * ms + 128 * ms)); // a trial begins

        // A losing trial: 16 times its whole deficit, never more than a second.
        for _ in 1..TRIAL_CALLS {
            b.judge_at(0, 0);
        }
        b.judge_at(i64::MIN, 0);
        assert!(b.solo_turn_at(0) && b.solo_turn_at(0)); // two calls by count
        assert!(b.solo_turn_at(999 * ms));
        assert!(!b.solo_turn_at(1_000 * ms));
    }

    #[test]
    fn a_trial_forgives_the_call_that_wakes_the_helpers() {
        // Measured at 410K elements: a call that woke sleeping helpers lost 20-100 us, the calls
        // after it saved ~15 us each. Regression: judged by that one call after each spell
        // alone, the helpers never came back, and 2 threads ran at 1 thread's pace.
        let b = resting_after_a_loss();
        b.judge_at(-100_000, 0);
        for _ in 1..TRIAL_CALLS {
            b.judge_at(15_000, 0);
        }
        assert!(!b.solo_turn_at(u64::MAX));
        // The same at the first calls of a process, which wake (and spawn) the helpers.
        let b = Backoff::new();
        b.judge_at(-100_000, 0);
        assert!(!b.solo_turn_at(u64::MAX));
        for _ in 1..TRIAL_CALLS {
            b.judge_at(15_000, 0);
        }
        assert!(!b.solo_turn_at(u64::MAX));
    }

    #[test]
    fn a_trial_ends_at_its_first_costly_loss() {
        // Beside a busy core every call of a trial can lose milliseconds; eight of them before
        // deciding would cost 8 losses per spell alone where one did.
        let b = resting_after_a_loss();
        let ms = 1_000_000u64;
        b.judge_at(-2_000_000, 10 * ms); // the trial's first call
        assert!(b.solo_turn_at(10 * ms) && b.solo_turn_at(10 * ms)); // two calls by count
        assert!(b.solo_turn_at(10 * ms + 31 * ms)); // and 16 x 2 ms
        assert!(!b.solo_turn_at(10 * ms + 32 * ms));
    }

    #[test]
    fn a_failed_trial_buys_sixteen_times_all_it_lost() {
        // Eight calls that each lost 300 us (under the trial's limit) cost 2.4 ms; the faded
        // balance alone would have bought 16 x ~1 ms.
        let b = resting_after_a_loss();
        let ms = 1_000_000u64;
        for _ in 0..TRIAL_CALLS {
            b.judge_at(-300_000, 10 * ms);
        }
        assert!(b.solo_turn_at(10 * ms) && b.solo_turn_at(10 * ms)); // two calls by count
        assert!(b.solo_turn_at(10 * ms + 38 * ms)); // and 16 x 2.4 ms
        assert!(!b.solo_turn_at(10 * ms + 39 * ms));
    }

    #[test]
    fn rare_costly_losses_among_many_wins_keep_the_helpers() {
        // Measured on a quiet machine: about one loss of 0.2-2.8 ms per 100 calls that saved
        // ~15 us each. Regression: each such loss sent ~1,000 calls alone, and 2 threads ran no
        // faster than 1 on a 410K-element drop_path.
        let b = Backoff::new();
        for _ in 0..5 {
            for _ in 0..300 {
                b.judge_at(15_000, 0);
                assert!(!b.solo_turn_at(0));
            }
            b.judge_at(-2_800_000, 0);
            assert!(!b.solo_turn_at(0));
        }
        // The credit is bounded: a loss past it goes alone, for 16 times what the credit did
        // not cover.
        for _ in 0..100_000 {
            b.judge_at(1_000_000, 0);
        }
        assert_eq!(b.balance.load(Ordering::Relaxed), MAX_CREDIT_NS);
        b.judge_at(-5_000_000, 0);
        assert!(b.solo_turn_at(0)); // the count's one call
        assert!(b.solo_turn_at(15_000_000)); // the fade took ~4 us, so 16 x ~1 ms of quiet
        assert!(!b.solo_turn_at(17_000_000));
    }

    #[test]
    fn calls_on_torch_storage_share_out_from_fewer_elements() {
        assert_eq!(parallel_min(), PARALLEL_MIN);
        assert_eq!(on_torch_storage(true, parallel_min), TEAM_PARALLEL_MIN);
        // The flag is the call's own: a NumPy call made inside one on torch storage, and the
        // calls after it, get the default again.
        let inner = on_torch_storage(true, || on_torch_storage(false, parallel_min));
        assert_eq!(inner, PARALLEL_MIN);
        assert_eq!(parallel_min(), PARALLEL_MIN);
    }

    #[test]
    fn every_chunk_runs_once_for_any_thread_count() {
        // More threads than chunks, than CPUs, and past the cap: each chunk exactly once.
        for threads in [1, 2, 3, 7, MAX_THREADS + 5] {
            for chunks in [1, 2, 5, 40] {
                let runs: Vec<AtomicUsize> = (0..chunks).map(|_| AtomicUsize::new(0)).collect();
                for_each_chunk(threads, PARALLEL_MIN, chunks, |c| {
                    runs[c].fetch_add(1, Ordering::Relaxed);
                });
                for (c, r) in runs.iter().enumerate() {
                    assert_eq!(r.load(Ordering::Relaxed), 1, "{threads} threads, chunk {c}");
                }
            }
        }
    }
}
