//! The shared token cache: a lock-free read path and single-flight refreshes.
//!
//! The current token lives in an [`ArcSwapOption`]. A request loads it (no lock, no
//! allocation, no clock read: a timer task moves the token's phase on) and,
//! depending on that phase:
//!
//! - before `refresh_at`: uses it;
//! - between `refresh_at` and `expires_at` (the soft window): uses it and makes sure a
//!   background refresh is running;
//! - at or after `expires_at`, or with no token: waits for a refresh.
//!
//! A refresh runs in its own spawned task, so dropping the request that started it
//! does not abort it. Requests that want its result subscribe to a `watch` channel.
//! The `inflight` mutex is only taken to start or join a refresh, never on the fast
//! path, and never across an `.await`.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwapOption;
use http::HeaderValue;
use secrecy::{ExposeSecret, SecretString};
use tokio::sync::watch;
use tokio::time::Instant;
use tracing::Instrument;

use super::response::bearer_header;
use super::shared::Shared;
use super::{BoxFuture, Source, Token, TokenResponse, FRESH, STALE};
use crate::error::Error;
use crate::handle::TokenInfo;
use crate::stats::Counters;
use crate::store::SharedToken;

type Outcome = Option<Result<Arc<Token>, Error>>;

/// Why a refresh was started; reported in logs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Reason {
    /// No token yet.
    Cold,
    /// The last token was invalidated (a 401, or through the handle).
    Invalidated,
    /// The token is in its soft window.
    Early,
    /// The token expired.
    Expired,
    /// Asked for through the handle.
    Forced,
}

/// Attempts one refresh makes at most when the endpoint fails transiently.
pub(crate) const MAX_ATTEMPTS: u32 = 4;
/// Shortest time a token is used before the next refresh, whatever `expires_in` says
/// and however slow the endpoint was: at most one refresh a second.
pub(crate) const MIN_LIFETIME: Duration = Duration::from_secs(1);
/// Back-off before the second attempt; doubled for each further one.
const BACKOFF_BASE: Duration = Duration::from_millis(200);
/// Longest back-off between two attempts.
const BACKOFF_MAX: Duration = Duration::from_secs(5);

/// The cache's timing settings, from the builder.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Timing {
    /// Refresh this long before expiry (capped at half the lifetime).
    pub(crate) margin: Duration,
    /// Bound on one whole refresh, retries included.
    pub(crate) timeout: Duration,
    /// How long a permanent failure is remembered (jittered ×0.5 to ×2.5).
    pub(crate) failure_cooldown: Duration,
}

pub(crate) struct TokenCache {
    current: ArcSwapOption<Token>,
    /// What the layer did, for [`crate::TokenHandle::stats`].
    pub(crate) counters: Counters,
    /// The generation and expiry of the current token, for subscribers.
    changes: watch::Sender<Option<TokenInfo>>,
    /// True while a refresh task runs; lets the soft window skip the mutex.
    refreshing: AtomicBool,
    /// True from an invalidation until the next token arrives (for logs).
    invalidated: AtomicBool,
    slow: Mutex<Slow>,
    next_generation: AtomicU64,
    /// The store id of the token a 401 invalidated (0: none), for the store.
    failed_shared_id: AtomicU64,
    source: Box<dyn Source>,
    /// The token store shared with other layers, if any.
    shared: Option<Arc<Shared>>,
    timing: Timing,
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

impl TokenCache {
    pub(crate) fn new(source: Box<dyn Source>, shared: Option<Shared>, timing: Timing) -> Self {
        let shared = shared.map(Arc::new);
        TokenCache {
            current: ArcSwapOption::empty(),
            counters: Counters::default(),
            changes: watch::channel(None).0,
            refreshing: AtomicBool::new(false),
            invalidated: AtomicBool::new(false),
            slow: Mutex::new(Slow::default()),
            next_generation: AtomicU64::new(1),
            failed_shared_id: AtomicU64::new(0),
            source,
            shared,
            timing,
        }
    }

    /// The fast path: the header and generation of a token that may be used now, or
    /// `None` when the caller must wait for [`TokenCache::wait`].
    ///
    /// In the soft window this starts a background refresh (unless one runs) and still
    /// returns the current token.
    pub(crate) fn get(self: &Arc<Self>) -> Option<(HeaderValue, u64)> {
        let guard = self.current.load();
        let token = guard.as_ref()?;
        self.admit(token)
            .then(|| (token.header.clone(), token.generation))
    }

