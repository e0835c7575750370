//! A mock Eshopbox on 127.0.0.1, to test an integration without network or credentials
//! (feature `test-util`).
//!
//! [`MockEshopbox::start`] serves:
//!
//! - `POST /api/v1/generateToken` — the refresh-token grant, JSON or form-encoded,
//!   checked against [`MockEshopbox::credentials`];
//! - `GET /api/v2/inventoryListing` — a sample authenticated API route, answering 401
//!   with Eshopbox's error shapes for an unknown, revoked or expired token;
//! - any other request under `/api/` — authenticated the same way, answered with
//!   `{"method": …, "path": …, "received": <body length>, "proxy_host": …}`, to check
//!   what arrived.
//!
//! Besides its own app ([`MockEshopbox::credentials`]), it serves one app per
//! workspace added with [`MockEshopbox::add_workspace`]: a token issued to a
//! workspace's app is accepted only with `ProxyHost: <that workspace>`; any other
//! `ProxyHost` is answered `403` and counted in [`MockEshopbox::mismatches`].
//!
//! ```
//! use eshopbox_auth::mock::MockEshopbox;
//! use eshopbox_auth::EshopboxAuthLayer;
//! use http_body_util::Empty;
//! use hyper_util::client::legacy::Client;
//! use hyper_util::rt::TokioExecutor;
//! use tower::{ServiceBuilder, ServiceExt};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
//! let eshopbox = MockEshopbox::start().await?;
//! let auth = EshopboxAuthLayer::builder(eshopbox.credentials())
//!     .token_url(&eshopbox.token_url())
//!     .build()?;
//! let client = Client::builder(TokioExecutor::new()).build_http::<Empty<bytes::Bytes>>();
//! let client = ServiceBuilder::new().layer(auth).service(client);
//!
//! let request = http::Request::get(eshopbox.url("/api/v2/inventoryListing"))
//!     .body(Empty::new())?;
//! let response = client.oneshot(request).await?;
//! assert_eq!(response.status(), 200);
//! assert_eq!(eshopbox.token_calls(), 1);
//! # Ok(())
//! # }
//! ```

