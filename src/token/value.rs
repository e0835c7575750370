//! The token as the cell holds it: its secret, the header built from it once, and
//! its phase (fresh, in the soft window, expired), moved on by a timer on a
//! multi-thread runtime and read from the clock on a current-thread one.

use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::time::{Duration, SystemTime};

use http::HeaderValue;
use secrecy::{ExposeSecret, SecretString};
use tokio::sync::oneshot;
use tokio::time::Instant;

use crate::error::Error;

/// An access token and its `Authorization` value, built together in
/// [`Bearer::new`] — the one place a header is made from a token. The secret is
/// kept, so nothing ever strips `Bearer ` back off the header.
#[derive(Clone)]
pub(crate) struct Bearer {
    secret: SecretString,
    /// `Bearer <access_token>`, marked sensitive.
    header: HeaderValue,
}

impl Bearer {
    /// Checks the token (a single run of visible characters: no whitespace or
    /// control characters, which also rules out CR/LF header injection) and builds
    /// its header.
    pub(crate) fn new(secret: SecretString) -> Result<Self, Error> {
        check_access_token(secret.expose_secret())?;
        let mut header = HeaderValue::try_from(format!("Bearer {}", secret.expose_secret()))
            .map_err(|_| {
                Error::invalid_response(
                    "token endpoint answered an access_token that is not a valid header value",
                )
            })?;
        header.set_sensitive(true);
        Ok(Bearer { secret, header })
    }

    pub(crate) fn secret(&self) -> &SecretString {
        &self.secret
    }

    /// The header value, for the parser's tests and fuzz target; the cell copies it
    /// into the installed token.
    #[cfg(any(test, feature = "fuzzing"))]
    pub(crate) fn header(&self) -> &HeaderValue {
        &self.header
    }
}

impl std::fmt::Debug for Bearer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Bearer([redacted])")
    }
}

/// Whether `token` can be sent as `Authorization: Bearer <token>`: non-empty visible
/// characters, no whitespace or control characters.
pub(crate) fn check_access_token(token: &str) -> Result<(), Error> {
    if token
        .bytes()
        .any(|b| b.is_ascii_whitespace() || b.is_ascii_control())
    {
        return Err(Error::invalid_response(
            "token endpoint answered an access_token with whitespace or control characters, \
             which cannot be sent in an Authorization header",
        ));
    }
    if HeaderValue::from_str(token).is_err() {
        return Err(Error::invalid_response(
            "token endpoint answered an access_token that is not a valid header value",
        ));
    }
    Ok(())
}

/// Where a token is in its life. Stored in an `AtomicU8` so that the request path
/// reads one byte instead of the clock.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub(crate) enum Phase {
    /// Before `refresh_at`.
    Fresh = 0,
    /// Between `refresh_at` and `expires_at`: the soft window.
    Stale = 1,
    /// At or after `expires_at`.
    Expired = 2,
    /// No timer moves the phase (its runtime shut down, or it is a current-thread
    /// runtime, whose timers run only while something drives it): read the clock.
    Untimed = 3,
}

impl Phase {
    fn from_u8(value: u8) -> Phase {
        match value {
            0 => Phase::Fresh,
            1 => Phase::Stale,
            2 => Phase::Expired,
            _ => Phase::Untimed,
        }
    }

    /// The phase at `now` of a token due for refresh at `refresh_at`.
    fn at(now: Instant, refresh_at: Instant, expires_at: Instant) -> Phase {
        if now >= expires_at {
            Phase::Expired
        } else if now >= refresh_at {
            Phase::Stale
        } else {
            Phase::Fresh
        }
    }
}

/// What is known of a token without its secret value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct TokenInfo {
    /// Counts the tokens this layer obtained, from 1.
    pub generation: u64,
    /// When the token expires (`tokio::time::Instant`).
    pub expires_at: Instant,
    /// When a request will start refreshing it in the background.
    pub refresh_at: Instant,
}

/// The token as requests use it: the ready-made header value and when it goes stale.
pub(crate) struct Token {
    pub(crate) bearer: Bearer,
    /// Identifies this token across the copies the cell makes of it, so a 401 can
    /// invalidate exactly the token it was answered for.
    pub(crate) generation: u64,
    /// From this instant on, a request triggers a background refresh.
    pub(crate) refresh_at: Instant,
    /// From this instant on, requests wait for a new token.
    pub(crate) expires_at: Instant,
    /// Identifies the token in a token store (random, not derived from the token).
    pub(crate) store_id: u64,
    /// When the token was requested, by the wall clock (for a token store).
    pub(crate) issued_at: SystemTime,
    /// How long it lives from `issued_at`.
    pub(crate) lifetime: Duration,
    /// A [`Phase`], moved on by a timer task at `refresh_at` and `expires_at`, or
    /// [`Phase::Untimed`] when there is no timer (then the clock decides).
    phase: AtomicU8,
    /// Dropped with the token, which ends its phase timer early.
    _alive: oneshot::Sender<()>,
    /// The other end, taken by [`Token::schedule`].
    gone: Mutex<Option<oneshot::Receiver<()>>>,
}

