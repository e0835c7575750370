//! The token cell: the current token in an [`ArcSwapOption`], and whether a request
//! may use it.
//!
//! A request loads the token (no lock, no allocation; on a multi-thread runtime no
//! clock read either: a timer task moves the token's [`Phase`] on, while on a
//! current-thread runtime, whose timers run only while it is driven, the phase is
//! read from the clock) and, depending on that phase:
//!
//! - fresh: uses it;
//! - in the soft window (between `refresh_at` and `expires_at`): uses it and makes
//!   sure a background refresh is running ([`flight`](super::flight));
//! - expired, or no token: waits for a refresh.
//!
//! A 401 invalidates exactly the token it answered (compare-and-swap on its
//! generation); a failed refresh is remembered for a while when no valid token is
//! left, and pushes a still-valid token's next attempt back.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwapOption;
use http::HeaderValue;
use tokio::sync::watch;
use tokio::time::Instant;

use super::endpoint::RotationHook;
use super::fetch::{Fetched, Fetcher, MIN_LIFETIME};
use super::flight::Flight;
use super::key::CellKey;
use super::refresh::{Coordinator, Reason};
use super::source::TokenSource;
use super::value::{Bearer, Phase, Token, TokenInfo};
use crate::error::Error;
use crate::stats::Counters;

/// The cell's timing settings, from the builder.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Timing {
    /// Refresh this long before expiry (capped at half the lifetime).
    pub(crate) margin: Duration,
    /// Bound on one whole refresh, retries included.
    pub(crate) timeout: Duration,
    /// Bound on one attempt (`None`: a third of what is left, at least 5 s).
    pub(crate) attempt_timeout: Option<Duration>,
    /// How long a permanent failure is remembered (jittered ×0.5 to ×2.5).
    pub(crate) failure_cooldown: Duration,
}

/// The token shared by a layer, its services and handles.
pub(crate) struct TokenCell {
    /// On a cache line of its own: every request reads it, and nothing near it is
    /// written per request (the `Arc`'s reference counts sit just before the cell).
    current: Aligned<ArcSwapOption<Token>>,
    /// What the layer did, for [`crate::TokenHandle::stats`].
    pub(crate) counters: Counters,
    /// The current token's info, for subscribers.
    changes: watch::Sender<Option<TokenInfo>>,
    /// True from an invalidation until the next token arrives (for logs).
    invalidated: AtomicBool,
    /// Set by [`TokenCell::retire`]: no token is fetched, installed or stored any more.
    retired: AtomicBool,
    /// Set by [`TokenCell::end_background`]: the background refresher stops.
    background_ended: AtomicBool,
    next_generation: AtomicU64,
    /// The store id of the token a 401 invalidated (0: none), for the store.
    failed_store_id: AtomicU64,
    /// The running refresh and a remembered failure.
    pub(super) flight: Flight,
    fetcher: Fetcher,
    /// Shares refreshes with other layers (a token store), if any.
    coordinator: Option<Box<dyn Coordinator>>,
    timing: Timing,
    /// This cell's name in the registry of `key.rs`, which response futures carry.
    key: CellKey,
}

impl TokenCell {
    pub(crate) fn new(
        source: Box<dyn TokenSource>,
        on_rotated: Option<RotationHook>,
        coordinator: Option<Box<dyn Coordinator>>,
        timing: Timing,
    ) -> Arc<Self> {
        CellKey::register(|key| TokenCell {
            current: Aligned(ArcSwapOption::empty()),
            counters: Counters::default(),
            changes: watch::channel(None).0,
            invalidated: AtomicBool::new(false),
            retired: AtomicBool::new(false),
            background_ended: AtomicBool::new(false),
            next_generation: AtomicU64::new(1),
            failed_store_id: AtomicU64::new(0),
            flight: Flight::default(),
            fetcher: Fetcher::new(
                source,
                on_rotated,
                timing.timeout,
                timing.attempt_timeout,
                timing.failure_cooldown,
            ),
            coordinator,
            timing,
            key,
        })
    }

    /// The key a response future carries to reach this cell after a 401.
    pub(crate) fn key(&self) -> CellKey {
        self.key
    }

