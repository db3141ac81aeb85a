//! Stopping long-running ingest cleanly: SIGINT or SIGTERM sets a flag the ingest loops poll,
//! and they commit what they hold before returning.

use std::sync::atomic::{AtomicBool, Ordering};

/// Sets `flag` on the first SIGINT or SIGTERM, from a thread of its own running a small tokio
/// runtime; tokio's handlers are registered before this returns.
pub fn set_on_stop_signal(flag: &'static AtomicBool) -> std::io::Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .build()?;
    let (mut int, mut term) = rt.block_on(async {
        Ok::<_, std::io::Error>((
            signal(SignalKind::interrupt())?,
            signal(SignalKind::terminate())?,
        ))
    })?;
    std::thread::Builder::new()
        .name("stop-signal".into())
        .spawn(move || {
            rt.block_on(std::future::poll_fn(|cx| {
                if int.poll_recv(cx).is_ready() || term.poll_recv(cx).is_ready() {
                    std::task::Poll::Ready(())
                } else {
                    std::task::Poll::Pending
                }
            }));
            tracing::info!("stop signal received; committing what is buffered");
            flag.store(true, Ordering::SeqCst);
        })?;
    Ok(())
}
