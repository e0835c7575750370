//! The one trait every token source implements, and what a source hands back.
//!
//! Eshopbox's refresh grant ([`GrantEndpoint`](super::endpoint::GrantEndpoint)), the
//! generic OAuth 2 grants and closures all implement [`TokenSource`]; the cell holds
//! one boxed source and never asks which kind it is.

use std::fmt;
use std::future::Future;
use std::time::Duration;

use secrecy::SecretString;

use crate::boxed::BoxFuture;
use crate::error::Error;

/// Something that can obtain a fresh access token.
pub trait TokenSource: Send + Sync + 'static {
    /// Requests one token. Return [`Error`]s of the right kind: a
    /// [`Rejected`](crate::ErrorKind::Rejected) error is remembered for the failure
    /// cooldown, an [`Unavailable`](crate::ErrorKind::Unavailable) one is retried
    /// with back-off (after its [`retry_after`](Error::with_retry_after), if set).
    fn fetch(&self) -> BoxFuture<'_, Result<FetchedToken, Error>>;

    /// The refresh token the source sends next, if it uses one that the provider
    /// rotates. With a [token store](crate::store), the layer shares it with the other
    /// replicas after each token call. The default: none.
    fn refresh_token(&self) -> Option<SecretString> {
        None
    }

    /// Sends `refresh_token` from now on: another replica sharing the
    /// [token store](crate::store) rotated it. The default ignores it.
    fn use_refresh_token(&self, refresh_token: SecretString) {
        let _ = refresh_token;
    }
}

/// A token as a [`TokenSource`] obtained it.
#[derive(Clone)]
pub struct FetchedToken {
    pub(crate) access_token: SecretString,
    pub(crate) expires_in: Option<Duration>,
    pub(crate) refresh_token: Option<SecretString>,
    /// The granted scope (not a secret; logged).
    pub(crate) scope: Option<String>,
    /// Whether an `id_token` came along (its value is not kept).
    pub(crate) has_id_token: bool,
}

impl FetchedToken {
    /// A Bearer token. Without [`expires_in`](Self::expires_in), it is assumed to last
    /// 24 hours.
    pub fn new(access_token: impl Into<String>) -> Self {
        FetchedToken {
            access_token: SecretString::from(access_token.into()),
            expires_in: None,
            refresh_token: None,
            scope: None,
            has_id_token: false,
        }
    }

    /// A new refresh token that came with this one. The layer hands it to the
    /// builder's [`on_refresh_token_rotated`](crate::EshopboxAuthBuilder::on_refresh_token_rotated)
    /// hook; the source itself must use it for its next request.
    pub fn rotated_refresh_token(mut self, refresh_token: impl Into<String>) -> Self {
        self.refresh_token = Some(SecretString::from(refresh_token.into()));
        self
    }

    /// How long the token lives, counted from when the request for it was sent
    /// (clamped to 30 days; zero means "stale at once", used for a 1 s floor).
    pub fn expires_in(mut self, lifetime: Duration) -> Self {
        self.expires_in = Some(lifetime);
        self
    }
}

impl fmt::Debug for FetchedToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FetchedToken")
            .field("access_token", &"[redacted]")
            .field("expires_in", &self.expires_in)
            .field("rotated_refresh_token", &self.refresh_token.is_some())
            .field("scope", &self.scope)
            .finish_non_exhaustive()
    }
}

/// A [`TokenSource`] made of an async closure; see [`source_fn`].
#[derive(Clone)]
pub struct FnSource<F>(F);

/// A [`TokenSource`] that calls `f` for each token.
pub fn source_fn<F, Fut>(f: F) -> FnSource<F>
where
    F: Fn() -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<FetchedToken, Error>> + Send + 'static,
{
    FnSource(f)
}

impl<F, Fut> TokenSource for FnSource<F>
where
    F: Fn() -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<FetchedToken, Error>> + Send + 'static,
{
    fn fetch(&self) -> BoxFuture<'_, Result<FetchedToken, Error>> {
        Box::pin((self.0)())
    }
}

impl<F> fmt::Debug for FnSource<F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("FnSource")
    }
}