    /// The fast path: the header and generation of a token that may be used now, or
    /// `None` when the caller must wait for [`TokenCell::wait`].
    ///
    /// In the soft window this starts a background refresh (unless one runs) and still
    /// returns the current token.
    pub(crate) fn get(self: &Arc<Self>) -> Option<(HeaderValue, u64)> {
        let guard = self.current.load();
        let token = guard.as_ref()?;
        self.admit(token)
            .then(|| (token.header().clone(), token.generation))
    }

    /// Whether `token` may be sent now: yes while fresh; yes in the soft window, after
    /// making sure a background refresh runs; no once expired.
    #[inline]
    pub(crate) fn admit(self: &Arc<Self>, token: &Token) -> bool {
        // One load and compare while the token is fresh; the rest off the hot path.
        token.is_fresh() || self.admit_unfresh(token)
    }

    #[cold]
    #[inline(never)]
    fn admit_unfresh(self: &Arc<Self>, token: &Token) -> bool {
        match token.phase_now() {
            Phase::Fresh => true,
            Phase::Stale => {
                self.refresh_in_background();
                true
            }
            Phase::Expired | Phase::Untimed => false,
        }
    }

    /// Invalidates the token with this generation if it is still the current one.
    /// Returns whether it was; a token that was already replaced is left alone, so many
    /// 401s for one token cause one refresh.
    pub(crate) fn invalidate(&self, generation: u64) -> bool {
        loop {
            let current = self.current.load_full();
            match &current {
                Some(token) if token.generation == generation => {}
                _ => return false,
            }
            let previous = self.current.compare_and_swap(&current, None);
            if ptr_eq(&previous, &current) {
                tracing::debug!(generation, "access token invalidated");
                if let Some(token) = &current {
                    self.failed_store_id
                        .store(token.store_id, Ordering::Relaxed);
                }
                self.invalidated.store(true, Ordering::Relaxed);
                self.counters.invalidation();
                self.changes.send_replace(None);
                return true;
            }
            // The token was swapped for a copy (for example with a later refresh_at)
            // in between: look again.
        }
    }

    /// Drops the current token, whatever it is.
    pub(crate) fn invalidate_current(&self) -> bool {
        match self.current.load().as_ref() {
            Some(token) => self.invalidate(token.generation),
            None => false,
        }
    }

    /// Ends this cell's use (its workspace was forgotten): the current token is
    /// invalidated, and from now on a refresh fails at once without a token call, a
    /// refresh under way neither installs nor stores what it obtains, and the
    /// background refresher ends.
    #[cfg(feature = "workspaces")]
    pub(crate) fn retire(&self) {
        self.retired.store(true, Ordering::Release);
        self.invalidate_current();
    }

    /// Whether [`retire`](Self::retire) was called.
    pub(crate) fn retired(&self) -> bool {
        self.retired.load(Ordering::Acquire)
    }

    /// Stops the background refresher before its next token call (its workspace was
    /// dropped for size or idleness). Requests that still hold the cell, and
    /// handles on it, refresh on demand as before.
    #[cfg(feature = "workspaces")]
    pub(crate) fn end_background(&self) {
        self.background_ended.store(true, Ordering::Release);
        // Wakes the refresher (and tells the front map's snapshot to look again).
        self.changes.send_modify(|_| {});
    }

    /// Whether the background refresher should end: the cell was retired, or
    /// [`end_background`](Self::end_background) was called.
    pub(crate) fn background_over(&self) -> bool {
        self.retired() || self.background_ended.load(Ordering::Acquire)
    }

    /// The current token, if any (valid or not).
    pub(crate) fn peek(&self) -> Option<Arc<Token>> {
        self.current.load_full()
    }

    /// Subscribes to changes of the current token.
    pub(crate) fn subscribe(&self) -> watch::Receiver<Option<TokenInfo>> {
        self.changes.subscribe()
    }

    /// The shared cell holding the current token.
    pub(crate) fn current(&self) -> &ArcSwapOption<Token> {
        &self.current
    }

