//! A token endpoint on 127.0.0.1 for integration tests: answers each
//! `POST /api/v1/generateToken` with whatever the test scripts, and records what it
//! was sent.

#![allow(dead_code)]

#[cfg(feature = "redis")]
pub mod redis;
pub mod replicas;
pub mod telemetry;
pub mod traffic;
#[cfg(feature = "workspaces")]
pub mod workspaces;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

pub const CLIENT_ID: &str = "client-id-1";
pub const CLIENT_SECRET: &str = "s3cr3t-client-secret";
pub const REFRESH_TOKEN: &str = "rt-long-lived-refresh-token";

/// What the endpoint answers to one token request.
#[derive(Clone)]
pub struct Reply {
    pub status: StatusCode,
    pub content_type: &'static str,
    pub body: Bytes,
    pub headers: Vec<(&'static str, String)>,
    /// Wait this long before answering.
    pub delay: Option<std::time::Duration>,
    pub action: Action,
}

/// How the endpoint treats the request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    Respond,
    /// Never answer.
    Hang,
    /// Close the connection without an answer.
    Close,
}

impl Reply {
    /// 200 with a token in the documented shape.
    pub fn token(access_token: &str, expires_in: i64) -> Self {
        Reply::json(
            200,
            &serde_json::json!({
                "access_token": access_token,
                "id_token": "id-token-value",
                "scope": "openid profile offline_access",
                "expires_in": expires_in,
                "token_type": "Bearer",
            })
            .to_string(),
        )
    }

    pub fn json(status: u16, body: &str) -> Self {
        Reply::raw(status, "application/json", body.to_owned())
    }

    pub fn hang() -> Self {
        Reply {
            action: Action::Hang,
            ..Reply::raw(200, "text/plain", "")
        }
    }

    pub fn close() -> Self {
        Reply {
            action: Action::Close,
            ..Reply::raw(200, "text/plain", "")
        }
    }

    pub fn with_header(mut self, name: &'static str, value: impl Into<String>) -> Self {
        self.headers.push((name, value.into()));
        self
    }

    pub fn after(mut self, delay: std::time::Duration) -> Self {
        self.delay = Some(delay);
        self
    }

    pub fn raw(status: u16, content_type: &'static str, body: impl Into<Bytes>) -> Self {
        Reply {
            status: StatusCode::from_u16(status).unwrap(),
            content_type,
            body: body.into(),
            headers: Vec::new(),
            delay: None,
            action: Action::Respond,
        }
    }
}

/// One token request as the endpoint received it.
#[derive(Clone, Debug)]
pub struct Seen {
    pub method: http::Method,
    pub path: String,
    pub content_type: Option<String>,
    pub authorization: Option<String>,
    pub body: Bytes,
    /// When it arrived.
    pub at: std::time::Instant,
}

type Script = Box<dyn FnMut(usize, &Seen) -> Reply + Send>;

struct State {
    posts: AtomicUsize,
    /// Token requests being answered now, and the most ever at once.
    in_flight: AtomicUsize,
    max_in_flight: AtomicUsize,
    seen: Mutex<Vec<Seen>>,
    script: Mutex<Script>,
}

/// The running endpoint. It lives as long as the test's runtime.
#[derive(Clone)]
pub struct TokenServer {
    pub addr: SocketAddr,
    state: Arc<State>,
}

impl TokenServer {
    /// Starts an endpoint whose n-th request (from 1) is answered by `script(n)`.
    pub async fn start(mut script: impl FnMut(usize) -> Reply + Send + 'static) -> Self {
        Self::start_seeing(move |n, _| script(n)).await
    }

    /// Starts an endpoint whose n-th request (from 1) is answered by `script(n, seen)`.
    pub async fn start_seeing(script: impl FnMut(usize, &Seen) -> Reply + Send + 'static) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let state = Arc::new(State {
            posts: AtomicUsize::new(0),
            in_flight: AtomicUsize::new(0),
            max_in_flight: AtomicUsize::new(0),
            seen: Mutex::new(Vec::new()),
            script: Mutex::new(Box::new(script)),
        });
        let server_state = state.clone();
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                let state = server_state.clone();
                tokio::spawn(async move {
                    let service = service_fn(move |req| answer(state.clone(), req));
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        TokenServer { addr, state }
    }

    /// An endpoint that hands out `tok-1`, `tok-2`, … valid for `expires_in` seconds.
    pub async fn counting(expires_in: i64) -> Self {
        Self::start(move |n| Reply::token(&format!("tok-{n}"), expires_in)).await
    }

    pub fn url(&self) -> String {
        format!("http://{}/api/v1/generateToken", self.addr)
    }

    pub fn posts(&self) -> usize {
        self.state.posts.load(Ordering::SeqCst)
    }

    pub fn seen(&self) -> Vec<Seen> {
        self.state.seen.lock().unwrap().clone()
    }

    /// The most token requests this endpoint was answering at one moment.
    pub fn max_in_flight(&self) -> usize {
        self.state.max_in_flight.load(Ordering::SeqCst)
    }
}

