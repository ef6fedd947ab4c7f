//! CPU kernels for the Hymba engine.
//!
//! Everything here is plain numerics over `f32` activations and weights kept in their stored
//! precision (f32, bf16 or f16). Nothing in this crate knows about Hymba: the model code in the
//! `hymba` crate composes these pieces in the order of the spec.
//!
//! Every optimised kernel has a slow reference beside it (`*_ref`) and tests comparing the two on
//! random inputs of odd sizes.

pub mod act;
#[cfg(target_arch = "x86_64")]
pub mod amx;
pub mod attention;
#[cfg(target_arch = "x86_64")]
pub mod avx512;
pub mod conv;
pub mod isa;
pub mod matmul;
pub mod norm;
pub mod probe;
pub mod qpanel;
pub mod quant;
pub mod rope;
pub mod scan;
pub mod testing;
#[cfg(target_arch = "x86_64")]
mod x86;

pub use matmul::{matmul, matmul_ref, Mat, WeightData};

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

/// Runs `f` on a thread of rayon's pool, so the serial work between the kernels' parallel loops
/// runs there too. Called from outside the pool, every parallel loop would otherwise be a hand-off
/// to the pool and back (two wake-ups), and the calling thread would be a third thread on the
/// pool's cores; a whole forward pass pays that once instead.
pub fn on_pool<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    rayon::scope(|_| f())
}

/// [`on_pool`] for work made of the kernels' parallel loops (a forward on the CPU): while `f`
/// runs, the pool's other threads keep looking for its loops' work instead of going to sleep
/// between them. A decode step is hundreds of short parallel loops, and a sleeping thread costs
/// each one a wake-up (a futex call and a context switch) before it can help.
pub fn on_busy_pool<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    let done = AtomicBool::new(false);
    let done = &done;
    rayon::scope(|s| {
        let home = rayon::current_thread_index();
        for _ in 1..rayon::current_num_threads() {
            s.spawn(move |_| keep_looking(done, home));
        }
        // Set however `f` ends: if it panics, the keepers must stop for the scope to end and
        // pass the panic on (else the call would hang).
        let _stop = Stop(done);
        f()
    })
}

/// Runs `f(task)` for every task of `0..n`, each once, on the calling thread and on the pool's
/// other threads, each claiming the next task from a shared counter. The caller, its own share
/// done, spins until the others' tasks are finished instead of waiting in rayon's join, which
/// puts a thread to sleep (a futex wait, then a wake-up) when the other thread's share ends
/// later than its own: in a decode step's hundreds of short loops that cost the forward's
/// thread ~8% of its time (Q4_0, 2 threads, `perf`).
pub fn par_tasks(n: usize, f: impl Fn(usize) + Sync) {
    let threads = rayon::current_num_threads().min(n);
    if threads <= 1 {
        (0..n).for_each(f);
        return;
    }
    let (next, done) = (AtomicUsize::new(0), AtomicUsize::new(0));
    let work = || loop {
        let task = next.fetch_add(1, Ordering::Relaxed);
        if task >= n {
            break;
        }
        // Counted however the task ends: a task that panics must not leave the caller spinning
        // (the panic then reaches the caller at the scope's end).
        let _done = Count(&done);
        f(task);
    };
    rayon::scope(|s| {
        for _ in 1..threads {
            s.spawn(|_| work());
        }
        work();
        while done.load(Ordering::Acquire) < n {
            std::hint::spin_loop();
        }
    });
}

/// Adds one to its counter when dropped.
struct Count<'a>(&'a AtomicUsize);

impl Drop for Count<'_> {
    fn drop(&mut self) {
        self.0.fetch_add(1, Ordering::Release);
    }
}

/// Sets its flag when dropped.
struct Stop<'a>(&'a AtomicBool);

impl Drop for Stop<'_> {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Release);
    }
}

/// Runs the pool's pending work until `done` (spinning while there is none). A keeper that lands
/// on the thread running the forward itself (taken up while that thread waited in a join) returns
/// at once: it would hold the forward below it up.
fn keep_looking(done: &AtomicBool, home: Option<usize>) {
    if rayon::current_thread_index() == home {
        return;
    }
    while !done.load(Ordering::Acquire) {
        if rayon::yield_now() != Some(rayon::Yield::Executed) {
            std::hint::spin_loop();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every task runs once, on a pool's threads and outside any; a task that panics passes its
    /// panic to the caller rather than leaving it spinning.
    #[test]
    fn par_tasks_runs_each_task_once() {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(3)
            .build()
            .unwrap();
        for n in [0, 1, 2, 7, 100] {
            let runs: Vec<AtomicUsize> = (0..n).map(|_| AtomicUsize::new(0)).collect();
            pool.install(|| {
                on_busy_pool(|| par_tasks(n, |t| _ = runs[t].fetch_add(1, Ordering::Relaxed)))
            });
            par_tasks(n, |t| _ = runs[t].fetch_add(1, Ordering::Relaxed));
            assert!(
                runs.iter().all(|r| r.load(Ordering::Relaxed) == 2),
                "{n} tasks"
            );
        }
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let r = pool.install(|| {
                std::panic::catch_unwind(|| {
                    par_tasks(50, |t| {
                        if t == 31 {
                            panic!("a task that fails")
                        }
                    })
                })
                .is_err()
            });
            tx.send(r).unwrap();
        });
        let r = rx.recv_timeout(std::time::Duration::from_secs(20));
        assert_eq!(r, Ok(true), "par_tasks hung or lost the panic");
    }

    /// A forward that panics on the busy pool passes its panic on (its keepers stop) rather than
    /// hanging, and the pool runs the next one.
    #[test]
    fn busy_pool_passes_panics_on() {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(3)
            .build()
            .unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let r = pool.install(|| {
                let panicked = std::panic::catch_unwind(|| {
                    on_busy_pool(|| -> usize { panic!("a forward that fails") })
                })
                .is_err();
                (panicked, on_busy_pool(|| 6 * 7))
            });
            tx.send(r).unwrap();
        });
        let r = rx.recv_timeout(std::time::Duration::from_secs(20));
        assert_eq!(r, Ok((true, 42)), "the busy pool hung or lost the panic");
    }
}
