//! The end of a SIGTERM drain: live connections that are still open when
//! the drain timeout runs out are told to close.
use std::sync::atomic::{AtomicBool, Ordering};

use tokio::sync::Notify;

static FORCED: AtomicBool = AtomicBool::new(false);
static NOTIFY: Notify = Notify::const_new();

/// Tells every live connection to close now.
pub fn force() {
    FORCED.store(true, Ordering::SeqCst);
    NOTIFY.notify_waiters();
    crate::park::wake_all();
}

pub fn is_forced() -> bool {
    FORCED.load(Ordering::SeqCst)
}

/// Resolves once `force` has been called (at once if it already was).
pub async fn forced() {
    loop {
        let notified = NOTIFY.notified();
        tokio::pin!(notified);
        // Registered before the check, so a `force` in between still wakes us.
        notified.as_mut().enable();
        if FORCED.load(Ordering::SeqCst) {
            return;
        }
        notified.await;
    }
}
