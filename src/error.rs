//! The crate's error type.
//!
//! A token failure reaches the caller of the service as an [`Error`] boxed in a
//! [`tower::BoxError`]; `downcast_ref::<eshopbox_auth::Error>()` recovers it and
//! [`Error::kind`] tells what went wrong. No message or source produced here ever
//! contains the client secret, the refresh token or an access token.

use std::error::Error as StdError;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use http::StatusCode;

/// The longest wait a `Retry-After` may impose, from the endpoint or a source.
pub(crate) const MAX_RETRY_AFTER: Duration = Duration::from_secs(60);

/// What went wrong, coarse enough to match on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ErrorKind {
    /// The builder was given something unusable: a malformed or plain-http token URL,
    /// an empty credential, a zero timeout, or the layer was used outside a tokio runtime.
    Config,
    /// The token endpoint rejected the credentials or the refresh token
    /// (`invalid_grant`, `invalid_client`, any other 4xx but 408 and 429).
    /// Trying again with the same credentials will not help.
    Rejected,
    /// The token endpoint could not be reached, timed out, or answered 5xx, 408 or 429
    /// — or, per workspace, the credentials lookup failed or timed out. A later
    /// attempt may succeed.
    Unavailable,
    /// The token endpoint answered, but not with a usable token: not JSON, a missing or
    /// empty `access_token`, a `token_type` other than Bearer, a token that cannot be
    /// sent in a header, or an oversized body.
    InvalidResponse,
    /// The request was not sent: its URI is not a destination the token may go to
    /// (not https to an Eshopbox host, loopback or a host added with
    /// [`allow_host`](crate::EshopboxAuthBuilder::allow_host)). The message names the
    /// scheme and host. See [`EshopboxAuthBuilder::allow_host`](crate::EshopboxAuthBuilder::allow_host).
    UntrustedDestination,
    /// A per-workspace layer got a request it cannot serve: no
    /// `Workspace` extension, a workspace name that cannot be a header
    /// value, or one the credentials resolver does not know. The inner service was
    /// not called.
    UnknownWorkspace,
}

impl ErrorKind {
    fn as_str(self) -> &'static str {
        match self {
            ErrorKind::Config => "configuration error",
            ErrorKind::Rejected => "credentials rejected",
            ErrorKind::Unavailable => "unavailable",
            ErrorKind::InvalidResponse => "invalid token response",
            ErrorKind::UntrustedDestination => "untrusted destination",
            ErrorKind::UnknownWorkspace => "unknown workspace",
        }
    }
}

impl fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An error from obtaining an Eshopbox access token or from building the layer.
///
/// Cheap to clone: every request that waited on one failed refresh receives a clone
/// of the same error.
#[derive(Clone)]
pub struct Error {
    inner: Arc<Inner>,
}

struct Inner {
    kind: ErrorKind,
    message: String,
    status: Option<StatusCode>,
    oauth_error: Option<String>,
    retry_after: Option<Duration>,
    source: Option<Box<dyn StdError + Send + Sync>>,
}

