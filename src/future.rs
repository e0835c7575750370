//! The response future of [`EshopboxAuth`](crate::EshopboxAuth).
//!
//! A request goes through at most these states:
//!
//! ```text
//! Token ──► Ready ──► Called ──► done
//!   ▲                   │ 401, first attempt, body replayable
//!   └───────────────────┘ (at most once)
//! ```
//!
//! - `Token`: no usable token was cached; wait for the shared refresh.
//! - `Ready`: drive the inner service to readiness (skipped for the first attempt,
//!   whose service the caller already polled ready).
//! - `Called`: the inner service's future.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use http::header::AUTHORIZATION;
use http::{Request, Response};
use pin_project_lite::pin_project;
use tower::{BoxError, Service};

use crate::classify::{Http401, UnauthorizedPolicy};
use crate::error::Error;
use crate::token::cache::TokenCache;
use crate::token::{BoxFuture, Token};

/// A request not sent yet, with the service to send it: the first attempt while it
/// waits for a token, or the copy kept for one resend after a 401. Boxed, so that the
/// response future stays small on the hot path, where neither exists.
pub(crate) struct Unsent<S, B> {
    pub(crate) service: S,
    pub(crate) request: Request<B>,
}

pin_project! {
    /// Response future of [`EshopboxAuth`](crate::EshopboxAuth).
    pub struct ResponseFuture<S, B, C = Http401>
    where
        S: Service<Request<B>>,
    {
        #[pin]
        state: State<S, B>,
        cache: Arc<TokenCache>,
        unauthorized: C,
        // The generation of the token the first attempt carried.
        generation: u64,
        replay: Option<Box<Unsent<S, B>>>,
        resent: bool,
    }
}

pin_project! {
    #[project = StateProj]
    enum State<S, B>
    where
        S: Service<Request<B>>,
    {
        Token {
            token: BoxFuture<Result<Arc<Token>, Error>>,
            unsent: Option<Box<Unsent<S, B>>>,
            // Whether the service was already polled ready.
            ready: bool,
        },
        Ready {
            unsent: Option<Box<Unsent<S, B>>>,
        },
        Called {
            #[pin]
            future: S::Future,
        },
        // The destination guard refused the request before it was sent.
        Refused {
            error: Option<Error>,
        },
    }
}

impl<S, B, C> ResponseFuture<S, B, C>
where
    S: Service<Request<B>>,
{
    /// The first attempt was sent at once with the token of this generation.
    pub(crate) fn called(
        future: S::Future,
        cache: Arc<TokenCache>,
        generation: u64,
        replay: Option<Box<Unsent<S, B>>>,
        unauthorized: C,
    ) -> Self {
        ResponseFuture {
            state: State::Called { future },
            cache,
            unauthorized,
            generation,
            replay,
            resent: false,
        }
    }

    /// The request fails with `error` without being sent.
    pub(crate) fn refused(error: Error, cache: Arc<TokenCache>, unauthorized: C) -> Self {
        ResponseFuture {
            state: State::Refused { error: Some(error) },
            cache,
            unauthorized,
            generation: 0,
            replay: None,
            resent: false,
        }
    }

    /// The first attempt waits for a token; `service` has been polled ready.
    pub(crate) fn waiting(
        service: S,
        request: Request<B>,
        cache: Arc<TokenCache>,
        replay: Option<Box<Unsent<S, B>>>,
        unauthorized: C,
    ) -> Self {
        ResponseFuture {
            unauthorized,
            state: State::Token {
                token: cache.wait(),
                unsent: Some(Box::new(Unsent { service, request })),
                ready: true,
            },
            cache,
            generation: 0,
            replay,
            resent: false,
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
                StateProj::Token {
                    token,
                    unsent,
                    ready,
                } => {
                    let token = ready!(token.as_mut().poll(cx))?;
                    let (unsent, ready) = (unsent.take(), *ready);
                    if ready {
                        *this.generation = token.generation;
                    }
                    with_token(this.state.as_mut(), &token, unsent, ready)?;
                }
                StateProj::Ready { unsent } => {
                    let Some(pending) = unsent.as_mut() else {
                        return Poll::Ready(Err(polled_after_completion()));
                    };
                    ready!(pending.service.poll_ready(cx)).map_err(Into::into)?;
                    let unsent = unsent.take();
                    send(this.state.as_mut(), unsent)?;
                }
                StateProj::Called { future } => {
                    let response = ready!(future.poll(cx)).map_err(Into::into)?;
                    if *this.resent || !this.unauthorized.is_unauthorized(&response) {
                        return Poll::Ready(Ok(response));
                    }
                    // The first attempt was refused: resend it once, if there is a copy.
                    if !refused(
                        this.state.as_mut(),
                        this.cache,
                        *this.generation,
                        this.replay,
                    ) {
                        return Poll::Ready(Ok(response));
                    }
                    *this.resent = true;
                }
                StateProj::Refused { error } => {
                    return Poll::Ready(Err(match error.take() {
                        Some(error) => error.into(),
                        None => polled_after_completion(),
                    }));
                }
            }
        }
    }
}

// The rare transitions live in functions of their own, so that `poll` stays small for
// the common case: one poll of the `Called` state.

/// A token arrived for a request that waited: puts it on the request, then sends it
/// (its service is ready) or waits for its service to be ready.
#[cold]
#[inline(never)]
fn with_token<S, B>(
    mut state: Pin<&mut State<S, B>>,
    token: &Token,
    unsent: Option<Box<Unsent<S, B>>>,
    ready: bool,
) -> Result<(), BoxError>
where
    S: Service<Request<B>>,
{
    let Some(mut unsent) = unsent else {
        return Err(polled_after_completion());
    };
    unsent
        .request
        .headers_mut()
        .insert(AUTHORIZATION, token.header.clone());
    if ready {
        send(state, Some(unsent))
    } else {
        state.set(State::Ready {
            unsent: Some(unsent),
        });
        Ok(())
    }
}

/// Sends a request on its service, which has been polled ready.
#[cold]
#[inline(never)]
fn send<S, B>(
    mut state: Pin<&mut State<S, B>>,
    unsent: Option<Box<Unsent<S, B>>>,
) -> Result<(), BoxError>
where
    S: Service<Request<B>>,
{
    let Some(unsent) = unsent else {
        return Err(polled_after_completion());
    };
    let Unsent {
        mut service,
        request,
    } = *unsent;
    let future = service.call(request);
    state.set(State::Called { future });
    Ok(())
}

/// After a 401 for the first attempt: drops its token (only if it is still the
/// current one) and, if a copy of the request was kept, moves on to resending it.
/// Returns whether it did.
#[cold]
#[inline(never)]
fn refused<S, B>(
    mut state: Pin<&mut State<S, B>>,
    cache: &Arc<TokenCache>,
    generation: u64,
    replay: &mut Option<Box<Unsent<S, B>>>,
) -> bool
where
    S: Service<Request<B>>,
{
    cache.invalidate(generation);
    let Some(mut unsent) = replay.take() else {
        return false;
    };
    cache.counters.resend();
    tracing::debug!("request answered 401; resending it once with a new token");
    match cache.get() {
        Some((header, _)) => {
            unsent.request.headers_mut().insert(AUTHORIZATION, header);
            state.set(State::Ready {
                unsent: Some(unsent),
            });
        }
        None => {
            cache.counters.waited();
            state.set(State::Token {
                token: cache.wait(),
                unsent: Some(unsent),
                ready: false,
            });
        }
    }
    true
}

fn polled_after_completion() -> BoxError {
    "eshopbox auth: response future polled after completion".into()
}