/// Counts a token request as in flight from its arrival until its answer is ready
/// (or its connection is closed without one).
struct InFlight(Arc<State>);

impl InFlight {
    fn enter(state: &Arc<State>) -> Self {
        let now = state.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
        state.max_in_flight.fetch_max(now, Ordering::SeqCst);
        InFlight(state.clone())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::SeqCst);
    }
}

async fn answer(
    state: Arc<State>,
    req: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, std::io::Error> {
    let _in_flight = InFlight::enter(&state);
    let (parts, body) = req.into_parts();
    let body = body
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    let n = state.posts.fetch_add(1, Ordering::SeqCst) + 1;
    let seen = Seen {
        method: parts.method,
        path: parts.uri.path().to_owned(),
        content_type: parts
            .headers
            .get(http::header::CONTENT_TYPE)
            .map(|v| v.to_str().unwrap_or_default().to_owned()),
        authorization: parts
            .headers
            .get(http::header::AUTHORIZATION)
            .map(|v| v.to_str().unwrap_or_default().to_owned()),
        body,
        at: std::time::Instant::now(),
    };
    let reply = (state.script.lock().unwrap())(n, &seen);
    state.seen.lock().unwrap().push(seen);
    if let Some(delay) = reply.delay {
        tokio::time::sleep(delay).await;
    }
    match reply.action {
        Action::Respond => {}
        Action::Hang => std::future::pending::<()>().await,
        Action::Close => {
            return Err(std::io::Error::new(
                std::io::ErrorKind::ConnectionAborted,
                "closing without an answer",
            ))
        }
    }
    let mut response = Response::new(Full::new(reply.body));
    for (name, value) in reply.headers {
        response
            .headers_mut()
            .insert(name, http::HeaderValue::from_str(&value).unwrap());
    }
    *response.status_mut() = reply.status;
    response.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static(reply.content_type),
    );
    Ok(response)
}

/// An endpoint that rotates the refresh token on every call, as some providers do:
/// the n-th call must send the refresh token the (n-1)-th handed out (the first,
/// [`REFRESH_TOKEN`]); it answers `tok-n` and `rt-n`, and refuses a spent refresh
/// token with `400 invalid_grant`.
pub async fn rotating_endpoint(expires_in: i64) -> TokenServer {
    rotating_endpoint_slow(expires_in, std::time::Duration::ZERO).await
}