impl Error {
    pub(crate) fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        Error {
            inner: Arc::new(Inner {
                kind,
                message: message.into(),
                status: None,
                oauth_error: None,
                retry_after: None,
                source: None,
            }),
        }
    }

    pub(crate) fn config(message: impl Into<String>) -> Self {
        Error::new(ErrorKind::Config, message)
    }

    /// An [`ErrorKind::InvalidResponse`] error, for
    /// [`TokenSource`](crate::source::TokenSource) implementations. The message must
    /// not contain a secret.
    pub fn invalid_response(message: impl Into<String>) -> Self {
        Error::new(ErrorKind::InvalidResponse, message)
    }

    /// An [`ErrorKind::Unavailable`] error (retried with back-off), for
    /// [`TokenSource`](crate::source::TokenSource) implementations. The message must
    /// not contain a secret.
    pub fn unavailable(message: impl Into<String>) -> Self {
        Error::new(ErrorKind::Unavailable, message)
    }

    /// An [`ErrorKind::Rejected`] error (remembered for the failure cooldown), for
    /// [`TokenSource`](crate::source::TokenSource) implementations. The message must
    /// not contain a secret.
    pub fn rejected(message: impl Into<String>) -> Self {
        Error::new(ErrorKind::Rejected, message)
    }

    /// Adds the HTTP status and OAuth `error` code of the endpoint's answer — for a
    /// [`TokenSource`](crate::source::TokenSource) that reports them. The code must not
    /// carry a secret. Call it on a new error: on one whose clones are shared, it
    /// changes nothing.
    pub fn with_status(mut self, status: StatusCode, oauth_error: Option<String>) -> Self {
        if let Some(inner) = Arc::get_mut(&mut self.inner) {
            inner.status = Some(status);
            inner.oauth_error = oauth_error;
        }
        self
    }

    /// Adds how long the endpoint asked us to wait (`Retry-After`), capped at one
    /// minute. A [`TokenSource`](crate::source::TokenSource) that returns a transient
    /// error with it has its next attempt made no sooner. Call it on a new error: on
    /// one whose clones are shared, it changes nothing.
    pub fn with_retry_after(mut self, wait: Option<Duration>) -> Self {
        if let Some(inner) = Arc::get_mut(&mut self.inner) {
            inner.retry_after = wait.map(|wait| wait.min(MAX_RETRY_AFTER));
        }
        self
    }

    /// Adds an already boxed cause (an application's error).
    #[cfg(feature = "workspaces")]
    pub(crate) fn with_boxed_source(mut self, source: Box<dyn StdError + Send + Sync>) -> Self {
        if let Some(inner) = Arc::get_mut(&mut self.inner) {
            inner.source = Some(source);
        }
        self
    }

    /// Adds an underlying cause. The caller guarantees it carries no secret.
    pub(crate) fn with_source(mut self, source: impl StdError + Send + Sync + 'static) -> Self {
        if let Some(inner) = Arc::get_mut(&mut self.inner) {
            inner.source = Some(Box::new(source));
        }
        self
    }

    /// What went wrong.
    pub fn kind(&self) -> ErrorKind {
        self.inner.kind
    }

    /// The HTTP status the token endpoint answered with, when it answered.
    pub fn status(&self) -> Option<StatusCode> {
        self.inner.status
    }

    /// The OAuth 2 `error` code of the endpoint's answer (`invalid_grant`, …), when it
    /// sent one.
    pub fn oauth_error(&self) -> Option<&str> {
        self.inner.oauth_error.as_deref()
    }

    /// How long the token endpoint asked clients to wait before trying again
    /// (its `Retry-After` header on a 429 or 503), capped at one minute.
    pub fn retry_after(&self) -> Option<Duration> {
        self.inner.retry_after
    }

    /// Whether a later attempt may succeed without changing the credentials.
    pub fn is_transient(&self) -> bool {
        self.inner.kind == ErrorKind::Unavailable
    }
}

impl fmt::Debug for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut d = f.debug_struct("Error");
        d.field("kind", &self.inner.kind)
            .field("message", &self.inner.message);
        if let Some(status) = self.inner.status {
            d.field("status", &status);
        }
        if let Some(code) = &self.inner.oauth_error {
            d.field("oauth_error", code);
        }
        if let Some(wait) = self.inner.retry_after {
            d.field("retry_after", &wait);
        }
        if let Some(source) = &self.inner.source {
            d.field("source", source);
        }
        d.finish()
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "eshopbox auth: {}: {}",
            self.inner.kind, self.inner.message
        )?;
        if let Some(status) = self.inner.status {
            write!(f, " (HTTP {}", status.as_u16())?;
            if let Some(code) = &self.inner.oauth_error {
                write!(f, ", {code}")?;
            }
            f.write_str(")")?;
        }
        Ok(())
    }
}

impl StdError for Error {
    fn source(&self) -> Option<&(dyn StdError + 'static)> {
        self.inner
            .source
            .as_deref()
            .map(|s| s as &(dyn StdError + 'static))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn display_names_kind_status_and_code() {
        let e = Error::new(
            ErrorKind::Rejected,
            "the token endpoint refused the refresh token",
        )
        .with_status(StatusCode::BAD_REQUEST, Some("invalid_grant".into()));
        assert_eq!(
            e.to_string(),
            "eshopbox auth: credentials rejected: the token endpoint refused the refresh token \
             (HTTP 400, invalid_grant)"
        );
        assert_eq!(e.kind(), ErrorKind::Rejected);
        assert_eq!(e.status(), Some(StatusCode::BAD_REQUEST));
        assert_eq!(e.oauth_error(), Some("invalid_grant"));
        assert!(!e.is_transient());
    }

    #[test]
    fn a_sources_retry_after_is_capped_at_a_minute() {
        let long = Error::unavailable("busy").with_retry_after(Some(Duration::MAX));
        assert_eq!(long.retry_after(), Some(MAX_RETRY_AFTER));
        let short = Error::unavailable("busy").with_retry_after(Some(Duration::from_secs(3)));
        assert_eq!(short.retry_after(), Some(Duration::from_secs(3)));
    }

    #[test]
    fn clones_share_source() {
        let io = std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "refused");
        let e = Error::unavailable("could not connect").with_source(io);
        let c = e.clone();
        assert!(c.source().is_some());
        assert!(c.is_transient());
    }
}
