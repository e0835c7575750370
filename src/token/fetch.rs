//! The fetcher: owns the token source and makes one refresh's attempts — retrying
//! transient failures with capped, jittered exponential back-off or the endpoint's
//! `Retry-After` (whichever is longer) until the refresh's deadline would pass. Each
//! attempt has a bound of its own, so one hung connection cannot eat the whole budget.
//! Refreshes that follow an invalidation (a 401) are at least the failure cooldown
//! apart, so an API that refuses every token costs a token call per cooldown, not per
//! request. Only a refresh's first token call is spaced: a second one in the same
//! refresh (the configured refresh token, tried after a stored one was refused) goes
//! at once.
//!
//! A refresh that requests wait for (no valid token left) keeps trying until its
//! deadline; an early refresh (a valid token is still served) makes at most
//! [`EARLY_ATTEMPTS`], since its failure costs nothing. When a refresh runs out of
//! time, the next one resumes its back-off where it stopped, so refreshes that follow
//! each other through a long outage call no more often than one refresh would.

use std::sync::{Mutex, PoisonError};
use std::time::{Duration, SystemTime};

use secrecy::{ExposeSecret, SecretString};
use tokio::time::Instant;

use super::endpoint::RotationHook;
use super::refresh::Reason;
use super::response::{clamp_lifetime, DEFAULT_LIFETIME};
use super::source::{FetchedToken, TokenSource};
use super::value::Bearer;
use crate::error::Error;
use crate::stats::Counters;

/// Default [`token_timeout`](crate::EshopboxAuthBuilder::token_timeout): 30 seconds.
pub const DEFAULT_TOKEN_TIMEOUT: Duration = Duration::from_secs(30);

/// Attempts an early refresh (made while the current token is still valid) makes at
/// most when the endpoint fails transiently.
pub(crate) const EARLY_ATTEMPTS: u32 = 4;
/// The shortest bound on one attempt (unless less of the budget is left).
pub(crate) const MIN_ATTEMPT_TIMEOUT: Duration = Duration::from_secs(5);
/// Shortest time a token is used before the next refresh, whatever `expires_in` says
/// and however slow the endpoint was: at most one refresh a second.
pub(crate) const MIN_LIFETIME: Duration = Duration::from_secs(1);
/// Back-off before the second attempt; doubled for each further one.
const BACKOFF_BASE: Duration = Duration::from_millis(200);
/// Longest back-off between two attempts.
const BACKOFF_MAX: Duration = Duration::from_secs(5);

/// A token the source answered, checked and ready to install.
pub(crate) struct Fetched {
    pub(crate) bearer: Bearer,
    /// How long it lives from `sent_at`: defaulted, clamped, at least [`MIN_LIFETIME`].
    pub(crate) lifetime: Duration,
    /// When its request was sent: expiry counts from here.
    pub(crate) sent_at: Instant,
    /// The same instant by the wall clock (for a token store).
    pub(crate) issued_at: SystemTime,
    /// Identifies it in a token store: random, not derived from the token.
    pub(crate) store_id: u64,
}

/// Owns the token source; makes the token requests of a refresh.
pub(crate) struct Fetcher {
    source: Box<dyn TokenSource>,
    /// Told about refresh tokens the source reports as rotated (sources that call
    /// the application's hook themselves, like Eshopbox's grant, have none here).
    on_rotated: Option<RotationHook>,
    /// Bound on one refresh's token requests, retries included.
    timeout: Duration,
    /// Bound on one attempt; `None`: a third of what is left of the budget, at least
    /// [`MIN_ATTEMPT_TIMEOUT`].
    attempt_timeout: Option<Duration>,
    /// After a refresh that ran out of time on transient failures: when the next
    /// token call may be made, and the attempt whose back-off comes after it.
    resume: Mutex<Option<(Instant, u32)>>,
    /// Shortest time between two refreshes that follow an invalidation (the failure
    /// cooldown), and when the last one made its first token call.
    spacing: Duration,
    last_after_invalidation: Mutex<Option<Instant>>,
    /// The refresh token the source was made with (before any from a token store).
    configured_refresh_token: Option<SecretString>,
}

impl Fetcher {
    pub(crate) fn new(
        source: Box<dyn TokenSource>,
        on_rotated: Option<RotationHook>,
        timeout: Duration,
        attempt_timeout: Option<Duration>,
        spacing: Duration,
    ) -> Self {
        Fetcher {
            configured_refresh_token: source.refresh_token(),
            source,
            on_rotated,
            timeout,
            attempt_timeout,
            resume: Mutex::new(None),
            spacing,
            last_after_invalidation: Mutex::new(None),
        }
    }

