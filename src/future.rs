//! The response future of [`EshopboxAuth`](crate::EshopboxAuth).
//!
//! A request goes through at most these states:
//!
//! ```text
//! Token ──► Ready ──► Called ──► answer
//!   │ ▲       │           │ 401, first attempt, body replayable
//!   │ └───────┼───────────┘ (at most once)
//!   └─────────┴──► Done (no token, or the service failed to get ready)
//! ```
//!
//! - `Token`: no usable token was cached; wait for the shared refresh. Owns the
//!   request that waits.
//! - `Ready`: drive the inner service to readiness (skipped for the first attempt,
//!   whose service the caller already polled ready). Owns the request to send.
//! - `Called`: the inner service's future. Its answer is handed out from here, so the
//!   common case never writes the state again (a poll after that goes to the inner
//!   future, as with tower-http's futures).
//! - `Refused`: the destination guard refused the request before it was sent; its
//!   error is handed out once.
//! - `Done`: the wait for a token or for readiness failed, the refusal was handed out,
//!   or a transition is under way; a poll here is answered with an error.
//!
//! ## What the common case costs, and why the future holds no `Arc`
//!
//! With a warm token and no 401, the future is made, polled once in `Called` and
//! dropped. It writes no memory that other service clones or other threads write:
//!
//! - it names its token cell by a `CellKey` (a copied number) and the token by its
//!   generation, not by an `Arc<TokenCell>`, whose reference count would be one cache
//!   line incremented and decremented by every request on every thread;
//! - the key is resolved to the cell (a registry lookup under a mutex, in
//!   `token/key.rs`) only after a 401, to invalidate the token the request carried
//!   (only if it is still the current one). Should every service and handle of the
//!   layer be gone by then, the key resolves to nothing: there is no token left to
//!   drop, and the 401 is handed out as it is.
//! - A request that can be resent (retry on, a replayable body) keeps a copy of
//!   itself anyway (an allocation); that copy also holds an `Arc` of the cell, for the
//!   resend's token. So such a request does write the cell's shared count, and is
//!   resent even when it went out through the last service of its layer
//!   (`oneshot`). With retry off, nothing is kept.
//!
//! The header the request carries is this service clone's own copy (see
//! `token/local.rs`), so its reference count is not shared with other clones either.
//!
//! The slow states hold what they need themselves: the wait for a token owns its
//! future (which holds the cell), a resend owns its boxed copy of the request.
//!
//! The future is generic over the inner service, the request body and the 401
//! classifier only; which cell it reports to is data (the key), so a layer with
//! several cells (one per workspace, say) builds it with the key of the cell whose
//! token the request carries.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use http::header::AUTHORIZATION;
use http::{Request, Response};
use pin_project_lite::pin_project;
use tower::{BoxError, Service};

use crate::boxed::BoxFuture;
use crate::classify::{Http401, UnauthorizedPolicy};
use crate::error::Error;
use crate::replay::ReplayPolicy;
use crate::token::cell::TokenCell;
use crate::token::key::CellKey;
use crate::token::value::Token;

/// A request not sent yet, with the service to send it: the first attempt while it
/// waits for a token, or the copy kept for one resend after a 401. Boxed, so that the
/// response future stays small on the hot path, where neither exists.
pub(crate) struct Unsent<S, B> {
    pub(crate) service: S,
    pub(crate) request: Request<B>,
    /// In the copy kept for a resend: the token cell the resend takes its token from.
    /// Only requests that can be resent pay for it (they allocate this copy anyway);
    /// it keeps the cell alive while the request is out, so that a request sent
    /// through the last service of a layer (`oneshot`) is still resent. `None` in a
    /// first attempt that waits for a token (its wait holds the cell).
    pub(crate) cell: Option<Arc<TokenCell>>,
}

impl<S: Clone, B> Unsent<S, B> {
    /// The request to send and, when `policy` can replay its body, a copy of it (its
    /// head as set so far) with a clone of `service` to send it and `cell` for the
    /// resend's token: what a request keeps for one resend after a 401.
    #[allow(clippy::type_complexity)]
    pub(crate) fn copy_for_resend<P: ReplayPolicy<B>>(
        policy: &P,
        service: &S,
        request: Request<B>,
        cell: Option<&Arc<TokenCell>>,
    ) -> (Request<B>, Option<Box<Self>>) {
        let (parts, body) = request.into_parts();
        let (body, copy) = policy.prepare(body);
        let replay = copy.map(|copy| {
            Box::new(Unsent {
                service: service.clone(),
                request: Request::from_parts(parts.clone(), copy),
                cell: cell.cloned(),
            })
        });
        (Request::from_parts(parts, body), replay)
    }
}

