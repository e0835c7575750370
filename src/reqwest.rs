//! `reqwest::Client` as a tower service, so reqwest users get the same layer
//! (feature `reqwest`).
//!
//! reqwest's `Client` is not a `tower::Service<http::Request<_>>`;
//! [`ReqwestService`] adapts it. Requests are `http::Request<reqwest::Body>` (or any
//! body `Into<reqwest::Body>`), responses `http::Response<reqwest::Body>`.
//!
//! By default only empty bodies are resent after a 401; [`BufferedBodies`] also resends
//! bodies that reqwest holds in memory (built from bytes or a string).
//!
//! ```
//! use eshopbox_auth::mock::MockEshopbox;
//! use eshopbox_auth::reqwest::{BufferedBodies, ReqwestService};
//! use eshopbox_auth::EshopboxAuthLayer;
//! use tower::{ServiceBuilder, ServiceExt};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
//! # let eshopbox = MockEshopbox::start().await?;
//! let auth = EshopboxAuthLayer::builder(eshopbox.credentials())
//! #   .token_url(&eshopbox.token_url())
//!     .replay_bodies(BufferedBodies)
//!     .build()?;
//! let client = ServiceBuilder::new()
//!     .layer(auth)
//!     .service(ReqwestService::new(reqwest::Client::new()));
//!
//! let request = http::Request::post(eshopbox.url("/api/v1/orders"))
//!     .body(reqwest::Body::from(r#"{"orderId":"A-1"}"#))?;
//! let response = client.oneshot(request).await?;
//! assert_eq!(response.status(), 200);
//! # Ok(())
//! # }
//! ```

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use ::reqwest::{Body, Client};
use bytes::Bytes;
use tower::Service;

use crate::replay::ReplayPolicy;

/// A `reqwest::Client` as a `tower::Service<http::Request<B>>`.
#[derive(Clone, Debug, Default)]
pub struct ReqwestService {
    client: Client,
}

impl ReqwestService {
    /// Wraps a client (cheap to clone: reqwest clients share their pool).
    pub fn new(client: Client) -> Self {
        ReqwestService { client }
    }

    /// The wrapped client.
    pub fn client(&self) -> &Client {
        &self.client
    }
}

/// The future of [`ReqwestService`].
pub type ReqwestFuture =
    Pin<Box<dyn Future<Output = Result<http::Response<Body>, ::reqwest::Error>> + Send>>;

impl<B> Service<http::Request<B>> for ReqwestService
where
    B: Into<Body>,
{
    type Response = http::Response<Body>;
    type Error = ::reqwest::Error;
    type Future = ReqwestFuture;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let client = self.client.clone();
        let request = ::reqwest::Request::try_from(request);
        Box::pin(async move {
            let response = client.execute(request?).await?;
            Ok(http::Response::from(response))
        })
    }
}

/// Resends a `reqwest::Body` after a 401 when reqwest holds it in memory (it was built
/// from bytes, a `Vec<u8>` or a string); streaming bodies are not resent.
#[derive(Debug, Clone, Copy, Default)]
pub struct BufferedBodies;

impl ReplayPolicy<Body> for BufferedBodies {
    fn prepare(&self, body: Body) -> (Body, Option<Body>) {
        let copy = body
            .as_bytes()
            .map(|bytes| Body::from(Bytes::copy_from_slice(bytes)));
        (body, copy)
    }
}
