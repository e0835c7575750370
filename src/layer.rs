//! The [`EshopboxAuthLayer`]: wraps services in [`EshopboxAuth`].

use std::sync::Arc;

use http::HeaderValue;
use tower::Layer;

use crate::builder::EshopboxAuthBuilder;
use crate::classify::Http401;
use crate::credentials::Credentials;
use crate::destination::Destinations;
use crate::error::Error;
use crate::handle::TokenHandle;
use crate::replay::EmptyBodies;
use crate::service::EshopboxAuth;
use crate::source::TokenSource;
use crate::token::cell::TokenCell;

/// Layer that applies [`EshopboxAuth`] to a service.
///
/// Every service made from one layer, or from any of its clones, shares one token
/// cell: one token, one refresh at a time.
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
#[derive(Clone, Debug)]
pub struct EshopboxAuthLayer<P = EmptyBodies, C = Http401> {
    cell: Arc<TokenCell>,
    shape: Shape,
    replay: P,
    unauthorized: C,
}

/// What the service does to each request, besides the token.
#[derive(Debug, Clone)]
pub(crate) struct Shape {
    /// Resend once after a 401.
    pub(crate) retry_on_unauthorized: bool,
    /// `ProxyHost: <workspace>`, when configured.
    pub(crate) proxy_host: Option<HeaderValue>,
    /// Which requests may carry the token.
    pub(crate) destinations: Destinations,
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

    /// A builder for a layer whose tokens come from another [`TokenSource`] — a
    /// generic OAuth 2 grant, a closure, your own type; see [`crate::source`]. The
    /// Eshopbox-specific settings (`token_url`, `request_format`, `http_client`) do
    /// not apply to it; `on_refresh_token_rotated` receives the refresh tokens the
    /// source reports with [`FetchedToken::rotated_refresh_token`](crate::source::FetchedToken::rotated_refresh_token).
    pub fn with_source<T: TokenSource>(source: T) -> EshopboxAuthBuilder {
        EshopboxAuthBuilder::with_source(source)
    }
}

impl<P, C> EshopboxAuthLayer<P, C> {
    pub(crate) fn from_parts(
        cell: Arc<TokenCell>,
        shape: Shape,
        replay: P,
        unauthorized: C,
    ) -> Self {
        EshopboxAuthLayer {
            cell,
            shape,
            replay,
            unauthorized,
        }
    }
}

impl<P, C> EshopboxAuthLayer<P, C> {
    /// A handle to see and steer the token shared by this layer's services: read
    /// it, force a refresh, invalidate it, subscribe to changes, read counters.
    pub fn handle(&self) -> TokenHandle {
        TokenHandle::new(self.cell.clone())
    }

    /// The same token as a [`reqwest_middleware::Middleware`], for a
    /// `reqwest_middleware::ClientWithMiddleware` (feature `reqwest-middleware`). It
    /// shares this layer's token cell, destination rules, workspace and 401 setting;
    /// see [`crate::middleware`].
    #[cfg(feature = "reqwest-middleware")]
    #[cfg_attr(docsrs, doc(cfg(feature = "reqwest-middleware")))]
    pub fn middleware(&self) -> crate::middleware::EshopboxAuthMiddleware {
        crate::middleware::EshopboxAuthMiddleware::new(self.cell.clone(), self.shape.clone())
    }
}

impl<S, P: Clone, C: Clone> Layer<S> for EshopboxAuthLayer<P, C> {
    type Service = EshopboxAuth<S, P, C>;

    fn layer(&self, inner: S) -> Self::Service {
        EshopboxAuth::new(
            inner,
            self.cell.clone(),
            self.shape.clone(),
            self.replay.clone(),
            self.unauthorized.clone(),
        )
    }
}