impl Token {
    pub(crate) fn new(
        bearer: Bearer,
        generation: u64,
        refresh_at: Instant,
        expires_at: Instant,
    ) -> Self {
        let now = Instant::now();
        let (alive, gone) = oneshot::channel();
        Token {
            bearer,
            generation,
            refresh_at,
            expires_at,
            store_id: 0,
            issued_at: SystemTime::now(),
            lifetime: expires_at.saturating_duration_since(now),
            phase: AtomicU8::new(Phase::at(now, refresh_at, expires_at) as u8),
            _alive: alive,
            gone: Mutex::new(Some(gone)),
        }
    }

    /// A copy of this token that is due for a refresh at `refresh_at` instead.
    pub(crate) fn refreshing_at(&self, refresh_at: Instant) -> Token {
        let mut copy = Token::new(
            self.bearer.clone(),
            self.generation,
            refresh_at,
            self.expires_at,
        );
        copy.store_id = self.store_id;
        copy.issued_at = self.issued_at;
        copy.lifetime = self.lifetime;
        copy
    }

    /// `Bearer <access_token>`, marked sensitive.
    #[inline]
    pub(crate) fn header(&self) -> &HeaderValue {
        &self.bearer.header
    }

    /// What is known of this token without its secret.
    pub(crate) fn info(&self) -> TokenInfo {
        TokenInfo {
            generation: self.generation,
            expires_at: self.expires_at,
            refresh_at: self.refresh_at,
        }
    }

    /// Whether the timer says the token is fresh: one load, for the request path.
    #[inline]
    pub(crate) fn is_fresh(&self) -> bool {
        self.phase.load(Ordering::Acquire) == Phase::Fresh as u8
    }

    /// Whether the token is fresh now: by its timer, or by the clock when it has none
    /// (one load while a timer keeps it fresh).
    #[cfg(feature = "workspaces")]
    #[inline]
    pub(crate) fn is_fresh_now(&self) -> bool {
        self.is_fresh() || self.phase_now() == Phase::Fresh
    }

    /// The timer-driven phase ([`Phase::Untimed`] once the timer is gone).
    pub(crate) fn timed_phase(&self) -> Phase {
        Phase::from_u8(self.phase.load(Ordering::Acquire))
    }

    /// Fresh, stale or expired: from the timer-driven phase, or from the clock when
    /// the timer is gone.
    #[inline]
    pub(crate) fn phase_now(&self) -> Phase {
        match self.timed_phase() {
            Phase::Untimed => Phase::at(Instant::now(), self.refresh_at, self.expires_at),
            phase => phase,
        }
    }

    /// Spawns the timer that moves this token's phase on. It holds the token weakly
    /// and ends as soon as the token is dropped. Must run inside a tokio runtime.
    ///
    /// On a current-thread runtime there is no timer: such a runtime runs its timers
    /// only while something drives it, and one driven now and then (`block_on` per
    /// call, say) would let an expired token look fresh to the first request after a
    /// pause. The token's phase is read from the clock on every request instead.
    pub(crate) fn schedule(token: &Arc<Token>) {
        let gone = token
            .gone
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        let Some(mut gone) = gone else {
            return;
        };
        let runtime = tokio::runtime::Handle::current();
        if runtime.runtime_flavor() == tokio::runtime::RuntimeFlavor::CurrentThread {
            token.phase.store(Phase::Untimed as u8, Ordering::Release);
            return;
        }
        let (refresh_at, expires_at) = (token.refresh_at, token.expires_at);
        let mut timer = Timer {
            token: Arc::downgrade(token),
            done: false,
        };
        runtime.spawn(async move {
            // `Ok` from the timeout means the token was dropped first.
            if tokio::time::timeout_at(refresh_at, &mut gone).await.is_ok() {
                timer.disarm();
                return;
            }
            match timer.token.upgrade() {
                Some(token) => token.phase.fetch_max(Phase::Stale as u8, Ordering::Release),
                None => return,
            };
            if tokio::time::timeout_at(expires_at, &mut gone).await.is_ok() {
                timer.disarm();
                return;
            }
            if let Some(token) = timer.token.upgrade() {
                token.phase.store(Phase::Expired as u8, Ordering::Release);
            }
            timer.disarm();
        });
    }
}

