//! The [`WorkspaceAuth`] service: puts each request's workspace token on it.

use std::fmt;
use std::sync::Arc;
use std::task::{Context, Poll};

use http::header::{HeaderName, AUTHORIZATION};
use http::{Request, Response};
use tower::{BoxError, Service};

use super::future::ResponseFuture;
use super::registry::{Entry, Registry, Warm};
use super::Workspace;
use crate::classify::{Http401, UnauthorizedPolicy};
use crate::future::{ResponseFuture as AuthFuture, Unsent};
use crate::layer::Shape;
use crate::replay::{EmptyBodies, ReplayPolicy};

/// The header Eshopbox reads the workspace from.
const PROXY_HOST: HeaderName = HeaderName::from_static("proxyhost");

/// Middleware that authenticates each request with the access token of the
/// workspace named by its [`Workspace`] extension, and sets `ProxyHost` to it.
///
/// Made by [`WorkspaceAuthLayer`](super::WorkspaceAuthLayer). A request that fails
/// the destination guard, has no `Workspace`, or names one that cannot be resolved
/// fails without reaching the inner service.
#[derive(Clone)]
pub struct WorkspaceAuth<S, P = EmptyBodies, C = Http401> {
    inner: S,
    registry: Arc<Registry>,
    shape: Shape,
    replay: P,
    unauthorized: C,
}

impl<S, P, C> WorkspaceAuth<S, P, C> {
    pub(crate) fn new(
        inner: S,
        registry: Arc<Registry>,
        shape: Shape,
        replay: P,
        unauthorized: C,
    ) -> Self {
        WorkspaceAuth {
            inner,
            registry,
            shape,
            replay,
            unauthorized,
        }
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

impl<S, P, C, B, RB> Service<Request<B>> for WorkspaceAuth<S, P, C>
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

    fn call(&mut self, mut request: Request<B>) -> Self::Future {
        if let Err(error) = self.shape.destinations.check(request.uri()) {
            tracing::debug!(%error, "request refused before sending");
            self.registry.refused();
            return ResponseFuture::failed(error);
        }
        let Some(workspace) = request.extensions().get::<Workspace>() else {
            return ResponseFuture::failed(self.registry.unnamed());
        };
        let retry = self.shape.retry_on_unauthorized;
        let entry = match self.registry.warm(workspace, !retry) {
            None => return self.resolve_first(request),
            // The workspace's token is fresh: the request goes on at once, with
            // nothing kept for a resend (retry is off).
            Some(Warm::Fresh {
                proxy_host,
                authorization,
                key,
                generation,
            }) => {
                let headers = request.headers_mut();
                headers.insert(PROXY_HOST, proxy_host);
                headers.insert(AUTHORIZATION, authorization);
                return ResponseFuture::auth(
                    AuthFuture::called(
                        self.inner.call(request),
                        key,
                        generation,
                        None,
                        self.unauthorized.clone(),
                    ),
                    None,
                );
            }
            Some(Warm::Entry(entry)) => entry,
        };
        request
            .headers_mut()
            .insert(PROXY_HOST, entry.proxy_host.clone());
        let replay = if retry {
            let (prepared, replay) =
                Unsent::copy_for_resend(&self.replay, &self.inner, request, Some(&entry.cell));
            request = prepared;
            replay
        } else {
            None
        };
        let token = {
            let _span = entry.span.enter();
            entry.cell.get()
        };
        match token {
            Some((header, generation)) => {
                request.headers_mut().insert(AUTHORIZATION, header);
                ResponseFuture::auth(
                    AuthFuture::called(
                        self.inner.call(request),
                        entry.cell.key(),
                        generation,
                        replay,
                        self.unauthorized.clone(),
                    ),
                    None,
                )
            }
            None => self.wait_for_token(request, &entry, replay),
        }
    }
}

impl<S, P, C> WorkspaceAuth<S, P, C>
where
    S: Clone,
{
    /// `self.inner`, which the caller polled ready, for a request that goes on later;
    /// a fresh clone stays behind.
    fn take_ready(&mut self) -> S {
        let clone = self.inner.clone();
        std::mem::replace(&mut self.inner, clone)
    }

    /// The workspace's token must be fetched first: the request waits for it, in the
    /// workspace's span.
    #[cold]
    #[inline(never)]
    fn wait_for_token<B, RB>(
        &mut self,
        request: Request<B>,
        entry: &Entry,
        replay: Option<Box<Unsent<S, B>>>,
    ) -> ResponseFuture<S, B, C>
    where
        S: Service<Request<B>, Response = Response<RB>>,
        C: UnauthorizedPolicy<RB>,
    {
        entry.cell.counters.waited();
        let ready = self.take_ready();
        let future = AuthFuture::waiting(
            ready,
            request,
            &entry.cell,
            replay,
            self.unauthorized.clone(),
        );
        ResponseFuture::auth(future, Some(entry.span.clone()))
    }

    /// The workspace is not in the map: the request waits for its resolution.
    #[cold]
    #[inline(never)]
    fn resolve_first<B, RB>(&mut self, request: Request<B>) -> ResponseFuture<S, B, C>
    where
        S: Service<Request<B>, Response = Response<RB>>,
        P: ReplayPolicy<B>,
        C: UnauthorizedPolicy<RB>,
    {
        let workspace = request
            .extensions()
            .get::<Workspace>()
            .cloned()
            .unwrap_or_else(|| Workspace::new(""));
        let resolve = self.registry.resolve(workspace);
        let (request, replay) = if self.shape.retry_on_unauthorized {
            Unsent::copy_for_resend(&self.replay, &self.inner, request, None)
        } else {
            (request, None)
        };
        let ready = self.take_ready();
        ResponseFuture::resolving(
            resolve,
            Unsent {
                service: ready,
                request,
                cell: None,
            },
            replay,
            self.unauthorized.clone(),
        )
    }
}

impl<S: fmt::Debug, P: fmt::Debug, C: fmt::Debug> fmt::Debug for WorkspaceAuth<S, P, C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WorkspaceAuth")
            .field("inner", &self.inner)
            .field("registry", &self.registry)
            .field("shape", &self.shape)
            .field("replay", &self.replay)
            .field("unauthorized", &self.unauthorized)
            .finish()
    }
}
