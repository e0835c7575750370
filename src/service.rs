//! The [`EshopboxAuth`] service: puts the current token on each request.

use std::fmt;
use std::sync::Arc;
use std::task::{Context, Poll};

use http::header::{HeaderName, AUTHORIZATION};
use http::{Request, Response};
use tower::{BoxError, Service};

use crate::classify::{Http401, UnauthorizedPolicy};
use crate::error::Error;
use crate::future::{ResponseFuture, Unsent};
use crate::layer::Shape;
use crate::replay::{EmptyBodies, ReplayPolicy};
use crate::token::cell::TokenCell;
use crate::token::local::LocalToken;

/// The header Eshopbox reads the workspace from on workspace calls.
const PROXY_HOST: HeaderName = HeaderName::from_static("proxyhost");

/// Middleware that authenticates each request with the current Eshopbox access token.
///
/// Made by [`EshopboxAuthLayer`](crate::EshopboxAuthLayer); see the
/// [crate documentation](crate) for what it does to a request.
#[derive(Clone)]
pub struct EshopboxAuth<S, P = EmptyBodies, C = Http401> {
    inner: S,
    token: LocalToken,
    shape: Shape,
    replay: P,
    unauthorized: C,
}

impl<S, P, C> EshopboxAuth<S, P, C> {
    pub(crate) fn new(
        inner: S,
        cell: Arc<TokenCell>,
        shape: Shape,
        replay: P,
        unauthorized: C,
    ) -> Self {
        EshopboxAuth {
            inner,
            token: LocalToken::new(cell),
            shape,
            replay,
            unauthorized,
        }
    }

    /// The token cell shared by every service of the layer.
    fn cell(&self) -> &Arc<TokenCell> {
        self.token.cell()
    }

    /// The wrapped service.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// The wrapped service, mutably.
    pub fn get_mut(&mut self) -> &mut S {
        &mut self.inner
    }

    /// Unwraps the inner service.
    pub fn into_inner(self) -> S {
        self.inner
    }
}

impl<S, P, C, B, RB> Service<Request<B>> for EshopboxAuth<S, P, C>
where
    S: Service<Request<B>, Response = Response<RB>> + Clone,
    S::Error: Into<BoxError>,
    P: ReplayPolicy<B>,
    C: UnauthorizedPolicy<RB>,
{
    type Response = Response<RB>;
    type Error = BoxError;
    type Future = ResponseFuture<S, B, C>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    #[inline]
    fn call(&mut self, mut request: Request<B>) -> Self::Future {
        if let Err(error) = self.shape.destinations.check(request.uri()) {
            return self.refuse(error);
        }
        if let Some(workspace) = &self.shape.proxy_host {
            request.headers_mut().insert(PROXY_HOST, workspace.clone());
        }
        let replay = if self.shape.retry_on_unauthorized {
            let (prepared, replay) =
                Unsent::copy_for_resend(&self.replay, &self.inner, request, Some(self.cell()));
            request = prepared;
            replay
        } else {
            None
        };
        match self.token.get() {
            Some((header, generation)) => {
                request.headers_mut().insert(AUTHORIZATION, header);
                // The future carries the cell's key, not an `Arc` of it: no shared
                // reference count is written per request (see `future.rs`).
                ResponseFuture::called(
                    self.inner.call(request),
                    self.token.key(),
                    generation,
                    replay,
                    self.unauthorized.clone(),
                )
            }
            None => self.wait_for_token(request, replay),
        }
    }
}

impl<S, P, C> EshopboxAuth<S, P, C>
where
    S: Clone,
{
    /// The request may not carry the token: it fails without reaching the inner
    /// service (the rules are in `destination.rs`).
    #[cold]
    #[inline(never)]
    fn refuse<B>(&self, error: Error) -> ResponseFuture<S, B, C>
    where
        S: Service<Request<B>>,
        C: Clone,
    {
        tracing::debug!(%error, "request refused before sending");
        self.cell().counters.refused();
        ResponseFuture::refused(error, self.token.key(), self.unauthorized.clone())
    }

    /// The first attempt must wait for a token. `self.inner` is the service the caller
    /// polled ready: the request takes it along and leaves a fresh clone behind.
    #[cold]
    #[inline(never)]
    fn wait_for_token<B>(
        &mut self,
        request: Request<B>,
        replay: Option<Box<Unsent<S, B>>>,
    ) -> ResponseFuture<S, B, C>
    where
        S: Service<Request<B>>,
        C: Clone,
    {
        let clone = self.inner.clone();
        let ready = std::mem::replace(&mut self.inner, clone);
        self.cell().counters.waited();
        ResponseFuture::waiting(
            ready,
            request,
            self.cell(),
            replay,
            self.unauthorized.clone(),
        )
    }
}

impl<S: fmt::Debug, P: fmt::Debug, C: fmt::Debug> fmt::Debug for EshopboxAuth<S, P, C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EshopboxAuth")
            .field("inner", &self.inner)
            .field("cell", self.cell())
            .field("shape", &self.shape)
            .field("replay", &self.replay)
            .field("unauthorized", &self.unauthorized)
            .finish()
    }
}
