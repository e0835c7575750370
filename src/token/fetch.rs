//! The fetcher: owns the token source and makes one refresh's attempts — retrying
//! transient failures with capped, jittered exponential back-off or the endpoint's
//! `Retry-After`, all within the refresh's deadline.

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

/// Attempts one refresh makes at most when the endpoint fails transiently.
pub(crate) const MAX_ATTEMPTS: u32 = 4;
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
}

impl Fetcher {
    pub(crate) fn new(
        source: Box<dyn TokenSource>,
        on_rotated: Option<RotationHook>,
        timeout: Duration,
    ) -> Self {
        Fetcher {
            source,
            on_rotated,
            timeout,
        }
    }

    /// The bound on one refresh's token requests.
    pub(crate) fn timeout(&self) -> Duration {
        self.timeout
    }

    /// Token requests until one succeeds: up to [`MAX_ATTEMPTS`], retrying transient
    /// failures with jittered exponential back-off (or the endpoint's `Retry-After`),
    /// all before `deadline`.
    pub(crate) async fn fetch(
        &self,
        counters: &Counters,
        reason: Reason,
        deadline: Instant,
    ) -> Result<Fetched, Error> {
        let mut attempt = 1;
        loop {
            tracing::debug!(?reason, attempt, "requesting an access token");
            counters.token_request();
            let sent_at = Instant::now();
            let result = match tokio::time::timeout_at(deadline, self.source.fetch()).await {
                Ok(result) => result.and_then(|fetched| self.accept(fetched, sent_at)),
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
                    return Err(error);
                }
            }
        }
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