/// Which attempt the future is on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Attempt {
    /// The first: its service was polled ready by the caller, and a 401 may be
    /// answered by one resend.
    First,
    /// The resend after a 401: its service must be polled ready, and its answer is
    /// final.
    Resend,
}

pin_project! {
    /// Response future of [`EshopboxAuth`](crate::EshopboxAuth).
    pub struct ResponseFuture<S, B, C = Http401>
    where
        S: Service<Request<B>>,
    {
        #[pin]
        state: State<S, B>,
        // The token cell, resolved only after a 401 (see the module documentation).
        cell: CellKey,
        unauthorized: C,
        // The generation of the token the first attempt carried.
        generation: u64,
        // The copy kept for the resend, while the first attempt runs.
        replay: Option<Box<Unsent<S, B>>>,
        attempt: Attempt,
    }
}

pin_project! {
    #[project = StateProj]
    #[project_replace = StateTaken]
    enum State<S, B>
    where
        S: Service<Request<B>>,
    {
        Token {
            token: BoxFuture<'static, Result<Arc<Token>, Error>>,
            unsent: Box<Unsent<S, B>>,
        },
        Ready {
            unsent: Box<Unsent<S, B>>,
        },
        Called {
            #[pin]
            future: S::Future,
        },
        // The destination guard refused the request before it was sent.
        Refused {
            error: Error,
        },
        Done,
    }
}

impl<S, B, C> ResponseFuture<S, B, C>
where
    S: Service<Request<B>>,
{
    /// The first attempt was sent at once with the token of this generation.
    pub(crate) fn called(
        future: S::Future,
        cell: CellKey,
        generation: u64,
        replay: Option<Box<Unsent<S, B>>>,
        unauthorized: C,
    ) -> Self {
        ResponseFuture {
            state: State::Called { future },
            cell,
            unauthorized,
            generation,
            replay,
            attempt: Attempt::First,
        }
    }

    /// The request fails with `error` without being sent.
    pub(crate) fn refused(error: Error, cell: CellKey, unauthorized: C) -> Self {
        ResponseFuture {
            state: State::Refused { error },
            cell,
            unauthorized,
            generation: 0,
            replay: None,
            attempt: Attempt::First,
        }
    }

    /// The first attempt waits for a token; `service` has been polled ready.
    pub(crate) fn waiting(
        service: S,
        request: Request<B>,
        cell: &Arc<TokenCell>,
        replay: Option<Box<Unsent<S, B>>>,
        unauthorized: C,
    ) -> Self {
        ResponseFuture {
            unauthorized,
            state: State::Token {
                token: cell.wait(),
                unsent: Box::new(Unsent {
                    service,
                    request,
                    cell: None,
                }),
            },
            cell: cell.key(),
            generation: 0,
            replay,
            attempt: Attempt::First,
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
            // The common case, a request sent with a cached token, is one poll of
            // `Called`; every other state is handled off this path.
            let StateProj::Called { future } = this.state.as_mut().project() else {
                ready!(advance(
                    this.state.as_mut(),
                    cx,
                    *this.attempt,
                    this.generation
                ))?;
                continue;
            };
            let response = ready!(future.poll(cx)).map_err(Into::into)?;
            if *this.attempt == Attempt::Resend || !this.unauthorized.is_unauthorized(&response) {
                return Poll::Ready(Ok(response));
            }
            // The first attempt was refused: resend it once, if there is a copy.
            if !resend_after_401(
                this.state.as_mut(),
                *this.cell,
                *this.generation,
                this.replay.take(),
            ) {
                return Poll::Ready(Ok(response));
            }
            *this.attempt = Attempt::Resend;
        }
    }
}

