//! Shutdown in two steps, as the CA and the node agent do it: on the signal, report not ready
//! at once but serve on for a grace period (what still routes here while the endpoint is dropped
//! is answered), then stop accepting and give calls in flight a bounded time to finish (streams
//! never end on their own; their clients reconnect elsewhere).

use std::future::Future;
use std::time::Duration;

use tokio::sync::watch;
use tracing::info;

/// Turns true `grace` after `signalled` did (at once if `signalled` closes without).
pub fn stop_after_grace(
    mut signalled: watch::Receiver<bool>,
    grace: Duration,
) -> watch::Receiver<bool> {
    let (stop, stopped) = watch::channel(false);
    tokio::spawn(async move {
        if signalled.wait_for(|s| *s).await.is_ok() {
            info!(
                grace_s = grace.as_secs_f64(),
                "shutting down: reporting not ready, serving on for the grace period"
            );
            tokio::time::sleep(grace).await;
            info!("grace period over: no longer accepting; draining calls in flight");
        }
        stop.send_replace(true);
    });
    stopped
}

/// Runs `serving` (which stops accepting once `stopped` turns true) to its end, or until
/// `drain_timeout` after `stopped` turned true, whichever is first; `None` if calls were still
/// open then (they are closed by dropping `serving`).
pub async fn serve_then_drain<T>(
    serving: impl Future<Output = T>,
    mut stopped: watch::Receiver<bool>,
    drain_timeout: Duration,
) -> Option<T> {
    tokio::select! {
        result = serving => Some(result),
        () = async {
            let _ = stopped.wait_for(|stop| *stop).await;
            tokio::time::sleep(drain_timeout).await;
        } => {
            info!("calls still open after the drain timeout (streams); closing them");
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn stops_after_the_grace_and_drains_for_the_timeout() {
        let (signal_tx, signalled) = watch::channel(false);
        let mut stopped = stop_after_grace(signalled, Duration::from_secs(5));
        signal_tx.send_replace(true);
        let start = tokio::time::Instant::now();
        stopped.wait_for(|s| *s).await.unwrap();
        assert!(start.elapsed() >= Duration::from_secs(5));

        let never = std::future::pending::<()>();
        let drained = serve_then_drain(never, stopped.clone(), Duration::from_secs(1)).await;
        assert_eq!(drained, None);
        let finished = serve_then_drain(async { 7 }, stopped, Duration::from_secs(1)).await;
        assert_eq!(finished, Some(7));
    }

    #[tokio::test]
    async fn a_closed_signal_stops_at_once() {
        let (signal_tx, signalled) = watch::channel(false);
        drop(signal_tx);
        let mut stopped = stop_after_grace(signalled, Duration::from_secs(3600));
        stopped.wait_for(|s| *s).await.unwrap();
    }
}