/// [`rotating_endpoint`] taking `delay` to answer each call.
pub async fn rotating_endpoint_slow(expires_in: i64, delay: std::time::Duration) -> TokenServer {
    let mut current = REFRESH_TOKEN.to_owned();
    let mut issued = 0;
    TokenServer::start_seeing(move |_, seen| {
        if sent_refresh_token(seen).as_deref() != Some(current.as_str()) {
            return Reply::json(400, r#"{"error":"invalid_grant"}"#);
        }
        issued += 1;
        current = format!("rt-{issued}");
        Reply::json(
            200,
            &format!(
                r#"{{"access_token":"tok-{issued}","refresh_token":"{current}","expires_in":{expires_in},"token_type":"Bearer"}}"#
            ),
        )
        .after(delay)
    })
    .await
}

/// The refresh token a token request sent, JSON or form-encoded.
pub fn sent_refresh_token(seen: &Seen) -> Option<String> {
    match serde_json::from_slice::<serde_json::Value>(&seen.body) {
        Ok(json) => json["refresh_token"].as_str().map(str::to_owned),
        Err(_) => serde_urlencoded::from_bytes::<Vec<(String, String)>>(&seen.body)
            .ok()?
            .into_iter()
            .find_map(|(name, value)| (name == "refresh_token").then_some(value)),
    }
}

/// The refresh tokens the endpoint was sent, in order.
pub fn sent_refresh_tokens(server: &TokenServer) -> Vec<String> {
    server
        .seen()
        .iter()
        .map(|seen| sent_refresh_token(seen).unwrap_or_default())
        .collect()
}

/// The bound on any wait in a test that should end: a regression fails the test
/// instead of hanging it.
pub const WAIT_LIMIT: std::time::Duration = std::time::Duration::from_secs(60);

/// `future`'s output, or a panic if it takes longer than [`WAIT_LIMIT`].
pub async fn within<F: std::future::Future>(future: F) -> F::Output {
    tokio::time::timeout(WAIT_LIMIT, future)
        .await
        .expect("a wait that should end did not end within the limit")
}

/// A 127.0.0.1 address where nothing listens, for as long as the returned socket
/// lives: it is bound, so no other socket can take the port, but not listening, so
/// connections to it are refused. (A port that was free a moment ago may have been
/// taken by another test since.)
pub fn refusing_address() -> (tokio::net::TcpSocket, SocketAddr) {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let addr = socket.local_addr().unwrap();
    (socket, addr)
}

/// The longest back-off the layer waits after its `attempt`-th failed token request
/// (200 ms doubled per attempt, at most 5 s). A refresh gives up only when the next
/// back-off would end past its deadline: it ends no earlier than its deadline less
/// this, with `attempt` the number of requests it made.
pub fn longest_backoff(attempt: usize) -> std::time::Duration {
    let doubled = 1u32 << attempt.saturating_sub(1).min(16);
    (std::time::Duration::from_millis(200) * doubled).min(std::time::Duration::from_secs(5))
}

/// A GET of the inventory listing, with an empty body.
pub fn get() -> Request<http_body_util::Empty<Bytes>> {
    Request::get("https://acme.myeshopbox.com/api/v2/inventoryListing")
        .body(http_body_util::Empty::new())
        .unwrap()
}

/// Credentials matching the constants above.
pub fn credentials() -> eshopbox_auth::Credentials {
    eshopbox_auth::Credentials::new(CLIENT_ID, CLIENT_SECRET, REFRESH_TOKEN)
}

/// Asserts that `text` contains none of the secrets, nor any of `tokens`.
pub fn assert_no_secret(text: &str, tokens: &[&str]) {
    for secret in [CLIENT_SECRET, REFRESH_TOKEN].iter().chain(tokens) {
        assert!(!text.contains(secret), "{text:?} leaks {secret:?}");
    }
}

/// Display and Debug of an error and of every source below it.
pub fn full_report(err: &tower::BoxError) -> String {
    let mut text = format!("{err} | {err:?}");
    let mut source = err.source();
    while let Some(s) = source {
        text.push_str(&format!(" | {s} | {s:?}"));
        source = s.source();
    }
    text
}

/// An inner service that answers 200 at once, for measuring the layer alone.
#[derive(Clone, Copy, Debug)]
pub struct Noop;

impl<B> tower::Service<Request<B>> for Noop {
    type Response = Response<()>;
    type Error = std::convert::Infallible;
    type Future = std::future::Ready<Result<Response<()>, std::convert::Infallible>>;
    fn poll_ready(
        &mut self,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        std::task::Poll::Ready(Ok(()))
    }
    fn call(&mut self, _: Request<B>) -> Self::Future {
        std::future::ready(Ok(Response::new(())))
    }
}

/// An API stand-in: answers 200 with the `Authorization` header it received as the
/// body, or 401 when that header is `refused`; counts its calls.
#[derive(Clone, Debug, Default)]
pub struct EchoApi {
    refused: &'static str,
    calls: Arc<AtomicUsize>,
}

impl EchoApi {
    /// Answers 401 to requests carrying exactly `refused` ("" refuses nothing sent).
    pub fn refusing(refused: &'static str) -> Self {
        EchoApi {
            refused,
            calls: Arc::default(),
        }
    }

    /// Requests received.
    pub fn calls(&self) -> usize {
        self.calls.load(Ordering::SeqCst)
    }
}

impl tower::Service<Request<http_body_util::Empty<Bytes>>> for EchoApi {
    type Response = Response<String>;
    type Error = std::convert::Infallible;
    type Future = std::future::Ready<Result<Response<String>, Self::Error>>;

    fn poll_ready(
        &mut self,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<http_body_util::Empty<Bytes>>) -> Self::Future {
        self.calls.fetch_add(1, Ordering::SeqCst);
        let auth = req
            .headers()
            .get(http::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_owned();
        let mut res = Response::new(auth.clone());
        if !auth.is_empty() && auth == self.refused {
            *res.status_mut() = StatusCode::UNAUTHORIZED;
        }
        std::future::ready(Ok(res))
    }
}
