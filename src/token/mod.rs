//! Where the access token comes from and where it is kept.
//!
//! - [`response`] turns the token endpoint's answer into a validated [`TokenResponse`].
//! - [`endpoint`] makes the `POST /api/v1/generateToken` call.
//! - [`cache`] keeps the current [`Token`] in an `arc-swap` and runs single-flight refreshes.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime};

use http::HeaderValue;
use secrecy::SecretString;
use tokio::sync::oneshot;
use tokio::time::Instant;

use crate::error::Error;
use crate::store::SharedToken;

pub(crate) mod cache;
pub(crate) mod endpoint;
pub(crate) mod local;
pub(crate) mod response;
pub(crate) mod shared;

/// A boxed, sendable future: the token paths are off the hot path, so one allocation
/// per refresh (or per waiting request) is fine.
pub(crate) type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send + 'static>>;

/// A validated answer of the token endpoint.
pub(crate) struct TokenResponse {
    /// `Bearer <access_token>`, already marked sensitive.
    pub(crate) header: HeaderValue,
    /// How long the token lives, already defaulted and clamped.
    pub(crate) lifetime: Duration,
    /// The granted scope (not a secret).
    pub(crate) scope: Option<String>,
    /// Whether an `id_token` came along (its value is not kept).
    pub(crate) has_id_token: bool,
    /// A new refresh token the endpoint rotated to (already in use by the endpoint).
    pub(crate) rotated: Option<SecretString>,
}

impl std::fmt::Debug for TokenResponse {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenResponse")
            .field("lifetime", &self.lifetime)
            .field("scope", &self.scope)
            .finish_non_exhaustive()
    }
}

/// The future of [`Source::fetch`].
pub(crate) type SourceFuture<'a> =
    Pin<Box<dyn Future<Output = Result<TokenResponse, Error>> + Send + 'a>>;

/// Something that can obtain a fresh access token.
pub(crate) trait Source: Send + Sync + 'static {
    /// Requests one token.
    fn fetch(&self) -> SourceFuture<'_>;

    /// Sends `refresh_token` from now on (another process rotated it). Sources without
    /// a refresh token ignore it.
    fn use_refresh_token(&self, refresh_token: SecretString) {
        let _ = refresh_token;
    }

    /// The refresh token the source sends next, if it uses one.
    fn refresh_token(&self) -> Option<SecretString> {
        None
    }
}

/// [`Token::phase`]: before `refresh_at`.
pub(crate) const FRESH: u8 = 0;
/// [`Token::phase`]: between `refresh_at` and `expires_at`.
pub(crate) const STALE: u8 = 1;
/// [`Token::phase`]: at or after `expires_at`.
pub(crate) const EXPIRED: u8 = 2;
/// [`Token::phase`]: the timer is gone (its runtime shut down); read the clock.
pub(crate) const UNTIMED: u8 = 3;

/// The token as requests use it: the ready-made header value and when it goes stale.
pub(crate) struct Token {
    /// `Bearer <access_token>`, built once per token and marked sensitive.
    pub(crate) header: HeaderValue,
    /// Identifies this token across the copies the cache makes of it, so a 401 can
    /// invalidate exactly the token it was answered for.
    pub(crate) generation: u64,
    /// From this instant on, a request triggers a background refresh.
    pub(crate) refresh_at: Instant,
    /// From this instant on, requests wait for a new token.
    pub(crate) expires_at: Instant,
    /// Identifies the token in a token store (random, not derived from the token).
    pub(crate) shared_id: u64,
    /// When the token was requested, by the wall clock (shown by a token store; never
    /// used for timing).
    pub(crate) issued_at: SystemTime,
    /// How long it lives from `issued_at`.
    pub(crate) lifetime: Duration,
    /// [`FRESH`], [`STALE`] or [`EXPIRED`], moved on by a timer task at `refresh_at`
    /// and `expires_at`, so the request path reads an atomic instead of the clock.
    pub(crate) phase: AtomicU8,
    /// Dropped with the token, which ends its phase timer early.
    _alive: oneshot::Sender<()>,
    /// The other end, taken by [`Token::schedule`].
    gone: Mutex<Option<oneshot::Receiver<()>>>,
}

