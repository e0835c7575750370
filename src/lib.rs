//! Tower middleware that keeps an [Eshopbox] access token fresh and puts it on every
//! request.
//!
//! Eshopbox gives each app a long-lived refresh token, which is traded for a
//! 24-hour Bearer access token at `POST https://auth.myeshopbox.com/api/v1/generateToken`.
//! [`EshopboxAuthLayer`] wraps any HTTP client service
//! (`tower::Service<http::Request<B>>`) and:
//!
//! - sets `Authorization: Bearer <access_token>` on each request (replacing any it
//!   had), with a header value built once per token and marked sensitive;
//! - reads the token lock-free from an [`arc_swap`] cell: a request that finds a valid
//!   token takes no lock and makes no token call;
//! - fetches a token with exactly one POST however many requests need it at once, in
//!   a spawned task, so cancelling the requests that wait does not abort it;
//! - refreshes ahead of expiry ([`refresh_margin`](EshopboxAuthBuilder::refresh_margin),
//!   capped at half the token's lifetime, with jitter) in the background, while
//!   requests keep using the still-valid token; a failed early refresh keeps it;
//! - on `401 Unauthorized`, drops that token (only if no newer one has replaced it)
//!   and resends the request once with a new token, if its body can be replayed
//!   (see [`replay`]);
//! - sends the token only to trusted destinations: https to `myeshopbox.com`,
//!   `eshopbox.com` and their subdomains, loopback, path-only requests (a tonic
//!   `Channel` sets the host), and hosts added with
//!   [`allow_host`](EshopboxAuthBuilder::allow_host); any other request fails before
//!   it is sent with [`ErrorKind::UntrustedDestination`] (see [Security](#security));
//! - reports token failures as an [`Error`] with an [`ErrorKind`] to match on, never
//!   containing a secret;
//! - with a [token store](store) such as Redis, shares one token between the replicas
//!   of a service: one token call per expiry across all of them.
//!
//! # Example
//!
//! ```
//! use eshopbox_auth::{Credentials, EshopboxAuthLayer};
//! use http::{Request, Response};
//! use std::convert::Infallible;
//! use tower::{service_fn, Service, ServiceBuilder, ServiceExt};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
//! let credentials = Credentials::new("client-id", "client-secret", "refresh-token");
//! let auth = EshopboxAuthLayer::builder(credentials)
//! #   .token_url(&mock_token_endpoint().await)
//!     .build()?;
//!
//! // Any `Service<http::Request<B>>` works: a hyper-util client, a tonic channel, …
//! // Here, a stand-in that echoes the header it received.
//! let client = service_fn(|req: Request<String>| async move {
//!     let auth = req.headers()["authorization"].to_str().unwrap().to_owned();
//!     Ok::<_, Infallible>(Response::new(auth))
//! });
//!
//! let mut client = ServiceBuilder::new().layer(auth).service(client);
//! let request = Request::get("https://acme.myeshopbox.com/api/v2/inventoryListing")
//!     .body(String::new())?;
//! let response = client.ready().await?.call(request).await?;
//! assert_eq!(response.body(), "Bearer doc-token");
//! # Ok(())
//! # }
//! # // A one-shot token endpoint on loopback, standing in for Eshopbox.
//! # async fn mock_token_endpoint() -> String {
//! #     use tokio::io::{AsyncReadExt, AsyncWriteExt};
//! #     let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
//! #     let addr = listener.local_addr().unwrap();
//! #     tokio::spawn(async move {
//! #         let (mut socket, _) = listener.accept().await.unwrap();
//! #         let mut buf = vec![0; 4096];
//! #         let _ = socket.read(&mut buf).await;
//! #         let body = r#"{"access_token":"doc-token","expires_in":86400,"token_type":"Bearer"}"#;
//! #         let reply = format!(
//! #             "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
//! #             body.len()
//! #         );
//! #         socket.write_all(reply.as_bytes()).await.unwrap();
//! #         // The rest of the request, if the first read did not get it all: closing
//! #         // with data unread would reset the connection under the reply.
//! #         socket.shutdown().await.unwrap();
//! #         let _ = socket.read_to_end(&mut Vec::new()).await;
//! #     });
//! #     format!("http://{addr}/api/v1/generateToken")
//! # }
//! ```
//!
//! # Integrations
//!
//! Runnable examples, each with an integration test on loopback:
//!
//! - `examples/quickstart.rs` — hyper-util's legacy `Client`, 4 000 requests against
//!   [`mock::MockEshopbox`] (`cargo run --example quickstart`);
//! - `examples/hyper_util.rs` — a GET and a POST resent after a 401 with
//!   [`CloneBodies`];
//! - `examples/reqwest.rs` — reqwest through [`reqwest::ReqwestService`];
//! - `examples/reqwest_middleware.rs` — a `reqwest_middleware` client with
//!   `reqwest-retry`, through `EshopboxAuthLayer::middleware` (feature
//!   `reqwest-middleware`, see the `middleware` module);
//! - `examples/axum.rs` — one shared authenticated client in axum state;
//! - `examples/tonic.rs` — a tonic `Channel`, with [`classify::GrpcUnauthenticated`];
//! - `examples/workspaces.rs` — a stock-sync job for several merchants through one
//!   per-workspace layer (feature `workspaces`, see the `workspace` module);
//! - the `eshopbox-token` command (feature `cli`): prints a token for scripts and
//!   `curl`, taking the fleet's token from a Redis store when one is given
//!   (`cargo run --features cli --bin eshopbox-token -- --help`).
//!
//! Optional features: `test-util` ([`mock`]), `reqwest` ([`reqwest`]),
//! `reqwest-middleware` (`middleware::EshopboxAuthMiddleware`), `tonic`
//! (`GrpcBodies`, to resend unary gRPC calls), `redis` (`store::RedisStore`, one token
//! for all replicas), `metrics` (counters to the `metrics` facade), `cli` (the
//! `eshopbox-token` command) and `workspaces` (`EshopboxAuthLayer::per_workspace`: one
//! layer for many workspaces, each with its own credentials).
//!
//! # Errors
//!
//! The service's error type is [`tower::BoxError`]. When a token cannot be had, it
//! holds an [`Error`]: `err.downcast_ref::<eshopbox_auth::Error>()` and
//! [`Error::kind`]. Errors of the inner service are passed through, boxed.
//!
//! # Failure semantics
//!
//! | the token endpoint … | requests see | token requests |
//! |---|---|---|
//! | answers a Bearer token | the token, until `expires_in` (from when the request was sent; missing → 24 h, ≤ 0 → used for a 1 s floor, > 30 days → 30 days) | 1 per refresh |
//! | answers 4xx but 408/429 (`invalid_grant`, `invalid_client`, …) | [`ErrorKind::Rejected`] at once, then the same error for 1–5 s ([`failure_cooldown`](EshopboxAuthBuilder::failure_cooldown)) | 1, none during the cooldown |
//! | answers something unusable (not JSON, no `access_token`, not Bearer, CR/LF in the token, a 2xx body over 64 KiB) | [`ErrorKind::InvalidResponse`], remembered like a rejection | 1, none during the cooldown |
//! | answers 5xx, 408 or 429, drops the connection, cannot be reached | retried with back-off 200 ms × 2ⁿ (jitter ½–1, ≤ 5 s) — or, for 429 and 503 only, its `Retry-After` when longer (seconds or date, ≤ 60 s) — while the next attempt would start before the refresh's deadline ([`token_timeout`](EshopboxAuthBuilder::token_timeout), default 30 s); then [`ErrorKind::Unavailable`] for every request that waited | one at a time; without `Retry-After` ≤ 16 per 30 s (10–16 by the back-off's draws) |
//! | answers 429 or 503 with a `Retry-After` longer than the rest of the token timeout | [`ErrorKind::Unavailable`] at once, then the same error until that time | 1 |
//! | hangs | each attempt abandoned after a third of what is left of the token timeout (at least 5 s, or [`attempt_timeout`](EshopboxAuthBuilder::attempt_timeout)) and retried on a new connection; [`ErrorKind::Unavailable`] when the [`token_timeout`](EshopboxAuthBuilder::token_timeout) runs out | 5 per 30 s |
//! | fails in any way while the current token is still valid (early refresh) | nothing: requests keep the valid token; at most 4 attempts, and the next refresh comes after a back-off of half the remaining life (1–30 s, at least `Retry-After`) | ≤ 4 per early refresh |
//! | recovers after an outage | the next request (after any cooldown or `Retry-After`) gets a token | 1 |
//! | answers a redirect (3xx) | [`ErrorKind::InvalidResponse`] with the status; the redirect is not followed (it would carry the client secret elsewhere) | 1 |
//!
//! A refresh that follows one that ran out of time goes on with that one's back-off
//! (2.5–5 s between calls), so a long outage sees no burst of calls at each
//! deadline; when that back-off runs past a refresh's whole timeout, its waiters
//! fail with [`ErrorKind::Unavailable`] when their time is up, without a call.
//!
//! A refresh that is cancelled (its runtime shut down) or panics fails its waiters
//! with [`ErrorKind::Unavailable`]; the next request starts a new one. A rotated
//! `refresh_token` is kept even from an answer that is otherwise unusable, because
//! the old one may already be spent.
//!
//! # Security
//!
//! The token (and the `ProxyHost` header) is put only on requests whose URI is
//!
//! - `https` to `myeshopbox.com`, `eshopbox.com` or a subdomain of either, or to a
//!   host added with [`allow_host`](EshopboxAuthBuilder::allow_host) (plain `http`
//!   to those hosts only with [`allow_insecure_http`](EshopboxAuthBuilder::allow_insecure_http));
//! - `http` or `https` to `localhost`, `127.0.0.0/8` or `[::1]`;
//! - path-only, without scheme or host: tonic's generated clients send these through a
//!   `Channel`, which decides the destination itself, so the channel's URI is what you
//!   trust.
//!
//! Any other request fails before it is sent, with [`ErrorKind::UntrustedDestination`]
//! naming the scheme and host: the inner service is not called and no token is
//! fetched. Hosts are compared on the parsed host, case-insensitively and on label
//! boundaries. Put the layer outside a redirect-following service (tower-http's
//! `FollowRedirect` strips `Authorization` from cross-origin hops); inside one, each
//! hop is checked again, so a redirect to a foreign host fails with
//! `UntrustedDestination`.
//!
//! # Files
//!
//! A request goes through [`EshopboxAuth::call`](tower::Service::call) in
//! `service.rs`, which reads the token through this service clone's view in
//! `token/local.rs` (admission: fresh, soft window or expired, in `token/cell.rs`),
//! and the response future's state machine in `future.rs`. A request that must wait
//! joins the single refresh of `token/flight.rs`, which runs `token/refresh.rs`:
//! through the token store (`store_sync.rs`) when there is one, else straight to the
//! fetcher's attempt loop in `token/fetch.rs`, which calls the
//! [`TokenSource`](source::TokenSource). `ARCHITECTURE.md` maps the layers.
//!
//! [Eshopbox]: https://www.eshopbox.com

