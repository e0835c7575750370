//! The background refresher
//! ([`background_refresh`](crate::EshopboxAuthBuilder::background_refresh)): keeps the
//! token fresh ahead of expiry without waiting for requests.

use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use super::cell::TokenCell;
use crate::error::Error;

/// Fetches a token at once, then refreshes each one when it reaches its refresh
/// time. The task holds the cell weakly and ends when the last layer, service and
/// handle is dropped, or when the cell is retired or its workspace dropped.
pub(crate) fn spawn_background(cell: &Arc<TokenCell>) -> Result<(), Error> {
    let runtime = tokio::runtime::Handle::try_current().map_err(|_| {
        Error::config("background_refresh needs a tokio runtime when the layer is built")
    })?;
    let weak = Arc::downgrade(cell);
    let mut changes = cell.subscribe();
    runtime.spawn(async move {
        let mut retry_at: Option<Instant> = None;
        let mut failures = 0;
        loop {
            let due = {
                let Some(cell) = weak.upgrade() else {
                    return;
                };
                if cell.background_over() {
                    return;
                }
                let due = cell.peek().map_or_else(Instant::now, |t| t.refresh_at);
                retry_at.map_or(due, |at| due.max(at))
            };
            match tokio::time::timeout_at(due, changes.changed()).await {
                Ok(Ok(())) => continue,
                Ok(Err(_)) => return,
                Err(_) => {}
            }
            let Some(cell) = weak.upgrade().filter(|cell| !cell.background_over()) else {
                return;
            };
            match cell.force().await {
                Ok(_) => {
                    failures = 0;
                    retry_at = None;
                }
                Err(error) => {
                    failures += 1;
                    let wait =
                        Duration::from_secs(1 << failures.min(5)).min(Duration::from_secs(30));
                    tracing::debug!(
                        error = &error as &dyn std::error::Error,
                        ?wait,
                        "background token refresh failed"
                    );
                    retry_at = Some(Instant::now() + wait);
                }
            }
            changes.borrow_and_update();
        }
    });
    Ok(())
}

#[cfg(all(test, feature = "workspaces"))]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;
    use crate::token::cell::Timing;
    use crate::token::source::{source_fn, FetchedToken};

    /// A cell whose tokens live ten minutes, counting its token calls.
    fn counted_cell() -> (Arc<TokenCell>, Arc<AtomicUsize>) {
        let calls = Arc::new(AtomicUsize::new(0));
        let counted = calls.clone();
        let source = source_fn(move || {
            counted.fetch_add(1, Ordering::SeqCst);
            async { Ok(FetchedToken::new("t").expires_in(Duration::from_secs(600))) }
        });
        let timing = Timing {
            margin: Duration::from_secs(60),
            timeout: Duration::from_secs(30),
            attempt_timeout: None,
            failure_cooldown: Duration::from_secs(2),
        };
        (TokenCell::new(Box::new(source), None, None, timing), calls)
    }

    #[tokio::test(start_paused = true)]
    async fn the_refresher_keeps_refreshing_until_its_cell_is_dropped_from_the_map() {
        let (cell, calls) = counted_cell();
        spawn_background(&cell).unwrap();
        // An hour of ten-minute tokens: the first call and six refreshes.
        tokio::time::sleep(Duration::from_secs(3600)).await;
        assert_eq!(calls.load(Ordering::SeqCst), 7);
        // Dropped from the map while something still holds the cell: no more calls,
        // and the task ends at once.
        let tasks = tokio::runtime::Handle::current()
            .metrics()
            .num_alive_tasks();
        cell.end_background();
        // Woken by the end, the refresher returns at once: no time passes here.
        for _ in 0..100 {
            tokio::task::yield_now().await;
        }
        assert!(
            tokio::runtime::Handle::current()
                .metrics()
                .num_alive_tasks()
                < tasks,
            "the refresher is still there"
        );
        tokio::time::sleep(Duration::from_secs(3600)).await;
        assert_eq!(calls.load(Ordering::SeqCst), 7);
        // Requests still holding it refresh on demand.
        cell.invalidate_current();
        assert!(cell.wait().await.is_ok());
        assert_eq!(calls.load(Ordering::SeqCst), 8);
    }
}