    /// Why a refresh is needed now, or the current token if it is still valid.
    pub(super) fn need(&self, now: Instant) -> Result<Arc<Token>, Reason> {
        match self.current.load_full() {
            Some(token) if now < token.expires_at => Ok(token),
            Some(_) => Err(Reason::Expired),
            None if self.invalidated.load(Ordering::Relaxed) => Err(Reason::Invalidated),
            None => Err(Reason::Cold),
        }
    }

    /// Whether a refresh now follows an invalidation (a 401), whoever starts it: a
    /// request, the background refresher or the handle. Such refreshes are spaced.
    fn after_invalidation(&self) -> bool {
        self.invalidated.load(Ordering::Relaxed)
    }

    /// Whether the current token is due for a refresh (re-checked under the flight
    /// lock before a background refresh starts).
    pub(super) fn due(&self) -> bool {
        self.current
            .load()
            .as_ref()
            .is_some_and(|t| t.phase_now() != Phase::Fresh)
    }

    pub(super) fn fetcher(&self) -> &Fetcher {
        &self.fetcher
    }

    pub(super) fn coordinator(&self) -> Option<&dyn Coordinator> {
        self.coordinator.as_deref()
    }

    pub(super) fn margin(&self) -> Duration {
        self.timing.margin
    }

    /// The fetcher's attempts: a few while a valid token is still served (an early
    /// refresh), until the deadline when requests wait. A failure pushes a still-valid
    /// token's next refresh back. The first token call of a refresh that follows an
    /// invalidation, whoever started it, is spaced (see
    /// [`Fetcher::fetch`](super::fetch::Fetcher::fetch)); `first_call` is false for a
    /// second call in the same refresh.
    pub(super) async fn fetch(
        &self,
        reason: Reason,
        deadline: Instant,
        first_call: bool,
    ) -> Result<Fetched, Error> {
        let space = first_call && self.after_invalidation();
        let early_until = self.need(Instant::now()).ok().map(|token| token.expires_at);
        let fetched = self
            .fetcher
            .fetch(&self.counters, reason, deadline, early_until, space)
            .await;
        if let Err(error) = &fetched {
            self.back_off(error);
        }
        fetched
    }

    /// Builds the token, schedules its phase timer and publishes it.
    pub(super) fn put(
        &self,
        bearer: Bearer,
        expires_at: Instant,
        lifetime: Duration,
        issued_at: SystemTime,
        store_id: u64,
    ) -> Arc<Token> {
        let generation = self.next_generation.fetch_add(1, Ordering::Relaxed);
        // `checked_sub`: an adopted token's expiry can lie closer to the clock's origin
        // than its whole lifetime's margin (a host up for less than that).
        let refresh_at = expires_at
            .checked_sub(early_by(self.timing.margin, lifetime, fastrand::f64()))
            .unwrap_or(expires_at)
            .max(Instant::now() + MIN_LIFETIME)
            .min(expires_at);
        let mut token = Token::new(bearer, generation, refresh_at, expires_at);
        token.store_id = store_id;
        token.issued_at = issued_at;
        token.lifetime = lifetime;
        let token = Arc::new(token);
        Token::schedule(&token);
        self.current.store(Some(token.clone()));
        self.invalidated.store(false, Ordering::Relaxed);
        self.changes.send_replace(Some(token.info()));
        tracing::debug!(generation, "access token in use");
        token
    }

    /// The store id of the last token a 401 invalidated, until the store has
    /// dropped it.
    pub(super) fn failed_store_id(&self) -> Option<u64> {
        match self.failed_store_id.load(Ordering::Relaxed) {
            0 => None,
            id => Some(id),
        }
    }

    /// The store no longer holds the token with this id.
    pub(super) fn forget_failed_store_id(&self, id: u64) {
        let _ = self
            .failed_store_id
            .compare_exchange(id, 0, Ordering::Relaxed, Ordering::Relaxed);
    }

    /// How long to answer a failed refresh's error without a new token request, when
    /// no valid token is left: a jittered cooldown for permanent failures, the
    /// endpoint's `Retry-After` for transient ones (else not at all: the refresh already
    /// retried with back-off).
    pub(super) fn remember(&self, error: &Error) -> Option<(Error, Instant)> {
        let now = Instant::now();
        let valid = self
            .current
            .load()
            .as_ref()
            .is_some_and(|t| now < t.expires_at);
        if valid {
            return None;
        }
        let hold = if error.is_transient() {
            error.retry_after()?
        } else {
            self.timing
                .failure_cooldown
                .mul_f64(0.5 + 2.0 * fastrand::f64())
        };
        (!hold.is_zero()).then(|| (error.clone(), now + hold))
    }