#![deny(unsafe_code, unreachable_pub)]
#![warn(missing_docs)]
#![deny(rustdoc::broken_intra_doc_links)]
#![cfg_attr(docsrs, feature(doc_cfg))]

mod boxed;
mod builder;
pub mod classify;
mod credentials;
mod destination;
mod error;
pub mod future;
mod handle;
mod layer;
#[cfg(feature = "reqwest-middleware")]
#[cfg_attr(docsrs, doc(cfg(feature = "reqwest-middleware")))]
pub mod middleware;
#[cfg(feature = "test-util")]
#[cfg_attr(docsrs, doc(cfg(feature = "test-util")))]
pub mod mock;
pub mod replay;
#[cfg(feature = "reqwest")]
#[cfg_attr(docsrs, doc(cfg(feature = "reqwest")))]
pub mod reqwest;
mod service;
pub mod source;
mod stats;
pub mod store;
mod store_sync;
mod token;
#[cfg(feature = "workspaces")]
#[cfg_attr(docsrs, doc(cfg(feature = "workspaces")))]
pub mod workspace;

/// The README's code blocks, compiled and run as doc tests.
#[cfg(all(
    doctest,
    feature = "test-util",
    feature = "reqwest",
    feature = "tonic",
    feature = "redis",
    feature = "reqwest-middleware",
    feature = "workspaces"
))]
#[doc = include_str!("../README.md")]
pub struct ReadmeDoctests;