    /// The bound on one refresh's token requests.
    pub(crate) fn timeout(&self) -> Duration {
        self.timeout
    }

    /// Token requests until one succeeds, all before `deadline`: transient failures
    /// are retried with jittered exponential back-off (or the endpoint's
    /// `Retry-After`, if longer) as long as the next attempt would start before the deadline —
    /// at most [`EARLY_ATTEMPTS`] while the refresh is early: `early_until` is when
    /// the token still served expires (`None`: none is). Requests that come after that
    /// wait for this refresh, so it then goes on to the deadline. Each attempt is
    /// abandoned after its own bound ([`Fetcher::attempt_bound`]). With `space` (the
    /// first token call of a refresh that follows an invalidation), the first attempt
    /// waits until the failure cooldown has passed since the last such call.
    pub(crate) async fn fetch(
        &self,
        counters: &Counters,
        reason: Reason,
        deadline: Instant,
        early_until: Option<Instant>,
        space: bool,
    ) -> Result<Fetched, Error> {
        if space {
            self.space_out(deadline).await?;
        }
        let early_at = |now: Instant| early_until.is_some_and(|until| now < until);
        let early = early_at(Instant::now());
        let mut attempt = 1;
        let now = Instant::now();
        let resume = {
            let mut resume = self.resume.lock().unwrap_or_else(PoisonError::into_inner);
            match *resume {
                // An early refresh within a wait the endpoint asked for (or a back-off
                // not over yet) makes no call, and leaves the wait to the next refresh.
                Some((at, _)) if early && now < at => {
                    return Err(Error::unavailable(
                        "the token endpoint's Retry-After (or back-off) has not passed yet",
                    )
                    .with_retry_after(Some(at - now)));
                }
                _ => resume.take(),
            }
        };
        // The last refresh ran out of time moments ago: its back-off goes on. (Long
        // after, a refresh starts afresh.)
        if let Some((at, next)) = resume.filter(|(at, _)| !early && now < *at + BACKOFF_MAX) {
            if at >= deadline {
                // No call fits in this refresh's time: fail at once, and the next
                // refresh goes on waiting.
                self.resume_at(at, next);
                return Err(Error::unavailable(
                    "the token endpoint's back-off (or Retry-After) runs past the token timeout",
                )
                .with_retry_after(Some(at - now)));
            }
            tokio::time::sleep_until(at).await;
            attempt = next;
        }
        loop {
            tracing::debug!(?reason, attempt, "requesting an access token");
            counters.token_request();
            let sent_at = Instant::now();
            let bound = self.attempt_bound(sent_at, deadline);
            let result = match tokio::time::timeout_at(bound, self.source.fetch()).await {
                Ok(result) => result.and_then(|fetched| self.accept(fetched, sent_at)),
                Err(_) if bound < deadline => Err(Error::unavailable(format!(
                    "no answer to one token request within {:?}; trying again",
                    bound - sent_at
                ))),
                Err(_) => Err(Error::unavailable(format!(
                    "no token within the token timeout of {:?}",
                    self.timeout
                ))),
            };
            let error = match result {
                Ok(fetched) => return Ok(fetched),
                Err(error) => error,
            };
            counters.failure(error.kind());
            let early = early_at(Instant::now());
            let more = error.is_transient() && !(early && attempt >= EARLY_ATTEMPTS);
            // A `Retry-After` waits at least the back-off: `0` or a date in the past
            // must not turn the retries into a tight loop.
            let retry_in = more.then(|| {
                let backoff = backoff(attempt, fastrand::f64());
                error
                    .retry_after()
                    .map_or(backoff, |after| after.max(backoff))
            });
            match retry_in {
                Some(wait) if Instant::now() + wait < deadline => {
                    tracing::debug!(
                        ?reason,
                        attempt,
                        error = &error as &dyn std::error::Error,
                        ?wait,
                        "token request failed; retrying"
                    );
                    tokio::time::sleep(wait).await;
                    attempt += 1;
                }
                Some(wait) => {
                    tracing::warn!(
                        ?reason,
                        attempt,
                        error = &error as &dyn std::error::Error,
                        "token refresh ran out of time"
                    );
                    // The next refresh resumes this back-off; after an early refresh,
                    // only an endpoint's explicit `Retry-After` (which the refresh at
                    // expiry must honour too).
                    if !early || error.retry_after().is_some() {
                        self.resume_at(Instant::now() + wait, attempt + 1);
                    }
                    return Err(error);
                }
                None => {
                    tracing::warn!(
                        ?reason,
                        attempt,
                        error = &error as &dyn std::error::Error,
                        "token refresh failed"
                    );
                    // An early refresh out of attempts: a `Retry-After` still holds
                    // for the next refresh.
                    if let Some(after) = error.retry_after().filter(|_| error.is_transient()) {
                        self.resume_at(Instant::now() + after, attempt + 1);
                    }
                    return Err(error);
                }
            }
        }
    }

