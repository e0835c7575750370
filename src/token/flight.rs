//! Single flight: at most one refresh runs per cell, in a spawned task, and every
//! request that needs its result subscribes to a `watch` channel.
//!
//! Dropping the request that started a refresh does not abort it. The `slow` mutex is
//! only taken to start or join a refresh, never on the request path's fast lane and
//! never across an `.await`. A refresh task that is dropped unfinished (its runtime
//! shut down, or a panic) still ends the refresh through its [`Finish`] guard, so the
//! cell never stays stuck on a refresh that will not complete.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use tokio::sync::watch;
use tokio::time::Instant;
use tracing::Instrument;

use super::cell::TokenCell;
use super::refresh::Reason;
use super::value::Token;
use crate::boxed::BoxFuture;
use crate::error::Error;

type Outcome = Option<Result<Arc<Token>, Error>>;

/// The running refresh, if any, and the last failure to remember.
#[derive(Default)]
pub(crate) struct Flight {
    /// True while a refresh task runs; lets the soft window skip the mutex.
    refreshing: AtomicBool,
    slow: Mutex<Slow>,
}

/// What the slow path coordinates under its mutex.
#[derive(Default)]
struct Slow {
    /// The running refresh, if any.
    inflight: Option<watch::Receiver<Outcome>>,
    /// The last refresh failed while no valid token existed: its error, and until
    /// when requests get that error without a new token request.
    failed: Option<(Error, Instant)>,
}

impl Flight {
    fn lock(&self) -> MutexGuard<'_, Slow> {
        self.slow.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub(crate) fn is_running(&self) -> bool {
        self.refreshing.load(Ordering::Relaxed)
    }
}

impl TokenCell {
    /// A future that resolves to a usable token: the current one if it became valid in
    /// the meantime, else the result of the running refresh (started if needed).
    pub(crate) fn wait(self: &Arc<Self>) -> BoxFuture<'static, Result<Arc<Token>, Error>> {
        let cell = self.clone();
        Box::pin(async move {
            let rx = match cell.join_or_start()? {
                Joined::Valid(token) => return Ok(token),
                Joined::Refresh(rx) => rx,
            };
            answer(rx, cell.longest_refresh()).await
        })
    }

    /// A refresh now, even if the current token is valid: joins the running one, if
    /// any, else starts one. Resolves when it is done.
    pub(crate) fn force(self: &Arc<Self>) -> BoxFuture<'static, Result<Arc<Token>, Error>> {
        let cell = self.clone();
        Box::pin(async move {
            let rx = {
                let mut slow = cell.flight.lock();
                match &slow.inflight {
                    Some(rx) => rx.clone(),
                    None => {
                        let (rx, launch) = cell.start(&mut slow, Reason::Forced)?;
                        drop(slow);
                        launch.go();
                        rx
                    }
                }
            };
            answer(rx, cell.longest_refresh()).await
        })
    }

    /// How long a request waits for a refresh at most, whatever becomes of the task
    /// that runs it (its runtime may not be driven: a current-thread runtime that
    /// another thread enters only now and then). A refresh takes at most about three
    /// token timeouts: with a token store, waiting for another process's lock, its own
    /// token call, and the configured refresh token's if the stored one was refused;
    /// and a minute more for its store calls.
    fn longest_refresh(&self) -> std::time::Duration {
        self.fetcher()
            .timeout()
            .saturating_mul(3)
            .saturating_add(std::time::Duration::from_secs(60))
    }

    /// Makes sure a refresh runs, without waiting for it (the token is in its soft
    /// window).
    pub(crate) fn refresh_in_background(self: &Arc<Self>) {
        if self.flight.refreshing.load(Ordering::Acquire) {
            return;
        }
        let mut slow = self.flight.lock();
        if slow.inflight.is_some() {
            return;
        }
        // Re-check under the lock: a refresh may have just replaced the token.
        if self.due() {
            match self.start(&mut slow, Reason::Early) {
                Ok((_, launch)) => {
                    drop(slow);
                    launch.go();
                }
                Err(e) => {
                    tracing::warn!(
                        error = &e as &dyn std::error::Error,
                        "could not start a background token refresh"
                    );
                }
            }
        }
    }

    fn join_or_start(self: &Arc<Self>) -> Result<Joined, Error> {
        let mut slow = self.flight.lock();
        // Re-check under the lock: a refresh may have completed since the caller looked.
        let now = Instant::now();
        let reason = match self.need(now) {
            Ok(token) => return Ok(Joined::Valid(token)),
            Err(reason) => reason,
        };
        if let Some(rx) = &slow.inflight {
            return Ok(Joined::Refresh(rx.clone()));
        }
        if let Some((error, until)) = &slow.failed {
            if now < *until {
                return Err(error.clone());
            }
        }
        let (rx, launch) = self.start(&mut slow, reason)?;
        drop(slow);
        launch.go();
        Ok(Joined::Refresh(rx))
    }

    /// Registers a refresh and prepares its task. Called with the slow path locked and
    /// no refresh running; the caller releases the lock, then [`Launch::go`]es — a
    /// runtime that is shutting down drops the task at once, and its [`Finish`] guard
    /// takes the lock.
    fn start(
        self: &Arc<Self>,
        slow: &mut Slow,
        reason: Reason,
    ) -> Result<(watch::Receiver<Outcome>, Launch), Error> {
        let runtime = tokio::runtime::Handle::try_current().map_err(|_| {
            Error::config("no tokio runtime: the token refresh must run inside a tokio runtime")
        })?;
        let (tx, rx) = watch::channel(None);
        slow.inflight = Some(rx.clone());
        self.flight.refreshing.store(true, Ordering::Release);
        // Created outside the task, so that even a task dropped before its first poll
        // (its runtime shutting down) clears the slot and answers the waiters.
        let finish = Finish {
            cell: self.clone(),
            tx,
            done: false,
        };
        let span = tracing::debug_span!("eshopbox_auth_refresh", ?reason);
        let task = Box::pin(
            async move {
                let started = Instant::now();
                let outcome = finish.cell.refresh(reason).await;
                match &outcome {
                    Ok(token) => tracing::debug!(
                        outcome = "ok",
                        generation = token.generation,
                        duration_ms = started.elapsed().as_millis() as u64,
                        "token refresh finished"
                    ),
                    Err(error) => tracing::debug!(
                        outcome = "failed",
                        kind = ?error.kind(),
                        duration_ms = started.elapsed().as_millis() as u64,
                        "token refresh finished"
                    ),
                }
                finish.complete(outcome);
            }
            .instrument(span),
        );
        Ok((rx, Launch { runtime, task }))
    }

    /// Ends a refresh: clears the slow path, remembers a failure, answers the waiters.
    fn finish(&self, tx: &watch::Sender<Outcome>, outcome: Result<Arc<Token>, Error>) {
        {
            let mut slow = self.flight.lock();
            slow.inflight = None;
            slow.failed = match &outcome {
                Ok(_) => None,
                Err(error) => self.remember(error),
            };
            self.flight.refreshing.store(false, Ordering::Release);
        }
        // Nobody may be waiting any more; the token is stored either way.
        tx.send_replace(Some(outcome));
    }
}