pub use builder::{
    EshopboxAuthBuilder, DEFAULT_FAILURE_COOLDOWN, DEFAULT_REFRESH_MARGIN, DEFAULT_STORE_TIMEOUT,
    DEFAULT_TOKEN_TIMEOUT, DEFAULT_TOKEN_URL,
};
pub use credentials::Credentials;
pub use error::{Error, ErrorKind};
pub use handle::{AccessToken, TokenHandle};
pub use layer::EshopboxAuthLayer;
#[cfg(feature = "reqwest-middleware")]
pub use middleware::EshopboxAuthMiddleware;
#[cfg(feature = "tonic")]
pub use replay::GrpcBodies;
pub use replay::{CloneBodies, EmptyBodies, ReplayPolicy};
/// The [`secrecy`](https://docs.rs/secrecy) crate, whose `SecretString` carries a rotated
/// refresh token to [`EshopboxAuthBuilder::on_refresh_token_rotated`].
pub use secrecy;
pub use service::EshopboxAuth;
pub use stats::Stats;
pub use token::endpoint::RequestFormat;
pub use token::value::TokenInfo;
#[cfg(feature = "workspaces")]
pub use workspace::{Workspace, WorkspaceAuthBuilder, WorkspaceAuthLayer};

/// Runs the token-response parser on arbitrary bytes, for the fuzz target in `fuzz/`.
/// Not part of the API.
#[cfg(feature = "fuzzing")]
#[doc(hidden)]
pub fn __fuzz_token_response(body: &[u8]) {
    let _ = token::response::rotated_refresh_token(body);
    let _ = token::response::oauth_error_code(body);
    if let Ok(response) = token::response::parse(body) {
        let lifetime = response.expires_in.unwrap_or_default();
        assert!(lifetime <= token::response::MAX_LIFETIME);
        let bearer = token::value::Bearer::new(response.access_token)
            .expect("a parsed token is always sendable");
        assert!(bearer.header().is_sensitive());
    }
}
