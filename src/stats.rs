//! Counters of what the layer did, read through
//! [`TokenHandle::stats`](crate::TokenHandle::stats) and, with the `metrics` feature,
//! reported to the [`metrics`](https://docs.rs/metrics) facade as
//! `eshopbox_auth_token_requests_total`, `eshopbox_auth_token_failures_total{kind}`,
//! `eshopbox_auth_invalidations_total`, `eshopbox_auth_resends_total`,
//! `eshopbox_auth_waited_total`, `eshopbox_auth_store_adopted_total`,
//! `eshopbox_auth_store_failures_total` and `eshopbox_auth_refused_total`.

use std::sync::atomic::{AtomicU64, Ordering};

use crate::error::ErrorKind;

/// A snapshot of the layer's counters, since it was built.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Stats {
    /// Token requests sent (every attempt, retries included).
    pub token_requests: u64,
    /// Token requests that failed because the credentials were rejected.
    pub failures_rejected: u64,
    /// Token requests that failed because the endpoint was unavailable.
    pub failures_unavailable: u64,
    /// Token requests answered with something unusable.
    pub failures_invalid_response: u64,
    /// Tokens invalidated: by a response classified as refused (401), or through
    /// [`TokenHandle::invalidate`](crate::TokenHandle::invalidate).
    pub invalidations: u64,
    /// Requests resent once with a new token after a 401.
    pub resends: u64,
    /// Requests that found no usable token and waited for a refresh.
    pub waited: u64,
    /// Tokens taken from the [token store](crate::store) instead of being requested.
    pub store_adopted: u64,
    /// Refreshes that found the token store failing and went to the token endpoint
    /// directly.
    pub store_failures: u64,
    /// Requests refused before they were sent, because their destination is not
    /// trusted (see [`ErrorKind::UntrustedDestination`]). Each one is a request that
    /// would otherwise have carried the token elsewhere.
    pub refused: u64,
}

#[derive(Default)]
pub(crate) struct Counters {
    token_requests: AtomicU64,
    failures_rejected: AtomicU64,
    failures_unavailable: AtomicU64,
    failures_invalid_response: AtomicU64,
    invalidations: AtomicU64,
    resends: AtomicU64,
    waited: AtomicU64,
    store_adopted: AtomicU64,
    store_failures: AtomicU64,
    refused: AtomicU64,
}

/// With the `metrics` feature, every count also goes to the `metrics` facade under
/// these names (the failure counter with a `kind` label).
#[cfg(feature = "metrics")]
mod names {
    pub(super) const TOKEN_REQUESTS: &str = "eshopbox_auth_token_requests_total";
    pub(super) const TOKEN_FAILURES: &str = "eshopbox_auth_token_failures_total";
    pub(super) const INVALIDATIONS: &str = "eshopbox_auth_invalidations_total";
    pub(super) const RESENDS: &str = "eshopbox_auth_resends_total";
    pub(super) const WAITED: &str = "eshopbox_auth_waited_total";
    pub(super) const STORE_ADOPTED: &str = "eshopbox_auth_store_adopted_total";
    pub(super) const STORE_FAILURES: &str = "eshopbox_auth_store_failures_total";
    pub(super) const REFUSED: &str = "eshopbox_auth_refused_total";
}

impl Counters {
    pub(crate) fn token_request(&self) {
        self.token_requests.fetch_add(1, Ordering::Relaxed);
        #[cfg(feature = "metrics")]
        metrics::counter!(names::TOKEN_REQUESTS).increment(1);
    }

    pub(crate) fn failure(&self, kind: ErrorKind) {
        let (counter, label) = match kind {
            ErrorKind::Rejected => (&self.failures_rejected, "rejected"),
            ErrorKind::InvalidResponse => (&self.failures_invalid_response, "invalid_response"),
            _ => (&self.failures_unavailable, "unavailable"),
        };
        counter.fetch_add(1, Ordering::Relaxed);
        #[cfg(feature = "metrics")]
        metrics::counter!(names::TOKEN_FAILURES, "kind" => label).increment(1);
        #[cfg(not(feature = "metrics"))]
        let _ = label;
    }

    pub(crate) fn invalidation(&self) {
        self.invalidations.fetch_add(1, Ordering::Relaxed);
        #[cfg(feature = "metrics")]
        metrics::counter!(names::INVALIDATIONS).increment(1);
    }

    pub(crate) fn resend(&self) {
        self.resends.fetch_add(1, Ordering::Relaxed);
        #[cfg(feature = "metrics")]
        metrics::counter!(names::RESENDS).increment(1);
    }

    pub(crate) fn waited(&self) {
        self.waited.fetch_add(1, Ordering::Relaxed);
        #[cfg(feature = "metrics")]
        metrics::counter!(names::WAITED).increment(1);
    }

    pub(crate) fn adopted(&self) {
        self.store_adopted.fetch_add(1, Ordering::Relaxed);
        #[cfg(feature = "metrics")]
        metrics::counter!(names::STORE_ADOPTED).increment(1);
    }

    pub(crate) fn store_failure(&self) {
        self.store_failures.fetch_add(1, Ordering::Relaxed);
        #[cfg(feature = "metrics")]
        metrics::counter!(names::STORE_FAILURES).increment(1);
    }

    pub(crate) fn refused(&self) {
        self.refused.fetch_add(1, Ordering::Relaxed);
        #[cfg(feature = "metrics")]
        metrics::counter!(names::REFUSED).increment(1);
    }

    pub(crate) fn snapshot(&self) -> Stats {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        Stats {
            token_requests: get(&self.token_requests),
            failures_rejected: get(&self.failures_rejected),
            failures_unavailable: get(&self.failures_unavailable),
            failures_invalid_response: get(&self.failures_invalid_response),
            invalidations: get(&self.invalidations),
            resends: get(&self.resends),
            waited: get(&self.waited),
            store_adopted: get(&self.store_adopted),
            store_failures: get(&self.store_failures),
            refused: get(&self.refused),
        }
    }
}
