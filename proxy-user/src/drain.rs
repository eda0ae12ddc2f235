//! The end of a SIGTERM drain: live connections that are still open when
//! the drain timeout runs out are told to close. One value, made in main
//! and handed to the datapath, which is where connections wait.
use std::sync::atomic::{AtomicBool, Ordering};

use tokio::sync::Notify;

#[derive(Default)]
pub struct Drain {
    forced: AtomicBool,
    notify: Notify,
}

impl Drain {
    /// Tells every connection waiting in `forced` to close now. Parked
    /// connections wait on no task: the caller wakes those as well.
    pub fn force(&self) {
        self.forced.store(true, Ordering::SeqCst);
        self.notify.notify_waiters();
    }

    pub fn is_forced(&self) -> bool {
        self.forced.load(Ordering::SeqCst)
    }

    /// Resolves once `force` has been called (at once if it already was).
    pub async fn forced(&self) {
        loop {
            let notified = self.notify.notified();
            tokio::pin!(notified);
            // Registered before the check, so a `force` in between still wakes us.
            notified.as_mut().enable();
            if self.is_forced() {
                return;
            }
            notified.await;
        }
    }
}
