//! One refresh, from start to the token it installs: through a [`Coordinator`] (a
//! token store shared with other layers) when there is one, else — or when the store
//! fails — straight from the fetcher.
//!
//! The coordinator is a step with a narrow view of the refresh (a [`Job`]): it can
//! check a stored token, make the token call, and read or replace the source's
//! refresh token. It answers with what it [`Obtained`] — a stored token to adopt, or
//! a fetched one — and the cell installs that. It never sees the cell itself.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use secrecy::{ExposeSecret, SecretString};
use tokio::time::Instant;

use super::cell::{early_by, TokenCell};
use super::fetch::{Fetched, MIN_LIFETIME};
use super::value::{Bearer, Token};
use crate::boxed::BoxFuture;
use crate::error::{Error, ErrorKind};
use crate::stats::Counters;

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

/// A token as a store holds it, in the cell's terms.
pub(crate) struct StoredToken {
    pub(crate) id: u64,
    pub(crate) access_token: SecretString,
    /// When it was requested, by the wall clock (shown only; never used for timing).
    pub(crate) issued_at: SystemTime,
    /// How long it lives in all.
    pub(crate) lifetime: Duration,
    /// When it expires, by this process's monotonic clock.
    pub(crate) expires_at: Instant,
}

/// A stored token that suits this refresh, ready to install.
pub(crate) struct Adopted {
    bearer: Bearer,
    id: u64,
    issued_at: SystemTime,
    lifetime: Duration,
    expires_at: Instant,
}

/// What a coordinator obtained for the cell to install.
pub(crate) enum Obtained {
    /// Another layer's token, from the store.
    Adopted(Adopted),
    /// A token from this layer's own token call.
    Fetched(Fetched),
}

/// Coordinates refreshes with other layers (through a token store).
pub(crate) trait Coordinator: Send + Sync + 'static {
    /// Obtains a token for `job`. `None`: the store is paused or failed before any
    /// token call was made; the cell then fetches directly.
    fn obtain<'a>(&'a self, job: Job<'a>) -> BoxFuture<'a, Option<Result<Obtained, Error>>>;

    /// A token call made without the coordinator rotated the refresh token.
    fn rotated_directly(&self, refresh_token: SecretString);
}

/// The coordinator's view of one refresh.
pub(crate) struct Job<'a> {
    cell: &'a TokenCell,
    reason: Reason,
    deadline: Instant,
    /// Whether a token call was made for this refresh already (only the first one
    /// after an invalidation is spaced out).
    called: AtomicBool,
}

impl<'a> Job<'a> {
    /// When the refresh gives up.
    pub(crate) fn deadline(&self) -> Instant {
        self.deadline
    }