/// A refresh task, ready to spawn once the slow-path lock is released.
#[must_use]
struct Launch {
    runtime: tokio::runtime::Handle,
    task: BoxFuture<'static, ()>,
}

impl Launch {
    fn go(self) {
        self.runtime.spawn(self.task);
    }
}

/// Owned by the refresh task. Finishing the refresh goes through it, and if the task
/// is dropped unfinished (cancelled with its runtime, or a panic inside it), its `Drop`
/// still ends the refresh with an error.
struct Finish {
    cell: Arc<TokenCell>,
    tx: watch::Sender<Outcome>,
    done: bool,
}

impl Finish {
    fn complete(mut self, outcome: Result<Arc<Token>, Error>) {
        self.done = true;
        self.cell.finish(&self.tx, outcome);
    }
}

impl Drop for Finish {
    fn drop(&mut self) {
        if !self.done {
            self.cell.finish(
                &self.tx,
                Err(Error::unavailable(
                    "the token refresh task was cancelled or panicked before finishing",
                )),
            );
        }
    }
}

/// The result of the refresh behind `rx`, once it is done, waiting at most `bound`.
async fn answer(
    mut rx: watch::Receiver<Outcome>,
    bound: std::time::Duration,
) -> Result<Arc<Token>, Error> {
    // Bounded only inside a runtime, whose timer can bound it (a request polled
    // outside one joins the refresh as before).
    let waited = if tokio::runtime::Handle::try_current().is_ok() {
        match tokio::time::timeout(bound, rx.wait_for(Option::is_some)).await {
            Ok(waited) => waited,
            Err(_) => {
                return Err(Error::unavailable(format!(
                    "the token refresh did not finish within {bound:?}: the runtime running \
                     it may not be driven"
                )))
            }
        }
    } else {
        rx.wait_for(Option::is_some).await
    };
    let outcome = match waited {
        Ok(outcome) => outcome.clone(),
        Err(_) => None,
    };
    outcome.unwrap_or_else(|| {
        Err(Error::unavailable(
            "the token refresh task ended without an answer",
        ))
    })
}

enum Joined {
    Valid(Arc<Token>),
    Refresh(watch::Receiver<Outcome>),
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use crate::token::cell::test_cell;

    #[test]
    fn a_refresh_started_on_a_runtime_that_shut_down_fails_instead_of_hanging() {
        let cell = test_cell();
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let handle = runtime.handle().clone();
        runtime.shutdown_background();
        // On a runtime that shut down, the spawned refresh is dropped at once; its guard
        // must answer the waiter (a regression would hang, hence the thread and bound).
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let _entered = handle.enter();
            let mut wait = tokio_test::task::spawn(cell.wait());
            let _ = tx.send(format!("{:?}", wait.poll()));
        });
        let polled = rx
            .recv_timeout(Duration::from_secs(30))
            .expect("the refresh did not deadlock");
        assert!(polled.contains("cancelled or panicked"), "{polled}");
    }
}
