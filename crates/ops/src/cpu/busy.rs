//! Keeping the pool's threads awake through a forward step.
//!
//! A decode step is hundreds of short parallel regions (a few µs to a few hundred µs each) with
//! serial bits between them. Rayon puts a worker that finds no work to sleep within
//! microseconds, and the next region wakes it again: on a VM that is a halt and an interrupt to
//! another virtual CPU per region, and an idle core's slower clocks between them. llama.cpp's
//! threads spin through a whole graph instead. [`run`] does the same inside rayon: while the
//! step runs, every other worker of the pool runs a spinner that takes the step's work as it
//! appears and otherwise spins; the spinners end with the step.
//!
//! The step's work reaches a spinner two ways: rayon's (a spinner calls [`rayon::yield_now`],
//! which runs a job it can steal), and [`parallel_parts`], where the step's thread publishes a
//! region of numbered parts that the spinners claim from a shared counter, and then spins to the
//! region's end. The second is what a decode step's matmuls and attention use: a rayon join's
//! waiting side sleeps after a few microseconds and is woken by an interrupt, and with one
//! thread asleep at the end of each region the memory is read by the other alone.

use std::cell::Cell;
use std::hint::spin_loop;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, AtomicPtr, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

/// Turns the spinners off (`OLLM_CPU_SPIN=0`), for comparison.
pub const SPIN_ENV: &str = "OLLM_CPU_SPIN";

/// A spinner that has found no work for this long ends early. A step's serial bits are far
/// shorter; this bounds what a spinner costs when it ends up somewhere it cannot help (taken by
/// a worker that is itself waiting inside part of the step, or behind another caller's step),
/// where it would otherwise hold that worker's stack until the step ends.
const MAX_IDLE: Duration = Duration::from_micros(500);

/// The same before a spinner's first work: it may start while the step's thread is still on its
/// way to the first region (or descheduled), and a spinner gone before then leaves the whole
/// step to rayon's sleeping joins.
const FIRST_IDLE: Duration = Duration::from_millis(5);

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
    let shared = Shared::default();
    rayon::scope(|s| {
        // One spinner on every worker (the owner's returns at once): broadcast jobs wake their
        // workers and cannot be stolen, where a spawned spinner could sit in the owner's queue
        // while the other workers sleep, or be popped by the owner itself in a join.
        s.spawn_broadcast(|_, _| spin_until(&shared, owner));
        let _end = EndStep { shared: &shared, outer: STEP.replace(&shared) };
        step();
    });
}

/// Ends a step, on return or unwind: the owner's STEP restored, the spinners told.
struct EndStep<'a> {
    shared: &'a Shared,
    outer: *const Shared,
}

impl Drop for EndStep<'_> {
    fn drop(&mut self) {
        STEP.set(self.outer);
        self.shared.done.store(true, Ordering::Release);
    }
}

thread_local! {
    /// The step whose owner this thread is, while it is outside one of its regions.
    static STEP: Cell<*const Shared> = const { Cell::new(std::ptr::null()) };
}

/// What a step's owner and its spinners share: the region of parts being handed out.
#[derive(Default)]
struct Shared {
    /// The step has ended.
    done: AtomicBool,
    /// Spinners now looking for work (a region with none falls back to rayon).
    helpers: AtomicUsize,
    /// The current region: generation (32 bits), parts (16), next unclaimed part (16). A part
    /// is claimed by a compare-and-swap of this word, so a stale reader never claims a part of a
    /// later region with an earlier region's function.
    claim: AtomicU64,
    /// The region's parts run so far (or abandoned by a panic).
    finished: AtomicUsize,
    /// A part panicked.
    panicked: AtomicBool,
    /// The region's function: a monomorphic trampoline and the closure it calls.
    call: AtomicPtr<()>,
    data: AtomicPtr<()>,
}

const PART_BITS: u32 = 16;
const PART_MASK: u64 = (1 << PART_BITS) - 1;

fn pack(generation: u64, parts: usize, next: usize) -> u64 {
    (generation << (2 * PART_BITS)) | ((parts as u64) << PART_BITS) | next as u64
}

/// Calls the closure `data` points at, of type `F`, on part `i`.
///
/// # Safety
/// `data` points at a live `F`.
unsafe fn trampoline<F: Fn(usize) + Sync>(data: *const (), i: usize) {
    // SAFETY: the caller's contract.
    unsafe { (*data.cast::<F>())(i) }
}

