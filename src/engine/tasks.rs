//! Owned tasks: every task the engine starts belongs to a `TaskGroup` (one per session, one per
//! torrent), is named, and logs how it ended: an error or a panic at `warn`/`debug`, a normal end
//! at `trace`. Shutdown is "signal, then wait (bounded)": `shutdown` cancels the group's token,
//! which every task of the group selects on, then joins them; stragglers past the bound are
//! aborted, so `shutdown` returns only when the group's tasks are gone.

use std::fmt::Display;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::sync::Mutex;
use std::time::Duration;

use futures_util::FutureExt;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

pub struct TaskGroup {
    name: &'static str,
    cancel: CancellationToken,
    set: Mutex<JoinSet<()>>,
}

/// How a task's failure is logged: a peer dropping is routine, a listener dying is not.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    Routine,
    Serious,
}

impl TaskGroup {
    pub fn new(name: &'static str, cancel: CancellationToken) -> TaskGroup {
        TaskGroup {
            name,
            cancel,
            set: Mutex::new(JoinSet::new()),
        }
    }

    /// The token every task of this group stops on; child tokens stop with it.
    pub fn token(&self) -> &CancellationToken {
        &self.cancel
    }

    pub fn is_cancelled(&self) -> bool {
        self.cancel.is_cancelled()
    }

    /// Spawns `fut` on the current runtime. It is dropped when the group is cancelled (so it
    /// needs no cancellation branch of its own unless it must clean up first). A task spawned
    /// after cancellation does not run.
    pub fn spawn<F, E>(&self, name: &'static str, failure: Failure, fut: F)
    where
        F: Future<Output = Result<(), E>> + Send + 'static,
        E: Display + Send + 'static,
    {
        let cancel = self.cancel.clone();
        let group = self.name;
        let task = async move {
            let run = AssertUnwindSafe(fut).catch_unwind();
            let ended = tokio::select! {
                r = run => r,
                _ = cancel.cancelled() => {
                    log::trace!("{group}/{name}: cancelled");
                    return;
                }
            };
            match ended {
                Ok(Ok(())) => log::trace!("{group}/{name}: ended"),
                Ok(Err(e)) if failure == Failure::Routine => log::debug!("{group}/{name}: {e}"),
                Ok(Err(e)) => log::warn!("{group}/{name}: {e}"),
                Err(panic) => log::error!("{group}/{name} panicked: {}", panic_text(&panic)),
            }
        };
        let mut set = lock(&self.set);
        // Reap finished tasks so a long session's set does not grow with every peer.
        while set.try_join_next().is_some() {}
        if !self.cancel.is_cancelled() {
            set.spawn(task);
        }
    }

    /// Runs blocking work (hashing, disk I/O) on the blocking pool as part of this group: a
    /// shutdown waits for it. A blocking task cannot be interrupted; it is expected to be short.
    pub fn spawn_blocking(&self, name: &'static str, work: impl FnOnce() + Send + 'static) {
        let group = self.name;
        let mut set = lock(&self.set);
        while set.try_join_next().is_some() {}
        set.spawn_blocking(move || {
            if let Err(panic) = std::panic::catch_unwind(AssertUnwindSafe(work)) {
                log::error!("{group}/{name} panicked: {}", panic_text(&panic));
            }
        });
    }

    /// Tasks not yet reaped (running, or finished since the last spawn).
    pub fn len(&self) -> usize {
        lock(&self.set).len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Cancels every task and waits up to `bound` for them to end; aborts the rest.
    pub async fn shutdown(&self, bound: Duration) {
        self.cancel.cancel();
        let mut set = std::mem::take(&mut *lock(&self.set));
        let all_done = async { while set.join_next().await.is_some() {} };
        if tokio::time::timeout(bound, all_done).await.is_err() {
            log::warn!(
                "{}: {} task(s) still running after {bound:?}; aborting them",
                self.name,
                set.len()
            );
            set.abort_all();
            while set.join_next().await.is_some() {}
        }
    }
}

fn panic_text(panic: &Box<dyn std::any::Any + Send>) -> String {
    if let Some(s) = panic.downcast_ref::<&str>() {
        s.to_string()
    } else if let Some(s) = panic.downcast_ref::<String>() {
        s.clone()
    } else {
        "(no message)".to_string()
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;

    #[tokio::test(start_paused = true)]
    async fn shutdown_cancels_and_waits_for_every_task() {
        let g = TaskGroup::new("test", CancellationToken::new());
        let dropped = Arc::new(AtomicBool::new(false));
        struct SetOnDrop(Arc<AtomicBool>);
        impl Drop for SetOnDrop {
            fn drop(&mut self) {
                self.0.store(true, Ordering::SeqCst);
            }
        }
        let guard = SetOnDrop(dropped.clone());
        g.spawn("forever", Failure::Routine, async move {
            let _guard = guard;
            std::future::pending::<()>().await;
            Ok::<(), String>(())
        });
        assert_eq!(g.len(), 1);
        g.shutdown(Duration::from_secs(5)).await;
        assert!(
            dropped.load(Ordering::SeqCst),
            "the task's state was dropped"
        );
        assert!(g.is_empty());
        // Spawning after shutdown runs nothing.
        g.spawn("late", Failure::Routine, async { Ok::<(), String>(()) });
        assert!(g.is_empty());
    }

    #[tokio::test]
    async fn a_panicking_task_is_contained_and_reaped() {
        let g = TaskGroup::new("test", CancellationToken::new());
        g.spawn("boom", Failure::Serious, async {
            if g_true() {
                panic!("on purpose");
            }
            Ok::<(), String>(())
        });
        g.spawn_blocking("boom-blocking", || panic!("on purpose too"));
        g.shutdown(Duration::from_secs(5)).await;
        assert!(g.is_empty());
    }

    fn g_true() -> bool {
        std::hint::black_box(true)
    }

    #[tokio::test(start_paused = true)]
    async fn shutdown_waits_for_blocking_work() {
        let g = TaskGroup::new("test", CancellationToken::new());
        let done = Arc::new(AtomicBool::new(false));
        let d = done.clone();
        g.spawn_blocking("slow", move || {
            std::thread::sleep(Duration::from_millis(200));
            d.store(true, Ordering::SeqCst);
        });
        g.shutdown(Duration::from_secs(30)).await;
        assert!(
            done.load(Ordering::SeqCst),
            "blocking work finished before shutdown returned"
        );
    }
}