/// Drives the states before `Called`: waits for the token, then for the service to
/// be ready, then sends (`Ready(Ok)` once the state is `Called`); hands out the
/// destination guard's error, or answers a poll after the end.
#[cold]
#[inline(never)]
fn advance<S, B>(
    mut state: Pin<&mut State<S, B>>,
    cx: &mut Context<'_>,
    attempt: Attempt,
    generation: &mut u64,
) -> Poll<Result<(), BoxError>>
where
    S: Service<Request<B>>,
    S::Error: Into<BoxError>,
{
    loop {
        match state.as_mut().project() {
            StateProj::Token { token, .. } => {
                let token = ready!(token.as_mut().poll(cx));
                with_token(state.as_mut(), token, attempt, generation)?;
            }
            StateProj::Ready { unsent } => {
                let ready = ready!(unsent.service.poll_ready(cx));
                send(state.as_mut(), ready.map_err(Into::into))?;
            }
            StateProj::Called { .. } => return Poll::Ready(Ok(())),
            StateProj::Refused { .. } => return Poll::Ready(Err(refusal(state.as_mut()))),
            StateProj::Done => return Poll::Ready(Err(polled_after_completion())),
        }
    }
}

// The rare transitions live in functions of their own, so that `poll` stays small for
// the common case: one poll of the `Called` state.

/// A refresh answered a request that waited (in the `Token` state). With a token,
/// puts it on the request, then sends it (the first attempt: its service is ready)
/// or waits for its service to be ready (the resend). With an error, ends.
fn with_token<S, B>(
    mut state: Pin<&mut State<S, B>>,
    token: Result<Arc<Token>, Error>,
    attempt: Attempt,
    generation: &mut u64,
) -> Result<(), BoxError>
where
    S: Service<Request<B>>,
{
    let StateTaken::Token { mut unsent, .. } = state.as_mut().project_replace(State::Done) else {
        return Err(polled_after_completion());
    };
    let token = token?;
    unsent
        .request
        .headers_mut()
        .insert(AUTHORIZATION, token.header().clone());
    match attempt {
        Attempt::First => {
            *generation = token.generation;
            call(state, *unsent);
        }
        Attempt::Resend => state.set(State::Ready { unsent }),
    }
    Ok(())
}

/// The service of the `Ready` state was polled ready (or failed): sends the request.
fn send<S, B>(mut state: Pin<&mut State<S, B>>, ready: Result<(), BoxError>) -> Result<(), BoxError>
where
    S: Service<Request<B>>,
{
    let StateTaken::Ready { unsent } = state.as_mut().project_replace(State::Done) else {
        return Err(polled_after_completion());
    };
    ready?;
    call(state, *unsent);
    Ok(())
}

/// The destination guard's error, handed out once.
fn refusal<S, B>(mut state: Pin<&mut State<S, B>>) -> BoxError
where
    S: Service<Request<B>>,
{
    match state.as_mut().project_replace(State::Done) {
        StateTaken::Refused { error } => error.into(),
        _ => polled_after_completion(),
    }
}

#[cold]
pub(crate) fn polled_after_completion() -> BoxError {
    "eshopbox auth: response future polled after completion".into()
}

fn call<S, B>(mut state: Pin<&mut State<S, B>>, unsent: Unsent<S, B>)
where
    S: Service<Request<B>>,
{
    let Unsent {
        mut service,
        request,
        cell: _,
    } = unsent;
    let future = service.call(request);
    state.set(State::Called { future });
}

/// After a 401 for the first attempt: drops its token (only if it is still the
/// current one) and, if a copy of the request was kept, moves on to resending it.
/// Returns whether it did. Without a copy, the cell is resolved from its key here, off
/// the common path; if it is gone (the layer and all its services dropped), there is
/// no token left to drop.
#[cold]
#[inline(never)]
fn resend_after_401<S, B>(
    mut state: Pin<&mut State<S, B>>,
    cell: CellKey,
    generation: u64,
    replay: Option<Box<Unsent<S, B>>>,
) -> bool
where
    S: Service<Request<B>>,
{
    let Some((mut unsent, cell)) = replay.and_then(|mut unsent| {
        let cell = unsent.cell.take()?;
        Some((unsent, cell))
    }) else {
        if let Some(cell) = cell.resolve() {
            cell.invalidate(generation);
        }
        return false;
    };
    cell.invalidate(generation);
    cell.counters.resend();
    tracing::debug!("request answered 401; resending it once with a new token");
    match cell.get() {
        Some((header, _)) => {
            unsent.request.headers_mut().insert(AUTHORIZATION, header);
            state.set(State::Ready { unsent });
        }
        None => {
            cell.counters.waited();
            state.set(State::Token {
                token: cell.wait(),
                unsent,
            });
        }
    }
    true
}