impl Shared {
    /// Claims and runs parts of the current region until none is left; whether it ran any.
    fn help(&self) -> bool {
        let mut ran = false;
        loop {
            let c = self.claim.load(Ordering::Acquire);
            let (parts, next) = (((c >> PART_BITS) & PART_MASK) as usize, (c & PART_MASK) as usize);
            if next >= parts {
                return ran;
            }
            let (call, data) = (self.call.load(Ordering::Acquire), self.data.load(Ordering::Acquire));
            if self.claim.compare_exchange_weak(c, c + 1, Ordering::AcqRel, Ordering::Relaxed).is_err() {
                continue;
            }
            // The claim succeeded with `next < parts`, so this region was still handing out
            // parts: its owner is waiting for this one, its closure is alive, and `call`/`data`
            // were published (Release on `claim`) before the word just claimed from.
            // SAFETY: `call` is `trampoline::<F>` for the `F` that `data` points at.
            let call: unsafe fn(*const (), usize) = unsafe { std::mem::transmute(call) };
            run_part(&self.panicked, || unsafe { call(data, next) });
            self.finished.fetch_add(1, Ordering::AcqRel);
            ran = true;
        }
    }
}

/// Runs `f(0) .. f(parts - 1)` in parallel and returns when all have run; when parts panic, the
/// others still run and then this call panics. On the owner of a
/// step ([`run`]) with spinners waiting, the parts go to them through a shared counter and the
/// owner spins until the last one ends — no rayon join, whose waiting side sleeps after a few
/// microseconds and is woken by an interrupt on a VM (tens of µs, with no thread reading
/// memory meanwhile). Elsewhere (no step, a nested call, no spinner awake): rayon.
pub fn parallel_parts<F: Fn(usize) + Sync>(parts: usize, f: F) {
    let sh = STEP.get();
    // SAFETY: STEP holds a `Shared` of a `run` on this thread's stack, live until it resets STEP.
    let shared = unsafe { sh.as_ref() };
    let Some(shared) =
        shared.filter(|s| parts > 1 && parts < PART_MASK as usize && s.helpers.load(Ordering::SeqCst) > 0)
    else {
        // Every part runs even when one panics, as on the spinners' path, then the region panics.
        use rayon::prelude::*;
        let panicked = AtomicBool::new(false);
        (0..parts).into_par_iter().for_each(|i| run_part(&panicked, || f(i)));
        return raise_if(&panicked);
    };
    // Nested calls (inside `f` on this thread) take the rayon path.
    STEP.set(std::ptr::null());
    // Only this thread publishes regions, so the word's generation is the last one handed out.
    let generation = (shared.claim.load(Ordering::Relaxed) >> (2 * PART_BITS)) + 1;
    shared.finished.store(0, Ordering::Relaxed);
    shared.panicked.store(false, Ordering::Relaxed);
    shared.call.store(trampoline::<F> as *mut (), Ordering::Release);
    shared.data.store((&f as *const F).cast_mut().cast(), Ordering::Release);
    shared.claim.store(pack(generation, parts, 0), Ordering::SeqCst);
    shared.help();
    while shared.finished.load(Ordering::Acquire) < parts {
        spin_loop();
    }
    STEP.set(sh);
    raise_if(&shared.panicked);
}

/// Runs one part of a region, noting a panic in `panicked` instead of unwinding, so that the
/// region's other parts still run and its owner still sees every part end.
fn run_part(panicked: &AtomicBool, part: impl FnOnce()) {
    if std::panic::catch_unwind(std::panic::AssertUnwindSafe(part)).is_err() {
        panicked.store(true, Ordering::Relaxed);
    }
}

/// The region's panic, on its owner, once every part has ended (the part's own message was
/// printed where it panicked).
fn raise_if(panicked: &AtomicBool) {
    if panicked.load(Ordering::Relaxed) {
        panic!("a part of a parallel region panicked (its message is above)");
    }
}