use std::collections::HashMap;
use std::convert::Infallible;
use std::fmt;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{header, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use serde::Deserialize;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

use crate::credentials::Credentials;

/// The client id the mock accepts.
pub const CLIENT_ID: &str = "mock-client-id";
/// The client secret the mock accepts.
pub const CLIENT_SECRET: &str = "mock-client-secret";
/// The refresh token the mock accepts.
pub const REFRESH_TOKEN: &str = "mock-refresh-token";

/// A running mock Eshopbox. It stops when dropped.
pub struct MockEshopbox {
    addr: SocketAddr,
    state: Arc<State>,
    server: JoinHandle<()>,
}

#[derive(Default)]
struct State {
    token_calls: AtomicU64,
    api_calls: AtomicU64,
    unauthorized: AtomicU64,
    mismatches: AtomicU64,
    knobs: Mutex<Knobs>,
}

/// A workspace's app.
struct App {
    workspace: String,
    client_secret: String,
    refresh_token: String,
    delay: Duration,
    token_calls: u64,
}

struct Knobs {
    lifetime: Duration,
    delay: Duration,
    failures: Vec<StatusCode>,
    issued: u64,
    /// Token → (expiry, revoked, the workspace it was issued for).
    tokens: HashMap<String, (Instant, bool, Option<String>)>,
    /// Client id → the workspace app it belongs to.
    apps: HashMap<String, App>,
}

impl Default for Knobs {
    fn default() -> Self {
        Knobs {
            lifetime: Duration::from_secs(86400),
            delay: Duration::ZERO,
            failures: Vec::new(),
            issued: 0,
            tokens: HashMap::new(),
            apps: HashMap::new(),
        }
    }
}

impl MockEshopbox {
    /// Starts the mock on a free port of 127.0.0.1. Must be called inside a tokio
    /// runtime.
    pub async fn start() -> std::io::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let state = Arc::new(State::default());
        let shared = state.clone();
        let server = tokio::spawn(async move {
            // Owned here, so that aborting the server also closes every connection.
            let mut connections = tokio::task::JoinSet::new();
            while let Ok((stream, _)) = listener.accept().await {
                while connections.try_join_next().is_some() {}
                let state = shared.clone();
                connections.spawn(async move {
                    let service = hyper::service::service_fn(move |req| answer(state.clone(), req));
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        Ok(MockEshopbox {
            addr,
            state,
            server,
        })
    }

    /// The credentials the mock accepts.
    pub fn credentials(&self) -> Credentials {
        Credentials::new(CLIENT_ID, CLIENT_SECRET, REFRESH_TOKEN)
    }

    /// Adds an app for `workspace` and returns its credentials: client id
    /// `mock-client-<workspace>`, client secret `mock-secret-<workspace>`, refresh token
    /// `mock-refresh-<workspace>`. Its tokens are accepted only with
    /// `ProxyHost: <workspace>`. Adding a workspace again changes nothing.
    pub fn add_workspace(&self, workspace: &str) -> Credentials {
        let client_id = format!("mock-client-{workspace}");
        let mut knobs = self.knobs();
        let app = knobs.apps.entry(client_id.clone()).or_insert_with(|| App {
            workspace: workspace.to_owned(),
            client_secret: format!("mock-secret-{workspace}"),
            refresh_token: format!("mock-refresh-{workspace}"),
            delay: Duration::ZERO,
            token_calls: 0,
        });
        Credentials::new(client_id, &*app.client_secret, &*app.refresh_token)
    }

    /// Delays the token answers for this workspace's app (added with
    /// [`add_workspace`](Self::add_workspace)) by `delay`, on top of any
    /// [`set_token_delay`](Self::set_token_delay).
    pub fn set_workspace_token_delay(&self, workspace: &str, delay: Duration) {
        if let Some(app) = self
            .knobs()
            .apps
            .values_mut()
            .find(|app| app.workspace == workspace)
        {
            app.delay = delay;
        }
    }

    /// Token requests received from this workspace's app with its valid credentials.
    pub fn workspace_token_calls(&self, workspace: &str) -> u64 {
        self.knobs()
            .apps
            .values()
            .find(|app| app.workspace == workspace)
            .map_or(0, |app| app.token_calls)
    }

    /// API requests refused with `403` because their `ProxyHost` was not the workspace
    /// their token was issued for.
    pub fn mismatches(&self) -> u64 {
        self.state.mismatches.load(Ordering::SeqCst)
    }

    /// The mock's token endpoint, for
    /// [`token_url`](crate::EshopboxAuthBuilder::token_url).
    pub fn token_url(&self) -> String {
        self.url("/api/v1/generateToken")
    }

    /// An absolute URL on the mock.
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// The address the mock listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The `expires_in` of tokens issued from now on (default 24 h; whole seconds,
    /// at least 1).
    pub fn set_token_lifetime(&self, lifetime: Duration) {
        self.knobs().lifetime = lifetime.max(Duration::from_secs(1));
    }

    /// Delays every token answer by this much (default none).
    pub fn set_token_delay(&self, delay: Duration) {
        self.knobs().delay = delay;
    }

    /// Answers the next `n` token requests with `status` and an error body.
    pub fn fail_next_token_calls(&self, n: usize, status: StatusCode) {
        self.knobs().failures.extend(std::iter::repeat_n(status, n));
    }

    /// Revokes every token issued so far: the API answers 401 to them.
    pub fn revoke_tokens(&self) {
        for (_, revoked, _) in self.knobs().tokens.values_mut() {
            *revoked = true;
        }
    }

    /// Token requests received.
    pub fn token_calls(&self) -> u64 {
        self.state.token_calls.load(Ordering::SeqCst)
    }

    /// API requests received.
    pub fn api_calls(&self) -> u64 {
        self.state.api_calls.load(Ordering::SeqCst)
    }

    /// API requests answered 401.
    pub fn unauthorized(&self) -> u64 {
        self.state.unauthorized.load(Ordering::SeqCst)
    }

    fn knobs(&self) -> std::sync::MutexGuard<'_, Knobs> {
        lock(&self.state)
    }
}

impl Drop for MockEshopbox {
    fn drop(&mut self) {
        self.server.abort();
    }
}

impl fmt::Debug for MockEshopbox {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MockEshopbox")
            .field("addr", &self.addr)
            .field("token_calls", &self.token_calls())
            .field("api_calls", &self.api_calls())
            .field("unauthorized", &self.unauthorized())
            .field("mismatches", &self.mismatches())
            .finish()
    }
}

#[derive(Deserialize)]
struct Grant {
    client_id: Option<String>,
    client_secret: Option<String>,
    grant_type: Option<String>,
    refresh_token: Option<String>,
}

async fn answer(
    state: Arc<State>,
    req: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let response = match (req.method(), req.uri().path()) {
        (&Method::POST, "/api/v1/generateToken") => token(&state, req).await,
        (_, path) if path.starts_with("/api/") => api(&state, req).await,
        _ => json(StatusCode::NOT_FOUND, r#"{"message":"Not found"}"#.into()),
    };
    Ok(response)
}

async fn token(state: &State, req: Request<Incoming>) -> Response<Full<Bytes>> {
    state.token_calls.fetch_add(1, Ordering::SeqCst);
    let form = req.headers().get(header::CONTENT_TYPE).is_some_and(|v| {
        v.as_bytes()
            .starts_with(b"application/x-www-form-urlencoded")
    });
    let body = match req.into_body().collect().await {
        Ok(body) => body.to_bytes(),
        Err(_) => {
            return json(
                StatusCode::BAD_REQUEST,
                r#"{"error":"invalid_request"}"#.into(),
            )
        }
    };
    let delay = lock(state).delay;
    if !delay.is_zero() {
        tokio::time::sleep(delay).await;
    }
    let failure = {
        let mut knobs = lock(state);
        (!knobs.failures.is_empty()).then(|| knobs.failures.remove(0))
    };
    if let Some(status) = failure {
        return json(status, r#"{"error":"temporarily_unavailable"}"#.into());
    }
    let grant: Option<Grant> = if form {
        serde_urlencoded::from_bytes(&body).ok()
    } else {
        serde_json::from_slice(&body).ok()
    };
    let Some(grant) = grant else {
        return json(
            StatusCode::BAD_REQUEST,
            r#"{"error":"invalid_request"}"#.into(),
        );
    };
    if grant.grant_type.as_deref() != Some("refresh_token") {
        return json(
            StatusCode::BAD_REQUEST,
            r#"{"error":"unsupported_grant_type"}"#.into(),
        );
    }
    let workspace = match check_grant(state, &grant) {
        Ok(workspace) => workspace,
        Err(response) => return response,
    };
    let delay = workspace
        .as_ref()
        .map_or(Duration::ZERO, |(_, delay)| *delay);
    if !delay.is_zero() {
        tokio::time::sleep(delay).await;
    }
    let workspace = workspace.map(|(workspace, _)| workspace);
    let mut knobs = lock(state);
    knobs.issued += 1;
    let token = format!("mock-access-{}-{:016x}", knobs.issued, fastrand::u64(..));
    let lifetime = knobs.lifetime;
    knobs
        .tokens
        .insert(token.clone(), (Instant::now() + lifetime, false, workspace));
    let body = serde_json::json!({
        "access_token": token,
        "id_token": "mock-id-token",
        "scope": "openid profile offline_access",
        "expires_in": lifetime.as_secs(),
        "token_type": "Bearer",
    });
    json(StatusCode::OK, body.to_string())
}

async fn api(state: &State, req: Request<Incoming>) -> Response<Full<Bytes>> {
    state.api_calls.fetch_add(1, Ordering::SeqCst);
    let token = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    let verdict = token.map(|t| lock(state).tokens.get(t).cloned());
    let refusal = match verdict {
        None | Some(None) => Some(
            r#"{"error":{"code":401,"message":"Unauthorized","errors":[{"message":"Invalid token"}]}}"#,
        ),
        Some(Some((_, true, _))) => Some(
            r#"{"error":{"code":401,"message":"Unauthorized","errors":[{"message":"Token revoked"}]}}"#,
        ),
        Some(Some((expiry, false, _))) if Instant::now() >= expiry => {
            Some(r#"{"message":"Expired token"}"#)
        }
        Some(Some(_)) => None,
    };
    if let Some(body) = refusal {
        state.unauthorized.fetch_add(1, Ordering::SeqCst);
        return json(StatusCode::UNAUTHORIZED, body.into());
    }
    if let Some(Some((_, _, Some(workspace)))) = &verdict {
        let proxy_host = req.headers().get("proxyhost").map(|v| v.as_bytes());
        if proxy_host != Some(workspace.as_bytes()) {
            state.mismatches.fetch_add(1, Ordering::SeqCst);
            return json(
                StatusCode::FORBIDDEN,
                r#"{"message":"ProxyHost does not match the token's workspace"}"#.into(),
            );
        }
    }
    if req.method() == Method::GET && req.uri().path() == "/api/v2/inventoryListing" {
        return json(
            StatusCode::OK,
            r#"{"items":[{"sku":"SKU-1","available":12},{"sku":"SKU-2","available":0}],"total":2}"#
                .into(),
        );
    }
    let (method, path) = (req.method().to_string(), req.uri().path().to_owned());
    let proxy_host = req
        .headers()
        .get("proxyhost")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let received = match req.into_body().collect().await {
        Ok(body) => body.to_bytes().len(),
        Err(_) => return json(StatusCode::BAD_REQUEST, r#"{"message":"Bad body"}"#.into()),
    };
    let body = serde_json::json!({
        "method": method,
        "path": path,
        "received": received,
        "proxy_host": proxy_host,
    });
    json(StatusCode::OK, body.to_string())
}

/// Checks the grant's credentials: the mock's own app (`Ok(None)`) or a workspace's
/// (`Ok(Some((workspace, its delay)))`), counting the workspace's token call.
#[allow(clippy::result_large_err)]
fn check_grant(
    state: &State,
    grant: &Grant,
) -> Result<Option<(String, Duration)>, Response<Full<Bytes>>> {
    let invalid_client = || {
        json(
            StatusCode::UNAUTHORIZED,
            r#"{"error":"invalid_client"}"#.into(),
        )
    };
    let invalid_grant = || {
        json(
            StatusCode::BAD_REQUEST,
            r#"{"error":"invalid_grant"}"#.into(),
        )
    };
    let client_id = grant.client_id.as_deref().unwrap_or_default();
    let secret = grant.client_secret.as_deref();
    let refresh_token = grant.refresh_token.as_deref();
    if client_id == CLIENT_ID {
        if secret != Some(CLIENT_SECRET) {
            return Err(invalid_client());
        }
        if refresh_token != Some(REFRESH_TOKEN) {
            return Err(invalid_grant());
        }
        return Ok(None);
    }
    let mut knobs = lock(state);
    let Some(app) = knobs.apps.get_mut(client_id) else {
        return Err(invalid_client());
    };
    if secret != Some(app.client_secret.as_str()) {
        return Err(invalid_client());
    }
    if refresh_token != Some(app.refresh_token.as_str()) {
        return Err(invalid_grant());
    }
    app.token_calls += 1;
    Ok(Some((app.workspace.clone(), app.delay)))
}

fn lock(state: &State) -> std::sync::MutexGuard<'_, Knobs> {
    state.knobs.lock().unwrap_or_else(PoisonError::into_inner)
}

fn json(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    response
}