    /// After a failed refresh, pushes the still-valid token's next refresh attempt back,
    /// so the soft window does not turn into a retry loop. The token itself stays.
    pub(super) fn back_off(&self, error: &Error) {
        loop {
            let current = self.current.load_full();
            let Some(token) = current.as_deref() else {
                return;
            };
            let now = Instant::now();
            if now >= token.expires_at {
                return;
            }
            let remaining = token.expires_at - now;
            let wait = (remaining / 2)
                .clamp(Duration::from_secs(1), Duration::from_secs(30))
                .max(error.retry_after().unwrap_or_default())
                .min(remaining);
            let delayed = Arc::new(token.refreshing_at(now + wait));
            let previous = self
                .current
                .compare_and_swap(&current, Some(delayed.clone()));
            if ptr_eq(&previous, &current) {
                Token::schedule(&delayed);
                return;
            }
        }
    }
}

impl Drop for TokenCell {
    fn drop(&mut self) {
        self.key.unregister();
    }
}

impl std::fmt::Debug for TokenCell {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // `Token`'s Debug shows no header value, so no secret is printed here.
        f.debug_struct("TokenCell")
            .field("current", &self.current.load().as_deref())
            .field("refreshing", &self.flight.is_running())
            .field("timing", &self.timing)
            .finish_non_exhaustive()
    }
}

/// Aligns its content to 128 bytes (two cache lines, for adjacent-line prefetch), so
/// that nothing else shares its line.
#[repr(align(128))]
struct Aligned<T>(T);

impl<T> std::ops::Deref for Aligned<T> {
    type Target = T;
    fn deref(&self) -> &T {
        &self.0
    }
}

fn ptr_eq(a: &Option<Arc<Token>>, b: &Option<Arc<Token>>) -> bool {
    match (a, b) {
        (Some(a), Some(b)) => Arc::ptr_eq(a, b),
        (None, None) => true,
        _ => false,
    }
}

/// How long before expiry to refresh: the margin, capped at half the lifetime so a
/// short-lived token is not refreshed on every request, shortened by up to 10 % of
/// jitter (`unit` in `[0, 1)`) so replicas do not refresh in lockstep.
pub(crate) fn early_by(margin: Duration, lifetime: Duration, unit: f64) -> Duration {
    let capped = margin.min(lifetime / 2);
    capped.mul_f64(1.0 - 0.1 * unit.clamp(0.0, 1.0))
}

/// A cell whose source hands out the token `t` at once, with the default margin and
/// timeouts, for the core's unit tests.
#[cfg(test)]
pub(crate) fn test_cell() -> Arc<TokenCell> {
    use crate::token::source::{source_fn, FetchedToken};
    let source = source_fn(|| async { Ok(FetchedToken::new("t")) });
    let timing = Timing {
        margin: Duration::from_secs(300),
        timeout: Duration::from_secs(30),
        attempt_timeout: None,
        failure_cooldown: Duration::from_secs(2),
    };
    TokenCell::new(Box::new(source), None, None, timing)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn margin_is_capped_at_half_the_lifetime() {
        let min = Duration::from_secs(60);
        assert_eq!(early_by(5 * min, 24 * 60 * min, 0.0), 5 * min);
        assert_eq!(
            early_by(5 * min, Duration::from_secs(2), 0.0),
            Duration::from_secs(1)
        );
        assert_eq!(early_by(5 * min, Duration::ZERO, 0.5), Duration::ZERO);
    }

    #[test]
    fn jitter_only_shortens_the_margin_by_at_most_a_tenth() {
        let margin = Duration::from_secs(300);
        let life = Duration::from_secs(86400);
        assert_eq!(early_by(margin, life, 1.0), Duration::from_secs(270));
        let mid = early_by(margin, life, 0.5);
        assert!(mid < margin && mid > Duration::from_secs(270));
    }
}