    /// The counters of the layer.
    pub(crate) fn counters(&self) -> &'a Counters {
        &self.cell.counters
    }

    /// Whether the cell was retired (its workspace forgotten) during the refresh:
    /// then nothing it obtains may be written to the store.
    pub(crate) fn retired(&self) -> bool {
        self.cell.retired()
    }

    /// The store id of the token being replaced, if any: a stored token with this
    /// id is no use.
    pub(crate) fn replacing(&self) -> Option<u64> {
        self.cell.peek().map(|t| t.store_id)
    }

    /// The store id of the token a 401 refused, until the store no longer holds it:
    /// whoever starts the refresh (a request, the background refresher, the handle),
    /// that token is no use.
    pub(crate) fn refused(&self) -> Option<u64> {
        self.cell.failed_store_id()
    }

    /// The store no longer holds the refused token `id`.
    pub(crate) fn forget_refused(&self, id: u64) {
        self.cell.forget_failed_store_id(id);
    }

    /// `stored`, if it suits this refresh: it lives at least [`MIN_LIFETIME`] more,
    /// its value can be sent, and for an early or forced refresh it is not due for a
    /// refresh itself.
    pub(crate) fn adopt(&self, stored: StoredToken) -> Option<Adopted> {
        let remaining = stored.expires_at.saturating_duration_since(Instant::now());
        if remaining < MIN_LIFETIME {
            return None;
        }
        let bearer = match Bearer::new(stored.access_token) {
            Ok(bearer) => bearer,
            Err(error) => {
                tracing::warn!(
                    error = &error as &dyn std::error::Error,
                    "ignoring an unusable token in the token store"
                );
                return None;
            }
        };
        let lifetime = stored.lifetime.max(remaining);
        let due = remaining <= early_by(self.cell.margin(), lifetime, 0.0);
        if due && matches!(self.reason, Reason::Early | Reason::Forced) {
            return None;
        }
        tracing::debug!(
            remaining_secs = remaining.as_secs(),
            "using the access token from the token store"
        );
        self.cell.counters.adopted();
        Some(Adopted {
            bearer,
            id: stored.id,
            issued_at: stored.issued_at,
            lifetime,
            expires_at: stored.expires_at,
        })
    }

    /// The token call, with the whole token timeout from now (time spent on the store
    /// does not count).
    pub(crate) async fn fetch(&self) -> Result<Fetched, Error> {
        let deadline = Instant::now() + self.cell.fetcher().timeout();
        let first = !self.called.swap(true, Ordering::Relaxed);
        self.cell.fetch(self.reason, deadline, first).await
    }

    /// The refresh token the source sends next, if it has one.
    pub(crate) fn refresh_token(&self) -> Option<SecretString> {
        self.cell.fetcher().refresh_token()
    }

    /// The source's refresh token, if it changed from `before`.
    pub(crate) fn rotated_since(&self, before: Option<SecretString>) -> Option<SecretString> {
        self.cell.fetcher().rotated_since(before)
    }

    /// The refresh token this layer was configured with, if the source now sends
    /// another (taken from a token store).
    pub(crate) fn configured_refresh_token(&self) -> Option<SecretString> {
        self.cell.fetcher().configured_refresh_token()
    }

    /// After a failure outside the token call (the store's): puts a still-valid
    /// token's next refresh off, as a failed token call does.
    pub(crate) fn back_off(&self, error: &Error) {
        self.cell.back_off(error);
    }

    /// Sends `refresh_token` with the next token requests (it came from the store).
    pub(crate) fn use_refresh_token(&self, refresh_token: SecretString) {
        self.cell.fetcher().use_refresh_token(refresh_token);
    }
}

impl Fetched {
    /// This token as a store keeps it.
    pub(crate) fn stored(&self) -> StoredToken {
        StoredToken {
            id: self.store_id,
            access_token: SecretString::from(self.bearer.secret().expose_secret().to_owned()),
            issued_at: self.issued_at,
            lifetime: self.lifetime,
            expires_at: self.sent_at + self.lifetime,
        }
    }
}

impl TokenCell {
    /// One refresh: through the coordinator when there is one, else (or when it
    /// bows out) straight from the source.
    pub(super) async fn refresh(&self, reason: Reason) -> Result<Arc<Token>, Error> {
        if self.retired() {
            return Err(retired());
        }
        let timeout = self.fetcher().timeout();
        if let Some(coordinator) = self.coordinator() {
            let job = Job {
                cell: self,
                reason,
                deadline: Instant::now() + timeout,
                called: AtomicBool::new(false),
            };
            if let Some(obtained) = coordinator.obtain(job).await {
                return obtained.and_then(|obtained| self.install(obtained));
            }
        }
        // Straight to the source, with the whole token timeout.
        let before = self.fetcher().refresh_token();
        let fetched = self.fetch(reason, Instant::now() + timeout, true).await;
        if let Some(coordinator) = self.coordinator().filter(|_| !self.retired()) {
            if let Some(rotated) = self.fetcher().rotated_since(before) {
                // A rotation (even from an otherwise unusable answer) reaches the
                // store once it answers again.
                coordinator.rotated_directly(rotated);
            }
        }
        self.install(Obtained::Fetched(fetched?))
    }

    /// Makes what a refresh obtained the current token, unless the cell was retired
    /// meanwhile.
    fn install(&self, obtained: Obtained) -> Result<Arc<Token>, Error> {
        if self.retired() {
            return Err(retired());
        }
        Ok(match obtained {
            Obtained::Fetched(fetched) => self.put(
                fetched.bearer,
                fetched.sent_at + fetched.lifetime,
                fetched.lifetime,
                fetched.issued_at,
                fetched.store_id,
            ),
            Obtained::Adopted(adopted) => self.put(
                adopted.bearer,
                adopted.expires_at,
                adopted.lifetime,
                adopted.issued_at,
                adopted.id,
            ),
        })
    }
}

/// The error of a refresh on a retired cell.
fn retired() -> Error {
    Error::new(
        ErrorKind::UnknownWorkspace,
        "the workspace was forgotten; its token is no longer fetched",
    )
}
