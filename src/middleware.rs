//! The layer's token as a [`reqwest_middleware::Middleware`] (feature
//! `reqwest-middleware`).
//!
//! [`EshopboxAuthMiddleware`] does for a `reqwest_middleware::ClientWithMiddleware`
//! what [`EshopboxAuth`](crate::EshopboxAuth) does for a tower service, with the same
//! token cell: a middleware made with
//! [`EshopboxAuthLayer::middleware`](crate::EshopboxAuthLayer::middleware) shares one
//! token (and one refresh at a time) with every tower service made from that layer.
//!
//! For each request it
//!
//! - refuses it before it is sent if its URL is not a trusted destination (see
//!   [`allow_host`](crate::EshopboxAuthBuilder::allow_host)), with an
//!   [`ErrorKind::UntrustedDestination`](crate::ErrorKind::UntrustedDestination) error
//!   inside `reqwest_middleware::Error::Middleware`;
//! - sets `Authorization: Bearer <token>` (and `ProxyHost` with
//!   [`workspace`](crate::EshopboxAuthBuilder::workspace));
//! - on `401 Unauthorized`, drops that token (only if no newer one replaced it) and,
//!   when [`retry_on_unauthorized`](crate::EshopboxAuthBuilder::retry_on_unauthorized)
//!   is on and `reqwest::Request::try_clone` succeeds (any body but a stream), resends
//!   the request once with a new token. Otherwise the 401 is returned as it is.
//!
//! A response means "token refused" when its status is 401: the builder's
//! `unauthorized_when` and `replay_bodies` apply to the tower services only.
//!
//! # With `reqwest-retry`
//!
//! Put the retry middleware **before** this one, so that each retried attempt gets
//! the current token:
//!
//! ```
//! use eshopbox_auth::mock::MockEshopbox;
//! use eshopbox_auth::EshopboxAuthLayer;
//! use reqwest_middleware::ClientBuilder;
//! use reqwest_retry::{policies::ExponentialBackoff, RetryTransientMiddleware};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
//! # let eshopbox = MockEshopbox::start().await?;
//! let layer = EshopboxAuthLayer::builder(eshopbox.credentials())
//! #   .token_url(&eshopbox.token_url())
//!     .build()?;
//! let retry = ExponentialBackoff::builder().build_with_max_retries(3);
//! let client = ClientBuilder::new(reqwest::Client::new())
//!     .with(RetryTransientMiddleware::new_with_policy(retry))
//!     .with(layer.middleware())
//!     .build();
//!
//! let response = client.get(eshopbox.url("/api/v2/inventoryListing")).send().await?;
//! assert_eq!(response.status(), 200);
//! # Ok(())
//! # }
//! ```
//!
//! `reqwest-retry` treats a 401 as final, so it never resends one itself: a refused
//! token causes at most the one resend made here, in either order.

use std::fmt;
use std::sync::Arc;

use http::header::{HeaderName, AUTHORIZATION};
use http::{Extensions, HeaderValue, StatusCode};
use reqwest_middleware::{Middleware, Next};

use crate::error::Error;
use crate::layer::Shape;
use crate::token::cell::TokenCell;

/// The header Eshopbox reads the workspace from on workspace calls.
const PROXY_HOST: HeaderName = HeaderName::from_static("proxyhost");

/// A [`reqwest_middleware::Middleware`] that authenticates each request with the
/// layer's token; made by [`EshopboxAuthLayer::middleware`](crate::EshopboxAuthLayer::middleware).
/// See the [module documentation](self).
#[derive(Clone)]
pub struct EshopboxAuthMiddleware {
    cell: Arc<TokenCell>,
    shape: Shape,
}

impl EshopboxAuthMiddleware {
    pub(crate) fn new(cell: Arc<TokenCell>, shape: Shape) -> Self {
        EshopboxAuthMiddleware { cell, shape }
    }

    /// The header and generation of a usable token, waiting for a refresh if needed.
    async fn token(&self) -> Result<(HeaderValue, u64), Error> {
        if let Some(current) = self.cell.get() {
            return Ok(current);
        }
        self.cell.counters.waited();
        let token = self.cell.wait().await?;
        Ok((token.header().clone(), token.generation))
    }
}

#[async_trait::async_trait]
impl Middleware for EshopboxAuthMiddleware {
    async fn handle(
        &self,
        mut request: reqwest::Request,
        extensions: &mut Extensions,
        next: Next<'_>,
    ) -> reqwest_middleware::Result<reqwest::Response> {
        if let Err(error) = self.shape.destinations.check_url(request.url()) {
            self.cell.counters.refused();
            return Err(reqwest_middleware::Error::middleware(error));
        }
        if let Some(workspace) = &self.shape.proxy_host {
            request.headers_mut().insert(PROXY_HOST, workspace.clone());
        }
        let (header, generation) = self
            .token()
            .await
            .map_err(reqwest_middleware::Error::middleware)?;
        let copy = if self.shape.retry_on_unauthorized {
            request.try_clone()
        } else {
            None
        };
        request.headers_mut().insert(AUTHORIZATION, header);
        let response = next.clone().run(request, extensions).await?;
        if response.status() != StatusCode::UNAUTHORIZED {
            return Ok(response);
        }
        self.cell.invalidate(generation);
        let Some(mut copy) = copy else {
            return Ok(response);
        };
        self.cell.counters.resend();
        tracing::debug!("request answered 401; resending it once with a new token");
        drop(response);
        let (header, _) = self
            .token()
            .await
            .map_err(reqwest_middleware::Error::middleware)?;
        copy.headers_mut().insert(AUTHORIZATION, header);
        next.run(copy, extensions).await
    }
}

impl fmt::Debug for EshopboxAuthMiddleware {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EshopboxAuthMiddleware")
            .field("cell", &self.cell)
            .field("shape", &self.shape)
            .finish()
    }
}
