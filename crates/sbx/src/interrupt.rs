//! Waiting for the user (or the system) to stop `sbx`.

use tokio::signal::unix::{SignalKind, signal};

use crate::status;

/// Resolves when SIGINT (Ctrl-C) or SIGTERM arrives, with the status to exit with.
///
/// The caller then drops its running futures: the library's QEMU children are `kill_on_drop`,
/// so dropping a run kills its VM. A signal that cannot be watched never resolves.
pub async fn wait() -> u8 {
    let ctrl_c = async {
        if tokio::signal::ctrl_c().await.is_err() {
            std::future::pending::<()>().await;
        }
    };
    let terminate = async {
        match signal(SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        () = ctrl_c => status::INTERRUPTED,
        () = terminate => status::TERMINATED,
    }
}
