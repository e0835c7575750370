//! Token sources other than Eshopbox's refresh grant.
//!
//! The layer's machinery — single flight, refresh margin, 401 invalidation and
//! resend, retries with back-off, serve-stale, cooldowns — works the same for any
//! [`TokenSource`]. Build a layer on one with
//! [`EshopboxAuthLayer::with_source`](crate::EshopboxAuthLayer::with_source):
//!
//! - [`OAuth2Source::refresh_token`] and [`OAuth2Source::client_credentials`]: the
//!   generic OAuth 2 grants, form-encoded, client credentials in the body or as HTTP
//!   Basic;
//! - [`source_fn`]: any async closure;
//! - your own type implementing [`TokenSource`].
//!
//! ```
//! use eshopbox_auth::source::{source_fn, FetchedToken};
//! use eshopbox_auth::EshopboxAuthLayer;
//! use std::time::Duration;
//!
//! # fn main() -> Result<(), eshopbox_auth::Error> {
//! let layer = EshopboxAuthLayer::with_source(source_fn(|| async {
//!     // Ask your identity provider here.
//!     Ok(FetchedToken::new("a-token").expires_in(Duration::from_secs(3600)))
//! }))
//! .build()?;
//! # let _ = layer;
//! # Ok(())
//! # }
//! ```

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Mutex;
use std::time::Duration;

use secrecy::{ExposeSecret, SecretString};

use crate::error::Error;
use crate::token::endpoint::{GrantConfig, GrantEndpoint, GrantKind, RequestFormat, RotationHook};
use crate::token::response::{bearer_header, clamp_lifetime, DEFAULT_LIFETIME};
use crate::token::{Source, SourceFuture, TokenResponse};

/// A boxed, sendable future.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Something that can obtain a fresh access token.
pub trait TokenSource: Send + Sync + 'static {
    /// Requests one token. Return [`Error`]s of the right kind: a
    /// [`Rejected`](crate::ErrorKind::Rejected) error is remembered for the failure
    /// cooldown, an [`Unavailable`](crate::ErrorKind::Unavailable) one is retried
    /// with back-off.
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
    access_token: SecretString,
    expires_in: Option<Duration>,
    refresh_token: Option<SecretString>,
}

impl FetchedToken {
    /// A Bearer token. Without [`expires_in`](Self::expires_in), it is assumed to last
    /// 24 hours.
    pub fn new(access_token: impl Into<String>) -> Self {
        FetchedToken {
            access_token: SecretString::from(access_token.into()),
            expires_in: None,
            refresh_token: None,
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
            .finish()
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

/// Adapts a public [`TokenSource`] to the cache's internal source.
pub(crate) struct Custom<T> {
    pub(crate) source: T,
    pub(crate) on_rotated: Option<RotationHook>,
}

impl<T: TokenSource> Source for Custom<T> {
    fn fetch(&self) -> SourceFuture<'_> {
        Box::pin(async move {
            let fetched = self.source.fetch().await?;
            if let (Some(rotated), Some(hook)) = (&fetched.refresh_token, &self.on_rotated) {
                hook(rotated);
            }
            Ok(TokenResponse {
                header: bearer_header(fetched.access_token.expose_secret())?,
                lifetime: fetched.expires_in.map_or(DEFAULT_LIFETIME, clamp_lifetime),
                scope: None,
                has_id_token: false,
                rotated: None,
            })
        })
    }

    fn refresh_token(&self) -> Option<SecretString> {
        self.source.refresh_token()
    }

    fn use_refresh_token(&self, refresh_token: SecretString) {
        self.source.use_refresh_token(refresh_token);
    }
}

/// The generic OAuth 2 grants against any token endpoint.
pub struct OAuth2Source {
    endpoint: GrantEndpoint,
}

impl OAuth2Source {
    /// The `refresh_token` grant.
    pub fn refresh_token(
        token_url: &str,
        client_id: impl Into<String>,
        client_secret: impl Into<String>,
        refresh_token: impl Into<String>,
    ) -> OAuth2Builder {
        OAuth2Builder::new(
            token_url,
            client_id.into(),
            client_secret.into(),
            Grant::RefreshToken(refresh_token.into()),
        )
    }

    /// The `client_credentials` grant.
    pub fn client_credentials(
        token_url: &str,
        client_id: impl Into<String>,
        client_secret: impl Into<String>,
    ) -> OAuth2Builder {
        OAuth2Builder::new(
            token_url,
            client_id.into(),
            client_secret.into(),
            Grant::ClientCredentials,
        )
    }
}

impl TokenSource for OAuth2Source {
    fn fetch(&self) -> BoxFuture<'_, Result<FetchedToken, Error>> {
        Box::pin(async move {
            let response = self.endpoint.fetch().await?;
            let header = response.header.to_str().map_err(|_| {
                Error::invalid_response(
                    "token endpoint answered an access_token that is not visible ASCII",
                )
            })?;
            let token = header.strip_prefix("Bearer ").unwrap_or(header);
            let mut fetched = FetchedToken::new(token).expires_in(response.lifetime);
            fetched.refresh_token = response.rotated;
            Ok(fetched)
        })
    }

    fn refresh_token(&self) -> Option<SecretString> {
        Source::refresh_token(&self.endpoint)
    }

    fn use_refresh_token(&self, refresh_token: SecretString) {
        Source::use_refresh_token(&self.endpoint, refresh_token);
    }
}

impl fmt::Debug for OAuth2Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("OAuth2Source")
    }
}

