//! Keeping the pool's threads awake through a forward step.
//!
//! A decode step is hundreds of short parallel regions (a few µs to a few hundred µs each) with
//! serial bits between them. Rayon puts a worker that finds no work to sleep within
//! microseconds, and the next region wakes it again: on a VM that is a halt and an interrupt to
//! another virtual CPU per region, and an idle core's slower clocks between them. llama.cpp's
//! threads spin through a whole graph instead. [`run`] does the same inside rayon: while the
//! step runs, every other worker of the pool runs a spinner that takes the step's work as it
//! appears ([`rayon::yield_now`]) and otherwise spins; the spinners end with the step.

use std::hint::spin_loop;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

/// Turns the spinners off (`OLLM_CPU_SPIN=0`), for comparison.
pub const SPIN_ENV: &str = "OLLM_CPU_SPIN";

/// A spinner that has found no work for this long ends early. A step's serial bits are far
/// shorter; this bounds what a spinner costs when it ends up somewhere it cannot help (taken by
/// a worker that is itself waiting inside part of the step, or behind another caller's step),
/// where it would otherwise hold that worker's stack until the step ends.
const MAX_IDLE: Duration = Duration::from_micros(500);

fn enabled() -> bool {
    static ON: OnceLock<bool> = OnceLock::new();
    *ON.get_or_init(|| crate::env_switch(SPIN_ENV, true))
}

/// Runs `step` on the current thread (a worker of rayon's pool) while the pool's other workers
/// spin. In place when the pool has one thread or spinning is off.
pub fn run(step: &mut (dyn FnMut() + Send)) {
    let threads = rayon::current_num_threads();
    if threads < 2 || !enabled() {
        return step();
    }
    let owner = rayon::current_thread_index();
    let done = AtomicBool::new(false);
    rayon::scope(|s| {
        for _ in 1..threads {
            s.spawn(|_| spin_until(&done, owner));
        }
        step();
        done.store(true, Ordering::Release);
    });
}

/// Takes pending work or spins until `done`; returns at once on the step's own thread (a
/// spinner popped there would wait for the step beneath it), and after [`MAX_IDLE`] without work.
fn spin_until(done: &AtomicBool, owner: Option<usize>) {
    if rayon::current_thread_index() == owner {
        return;
    }
    #[cfg(test)]
    tests::SPINNERS_STARTED.fetch_add(1, Ordering::Relaxed);
    let mut idle_since: Option<Instant> = None;
    while !done.load(Ordering::Acquire) {
        match rayon::yield_now() {
            Some(rayon::Yield::Executed) => idle_since = None,
            _ => {
                if idle_since.get_or_insert_with(Instant::now).elapsed() > MAX_IDLE {
                    return;
                }
                spin_loop();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;

    /// Spinners that started on a thread other than their step's.
    pub(super) static SPINNERS_STARTED: AtomicUsize = AtomicUsize::new(0);
    /// The tests run one at a time, so one's spinners never count for the other.
    static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

    /// While a step runs, another worker of the pool runs a spinner (unless turned off).
    #[test]
    fn another_worker_spins_while_a_step_runs() {
        if !enabled() {
            return; // OLLM_CPU_SPIN=0 in the environment: nothing spins, by request
        }
        let _one = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
        let pool = rayon::ThreadPoolBuilder::new().num_threads(2).build().expect("a pool of 2");
        let before = SPINNERS_STARTED.load(Ordering::Relaxed);
        let mut seen = false;
        pool.install(|| {
            run(&mut || {
                let t = Instant::now();
                while !seen && t.elapsed() < Duration::from_secs(5) {
                    seen = SPINNERS_STARTED.load(Ordering::Relaxed) > before;
                }
            })
        });
        assert!(seen, "no spinner started on the pool's other thread within 5 s of the step");
    }

    /// A step's parallel work all runs, on more than one thread, and the step returns; nested
    /// and concurrent steps from several callers end too.
    #[test]
    fn steps_with_spinners_run_all_their_work_and_end() {
        let _one = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
        let pool = rayon::ThreadPoolBuilder::new().num_threads(3).build().expect("a pool of 3");
        let sum = AtomicUsize::new(0);
        let threads = std::sync::Mutex::new(std::collections::HashSet::new());
        let t0 = Instant::now();
        pool.install(|| {
            run(&mut || {
                use rayon::prelude::*;
                (0..10_000usize).into_par_iter().for_each(|i| {
                    sum.fetch_add(i, Ordering::Relaxed);
                    threads.lock().expect("not poisoned").insert(rayon::current_thread_index());
                    // Items wait (5 s at most) until a second thread has taken one, so a busy
                    // machine that is slow to schedule the other workers cannot finish the step on
                    // one thread first.
                    while enabled()
                        && threads.lock().expect("not poisoned").len() < 2
                        && t0.elapsed() < Duration::from_secs(5)
                    {
                        spin_loop();
                    }
                });
            })
        });
        assert_eq!(sum.load(Ordering::Relaxed), 10_000 * 9_999 / 2);
        if enabled() {
            assert!(threads.lock().expect("not poisoned").len() > 1, "the step's work stayed on one thread");
        }
        // Several callers' steps at once, each with a nested parallel region.
        let total = AtomicUsize::new(0);
        std::thread::scope(|s| {
            for _ in 0..4 {
                s.spawn(|| {
                    pool.install(|| {
                        run(&mut || {
                            use rayon::prelude::*;
                            let part: usize = (0..1000usize).into_par_iter().map(|i| i % 7).sum();
                            total.fetch_add(part, Ordering::Relaxed);
                        })
                    })
                });
            }
        });
        let one: usize = (0..1000usize).map(|i| i % 7).sum();
        assert_eq!(total.load(Ordering::Relaxed), 4 * one);
    }
}