/// Owned by a phase timer task. If the task is dropped before it finishes (its
/// runtime shut down), the token falls back to reading the clock.
struct Timer {
    token: Weak<Token>,
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
                token.phase.store(Phase::Untimed as u8, Ordering::Release);
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
            .field("store_id", &self.store_id)
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bearer() -> Bearer {
        Bearer::new(SecretString::from("t")).unwrap()
    }

    fn multi_thread() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap()
    }

    #[test]
    fn a_token_whose_timer_is_gone_falls_back_to_the_clock() {
        let now = Instant::now();
        let hour = Duration::from_secs(3600);
        let fresh = Arc::new(Token::new(bearer(), 1, now + hour, now + 2 * hour));
        let stale = Arc::new(Token::new(bearer(), 2, now, now + hour));
        let runtime = multi_thread();
        runtime.block_on(async {
            Token::schedule(&fresh);
            Token::schedule(&stale);
        });
        assert_eq!(fresh.timed_phase(), Phase::Fresh);
        // The timers are dropped with their runtime.
        drop(runtime);
        assert_eq!(fresh.timed_phase(), Phase::Untimed);
        assert_eq!(fresh.phase_now(), Phase::Fresh);
        assert_eq!(stale.phase_now(), Phase::Stale);
        let expired = Token::new(bearer(), 3, now, now);
        assert_eq!(expired.phase_now(), Phase::Expired);
    }

    /// A token due for refresh after `refresh` and expiring after `expire`, from now,
    /// with its phase scheduled on the current runtime.
    fn scheduled(refresh: Duration, expire: Duration) -> Arc<Token> {
        let now = Instant::now();
        let token = Arc::new(Token::new(bearer(), 1, now + refresh, now + expire));
        Token::schedule(&token);
        token
    }

    #[test]
    fn the_timer_moves_the_phase_on_at_refresh_and_expiry() {
        let runtime = multi_thread();
        runtime.block_on(async {
            let token = scheduled(Duration::from_millis(20), Duration::from_millis(40));
            // Each phase is reached by the timer (not read from the clock), and never
            // before its time; the wait for it is bounded.
            for (phase, at) in [
                (Phase::Stale, token.refresh_at),
                (Phase::Expired, token.expires_at),
            ] {
                tokio::time::timeout(Duration::from_secs(30), async {
                    // (A loaded machine may see both moves at once.)
                    while (token.timed_phase() as u8) < phase as u8 {
                        tokio::task::yield_now().await;
                    }
                })
                .await
                .expect("the timer moved the phase on");
                assert!(Instant::now() >= at);
            }
        });
    }

    // A current-thread runtime runs its timers only while driven: the phase is read
    // from the clock. Here the token is made on one runtime that is then left idle,
    // and read from another whose (paused) clock is past its expiry.
    #[test]
    fn on_a_current_thread_runtime_the_phase_comes_from_the_clock() {
        let paused = || {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .start_paused(true)
                .build()
                .unwrap()
        };
        let idle = paused();
        let token =
            idle.block_on(async { scheduled(Duration::from_secs(10), Duration::from_secs(20)) });
        assert_eq!(token.timed_phase(), Phase::Untimed);
        assert!(!token.is_fresh());
        paused().block_on(async {
            assert_eq!(token.phase_now(), Phase::Fresh);
            tokio::time::advance(Duration::from_secs(15)).await;
            assert_eq!(token.phase_now(), Phase::Stale);
            tokio::time::advance(Duration::from_secs(10)).await;
            assert_eq!(token.phase_now(), Phase::Expired);
        });
        drop(idle);
    }

    #[test]
    fn the_header_is_built_once_sensitive_and_the_secret_kept() {
        let bearer = Bearer::new(SecretString::from("abc")).unwrap();
        assert_eq!(bearer.header(), "Bearer abc");
        assert!(bearer.header().is_sensitive());
        assert_eq!(bearer.secret().expose_secret(), "abc");
        for bad in ["a b", "a\r\nb", "a\u{7f}"] {
            let err = Bearer::new(SecretString::from(bad)).unwrap_err();
            assert_eq!(err.kind(), crate::ErrorKind::InvalidResponse, "{bad:?}");
        }
    }
}
