//! State shared by the services of one server: whether it is shutting down.

use tokio::sync::watch;

/// Shared by the services of one server.
#[derive(Debug)]
pub(crate) struct ServerState {
    shutting_down: watch::Sender<bool>,
}

impl ServerState {
    pub(crate) fn new() -> Self {
        Self {
            shutting_down: watch::Sender::new(false),
        }
    }

    /// From now on: health NOT_SERVING, new requests UNAVAILABLE.
    pub(crate) fn begin_shutdown(&self) {
        self.shutting_down.send_replace(true);
    }

    pub(crate) fn is_shutting_down(&self) -> bool {
        *self.shutting_down.borrow()
    }

    /// Notified when shutdown begins.
    pub(crate) fn subscribe(&self) -> watch::Receiver<bool> {
        self.shutting_down.subscribe()
    }
}