impl Token {
    pub(crate) fn new(
        header: HeaderValue,
        generation: u64,
        refresh_at: Instant,
        expires_at: Instant,
    ) -> Self {
        let now = Instant::now();
        let phase = if now >= expires_at {
            EXPIRED
        } else if now >= refresh_at {
            STALE
        } else {
            FRESH
        };
        let (alive, gone) = oneshot::channel();
        Token {
            header,
            generation,
            refresh_at,
            expires_at,
            shared_id: 0,
            issued_at: SystemTime::now(),
            lifetime: expires_at.saturating_duration_since(now),
            phase: AtomicU8::new(phase),
            _alive: alive,
            gone: Mutex::new(Some(gone)),
        }
    }

    /// A copy of this token that is due for a refresh at `refresh_at` instead.
    pub(crate) fn refreshing_at(&self, refresh_at: Instant) -> Token {
        let mut copy = Token::new(
            self.header.clone(),
            self.generation,
            refresh_at,
            self.expires_at,
        );
        copy.shared_id = self.shared_id;
        copy.issued_at = self.issued_at;
        copy.lifetime = self.lifetime;
        copy
    }

    /// This token as a token store keeps it; `None` if its header is not a Bearer
    /// token of visible ASCII.
    pub(crate) fn to_shared(&self) -> Option<SharedToken> {
        let value = self.header.to_str().ok()?.strip_prefix("Bearer ")?;
        // The remaining life, by this process's monotonic clock: what replicas exchange.
        let remaining = self.expires_at.saturating_duration_since(Instant::now());
        Some(
            SharedToken::new(
                self.shared_id,
                SecretString::from(value.to_owned()),
                self.lifetime,
                remaining,
            )
            .with_issued_at(self.issued_at),
        )
    }

    /// [`FRESH`], [`STALE`] or [`EXPIRED`]: from the timer-driven phase, or from the
    /// clock when the timer is gone.
    #[inline]
    pub(crate) fn phase_now(&self) -> u8 {
        match self.phase.load(Ordering::Acquire) {
            UNTIMED => {
                let now = Instant::now();
                if now >= self.expires_at {
                    EXPIRED
                } else if now >= self.refresh_at {
                    STALE
                } else {
                    FRESH
                }
            }
            phase => phase,
        }
    }

    /// Spawns the timer that moves this token's phase on. It holds the token weakly
    /// and ends as soon as the token is dropped. Must run inside a tokio runtime.
    pub(crate) fn schedule(token: &Arc<Token>) {
        let gone = token
            .gone
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        let Some(mut gone) = gone else {
            return;
        };
        let (refresh_at, expires_at) = (token.refresh_at, token.expires_at);
        let mut timer = Timer {
            token: Arc::downgrade(token),
            done: false,
        };
        tokio::spawn(async move {
            // `Ok` from the timeout means the token was dropped first.
            if tokio::time::timeout_at(refresh_at, &mut gone).await.is_ok() {
                timer.disarm();
                return;
            }
            match timer.token.upgrade() {
                Some(token) => token.phase.fetch_max(STALE, Ordering::Release),
                None => return,
            };
            if tokio::time::timeout_at(expires_at, &mut gone).await.is_ok() {
                timer.disarm();
                return;
            }
            if let Some(token) = timer.token.upgrade() {
                token.phase.store(EXPIRED, Ordering::Release);
            }
            timer.disarm();
        });
    }
}

/// Owned by a phase timer task. If the task is dropped before it finishes (its
/// runtime shut down), the token falls back to reading the clock.
struct Timer {
    token: std::sync::Weak<Token>,
    done: bool,
}

impl Timer {
    /// The timer finished its work (or the token is gone): nothing to fall back on.
    fn disarm(&mut self) {
        self.done = true;
    }
}

impl Drop for Timer {
    fn drop(&mut self) {
        if !self.done {
            if let Some(token) = self.token.upgrade() {
                token.phase.store(UNTIMED, Ordering::Release);
            }
        }
    }
}

impl std::fmt::Debug for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Token")
            .field("generation", &self.generation)
            .field("refresh_at", &self.refresh_at)
            .field("expires_at", &self.expires_at)
            .field("shared_id", &self.shared_id)
            .finish_non_exhaustive()
    }
}
