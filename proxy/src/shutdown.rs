//! A shutdown trigger that any number of server loops and tasks can wait on.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use tokio::sync::Notify;

/// A callback run when the trigger fires, e.g. to wake a thread blocked in a system call.
type WakeFn = Box<dyn Fn() + Send + Sync>;

/// Cloneable handle: one clone calls [`Shutdown::trigger`], the others observe it.
#[derive(Clone, Default)]
pub struct Shutdown {
    inner: Arc<Inner>,
}

#[derive(Default)]
struct Inner {
    triggered: AtomicBool,
    notify: Notify,
    wakers: Mutex<Vec<WakeFn>>,
}

impl std::fmt::Debug for Shutdown {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shutdown")
            .field("triggered", &self.is_triggered())
            .finish()
    }
}

impl Shutdown {
    /// A trigger that has not fired.
    pub fn new() -> Self {
        Self::default()
    }

    /// Fires the trigger; every waiter wakes. Idempotent.
    pub fn trigger(&self) {
        self.inner.triggered.store(true, Ordering::SeqCst);
        self.inner.notify.notify_waiters();
        let wakers = self.inner.wakers.lock().unwrap_or_else(|p| p.into_inner());
        for wake in wakers.iter() {
            wake();
        }
    }

    /// Whether the trigger has fired.
    pub fn is_triggered(&self) -> bool {
        self.inner.triggered.load(Ordering::SeqCst)
    }

    /// Runs `wake` when the trigger fires (at once if it already has). For threads that wait
    /// in a system call rather than on a future.
    pub fn on_trigger(&self, wake: impl Fn() + Send + Sync + 'static) {
        let mut wakers = self.inner.wakers.lock().unwrap_or_else(|p| p.into_inner());
        wakers.push(Box::new(wake));
        drop(wakers);
        if self.is_triggered() {
            self.trigger();
        }
    }

    /// Completes once the trigger has fired.
    pub async fn wait(&self) {
        let notified = self.inner.notify.notified();
        tokio::pin!(notified);
        // Register before checking the flag so a trigger in between is not missed.
        notified.as_mut().enable();
        if self.is_triggered() {
            return;
        }
        notified.await;
    }
}