    /// The next refresh makes no token call before `at`, and goes on with `attempt`'s
    /// back-off.
    fn resume_at(&self, at: Instant, attempt: u32) {
        *self.resume.lock().unwrap_or_else(PoisonError::into_inner) = Some((at, attempt));
    }

    /// A refresh after an invalidation (a 401) waits until the spacing has passed
    /// since the last such refresh began. An API that answers 401 for a reason a new
    /// token does not cure (a missing permission, say) would otherwise cost a token
    /// call per request, and the endpoint rate-limits them; a revoked token is still
    /// replaced, at most one spacing later.
    async fn space_out(&self, deadline: Instant) -> Result<(), Error> {
        let last = *self
            .last_after_invalidation
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if let Some(next) = last.map(|at| at + self.spacing) {
            if next >= deadline {
                return Err(Error::unavailable(
                    "tokens were refused (401) again and again; the next refresh would \
                     start past the token timeout",
                ));
            }
            if Instant::now() < next {
                tracing::debug!(
                    wait = ?next.saturating_duration_since(Instant::now()),
                    "the last token was refused moments after the one before; spacing the refresh"
                );
                tokio::time::sleep_until(next).await;
            }
        }
        *self
            .last_after_invalidation
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = Some(Instant::now());
        Ok(())
    }

    /// When an attempt started at `now` is abandoned: after the configured attempt
    /// timeout, or else a third of what is left of the budget (at least
    /// [`MIN_ATTEMPT_TIMEOUT`]); never after the refresh's deadline.
    fn attempt_bound(&self, now: Instant, deadline: Instant) -> Instant {
        let left = deadline.saturating_duration_since(now);
        let bound = self
            .attempt_timeout
            .unwrap_or_else(|| (left / 3).max(MIN_ATTEMPT_TIMEOUT));
        now + bound.min(left)
    }

    /// Checks one answer of the source and makes it installable.
    fn accept(&self, fetched: FetchedToken, sent_at: Instant) -> Result<Fetched, Error> {
        if let (Some(rotated), Some(hook)) = (&fetched.refresh_token, &self.on_rotated) {
            hook(rotated);
        }
        let bearer = Bearer::new(fetched.access_token)?;
        // A token that is (nearly) dead on arrival is still used for a moment, so a
        // broken `expires_in` cannot turn every request into a token request.
        let lifetime = fetched
            .expires_in
            .map_or(DEFAULT_LIFETIME, clamp_lifetime)
            .max(MIN_LIFETIME);
        tracing::debug!(
            lifetime_secs = lifetime.as_secs(),
            scope = fetched.scope.as_deref().unwrap_or(""),
            id_token = fetched.has_id_token,
            "access token received"
        );
        Ok(Fetched {
            bearer,
            lifetime,
            sent_at,
            issued_at: SystemTime::now()
                .checked_sub(sent_at.elapsed())
                .unwrap_or_else(SystemTime::now),
            store_id: fastrand::u64(1..),
        })
    }

    /// The refresh token the source sends next, if it has one.
    pub(crate) fn refresh_token(&self) -> Option<SecretString> {
        self.source.refresh_token()
    }

    /// The source's refresh token, if it changed from `before` (it was rotated).
    pub(crate) fn rotated_since(&self, before: Option<SecretString>) -> Option<SecretString> {
        let after = self.refresh_token()?;
        let same = before.is_some_and(|b| b.expose_secret() == after.expose_secret());
        (!same).then_some(after)
    }

    /// The refresh token the source was made with, if it differs from the one it
    /// sends now (a token store's).
    pub(crate) fn configured_refresh_token(&self) -> Option<SecretString> {
        let configured = self.configured_refresh_token.clone()?;
        self.rotated_since(Some(configured.clone()))
            .map(|_| configured)
    }

    /// Sends `refresh_token` with the next token requests (it came from the store).
    pub(crate) fn use_refresh_token(&self, refresh_token: SecretString) {
        self.source.use_refresh_token(refresh_token);
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_up_to_five_seconds_with_jitter() {
        assert_eq!(backoff(1, 1.0), Duration::from_millis(200));
        assert_eq!(backoff(2, 1.0), Duration::from_millis(400));
        assert_eq!(backoff(3, 0.0), Duration::from_millis(400));
        assert_eq!(backoff(10, 1.0), BACKOFF_MAX);
        assert_eq!(backoff(u32::MAX, 1.0), BACKOFF_MAX);
    }
}
