//! [`TokenHandle`]: see and steer the token of a layer.

use std::fmt;
use std::sync::Arc;

use secrecy::SecretString;
use tokio::sync::watch;
use tokio::time::Instant;

use crate::error::Error;
use crate::stats::Stats;
use crate::token::cache::TokenCache;
use crate::token::Token;

/// A cheap, cloneable handle on the token cache shared by a layer and every service
/// made from it, from [`EshopboxAuthLayer::handle`](crate::EshopboxAuthLayer::handle).
///
/// ```
/// use eshopbox_auth::mock::MockEshopbox;
/// use eshopbox_auth::EshopboxAuthLayer;
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
/// # let eshopbox = MockEshopbox::start().await?;
/// let layer = EshopboxAuthLayer::builder(eshopbox.credentials())
/// #   .token_url(&eshopbox.token_url())
///     .build()?;
/// let handle = layer.handle();
/// let mut changes = handle.subscribe();
///
/// handle.refresh().await?; // fetch one now, e.g. at start-up
/// let info = changes.borrow_and_update().expect("a token");
/// assert_eq!(info.generation, 1);
/// let token = handle.get().await?; // the valid one: no second token call
/// assert_eq!(token.info(), info);
/// assert_eq!(handle.stats().token_requests, 1);
/// # Ok(())
/// # }
/// ```
#[derive(Clone)]
pub struct TokenHandle {
    cache: Arc<TokenCache>,
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

impl TokenInfo {
    pub(crate) fn of(token: &Token) -> Self {
        TokenInfo {
            generation: token.generation,
            expires_at: token.expires_at,
            refresh_at: token.refresh_at,
        }
    }
}

/// The current access token, with its value kept secret.
#[derive(Clone)]
pub struct AccessToken {
    value: SecretString,
    info: TokenInfo,
}

impl AccessToken {
    fn of(token: &Token) -> Option<Self> {
        let header = token.header.to_str().ok()?;
        let value = header.strip_prefix("Bearer ").unwrap_or(header);
        Some(AccessToken {
            value: SecretString::from(value.to_owned()),
            info: TokenInfo::of(token),
        })
    }

    /// The token (`eshopbox_auth::secrecy::ExposeSecret::expose_secret` reads it).
    pub fn secret(&self) -> &SecretString {
        &self.value
    }

    /// Its generation and expiry.
    pub fn info(&self) -> TokenInfo {
        self.info
    }
}

impl fmt::Debug for AccessToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AccessToken")
            .field("value", &"[redacted]")
            .field("info", &self.info)
            .finish()
    }
}

impl TokenHandle {
    pub(crate) fn new(cache: Arc<TokenCache>) -> Self {
        TokenHandle { cache }
    }

    /// The current token, if there is one and it has not expired.
    pub fn token(&self) -> Option<AccessToken> {
        let token = self.cache.peek()?;
        if Instant::now() >= token.expires_at {
            return None;
        }
        AccessToken::of(&token)
    }

    /// A usable token, as a request would get it: the current one while it is valid,
    /// else the result of a refresh (joining one that runs). With a
    /// [token store](crate::store), a valid token another layer or replica stored is
    /// taken before any token call — unlike [`refresh`](Self::refresh), which always
    /// asks for a new one.
    pub async fn get(&self) -> Result<AccessToken, Error> {
        let token = self.cache.wait().await?;
        AccessToken::of(&token)
            .ok_or_else(|| Error::invalid_response("the token is not a valid header value"))
    }

    /// Generation and expiry of the current token, if there is one (expired or not).
    pub fn info(&self) -> Option<TokenInfo> {
        self.cache.peek().map(|token| TokenInfo::of(&token))
    }

    /// Gets a new token now, even if the current one is valid. If a refresh is already
    /// running, waits for that one instead of starting another.
    pub async fn refresh(&self) -> Result<TokenInfo, Error> {
        let token = self.cache.force().await?;
        Ok(TokenInfo::of(&token))
    }

    /// Drops the current token: the next request waits for a new one. Returns whether
    /// there was one. Counted in [`Stats::invalidations`].
    pub fn invalidate(&self) -> bool {
        self.cache.invalidate_current()
    }

    /// A receiver that sees every change of the current token: `Some` when a new one
    /// arrives, `None` when it is invalidated.
    pub fn subscribe(&self) -> watch::Receiver<Option<TokenInfo>> {
        self.cache.subscribe()
    }

    /// A snapshot of the counters.
    pub fn stats(&self) -> Stats {
        self.cache.counters.snapshot()
    }
}

impl fmt::Debug for TokenHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TokenHandle")
            .field("current", &self.info())
            .field("stats", &self.stats())
            .finish()
    }
}