enum Grant {
    RefreshToken(String),
    ClientCredentials,
}

/// Builder for [`OAuth2Source`]. Requests are form-encoded with the client
/// credentials in the body unless told otherwise.
#[must_use]
pub struct OAuth2Builder {
    token_url: String,
    client_id: String,
    client_secret: SecretString,
    grant: Grant,
    scope: Option<String>,
    basic_auth: bool,
    format: RequestFormat,
    http_client: Option<reqwest::Client>,
    on_rotated: Option<RotationHook>,
}

impl OAuth2Builder {
    fn new(token_url: &str, client_id: String, client_secret: String, grant: Grant) -> Self {
        OAuth2Builder {
            token_url: token_url.to_owned(),
            client_id,
            client_secret: SecretString::from(client_secret),
            grant,
            scope: None,
            basic_auth: false,
            format: RequestFormat::Form,
            http_client: None,
            on_rotated: None,
        }
    }

    /// The `scope` to ask for (client-credentials grant).
    pub fn scope(mut self, scope: impl Into<String>) -> Self {
        self.scope = Some(scope.into());
        self
    }

    /// Sends the client id and secret as HTTP Basic authentication instead of in the
    /// body (RFC 6749 §2.3.1).
    pub fn basic_auth(mut self, basic: bool) -> Self {
        self.basic_auth = basic;
        self
    }

    /// The body encoding (default form-encoded).
    pub fn request_format(mut self, format: RequestFormat) -> Self {
        self.format = format;
        self
    }

    /// The `reqwest::Client` for token requests (default: its own, redirects off).
    pub fn http_client(mut self, client: reqwest::Client) -> Self {
        self.http_client = Some(client);
        self
    }

    /// Called with a rotated refresh token (refresh-token grant); see
    /// [`EshopboxAuthBuilder::on_refresh_token_rotated`](crate::EshopboxAuthBuilder::on_refresh_token_rotated).
    pub fn on_refresh_token_rotated<F>(mut self, hook: F) -> Self
    where
        F: Fn(&SecretString) + Send + Sync + 'static,
    {
        self.on_rotated = Some(std::sync::Arc::new(hook));
        self
    }

    /// Checks the settings (same rules as the layer's builder) and builds the source.
    pub fn build(self) -> Result<OAuth2Source, Error> {
        let mut fields = vec![
            ("client_id", self.client_id.as_str()),
            ("client_secret", self.client_secret.expose_secret()),
        ];
        if let Grant::RefreshToken(token) = &self.grant {
            fields.push(("refresh_token", token));
        }
        crate::credentials::require_all("", &fields)?;
        let url = crate::builder::check_token_url(&self.token_url)?;
        let client = match self.http_client {
            Some(client) => client,
            None => crate::builder::default_client(crate::DEFAULT_TOKEN_TIMEOUT)?,
        };
        let grant = match self.grant {
            Grant::RefreshToken(token) => {
                GrantKind::RefreshToken(Mutex::new(SecretString::from(token)))
            }
            Grant::ClientCredentials => GrantKind::ClientCredentials { scope: self.scope },
        };
        Ok(OAuth2Source {
            endpoint: GrantEndpoint::new(GrantConfig {
                client,
                url,
                format: self.format,
                client_id: self.client_id,
                client_secret: self.client_secret,
                grant,
                basic_auth: self.basic_auth,
                on_rotated: self.on_rotated,
            }),
        })
    }
}

impl fmt::Debug for OAuth2Builder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("OAuth2Builder")
            .field("token_url", &self.token_url)
            .field("client_id", &self.client_id)
            .field("client_secret", &"[redacted]")
            .field("scope", &self.scope)
            .field("basic_auth", &self.basic_auth)
            .field("format", &self.format)
            .finish_non_exhaustive()
    }
}
