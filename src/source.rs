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
use std::sync::Mutex;

use secrecy::{ExposeSecret, SecretString};

use crate::error::Error;
use crate::token::client::{check_token_url, default_client};
use crate::token::endpoint::{GrantConfig, GrantEndpoint, GrantKind, RequestFormat, RotationHook};
use crate::token::fetch::DEFAULT_TOKEN_TIMEOUT;

pub use crate::boxed::BoxFuture;
pub use crate::token::source::{source_fn, FetchedToken, FnSource, TokenSource};

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
        self.endpoint.fetch()
    }

    fn refresh_token(&self) -> Option<SecretString> {
        self.endpoint.refresh_token()
    }

    fn use_refresh_token(&self, refresh_token: SecretString) {
        self.endpoint.use_refresh_token(refresh_token);
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
        let url = check_token_url(&self.token_url)?;
        let client = match self.http_client {
            Some(client) => client,
            None => default_client(DEFAULT_TOKEN_TIMEOUT)?,
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