/// Takes pending work or spins until the step is done; returns at once on the step's own thread
/// (a spinner popped there would wait for the step beneath it), and after [`MAX_IDLE`] without
/// work ([`FIRST_IDLE`] before its first).
fn spin_until(shared: &Shared, owner: Option<usize>) {
    if rayon::current_thread_index() == owner {
        return;
    }
    #[cfg(test)]
    tests::SPINNERS_STARTED.fetch_add(1, Ordering::Relaxed);
    shared.helpers.fetch_add(1, Ordering::SeqCst);
    let (mut idle_since, mut limit): (Option<Instant>, _) = (None, FIRST_IDLE);
    while !shared.done.load(Ordering::Acquire) {
        if shared.help() {
            (idle_since, limit) = (None, MAX_IDLE);
            continue;
        }
        match rayon::yield_now() {
            Some(rayon::Yield::Executed) => (idle_since, limit) = (None, MAX_IDLE),
            _ => {
                if idle_since.get_or_insert_with(Instant::now).elapsed() > limit {
                    break;
                }
                spin_loop();
            }
        }
    }
    shared.helpers.fetch_sub(1, Ordering::SeqCst);
    // A region published just before the count fell is still taken.
    shared.help();
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

    /// Waits (5 s at most) until a spinner of the step this thread owns looks for parts, so that
    /// the regions after it take the spinners' path rather than rayon's (in a forward the first
    /// regions go through rayon until then).
    fn wait_for_a_helper() {
        // SAFETY: called inside `run` on its thread, where STEP is that step's live `Shared`.
        let Some(shared) = (unsafe { STEP.get().as_ref() }) else { return };
        let t0 = Instant::now();
        while enabled() && shared.helpers.load(Ordering::SeqCst) == 0 && t0.elapsed() < Duration::from_secs(5) {
            // A region through rayon (no helper yet) wakes the other workers, which then steal
            // the spinners; a bare spin here could wait for a sleeping worker that nothing wakes.
            parallel_parts(2, |_| spin_loop());
        }
    }

    /// Every part of every region runs exactly once, inside a step (through the spinners) and
    /// outside one (rayon), nested regions included; inside a step the parts reach another thread.
    #[test]
    fn parallel_parts_run_each_part_once() {
        let _one = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
        let pool = rayon::ThreadPoolBuilder::new().num_threads(2).build().expect("a pool of 2");
        let counts: Vec<AtomicUsize> = (0..64).map(|_| AtomicUsize::new(0)).collect();
        let other_thread = AtomicBool::new(false);
        let regions = |owner: Option<usize>| {
            for r in 0..3000usize {
                let parts = 2 + r % 60;
                parallel_parts(parts, |i| {
                    counts[i].fetch_add(1, Ordering::Relaxed);
                    if rayon::current_thread_index() != owner {
                        other_thread.store(true, Ordering::Relaxed);
                    }
                    // The first regions' parts wait (5 s at most) for the other thread to take
                    // one, or the owner could run every short part before the spinner looks.
                    let t0 = Instant::now();
                    while owner.is_some()
                        && enabled()
                        && r < 10
                        && !other_thread.load(Ordering::Relaxed)
                        && t0.elapsed() < Duration::from_secs(5)
                    {
                        spin_loop();
                    }
                    if r % 500 == 0 && i == 0 {
                        // A nested region, from inside a part.
                        let inner = AtomicUsize::new(0);
                        parallel_parts(5, |j| {
                            inner.fetch_add(j + 1, Ordering::Relaxed);
                        });
                        assert_eq!(inner.load(Ordering::Relaxed), 15);
                    }
                });
            }
        };
        let expected: Vec<usize> = (0..64).map(|i| (0..3000usize).filter(|r| i < 2 + r % 60).count()).collect();
        pool.install(|| {
            run(&mut || {
                wait_for_a_helper();
                regions(rayon::current_thread_index())
            })
        });
        let got: Vec<usize> = counts.iter().map(|c| c.swap(0, Ordering::Relaxed)).collect();
        assert_eq!(got, expected, "inside a step");
        if enabled() {
            assert!(other_thread.load(Ordering::Relaxed), "no part of 3000 regions ran on the spinner's thread");
        }
        pool.install(|| regions(None));
        let got: Vec<usize> = counts.iter().map(|c| c.swap(0, Ordering::Relaxed)).collect();
        assert_eq!(got, expected, "outside a step");
    }

    /// A part that panics makes its region panic on the owner (on whichever thread the part
    /// ran), after every other part has ended; the step goes on with later regions. The same
    /// outside a step (rayon's path).
    #[test]
    fn a_panicking_part_panics_its_region_and_the_step_goes_on() {
        let _one = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
        let pool = rayon::ThreadPoolBuilder::new().num_threads(2).build().expect("a pool of 2");
        let regions = || {
            for bad in [0usize, 7, 15] {
                let ran = AtomicUsize::new(0);
                let caught = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    parallel_parts(16, |i| {
                        if i == bad {
                            panic!("part {i} fails on purpose");
                        }
                        ran.fetch_add(1, Ordering::Relaxed);
                    })
                }));
                assert!(caught.is_err(), "the region of part {bad} did not panic");
                assert_eq!(ran.load(Ordering::Relaxed), 15, "the other parts of region {bad}");
            }
            let sum = AtomicUsize::new(0);
            parallel_parts(10, |i| {
                sum.fetch_add(i, Ordering::Relaxed);
            });
            assert_eq!(sum.load(Ordering::Relaxed), 45);
        };
        pool.install(|| {
            run(&mut || {
                wait_for_a_helper();
                regions()
            })
        });
        pool.install(regions);
    }
}
