//! The [`EshopboxAuthLayer`]: wraps services in [`EshopboxAuth`].

use std::fmt;
use std::sync::Arc;

use tower::Layer;

use crate::builder::EshopboxAuthBuilder;
use crate::credentials::Credentials;
use crate::error::Error;
use crate::replay::EmptyBodies;
use crate::service::EshopboxAuth;
use crate::token::cache::TokenCache;

/// Layer that applies [`EshopboxAuth`] to a service.
///
/// Every service made from one layer, or from any of its clones, shares one token
/// cache: one token, one refresh at a time.
///
/// ```
/// use eshopbox_auth::{Credentials, EshopboxAuthLayer};
/// use std::time::Duration;
///
/// # fn main() -> Result<(), eshopbox_auth::Error> {
/// let layer = EshopboxAuthLayer::builder(Credentials::new("id", "secret", "refresh-token"))
///     .refresh_margin(Duration::from_secs(600))
///     .build()?;
/// # let _ = layer;
/// # Ok(())
/// # }
/// ```
pub struct EshopboxAuthLayer<P = EmptyBodies> {
    cache: Arc<TokenCache>,
    retry_on_unauthorized: bool,
    replay: P,
}

impl EshopboxAuthLayer {
    /// A layer with the default settings: the Eshopbox token endpoint, a 5 minute
    /// refresh margin, one resend after 401 for requests with an empty body.
    ///
    /// Shorthand for `EshopboxAuthLayer::builder(credentials).build()`; fails on the
    /// same bad input.
    pub fn new(credentials: Credentials) -> Result<Self, Error> {
        Self::builder(credentials).build()
    }

    /// A builder to configure the layer.
    pub fn builder(credentials: Credentials) -> EshopboxAuthBuilder {
        EshopboxAuthBuilder::new(credentials)
    }
}

impl<P> EshopboxAuthLayer<P> {
    pub(crate) fn from_parts(
        cache: Arc<TokenCache>,
        retry_on_unauthorized: bool,
        replay: P,
    ) -> Self {
        EshopboxAuthLayer {
            cache,
            retry_on_unauthorized,
            replay,
        }
    }
}

impl<S, P: Clone> Layer<S> for EshopboxAuthLayer<P> {
    type Service = EshopboxAuth<S, P>;

    fn layer(&self, inner: S) -> Self::Service {
        EshopboxAuth::new(
            inner,
            self.cache.clone(),
            self.retry_on_unauthorized,
            self.replay.clone(),
        )
    }
}

impl<P: Clone> Clone for EshopboxAuthLayer<P> {
    fn clone(&self) -> Self {
        EshopboxAuthLayer {
            cache: self.cache.clone(),
            retry_on_unauthorized: self.retry_on_unauthorized,
            replay: self.replay.clone(),
        }
    }
}

impl<P: fmt::Debug> fmt::Debug for EshopboxAuthLayer<P> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EshopboxAuthLayer")
            .field("cache", &self.cache)
            .field("retry_on_unauthorized", &self.retry_on_unauthorized)
            .field("replay", &self.replay)
            .finish()
    }
}