    /// Whether `token` may be sent now: yes while fresh; yes in the soft window, after
    /// making sure a background refresh runs; no once expired.
    #[inline]
    pub(crate) fn admit(self: &Arc<Self>, token: &Token) -> bool {
        // One load and compare while the token is fresh; the rest off the hot path.
        token.phase.load(Ordering::Acquire) == FRESH || self.admit_unfresh(token)
    }

    #[cold]
    #[inline(never)]
    fn admit_unfresh(self: &Arc<Self>, token: &Token) -> bool {
        match token.phase_now() {
            FRESH => true,
            STALE => {
                self.refresh_in_background();
                true
            }
            _ => false,
        }
    }

    /// A future that resolves to a usable token: the current one if it became valid in
    /// the meantime, else the result of the running refresh (started if needed).
    pub(crate) fn wait(self: &Arc<Self>) -> BoxFuture<Result<Arc<Token>, Error>> {
        let cache = self.clone();
        Box::pin(async move {
            let rx = match cache.join_or_start()? {
                Joined::Valid(token) => return Ok(token),
                Joined::Refresh(rx) => rx,
            };
            answer(rx).await
        })
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
                    self.failed_shared_id
                        .store(token.shared_id, Ordering::Relaxed);
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

    /// When the current token expires.
    #[cfg(test)]
    pub(crate) fn expiry(&self) -> Option<Instant> {
        self.current.load().as_ref().map(|t| t.expires_at)
    }

    /// Lets the phase timers catch up with the (paused) clock after a test advanced
    /// it: yields until the current token's phase matches the time.
    #[cfg(test)]
    pub(crate) async fn catch_up(&self) {
        for _ in 0..1000 {
            let settled = self.current.load().as_ref().is_none_or(|t| {
                let now = Instant::now();
                let expected = if now >= t.expires_at {
                    super::EXPIRED
                } else if now >= t.refresh_at {
                    STALE
                } else {
                    FRESH
                };
                t.phase.load(Ordering::Acquire) == expected
            });
            if settled {
                return;
            }
            tokio::task::yield_now().await;
        }
        panic!("the token's phase timer did not fire");
    }

    /// Waits until no refresh is running (tests use it instead of sleeping).
    #[cfg(test)]
    pub(crate) async fn settled(&self) {
        let rx = self.lock_slow().inflight.clone();
        if let Some(mut rx) = rx {
            let _ = rx.wait_for(Option::is_some).await;
        }
    }

    fn lock_slow(&self) -> MutexGuard<'_, Slow> {
        self.slow.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn join_or_start(self: &Arc<Self>) -> Result<Joined, Error> {
        let mut slow = self.lock_slow();
        // Re-check under the lock: a refresh may have completed since the caller looked.
        let now = Instant::now();
        let reason = match self.current.load_full() {
            Some(token) if now < token.expires_at => return Ok(Joined::Valid(token)),
            Some(_) => Reason::Expired,
            None if self.invalidated.load(Ordering::Relaxed) => Reason::Invalidated,
            None => Reason::Cold,
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

    /// The current token, if any (valid or not).
    pub(crate) fn peek(&self) -> Option<Arc<Token>> {
        self.current.load_full()
    }

    /// Subscribes to changes of the current token.
    pub(crate) fn subscribe(&self) -> watch::Receiver<Option<TokenInfo>> {
        self.changes.subscribe()
    }

    /// Drops the current token, whatever it is.
    pub(crate) fn invalidate_current(&self) -> bool {
        match self.current.load().as_ref() {
            Some(token) => self.invalidate(token.generation),
            None => false,
        }
    }

    /// A refresh now, even if the current token is valid: joins the running one, if
    /// any, else starts one. Resolves when it is done.
    pub(crate) fn force(self: &Arc<Self>) -> BoxFuture<Result<Arc<Token>, Error>> {
        let cache = self.clone();
        Box::pin(async move {
            let rx = {
                let mut slow = cache.lock_slow();
                match &slow.inflight {
                    Some(rx) => rx.clone(),
                    None => {
                        let (rx, launch) = cache.start(&mut slow, Reason::Forced)?;
                        drop(slow);
                        launch.go();
                        rx
                    }
                }
            };
            answer(rx).await
        })
    }

    /// The shared cell holding the current token.
    pub(crate) fn current(&self) -> &ArcSwapOption<Token> {
        &self.current
    }

    /// Makes sure a refresh runs, without waiting for it (the token is in its soft
    /// window).
    pub(crate) fn refresh_in_background(self: &Arc<Self>) {
        if self.refreshing.load(Ordering::Acquire) {
            return;
        }
        let mut slow = self.lock_slow();
        if slow.inflight.is_some() {
            return;
        }
        // Re-check under the lock: a refresh may have just replaced the token.
        let due = self
            .current
            .load()
            .as_ref()
            .is_some_and(|t| t.phase_now() != FRESH);
        if due {
            match self.start(&mut slow, Reason::Early) {
                Ok((_, launch)) => {
                    drop(slow);
                    launch.go();
                }
                Err(e) => {
                    tracing::warn!(error = %e, "could not start a background token refresh");
                }
            }
        }
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
        self.refreshing.store(true, Ordering::Release);
        // Created outside the task, so that even a task dropped before its first poll
        // (its runtime shutting down) clears the slot and answers the waiters.
        let finish = Finish {
            cache: self.clone(),
            tx,
            done: false,
        };
        let span = tracing::debug_span!("eshopbox_auth_refresh", ?reason);
        let task = Box::pin(
            async move {
                let started = Instant::now();
                let outcome = finish.cache.refresh(reason).await;
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
            let mut slow = self.lock_slow();
            slow.inflight = None;
            slow.failed = match &outcome {
                Ok(_) => None,
                Err(error) => self.remember(error),
            };
            self.refreshing.store(false, Ordering::Release);
        }
        // Nobody may be waiting any more; the token is stored either way.
        tx.send_replace(Some(outcome));
    }

    /// One refresh: through the token store when there is one (adopting another
    /// replica's token, or making the token call under the store's lock), else — or
    /// when the store fails — straight from the source.
    async fn refresh(&self, reason: Reason) -> Result<Arc<Token>, Error> {
        if let Some(shared) = self.shared.as_ref().filter(|s| s.available()) {
            let deadline = Instant::now() + self.timing.timeout;
            match shared.refresh(self, reason, deadline).await {
                Ok(outcome) => return outcome,
                Err(failure) => shared.failed(self, failure),
            }
        }
        // Straight to the source, with the whole token timeout.
        let before = self.refresh_token();
        let fetched = self
            .fetch(reason, Instant::now() + self.timing.timeout)
            .await;
        if let (Some(shared), Some(rotated)) = (&self.shared, self.rotated_since(before)) {
            // A rotation (even from an otherwise unusable answer) reaches the store
            // once it answers again.
            shared.rotated_directly(rotated);
        }
        let (response, sent_at) = fetched?;
        Ok(self.install(response, sent_at))
    }

    /// The bound on one refresh's token requests.
    pub(crate) fn token_timeout(&self) -> Duration {
        self.timing.timeout
    }

    /// Token requests until one succeeds: up to [`MAX_ATTEMPTS`], retrying transient
    /// failures with jittered exponential back-off (or the endpoint's `Retry-After`),
    /// all before `deadline`. Returns the answer and when its request was sent.
    pub(crate) async fn fetch(
        &self,
        reason: Reason,
        deadline: Instant,
    ) -> Result<(TokenResponse, Instant), Error> {
        let mut attempt = 1;
        loop {
            tracing::debug!(?reason, attempt, "requesting an access token");
            self.counters.token_request();
            let sent_at = Instant::now();
            let result = match tokio::time::timeout_at(deadline, self.source.fetch()).await {
                Ok(result) => result,
                Err(_) => Err(Error::unavailable(format!(
                    "no token within the token timeout of {:?}",
                    self.timing.timeout
                ))),
            };
            let error = match result {
                Ok(response) => return Ok((response, sent_at)),
                Err(error) => error,
            };
            self.counters.failure(error.kind());
            let retry_in = (error.is_transient() && attempt < MAX_ATTEMPTS).then(|| {
                error
                    .retry_after()
                    .unwrap_or_else(|| backoff(attempt, fastrand::f64()))
            });
            match retry_in {
                Some(wait) if Instant::now() + wait < deadline => {
                    tracing::debug!(?reason, attempt, %error, ?wait, "token request failed; retrying");
                    tokio::time::sleep(wait).await;
                    attempt += 1;
                }
                _ => {
                    tracing::warn!(?reason, attempt, %error, "token refresh failed");
                    self.back_off(&error);
                    return Err(error);
                }
            }
        }
    }

    /// Makes a fetched token the current one.
    pub(crate) fn install(&self, response: TokenResponse, sent_at: Instant) -> Arc<Token> {
        // A token that is (nearly) dead on arrival is still used for a moment, so a
        // broken `expires_in` cannot turn every request into a token request.
        let lifetime = response.lifetime.max(MIN_LIFETIME);
        let issued_at = SystemTime::now()
            .checked_sub(sent_at.elapsed())
            .unwrap_or_else(SystemTime::now);
        tracing::debug!(
            lifetime_secs = lifetime.as_secs(),
            scope = response.scope.as_deref().unwrap_or(""),
            id_token = response.has_id_token,
            "access token received"
        );
        let shared_id = fastrand::u64(1..);
        self.put(
            response.header,
            sent_at + lifetime,
            lifetime,
            issued_at,
            shared_id,
        )
    }

    /// Makes a token from the store the current one, if it suits this refresh: it
    /// must live at least [`MIN_LIFETIME`] more, and for an early or forced refresh it
    /// must not be due for a refresh itself.
    pub(crate) fn adopt(&self, stored: &SharedToken, reason: Reason) -> Option<Arc<Token>> {
        let remaining = stored.remaining();
        if remaining < MIN_LIFETIME {
            return None;
        }
        let header = match bearer_header(stored.access_token().expose_secret()) {
            Ok(header) => header,
            Err(error) => {
                tracing::warn!(%error, "ignoring an unusable token in the token store");
                return None;
            }
        };
        let lifetime = stored.lifetime().max(remaining);
        let due = remaining <= early_by(self.timing.margin, lifetime, 0.0);
        if due && matches!(reason, Reason::Early | Reason::Forced) {
            return None;
        }
        tracing::debug!(
            remaining_secs = remaining.as_secs(),
            "using the access token from the token store"
        );
        self.counters.adopted();
        Some(self.put(
            header,
            stored.expires_at(),
            lifetime,
            stored.issued_at(),
            stored.id(),
        ))
    }

    /// Builds the token, schedules its phase timer and publishes it.
    fn put(
        &self,
        header: HeaderValue,
        expires_at: Instant,
        lifetime: Duration,
        issued_at: SystemTime,
        shared_id: u64,
    ) -> Arc<Token> {
        let generation = self.next_generation.fetch_add(1, Ordering::Relaxed);
        let refresh_at = (expires_at - early_by(self.timing.margin, lifetime, fastrand::f64()))
            .max(Instant::now() + MIN_LIFETIME)
            .min(expires_at);
        let mut token = Token::new(header, generation, refresh_at, expires_at);
        token.shared_id = shared_id;
        token.issued_at = issued_at;
        token.lifetime = lifetime;
        let token = Arc::new(token);
        Token::schedule(&token);
        self.current.store(Some(token.clone()));
        self.invalidated.store(false, Ordering::Relaxed);
        self.changes.send_replace(Some(TokenInfo::of(&token)));
        tracing::debug!(generation, "access token in use");
        token
    }

    /// The store id of the last token a 401 invalidated, until the store has
    /// dropped it ([`forget_failed_shared_id`](Self::forget_failed_shared_id)).
    pub(crate) fn failed_shared_id(&self) -> Option<u64> {
        match self.failed_shared_id.load(Ordering::Relaxed) {
            0 => None,
            id => Some(id),
        }
    }

    /// The store no longer holds the token with this id.
    pub(crate) fn forget_failed_shared_id(&self, id: u64) {
        let _ = self
            .failed_shared_id
            .compare_exchange(id, 0, Ordering::Relaxed, Ordering::Relaxed);
    }

    /// The source's refresh token, if it changed from `before` (it was rotated).
    pub(crate) fn rotated_since(&self, before: Option<SecretString>) -> Option<SecretString> {
        let after = self.refresh_token()?;
        let same = before.is_some_and(|b| b.expose_secret() == after.expose_secret());
        (!same).then_some(after)
    }

    /// The refresh token the source sends next, if it has one.
    pub(crate) fn refresh_token(&self) -> Option<SecretString> {
        self.source.refresh_token()
    }

    /// Sends `refresh_token` with the next token requests (it came from the store).
    pub(crate) fn use_refresh_token(&self, refresh_token: SecretString) {
        self.source.use_refresh_token(refresh_token);
    }

    /// How long to answer a failed refresh's error without a new token request, when
    /// no valid token is left: a jittered cooldown for permanent failures, the
    /// endpoint's `Retry-After` for transient ones (else not at all: the refresh already
    /// retried with back-off).
    fn remember(&self, error: &Error) -> Option<(Error, Instant)> {
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
    fn back_off(&self, error: &Error) {
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

impl std::fmt::Debug for TokenCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // `Token`'s Debug shows no header value, so no secret is printed here.
        f.debug_struct("TokenCache")
            .field("current", &self.current.load().as_deref())
            .field("refreshing", &self.refreshing.load(Ordering::Relaxed))
            .field("timing", &self.timing)
            .finish_non_exhaustive()
    }
}

/// A refresh task, ready to spawn once the slow-path lock is released.
#[must_use]
struct Launch {
    runtime: tokio::runtime::Handle,
    task: BoxFuture<()>,
}

impl Launch {
    fn go(self) {
        self.runtime.spawn(self.task);
    }
}

/// Owned by the refresh task. Finishing the refresh goes through it, and if the task
/// is dropped unfinished (cancelled with its runtime, or a panic inside it), its `Drop`
/// still ends the refresh with an error, so the cache never stays stuck on a refresh
/// that will not complete.
struct Finish {
    cache: Arc<TokenCache>,
    tx: watch::Sender<Outcome>,
    done: bool,
}

impl Finish {
    fn complete(mut self, outcome: Result<Arc<Token>, Error>) {
        self.done = true;
        self.cache.finish(&self.tx, outcome);
    }
}

impl Drop for Finish {
    fn drop(&mut self) {
        if !self.done {
            self.cache.finish(
                &self.tx,
                Err(Error::unavailable(
                    "the token refresh task was cancelled or panicked before finishing",
                )),
            );
        }
    }
}

/// Keeps the token fresh ahead of expiry without waiting for requests
/// ([`background_refresh`](crate::EshopboxAuthBuilder::background_refresh)): fetches a
/// token at once, then refreshes each one when it reaches its refresh time. The task
/// holds the cache weakly and ends when the last layer, service and handle is dropped.
pub(crate) fn spawn_background(cache: &Arc<TokenCache>) -> Result<(), Error> {
    let runtime = tokio::runtime::Handle::try_current().map_err(|_| {
        Error::config("background_refresh needs a tokio runtime when the layer is built")
    })?;
    let weak = Arc::downgrade(cache);
    let mut changes = cache.subscribe();
    runtime.spawn(async move {
        let mut retry_at: Option<Instant> = None;
        let mut failures = 0;
        loop {
            let due = {
                let Some(cache) = weak.upgrade() else {
                    return;
                };
                let due = cache.peek().map_or_else(Instant::now, |t| t.refresh_at);
                retry_at.map_or(due, |at| due.max(at))
            };
            match tokio::time::timeout_at(due, changes.changed()).await {
                Ok(Ok(())) => continue,
                Ok(Err(_)) => return,
                Err(_) => {}
            }
            let Some(cache) = weak.upgrade() else {
                return;
            };
            match cache.force().await {
                Ok(_) => {
                    failures = 0;
                    retry_at = None;
                }
                Err(error) => {
                    failures += 1;
                    let wait =
                        Duration::from_secs(1 << failures.min(5)).min(Duration::from_secs(30));
                    tracing::debug!(%error, ?wait, "background token refresh failed");
                    retry_at = Some(Instant::now() + wait);
                }
            }
            changes.borrow_and_update();
        }
    });
    Ok(())
}

/// The result of the refresh behind `rx`, once it is done.
async fn answer(mut rx: watch::Receiver<Outcome>) -> Result<Arc<Token>, Error> {
    let outcome = match rx.wait_for(Option::is_some).await {
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

fn ptr_eq(a: &Option<Arc<Token>>, b: &Option<Arc<Token>>) -> bool {
    match (a, b) {
        (Some(a), Some(b)) => Arc::ptr_eq(a, b),
        (None, None) => true,
        _ => false,
    }
}

/// Back-off after the `attempt`-th failed attempt: 200 ms doubled per attempt, at most
/// 5 s, scaled at random by ½ to 1 (`unit` in `[0, 1)`).
pub(crate) fn backoff(attempt: u32, unit: f64) -> Duration {
    let exp = BACKOFF_BASE
        .saturating_mul(1 << attempt.saturating_sub(1).min(16))
        .min(BACKOFF_MAX);
    exp.mul_f64(0.5 + 0.5 * unit.clamp(0.0, 1.0))
}

/// How long before expiry to refresh: the margin, capped at half the lifetime so a
/// short-lived token is not refreshed on every request, shortened by up to 10 % of
/// jitter (`unit` in `[0, 1)`) so replicas do not refresh in lockstep.
pub(crate) fn early_by(margin: Duration, lifetime: Duration, unit: f64) -> Duration {
    let capped = margin.min(lifetime / 2);
    capped.mul_f64(1.0 - 0.1 * unit.clamp(0.0, 1.0))
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
    fn backoff_doubles_up_to_five_seconds_with_jitter() {
        assert_eq!(backoff(1, 1.0), Duration::from_millis(200));
        assert_eq!(backoff(2, 1.0), Duration::from_millis(400));
        assert_eq!(backoff(3, 0.0), Duration::from_millis(400));
        assert_eq!(backoff(10, 1.0), BACKOFF_MAX);
        assert_eq!(backoff(u32::MAX, 1.0), BACKOFF_MAX);
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
