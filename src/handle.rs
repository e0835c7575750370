//! [`TokenHandle`]: see and steer the token of a layer.

use std::fmt;
use std::sync::Arc;

use secrecy::SecretString;
use tokio::sync::watch;
use tokio::time::Instant;

use crate::error::Error;
use crate::stats::Stats;
use crate::token::cell::TokenCell;
use crate::token::value::{Token, TokenInfo};

/// A cheap, cloneable handle on the token cell shared by a layer and every service
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
    cell: Arc<TokenCell>,
}

/// The current access token, with its value kept secret.
#[derive(Clone)]
pub struct AccessToken {
    value: SecretString,
    info: TokenInfo,
}

impl AccessToken {
    fn of(token: &Token) -> Self {
        AccessToken {
            value: token.bearer.secret().clone(),
            info: token.info(),
        }
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
    pub(crate) fn new(cell: Arc<TokenCell>) -> Self {
        TokenHandle { cell }
    }

    /// The current token, if there is one and it has not expired.
    pub fn token(&self) -> Option<AccessToken> {
        let token = self.cell.peek()?;
        if Instant::now() >= token.expires_at {
            return None;
        }
        Some(AccessToken::of(&token))
    }

    /// A usable token: the current one while it is valid, else the result of a refresh
    /// (joining one that runs). Unlike a request, it starts no early refresh when the
    /// token is in its refresh window: compare [`TokenInfo::refresh_at`] and call
    /// [`refresh`](Self::refresh) for that. With a
    /// [token store](crate::store), a valid token another layer or replica stored is
    /// taken before any token call — unlike [`refresh`](Self::refresh), which always
    /// asks for a new one.
    pub async fn get(&self) -> Result<AccessToken, Error> {
        let token = self.cell.wait().await?;
        Ok(AccessToken::of(&token))
    }

    /// Generation and expiry of the current token, if there is one (expired or not).
    pub fn info(&self) -> Option<TokenInfo> {
        self.cell.peek().map(|token| token.info())
    }

    /// Gets a new token now, even if the current one is valid. If a refresh is already
    /// running, waits for that one instead of starting another. After an
    /// [`invalidate`](Self::invalidate) (or a 401), it waits out the failure cooldown
    /// since the last refresh that followed one, as every such refresh does; and
    /// while the token endpoint's `Retry-After` has not passed, it fails without a
    /// token call.
    pub async fn refresh(&self) -> Result<TokenInfo, Error> {
        let token = self.cell.force().await?;
        Ok(token.info())
    }

    /// Drops the current token: the next request waits for a new one. Returns whether
    /// there was one. Counted in [`Stats::invalidations`].
    pub fn invalidate(&self) -> bool {
        self.cell.invalidate_current()
    }

    /// A receiver that sees every change of the current token: `Some` when a new one
    /// arrives, `None` when it is invalidated.
    pub fn subscribe(&self) -> watch::Receiver<Option<TokenInfo>> {
        self.cell.subscribe()
    }

    /// A snapshot of the counters.
    pub fn stats(&self) -> Stats {
        self.cell.counters.snapshot()
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
