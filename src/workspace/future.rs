//! The response future of [`WorkspaceAuth`](super::WorkspaceAuth).
//!
//! ```text
//! Resolve ──► Auth (the single-account future: token, send, one resend after 401)
//!    │
//!    └──► Done (unknown workspace, lookup failed)       Failed ──► Done
//! ```
//!
//! - `Resolve`: the workspace is not in the map yet; waits for its (shared)
//!   resolution, then sets `ProxyHost` and goes on as the single-account layer does.
//! - `Auth`: the single-account response future, for the workspace's token cell.
//! - `Failed`: refused before sending (destination guard, no workspace); the error is
//!   handed out once.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use http::header::HeaderName;
use http::{Request, Response};
use pin_project_lite::pin_project;
use tower::{BoxError, Service};

use super::registry::Entry;
use crate::boxed::BoxFuture;
use crate::classify::{Http401, UnauthorizedPolicy};
use crate::error::Error;
use crate::future::{polled_after_completion, ResponseFuture as AuthFuture, Unsent};

const PROXY_HOST: HeaderName = HeaderName::from_static("proxyhost");

/// A request waiting for its workspace to be resolved.
struct Cold<S, B, C> {
    unsent: Unsent<S, B>,
    replay: Option<Box<Unsent<S, B>>>,
    unauthorized: C,
}

pin_project! {
    /// Response future of [`WorkspaceAuth`](super::WorkspaceAuth).
    pub struct ResponseFuture<S, B, C = Http401>
    where
        S: Service<Request<B>>,
    {
        #[pin]
        state: State<S, B, C>,
        // The workspace's span, entered while this request waits for its token.
        span: Option<tracing::Span>,
    }
}

pin_project! {
    #[project = StateProj]
    #[project_replace = StateTaken]
    enum State<S, B, C>
    where
        S: Service<Request<B>>,
    {
        Resolve {
            resolve: BoxFuture<'static, Result<Arc<Entry>, Error>>,
            cold: Box<Cold<S, B, C>>,
        },
        Auth {
            #[pin]
            future: AuthFuture<S, B, C>,
        },
        Failed {
            error: Error,
        },
        Done,
    }
}

impl<S, B, C> ResponseFuture<S, B, C>
where
    S: Service<Request<B>>,
{
    #[inline]
    pub(crate) fn auth(future: AuthFuture<S, B, C>, span: Option<tracing::Span>) -> Self {
        ResponseFuture {
            state: State::Auth { future },
            span,
        }
    }

    pub(crate) fn failed(error: Error) -> Self {
        ResponseFuture {
            state: State::Failed { error },
            span: None,
        }
    }

    pub(crate) fn resolving(
        resolve: BoxFuture<'static, Result<Arc<Entry>, Error>>,
        unsent: Unsent<S, B>,
        replay: Option<Box<Unsent<S, B>>>,
        unauthorized: C,
    ) -> Self {
        ResponseFuture {
            state: State::Resolve {
                resolve,
                cold: Box::new(Cold {
                    unsent,
                    replay,
                    unauthorized,
                }),
            },
            span: None,
        }
    }
}

impl<S, B, C, RB> Future for ResponseFuture<S, B, C>
where
    S: Service<Request<B>, Response = Response<RB>>,
    S::Error: Into<BoxError>,
    C: UnauthorizedPolicy<RB>,
{
    type Output = Result<Response<RB>, BoxError>;

    #[inline]
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        loop {
            match this.state.as_mut().project() {
                StateProj::Auth { future } => {
                    let _entered = this.span.as_ref().map(tracing::Span::enter);
                    return future.poll(cx);
                }
                StateProj::Resolve { resolve, .. } => {
                    let entry = ready!(resolve.as_mut().poll(cx));
                    resolved(this.state.as_mut(), entry, this.span)?;
                }
                StateProj::Failed { .. } => return Poll::Ready(Err(failure(this.state.as_mut()))),
                StateProj::Done => return Poll::Ready(Err(polled_after_completion())),
            }
        }
    }
}

/// The workspace was resolved (or not): sets `ProxyHost` on the request and its copy
/// and goes on with the single-account future, which waits for the workspace's token.
#[cold]
#[inline(never)]
fn resolved<S, B, C>(
    mut state: Pin<&mut State<S, B, C>>,
    entry: Result<Arc<Entry>, Error>,
    span: &mut Option<tracing::Span>,
) -> Result<(), BoxError>
where
    S: Service<Request<B>>,
{
    let StateTaken::Resolve { cold, .. } = state.as_mut().project_replace(State::Done) else {
        return Err(polled_after_completion());
    };
    let entry = entry?;
    let Cold {
        unsent: Unsent {
            service,
            mut request,
            ..
        },
        mut replay,
        unauthorized,
    } = *cold;
    request
        .headers_mut()
        .insert(PROXY_HOST, entry.proxy_host.clone());
    if let Some(copy) = replay.as_mut() {
        copy.request
            .headers_mut()
            .insert(PROXY_HOST, entry.proxy_host.clone());
        copy.cell = Some(entry.cell.clone());
    }
    entry.cell.counters.waited();
    let future = AuthFuture::waiting(service, request, &entry.cell, replay, unauthorized);
    *span = Some(entry.span.clone());
    state.set(State::Auth { future });
    Ok(())
}

#[cold]
#[inline(never)]
fn failure<S, B, C>(mut state: Pin<&mut State<S, B, C>>) -> BoxError
where
    S: Service<Request<B>>,
{
    match state.as_mut().project_replace(State::Done) {
        StateTaken::Failed { error } => error.into(),
        _ => polled_after_completion(),
    }
}
