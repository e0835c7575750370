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
/// handle is dropped, or when the cell is retired.
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
                if cell.retired() {
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
            let Some(cell) = weak.upgrade() else {
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
