//! The layer's behaviour through its public API: a scripted token source
//! (`with_source`), tower-test mocks and echo services, and paused time. The
//! network-facing parts are tested in the other files of `tests/`.

mod support;

use std::collections::VecDeque;
use std::convert::Infallible;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use eshopbox_auth::source::{source_fn, BoxFuture, FetchedToken, TokenSource};
use eshopbox_auth::{
    CloneBodies, EmptyBodies, Error, ErrorKind, EshopboxAuthBuilder, EshopboxAuthLayer,
    ReplayPolicy, TokenHandle,
};
use http::{HeaderValue, Request, Response, StatusCode};
use http_body_util::{BodyExt, Empty, Full};
use tokio::sync::{watch, Semaphore};
use tokio::time::Instant;
use tokio_test::{assert_pending, assert_ready};
use tower::{service_fn, BoxError, Layer, Service, ServiceExt};

use support::{get, within};

const DAY: Duration = Duration::from_secs(86400);

/// A token source that hands out `tok-1`, `tok-2`, … and can be held at a gate or told
/// to fail.
#[derive(Clone)]
struct Script {
    state: Arc<ScriptState>,
}

struct ScriptState {
    calls: watch::Sender<usize>,
    /// When each fetch started.
    times: Mutex<Vec<Instant>>,
    lifetime: Duration,
    failures: Mutex<VecDeque<Error>>,
    gate: Option<Semaphore>,
}

impl Script {
    fn new(lifetime: Duration) -> Self {
        Self::build(lifetime, None)
    }

    /// Each fetch waits for a permit from [`Script::release`].
    fn gated(lifetime: Duration) -> Self {
        Self::build(lifetime, Some(Semaphore::new(0)))
    }

    fn build(lifetime: Duration, gate: Option<Semaphore>) -> Self {
        Script {
            state: Arc::new(ScriptState {
                calls: watch::channel(0).0,
                times: Mutex::new(Vec::new()),
                lifetime,
                failures: Mutex::new(VecDeque::new()),
                gate,
            }),
        }
    }

    fn calls(&self) -> usize {
        *self.state.calls.borrow()
    }

    /// Waits (bounded) until at least `n` fetches have started.
    async fn wait_calls(&self, n: usize) {
        let mut rx = self.state.calls.subscribe();
        within(rx.wait_for(|c| *c >= n)).await.unwrap();
    }

    fn release(&self, n: usize) {
        if let Some(gate) = &self.state.gate {
            gate.add_permits(n);
        }
    }

    /// When each fetch started.
    fn times(&self) -> Vec<Instant> {
        self.state.times.lock().unwrap().clone()
    }

    /// The gaps between consecutive fetches.
    fn gaps(&self) -> Vec<Duration> {
        self.times().windows(2).map(|w| w[1] - w[0]).collect()
    }

    fn fail_next(&self, error: Error) {
        self.state.failures.lock().unwrap().push_back(error);
    }

    /// The builder every test starts from: a 5 min margin, 30 s timeout, 2 s cooldown.
    fn builder(&self) -> EshopboxAuthBuilder {
        EshopboxAuthLayer::with_source(self.clone())
            .refresh_margin(Duration::from_secs(300))
            .token_timeout(Duration::from_secs(30))
            .failure_cooldown(Duration::from_secs(2))
    }

    fn layer(&self) -> EshopboxAuthLayer {
        self.builder().build().unwrap()
    }
}

impl TokenSource for Script {
    fn fetch(&self) -> BoxFuture<'_, Result<FetchedToken, Error>> {
        let state = self.state.clone();
        Box::pin(async move {
            let mut n = 0;
            state.times.lock().unwrap().push(Instant::now());
            state.calls.send_modify(|c| {
                *c += 1;
                n = *c;
            });
            if let Some(gate) = &state.gate {
                gate.acquire().await.unwrap().forget();
            }
            if let Some(error) = state.failures.lock().unwrap().pop_front() {
                return Err(error);
            }
            Ok(FetchedToken::new(format!("tok-{n}")).expires_in(state.lifetime))
        })
    }
}

/// An inner service that answers 200 with the Authorization header it received as
/// body, or 401 when that header is in `rejected`; it counts its calls.
#[derive(Clone)]
struct Api {
    rejected: Arc<Mutex<Vec<String>>>,
    /// When set, requests carrying a rejected token are held until this many arrived.
    hold_rejected: Option<Arc<tokio::sync::Barrier>>,
    calls: Arc<AtomicUsize>,
    bodies: Arc<Mutex<Vec<Bytes>>>,
}

impl Api {
    fn new() -> Self {
        Api {
            rejected: Arc::default(),
            hold_rejected: None,
            calls: Arc::default(),
            bodies: Arc::default(),
        }
    }

    fn reject(&self, header: &str) {
        self.rejected.lock().unwrap().push(header.to_owned());
    }

    fn calls(&self) -> usize {
        self.calls.load(Ordering::SeqCst)
    }

    fn service<B>(
        &self,
    ) -> impl Service<
        Request<B>,
        Response = Response<String>,
        Error = Infallible,
        Future = impl Send + 'static,
    > + Clone
           + Send
           + 'static
    where
        B: http_body::Body + Send + 'static,
        B::Data: Send,
        B::Error: std::fmt::Debug,
    {
        let api = self.clone();
        service_fn(move |req: Request<B>| {
            let api = api.clone();
            async move {
                api.calls.fetch_add(1, Ordering::SeqCst);
                let auth = req
                    .headers()
                    .get(http::header::AUTHORIZATION)
                    .map(|v| v.to_str().unwrap().to_owned())
                    .unwrap_or_default();
                let body = req.into_body().collect().await.unwrap().to_bytes();
                api.bodies.lock().unwrap().push(body);
                let rejected = api.rejected.lock().unwrap().contains(&auth);
                let status = if rejected {
                    if let Some(barrier) = &api.hold_rejected {
                        barrier.wait().await;
                    }
                    StatusCode::UNAUTHORIZED
                } else {
                    StatusCode::OK
                };
                let mut response = Response::new(auth);
                *response.status_mut() = status;
                Ok::<_, Infallible>(response)
            }
        })
    }
}

fn post(body: &'static str) -> Request<Full<Bytes>> {
    Request::post("https://acme.myeshopbox.com/api/v1/orders")
        .body(Full::new(Bytes::from_static(body.as_bytes())))
        .unwrap()
}

async fn send<S, B, R>(svc: &mut S, req: Request<B>) -> Result<Response<R>, BoxError>
where
    S: Service<Request<B>, Response = Response<R>, Error = BoxError>,
{
    svc.ready().await?.call(req).await
}

/// [`send`] for a service moved into a spawned task.
async fn send_owned<S, B, R>(mut svc: S, req: Request<B>) -> Result<Response<R>, BoxError>
where
    S: Service<Request<B>, Response = Response<R>, Error = BoxError>,
{
    send(&mut svc, req).await
}

fn error_kind(err: &BoxError) -> ErrorKind {
    err.downcast_ref::<Error>()
        .unwrap_or_else(|| panic!("not an eshopbox_auth::Error: {err}"))
        .kind()
}

fn unauthorized() -> Response<()> {
    let mut res = Response::new(());
    *res.status_mut() = StatusCode::UNAUTHORIZED;
    res
}

/// Lets the paused clock run on by `by` (firing every timer on the way, in order),
/// then lets the tasks the last timers woke run.
async fn pass(by: Duration) {
    tokio::time::sleep(by).await;
    for _ in 0..4 {
        tokio::task::yield_now().await;
    }
}

/// Waits (bounded) until the handle's token has at least this generation.
async fn generation(handle: &TokenHandle, n: u64) {
    let mut changes = handle.subscribe();
    within(changes.wait_for(|info| info.is_some_and(|i| i.generation >= n)))
        .await
        .unwrap();
}

/// Lets spawned tasks run until `done` holds; fails after a bounded number of turns.
async fn until(mut done: impl FnMut() -> bool) {
    for _ in 0..10_000 {
        if done() {
            return;
        }
        tokio::task::yield_now().await;
    }
    panic!("the condition never held");
}

fn down() -> Error {
    Error::unavailable("endpoint down").with_status(StatusCode::SERVICE_UNAVAILABLE, None)
}

// Header ---------------------------------------------------------------------------

#[tokio::test(start_paused = true)]
async fn header_replaces_any_authorization_and_is_sensitive() {
    let script = Script::new(DAY);
    let (mock, mut handle) = tower_test::mock::pair::<Request<Empty<Bytes>>, Response<()>>();
    let svc = script.layer().layer(mock);

    let mut req = get();
    req.headers_mut()
        .insert("authorization", HeaderValue::from_static("Basic old"));
    let fut = tokio::spawn(send_owned(svc.clone(), req));
    let (seen, reply) = within(handle.next_request()).await.unwrap();
    let values: Vec<_> = seen.headers().get_all("authorization").iter().collect();
    assert_eq!(values, ["Bearer tok-1"]);
    assert!(values[0].is_sensitive());
    reply.send_response(Response::new(()));
    fut.await.unwrap().unwrap();

    // The second request reuses the header built for the token.
    let fut = tokio::spawn(send_owned(svc.clone(), get()));
    let (seen, reply) = within(handle.next_request()).await.unwrap();
    assert_eq!(seen.headers()["authorization"], "Bearer tok-1");
    reply.send_response(Response::new(()));
    fut.await.unwrap().unwrap();
    assert_eq!(script.calls(), 1);
}

// Lock-free read: a warm token makes no token call ----------------------------------

#[tokio::test(start_paused = true)]
async fn warm_token_is_read_without_token_calls() {
    let script = Script::new(DAY);
    let api = Api::new();
    let mut svc = script.layer().layer(api.service());
    send(&mut svc, get()).await.unwrap();

    for _ in 0..500 {
        let res = send(&mut svc, get()).await.unwrap();
        assert_eq!(res.body(), "Bearer tok-1");
    }
    assert_eq!(script.calls(), 1);
    assert_eq!(api.calls(), 501);
}

// Single flight --------------------------------------------------------------------

#[tokio::test(start_paused = true)]
async fn a_thousand_cold_requests_make_one_token_call() {
    let script = Script::gated(DAY);
    let api = Api::new();
    let svc = script.layer().layer(api.service());

    let tasks: Vec<_> = (0..1000)
        .map(|_| tokio::spawn(send_owned(svc.clone(), get())))
        .collect();
    script.wait_calls(1).await;
    script.release(1);
    for task in tasks {
        let res = task.await.unwrap().unwrap();
        assert_eq!(res.body(), "Bearer tok-1");
    }
    assert_eq!(script.calls(), 1);
    assert_eq!(api.calls(), 1000);
}

#[tokio::test(start_paused = true)]
async fn services_from_clones_of_one_layer_share_the_token() {
    let script = Script::new(DAY);
    let layer = script.layer();
    let api = Api::new();
    let mut a = layer.clone().layer(api.service());
    let mut b = layer.layer(api.service());
    send(&mut a, get()).await.unwrap();
    let res = send(&mut b, get()).await.unwrap();
    assert_eq!(res.body(), "Bearer tok-1");
    assert_eq!(script.calls(), 1);
}

// Cancellation-safe ----------------------------------------------------------------

#[tokio::test(start_paused = true)]
async fn dropping_every_waiter_does_not_abort_the_refresh() {
    let script = Script::gated(DAY);
    let api = Api::new();
    let layer = script.layer();
    let handle = layer.handle();
    let svc = layer.layer(api.service());

    let waiters: Vec<_> = (0..10)
        .map(|_| tokio::spawn(send_owned(svc.clone(), get())))
        .collect();
    script.wait_calls(1).await;
    for waiter in &waiters {
        waiter.abort();
    }
    for waiter in waiters {
        assert!(waiter.await.unwrap_err().is_cancelled());
    }
    // The refresh was started by requests that are gone; it still finishes.
    script.release(1);
    generation(&handle, 1).await;

    let mut svc = svc;
    let res = send(&mut svc, get()).await.unwrap();
    assert_eq!(res.body(), "Bearer tok-1");
    assert_eq!(script.calls(), 1);
    assert_eq!(api.calls(), 1);
}

// Before expiry --------------------------------------------------------------------

#[tokio::test(start_paused = true)]
async fn short_token_is_refreshed_after_half_its_life_not_on_every_request() {
    let script = Script::new(Duration::from_secs(2));
    let api = Api::new();
    let layer = script.layer();
    let handle = layer.handle();
    let mut svc = layer.layer(api.service());
    send(&mut svc, get()).await.unwrap();

    // The 5 min margin is capped at half of the 2 s lifetime.
    pass(Duration::from_millis(999)).await;
    for _ in 0..10 {
        send(&mut svc, get()).await.unwrap();
    }
    assert_eq!(script.calls(), 1);

    // Past half-life plus the largest jitter, one request starts one refresh.
    pass(Duration::from_millis(150)).await;
    for _ in 0..10 {
        send(&mut svc, get()).await.unwrap();
    }
    generation(&handle, 2).await;
    assert_eq!(script.calls(), 2);
    let res = send(&mut svc, get()).await.unwrap();
    assert_eq!(res.body(), "Bearer tok-2");
}

#[tokio::test(start_paused = true)]
async fn early_refresh_runs_in_background_while_requests_use_the_old_token() {
    let script = Script::gated(Duration::from_secs(3600));
    let api = Api::new();
    let layer = script.layer();
    let handle = layer.handle();
    let mut svc = layer.layer(api.service());
    script.release(1);
    send(&mut svc, get()).await.unwrap();

    // Into the soft window (margin 300 s, jitter ≤ 30 s).
    pass(Duration::from_secs(3600 - 200)).await;
    // The refresh is held at the gate, yet every request, including the one that
    // noticed, completes at once with the old token.
    for _ in 0..20 {
        let mut fut = tokio_test::task::spawn(send(&mut svc, get()));
        let res = assert_ready!(fut.poll()).unwrap();
        assert_eq!(res.body(), "Bearer tok-1");
    }
    script.wait_calls(2).await;
    assert_eq!(script.calls(), 2, "exactly one background refresh");

    script.release(1);
    generation(&handle, 2).await;
    let res = send(&mut svc, get()).await.unwrap();
    assert_eq!(res.body(), "Bearer tok-2");
}

#[tokio::test(start_paused = true)]
async fn failed_early_refresh_keeps_the_valid_token_and_backs_off() {
    let script = Script::new(Duration::from_secs(3600));
    let api = Api::new();
    let layer = script.layer();
    let handle = layer.handle();
    let mut svc = layer.layer(api.service());
    send(&mut svc, get()).await.unwrap();

    script.fail_next(Error::rejected("refused"));
    pass(Duration::from_secs(3600 - 200)).await;
    let res = send(&mut svc, get()).await.unwrap();
    assert_eq!(res.body(), "Bearer tok-1");
    until(|| handle.stats().failures_rejected == 1).await;
    assert_eq!(script.calls(), 2);

    // The failure left tok-1 in place, and the next attempt is not made at once.
    for _ in 0..10 {
        let res = send(&mut svc, get()).await.unwrap();
        assert_eq!(res.body(), "Bearer tok-1");
    }
    assert_eq!(script.calls(), 2);
    // Nor just before the back-off (half the remaining 200 s, capped at 30 s) ends.
    pass(Duration::from_millis(29_900)).await;
    send(&mut svc, get()).await.unwrap();
    pass(Duration::ZERO).await;
    assert_eq!(script.calls(), 2);

    // After it, the next request tries again.
    pass(Duration::from_millis(200)).await;
    send(&mut svc, get()).await.unwrap();
    generation(&handle, 2).await;
    assert_eq!(script.calls(), 3);
    let res = send(&mut svc, get()).await.unwrap();
    assert_eq!(res.body(), "Bearer tok-3");
}

#[tokio::test(start_paused = true)]
async fn expiry_counts_from_when_the_token_request_was_sent() {
    let script = Script::gated(Duration::from_secs(2));
    let api = Api::new();
    let layer = script.layer();
    let handle = layer.handle();
    let mut svc = layer.layer(api.service());

    let mut other = svc.clone();
    let mut first = tokio_test::task::spawn(send(&mut other, get()));
    assert_pending!(first.poll());
    script.wait_calls(1).await;
    // The endpoint takes 500 ms to answer.
    pass(Duration::from_millis(500)).await;
    script.release(1);
    generation(&handle, 1).await;
    assert_eq!(assert_ready!(first.poll()).unwrap().body(), "Bearer tok-1");
    drop(first);

    // 1.5 s after the answer, 2 s after the request was sent: the token has expired,
    // so the next request waits for a new one (held at the gate).
    pass(Duration::from_millis(1500)).await;
    let mut next = tokio_test::task::spawn(send(&mut svc, get()));
    assert_pending!(next.poll());
    script.wait_calls(2).await;
    script.release(1);
    generation(&handle, 2).await;
    assert_eq!(assert_ready!(next.poll()).unwrap().body(), "Bearer tok-2");
}

#[tokio::test(start_paused = true)]
async fn expired_token_makes_requests_wait() {
    let script = Script::gated(Duration::from_secs(60));
    let api = Api::new();
    let layer = script.layer();
    let handle = layer.handle();
    let mut svc = layer.layer(api.service());
    script.release(1);
    send(&mut svc, get()).await.unwrap();

    pass(Duration::from_secs(61)).await;
    let mut clone = svc.clone();
    let mut waiting = tokio_test::task::spawn(send(&mut clone, get()));
    assert_pending!(waiting.poll());
    assert_eq!(api.calls(), 1, "no request went out with the expired token");
    script.release(1);
    generation(&handle, 2).await;
    assert_eq!(
        assert_ready!(waiting.poll()).unwrap().body(),
        "Bearer tok-2"
    );
}

// 401 once -------------------------------------------------------------------------

#[tokio::test(start_paused = true)]
async fn unauthorized_get_is_resent_once_with_a_new_token() {
    let script = Script::new(DAY);
    let api = Api::new();
    api.reject("Bearer tok-1");
    let mut svc = script.layer().layer(api.service());

    let res = send(&mut svc, get()).await.unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    assert_eq!(res.body(), "Bearer tok-2");
    assert_eq!(script.calls(), 2);
    assert_eq!(api.calls(), 2);
}

#[tokio::test(start_paused = true)]
async fn two_hundred_concurrent_401s_cause_one_refresh() {
    let script = Script::gated(DAY);
    let mut api = Api::new();
    api.reject("Bearer tok-1");
    // All 200 first attempts are answered 401 together.
    api.hold_rejected = Some(Arc::new(tokio::sync::Barrier::new(200)));
    let layer = script.layer();
    let handle = layer.handle();
    let svc = layer.layer(api.service());
    // Warm the cell with tok-1 without sending a request.
    script.release(1);
    handle.refresh().await.unwrap();

    let tasks: Vec<_> = (0..200)
        .map(|_| tokio::spawn(send_owned(svc.clone(), get())))
        .collect();
    script.wait_calls(2).await;
    script.release(1);
    for task in tasks {
        let res = task.await.unwrap().unwrap();
        assert_eq!(res.status(), StatusCode::OK);
        assert_eq!(res.body(), "Bearer tok-2");
    }
    assert_eq!(script.calls(), 2, "one refresh for 200 401s");
    assert_eq!(api.calls(), 400);
}

#[tokio::test(start_paused = true)]
async fn late_401s_for_a_replaced_token_do_not_refresh_again() {
    let script = Script::new(DAY);
    let (mock, mut handle) = tower_test::mock::pair::<Request<Empty<Bytes>>, Response<()>>();
    handle.allow(1000);
    let layer = script.layer();
    layer.handle().refresh().await.unwrap();
    let svc = layer.layer(mock);

    let tasks: Vec<_> = (0..50)
        .map(|_| tokio::spawn(send_owned(svc.clone(), get())))
        .collect();
    let mut pending = Vec::new();
    for _ in 0..50 {
        let (req, reply) = within(handle.next_request()).await.unwrap();
        assert_eq!(req.headers()["authorization"], "Bearer tok-1");
        pending.push(reply);
    }
    // The first 401 replaces tok-1 with tok-2 ...
    pending.remove(0).send_response(unauthorized());
    let (req, reply) = within(handle.next_request()).await.unwrap();
    assert_eq!(req.headers()["authorization"], "Bearer tok-2");
    reply.send_response(Response::new(()));
    assert_eq!(script.calls(), 2);
    // ... and the 49 401s that arrive afterwards, for tok-1, leave tok-2 alone.
    for reply in pending {
        reply.send_response(unauthorized());
    }
    for _ in 0..49 {
        let (req, reply) = within(handle.next_request()).await.unwrap();
        assert_eq!(req.headers()["authorization"], "Bearer tok-2");
        reply.send_response(Response::new(()));
    }
    for task in tasks {
        assert_eq!(task.await.unwrap().unwrap().status(), StatusCode::OK);
    }
    assert_eq!(script.calls(), 2);
}

#[tokio::test(start_paused = true)]
async fn body_that_cannot_be_replayed_gets_the_401_and_the_token_is_dropped() {
    let script = Script::new(DAY);
    let api = Api::new();
    api.reject("Bearer tok-1");
    let mut svc = script.layer().layer(api.service());

    let res = send(&mut svc, post(r#"{"sku":"A1"}"#)).await.unwrap();
    assert_eq!(res.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(api.calls(), 1, "not resent");
    // The refused token is gone: the next request fetches tok-2.
    let res = send(&mut svc, post("{}")).await.unwrap();
    assert_eq!(res.body(), "Bearer tok-2");
    assert_eq!(script.calls(), 2);
}

#[tokio::test(start_paused = true)]
async fn clone_policy_replays_a_full_body() {
    let script = Script::new(DAY);
    let api = Api::new();
    api.reject("Bearer tok-1");
    let layer = script.builder().replay_bodies(CloneBodies).build().unwrap();
    let mut svc = layer.layer(api.service());

    let res = send(&mut svc, post(r#"{"sku":"A1"}"#)).await.unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    assert_eq!(res.body(), "Bearer tok-2");
    let bodies = api.bodies.lock().unwrap().clone();
    assert_eq!(bodies, [&br#"{"sku":"A1"}"#[..], &br#"{"sku":"A1"}"#[..]]);
}

#[tokio::test(start_paused = true)]
async fn retry_off_returns_the_401_and_drops_the_token() {
    let script = Script::new(DAY);
    let api = Api::new();
    api.reject("Bearer tok-1");
    let layer = script
        .builder()
        .retry_on_unauthorized(false)
        .replay_bodies(EmptyBodies)
        .build()
        .unwrap();
    let mut svc = layer.layer(api.service());

    let res = send(&mut svc, get()).await.unwrap();
    assert_eq!(res.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(api.calls(), 1);
    let res = send(&mut svc, get()).await.unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    assert_eq!(res.body(), "Bearer tok-2");
}

/// With retry off, a response future names the token cell by a key, not by an
/// `Arc`: it does not keep the cell alive, and a 401 that arrives after the layer, its
/// services and handles are gone is handed out as it is (no token left to drop).
#[tokio::test(start_paused = true)]
async fn with_retry_off_a_pending_response_future_does_not_keep_the_token_alive() {
    let script = Script::new(DAY);
    let (answer, answered) = tokio::sync::oneshot::channel::<Response<()>>();
    let answered = Arc::new(Mutex::new(Some(answered)));
    let inner = service_fn(move |_: Request<Empty<Bytes>>| {
        let answered = answered.lock().unwrap().take();
        async move {
            let answer = answered.expect("one call").await.expect("an answer");
            Ok::<_, Infallible>(answer)
        }
    });
    let layer = script
        .builder()
        .retry_on_unauthorized(false)
        .build()
        .unwrap();
    let handle = layer.handle();
    handle.get().await.unwrap();
    let mut changes = handle.subscribe();
    let mut svc = layer.layer(inner);

    let mut future = tokio_test::task::spawn(svc.ready().await.unwrap().call(get()));
    assert_pending!(future.poll());
    drop((svc, layer, handle));
    // Every owner of the cell is gone: its change channel closes.
    assert!(within(changes.changed()).await.is_err());

    answer.send(unauthorized()).unwrap();
    let res = within(future).await.unwrap();
    assert_eq!(res.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(script.calls(), 1);
}

/// The copy kept for a resend holds the token cell: a request sent through the last
/// service of its layer (`oneshot` drops the service once it has called it) is still
/// resent with a new token after a 401.
#[tokio::test(start_paused = true)]
async fn a_request_sent_through_the_last_service_of_its_layer_is_still_resent_after_a_401() {
    let script = Script::new(DAY);
    let api = Api::new();
    api.reject("Bearer tok-1");
    let layer = script.layer();
    layer.handle().get().await.unwrap();
    let svc = layer.layer(api.service());
    drop(layer);

    let res = within(svc.oneshot(get())).await.unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    assert_eq!(res.body(), "Bearer tok-2");
    assert_eq!(api.calls(), 2);
    assert_eq!(script.calls(), 2);
}

#[tokio::test(start_paused = true)]
async fn second_401_is_returned_and_does_not_drop_the_new_token() {
    use eshopbox_auth::secrecy::ExposeSecret;
    let script = Script::new(DAY);
    let api = Api::new();
    api.reject("Bearer tok-1");
    api.reject("Bearer tok-2");
    let layer = script.layer();
    let handle = layer.handle();
    let mut svc = layer.layer(api.service());

    let res = send(&mut svc, get()).await.unwrap();
    assert_eq!(res.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(
        res.body(),
        "Bearer tok-2",
        "the answer to the resent request"
    );
    assert_eq!(api.calls(), 2, "resent exactly once");
    assert_eq!(script.calls(), 2);
    // tok-2 was not invalidated by the second 401: it is still the current token.
    let token = handle.token().expect("tok-2 is still current");
    assert_eq!(token.secret().expose_secret(), "tok-2");
    assert_eq!(handle.stats().invalidations, 1);
    assert_eq!(script.calls(), 2);
}

#[tokio::test(start_paused = true)]
async fn an_api_refusing_every_token_costs_one_token_call_per_cooldown() {
    // A missing permission, say: every request is answered 401, whatever its token.
    let script = Script::new(DAY);
    let inner = service_fn(|_: Request<Empty<Bytes>>| async {
        let mut res = Response::new(());
        *res.status_mut() = StatusCode::UNAUTHORIZED;
        Ok::<_, Infallible>(res)
    });
    let layer = script.layer();
    let mut svc = layer.layer(inner);
    for _ in 0..10 {
        let res = send(&mut svc, get()).await.unwrap();
        assert_eq!(res.status(), StatusCode::UNAUTHORIZED);
    }
    // The first request's refresh came at once; every later one waited out the 2 s
    // cooldown since the one before.
    assert_eq!(script.calls(), 11);
    let gaps = script.gaps();
    assert_eq!(gaps[0], Duration::ZERO);
    for gap in &gaps[1..] {
        assert_eq!(*gap, Duration::from_secs(2), "{gaps:?}");
    }
    // Each request was resent once; the resend's 401 kept its new token.
    assert_eq!(layer.handle().stats().resends, 10);
    assert_eq!(layer.handle().stats().invalidations, 10);
}

// The background refresher, woken by the invalidation, is spaced the same way: with
// retry off every 401 invalidates the token, and the refresher would otherwise call
// at once each time.
#[tokio::test(start_paused = true)]
async fn with_background_refresh_an_api_refusing_every_token_costs_one_call_per_cooldown() {
    let script = Script::new(DAY);
    let inner = service_fn(|_: Request<Empty<Bytes>>| async {
        let mut res = Response::new(());
        *res.status_mut() = StatusCode::UNAUTHORIZED;
        Ok::<_, Infallible>(res)
    });
    let layer = script
        .builder()
        .background_refresh(true)
        .retry_on_unauthorized(false)
        .build()
        .unwrap();
    let mut svc = layer.layer(inner);
    // 20 s of requests, one every 10 ms (each waits for the refresh its 401 caused).
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(20) {
        let res = send(&mut svc, get()).await.unwrap();
        assert_eq!(res.status(), StatusCode::UNAUTHORIZED);
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // The first token, one at once after the first 401, then one per 2 s.
    let gaps = script.gaps();
    assert!(script.calls() <= 12, "{} calls: {gaps:?}", script.calls());
    for gap in &gaps[2..] {
        assert!(*gap >= Duration::from_secs(2), "{gaps:?}");
    }
}

#[tokio::test(start_paused = true)]
async fn a_closure_policy_decides_which_bodies_are_replayed() {
    let script = Script::new(DAY);
    let api = Api::new();
    api.reject("Bearer tok-1");
    let small_only = |body: &Full<Bytes>| {
        use http_body::Body;
        (body.size_hint().exact() < Some(8)).then(|| body.clone())
    };
    assert!(
        ReplayPolicy::prepare(&small_only, Full::new(Bytes::from_static(b"x")))
            .1
            .is_some()
    );
    let layer = script.builder().replay_bodies(small_only).build().unwrap();
    let mut svc = layer.layer(api.service());
    let res = send(&mut svc, post("{}")).await.unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    api.reject("Bearer tok-2");
    let res = send(&mut svc, post("a long body")).await.unwrap();
    assert_eq!(res.status(), StatusCode::UNAUTHORIZED);
}

#[tokio::test(start_paused = true)]
async fn a_custom_classifier_decides_what_counts_as_unauthorized() {
    let script = Script::new(DAY);
    // This API answers 200 with "expired" in the body's place: a header says it.
    let expired = |res: &Response<String>| res.headers().contains_key("x-token-expired");
    let layer = script.builder().unauthorized_when(expired).build().unwrap();
    let api = service_fn(|req: Request<Empty<Bytes>>| async move {
        let auth = req.headers()["authorization"].to_str().unwrap().to_owned();
        let mut res = Response::new(auth.clone());
        if auth == "Bearer tok-1" {
            res.headers_mut()
                .insert("x-token-expired", HeaderValue::from_static("1"));
        }
        Ok::<_, Infallible>(res)
    });
    let mut svc = layer.layer(api);
    let res = send(&mut svc, get()).await.unwrap();
    assert_eq!(res.body(), "Bearer tok-2");
    assert_eq!(script.calls(), 2);
}

// poll_ready contract (tower-test's Mock panics on an unready clone) ------------------

#[tokio::test(start_paused = true)]
async fn waiting_first_call_uses_the_service_that_was_polled_ready() {
    let script = Script::gated(DAY);
    let (mock, mut handle) = tower_test::mock::pair::<Request<Empty<Bytes>>, Response<()>>();
    let layer = script.layer();
    let tokens = layer.handle();
    let mut svc = layer.layer(mock);

    handle.allow(1);
    svc.ready().await.unwrap();
    let mut call = tokio_test::task::spawn(svc.call(get()));
    assert_pending!(call.poll());
    script.wait_calls(1).await;
    script.release(1);
    generation(&tokens, 1).await;
    assert_pending!(call.poll());
    let (req, reply) = within(handle.next_request()).await.unwrap();
    assert_eq!(req.headers()["authorization"], "Bearer tok-1");
    reply.send_response(Response::new(()));
    assert_ready!(call.poll()).unwrap();

    // The service left behind is a fresh clone that must be polled ready again.
    handle.allow(1);
    svc.ready().await.unwrap();
    let call = svc.call(get());
    let (_, reply) = within(handle.next_request()).await.unwrap();
    reply.send_response(Response::new(()));
    call.await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn resend_polls_the_inner_service_ready_again() {
    let script = Script::new(DAY);
    let (mock, mut handle) = tower_test::mock::pair::<Request<Empty<Bytes>>, Response<()>>();
    let layer = script.layer();
    let tokens = layer.handle();
    tokens.refresh().await.unwrap();
    let mut svc = layer.layer(mock);

    handle.allow(1);
    svc.ready().await.unwrap();
    let mut call = tokio_test::task::spawn(svc.call(get()));
    assert_pending!(call.poll());
    let (req, reply) = within(handle.next_request()).await.unwrap();
    assert_eq!(req.headers()["authorization"], "Bearer tok-1");
    reply.send_response(unauthorized());

    // The 401 dropped tok-1; the resend waits for tok-2 ...
    assert_pending!(call.poll());
    generation(&tokens, 2).await;
    // ... and then for the inner service to be ready again.
    assert_pending!(call.poll());
    assert!(handle.poll_request().is_pending());
    handle.allow(1);
    assert!(call.is_woken());
    assert_pending!(call.poll());
    let (req, reply) = within(handle.next_request()).await.unwrap();
    assert_eq!(req.headers()["authorization"], "Bearer tok-2");
    reply.send_response(Response::new(()));
    let res = assert_ready!(call.poll()).unwrap();
    assert_eq!(res.status(), StatusCode::OK);
}

#[tokio::test(start_paused = true)]
async fn inner_errors_pass_through_boxed() {
    let script = Script::new(DAY);
    let (mock, mut handle) = tower_test::mock::pair::<Request<Empty<Bytes>>, Response<()>>();
    let svc = script.layer().layer(mock);
    handle.allow(1);
    let call = tokio::spawn(send_owned(svc.clone(), get()));
    let (_, reply) = within(handle.next_request()).await.unwrap();
    reply.send_error("connection reset by peer");
    let err = call.await.unwrap().unwrap_err();
    assert!(err.downcast_ref::<Error>().is_none());
    assert_eq!(err.to_string(), "connection reset by peer");
}

#[tokio::test(start_paused = true)]
async fn a_response_future_polled_after_a_token_failure_errs_instead_of_panicking() {
    let script = Script::new(DAY);
    script.fail_next(Error::rejected("refused"));
    let api = Api::new();
    let mut svc = script.layer().layer(api.service());
    let mut call = tokio_test::task::spawn(svc.ready().await.unwrap().call(get()));
    let err = within(&mut call).await.unwrap_err();
    assert_eq!(error_kind(&err), ErrorKind::Rejected);
    let again = assert_ready!(call.poll()).unwrap_err();
    assert!(
        again.to_string().contains("polled after completion"),
        "{again}"
    );
    assert_eq!(api.calls(), 0);
}

// Errors, not panics ---------------------------------------------------------------

#[tokio::test(start_paused = true)]
async fn token_failure_fails_every_waiter_with_the_typed_error() {
    let script = Script::gated(DAY);
    let api = Api::new();
    let svc = script.layer().layer(api.service());
    script.fail_next(
        Error::rejected("refused")
            .with_status(StatusCode::BAD_REQUEST, Some("invalid_grant".into())),
    );
    let tasks: Vec<_> = (0..50)
        .map(|_| tokio::spawn(send_owned(svc.clone(), get())))
        .collect();
    script.wait_calls(1).await;
    script.release(1);
    for task in tasks {
        let err = task.await.unwrap().unwrap_err();
        assert_eq!(error_kind(&err), ErrorKind::Rejected);
        let err = err.downcast_ref::<Error>().unwrap();
        assert_eq!(err.oauth_error(), Some("invalid_grant"));
    }
    assert_eq!(script.calls(), 1);
    assert_eq!(api.calls(), 0);

    // The permanent failure is remembered for 1 to 5 s (the 2 s cooldown, jittered
    // ×½ to ×2½): a burst right after it, and a request just under the 1 s floor, get
    // the same error without a new token request ...
    for _ in 0..20 {
        let err = send(&mut svc.clone(), get()).await.unwrap_err();
        assert_eq!(error_kind(&err), ErrorKind::Rejected);
    }
    pass(Duration::from_millis(999)).await;
    let err = send(&mut svc.clone(), get()).await.unwrap_err();
    assert_eq!(error_kind(&err), ErrorKind::Rejected);
    assert_eq!(script.calls(), 1);
    // ... and after at most 5 s, the next request tries again (and here succeeds).
    pass(Duration::from_secs(5) - Duration::from_millis(999)).await;
    script.release(1);
    let res = send(&mut svc.clone(), get()).await.unwrap();
    assert_eq!(res.body(), "Bearer tok-2");
    assert_eq!(script.calls(), 2);
}

#[tokio::test(start_paused = true)]
async fn the_cooldown_is_drawn_between_half_and_two_and_a_half_times_the_setting() {
    // 200 layers fail at the same instant, each drawing its own cooldown from the
    // default 2 s: every one still refuses just under 1 s, every one tries again by 5 s.
    let scripts: Vec<Script> = (0..200).map(|_| Script::new(DAY)).collect();
    let mut services: Vec<_> = scripts
        .iter()
        .map(|script| {
            script.fail_next(Error::rejected("refused"));
            script.layer().layer(Api::new().service())
        })
        .collect();
    for svc in &mut services {
        send(svc, get()).await.unwrap_err();
    }
    pass(Duration::from_millis(999)).await;
    for svc in &mut services {
        let err = send(svc, get()).await.unwrap_err();
        assert_eq!(error_kind(&err), ErrorKind::Rejected);
    }
    assert!(
        scripts.iter().all(|s| s.calls() == 1),
        "a call inside the 1 s floor"
    );
    pass(Duration::from_millis(4_001)).await;
    for svc in &mut services {
        let res = send(svc, get()).await.unwrap();
        assert_eq!(res.body(), "Bearer tok-2");
    }
}

#[tokio::test(start_paused = true)]
async fn an_unusable_answer_is_remembered_like_a_rejection() {
    let calls = Arc::new(AtomicUsize::new(0));
    let counted = calls.clone();
    // A token with a space cannot be sent in a header.
    let source = source_fn(move || {
        counted.fetch_add(1, Ordering::SeqCst);
        async { Ok(FetchedToken::new("not a header value")) }
    });
    let layer = EshopboxAuthLayer::with_source(source).build().unwrap();
    let mut svc = layer.layer(Api::new().service());
    let err = send(&mut svc, get()).await.unwrap_err();
    assert_eq!(error_kind(&err), ErrorKind::InvalidResponse);
    assert_eq!(calls.load(Ordering::SeqCst), 1, "not retried");
    // Remembered for at least the 1 s floor of the default 2 s cooldown.
    pass(Duration::from_millis(999)).await;
    let err = send(&mut svc, get()).await.unwrap_err();
    assert_eq!(error_kind(&err), ErrorKind::InvalidResponse);
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    pass(Duration::from_secs(4)).await;
    let err = send(&mut svc, get()).await.unwrap_err();
    assert_eq!(error_kind(&err), ErrorKind::InvalidResponse);
    assert_eq!(
        calls.load(Ordering::SeqCst),
        2,
        "tried again after the cooldown"
    );
}

#[tokio::test(start_paused = true)]
async fn the_failure_cooldown_setter_sets_the_window() {
    // A 10 s cooldown is drawn between 5 and 25 s.
    let script = Script::new(DAY);
    let api = Api::new();
    let layer = script
        .builder()
        .failure_cooldown(Duration::from_secs(10))
        .build()
        .unwrap();
    let mut svc = layer.layer(api.service());
    script.fail_next(Error::rejected("refused"));
    send(&mut svc, get()).await.unwrap_err();
    pass(Duration::from_millis(4_999)).await;
    let err = send(&mut svc, get()).await.unwrap_err();
    assert_eq!(error_kind(&err), ErrorKind::Rejected);
    assert_eq!(script.calls(), 1, "still cooling down just under 5 s");
    pass(Duration::from_secs(20)).await;
    let res = send(&mut svc, get()).await.unwrap();
    assert_eq!(res.body(), "Bearer tok-2");

    // Zero turns it off: the next request tries again at once.
    let script = Script::new(DAY);
    let layer = script
        .builder()
        .failure_cooldown(Duration::ZERO)
        .build()
        .unwrap();
    let mut svc = layer.layer(api.service());
    script.fail_next(Error::rejected("refused"));
    send(&mut svc, get()).await.unwrap_err();
    let res = send(&mut svc, get()).await.unwrap();
    assert_eq!(res.body(), "Bearer tok-2");
}

#[tokio::test(start_paused = true)]
async fn a_hanging_endpoint_fails_waiters_at_the_timeout() {
    let script = Script::gated(DAY);
    let api = Api::new();
    let mut svc = script.layer().layer(api.service());
    // The gate is never opened: every token request hangs. Each attempt is abandoned
    // after a third of what is left of the 30 s (at least 5 s), then retried after a
    // back-off: at about 0, 10, 16.8, 22, 27.5 s; the last runs into the deadline.
    let start = Instant::now();
    let err = send(&mut svc, get()).await.unwrap_err();
    assert_eq!(error_kind(&err), ErrorKind::Unavailable);
    assert!(err.to_string().contains("token timeout of 30s"), "{err}");
    assert_eq!(start.elapsed(), Duration::from_secs(30));
    assert_eq!(script.calls(), 5);
    assert_eq!(api.calls(), 0);
}

// Debug shows no secret ------------------------------------------------------------

#[tokio::test(start_paused = true)]
async fn debug_of_layer_and_service_shows_no_token() {
    let script = Script::new(DAY);
    let layer = script.layer();
    let api = Api::new();
    let mut svc = layer.layer(api.service());
    send(&mut svc, get()).await.unwrap();
    let shown = format!("{layer:?} {:?}", layer.handle());
    assert!(shown.contains("generation: 1"), "{shown}");
    assert!(!shown.contains("tok-1"), "{shown}");
}

// Resilience ------------------------------------------------------------------------

#[tokio::test(start_paused = true)]
async fn transient_failures_are_retried_with_backoff_inside_one_refresh() {
    let script = Script::new(DAY);
    let api = Api::new();
    let mut svc = script.layer().layer(api.service());
    script.fail_next(down());
    script.fail_next(down());
    let res = send(&mut svc, get()).await.unwrap();
    assert_eq!(res.body(), "Bearer tok-3");
    let gaps = script.gaps();
    // 200 ms then 400 ms, each scaled by ½ to 1.
    assert!(gaps[0] >= Duration::from_millis(100) && gaps[0] <= Duration::from_millis(200));
    assert!(gaps[1] >= Duration::from_millis(200) && gaps[1] <= Duration::from_millis(400));
}

/// The back-off after the `n`-th failed attempt: 200 ms doubled per attempt, at most
/// 5 s, scaled by ½ to 1.
fn backoff_range(n: u32) -> (Duration, Duration) {
    let exp = (Duration::from_millis(200) * 2u32.pow((n - 1).min(16))).min(Duration::from_secs(5));
    (exp / 2, exp)
}

/// Asserts that each gap between token calls is the back-off of the attempt before.
fn assert_backoff_gaps(gaps: &[Duration]) {
    for (i, gap) in gaps.iter().enumerate() {
        let (low, high) = backoff_range(i as u32 + 1);
        assert!(
            *gap >= low && *gap <= high,
            "gap {} was {gap:?}, not within the back-off {low:?}..={high:?}",
            i + 1
        );
    }
}

#[tokio::test(start_paused = true)]
async fn waiting_requests_succeed_when_the_endpoint_recovers_within_the_budget() {
    let script = Script::new(DAY);
    let api = Api::new();
    let svc = script.layer().layer(api.service());
    // Seven transient failures: more than the four attempts an early refresh makes.
    for _ in 0..7 {
        script.fail_next(down());
    }
    let start = Instant::now();
    let waiters: Vec<_> = (0..20)
        .map(|_| tokio::spawn(send_owned(svc.clone(), get())))
        .collect();
    for waiter in waiters {
        let res = waiter.await.unwrap().unwrap();
        assert_eq!(res.body(), "Bearer tok-8");
    }
    assert_eq!(script.calls(), 8, "N failures, then the one that succeeds");
    assert_backoff_gaps(&script.gaps());
    assert!(start.elapsed() < Duration::from_secs(30));
}

#[tokio::test(start_paused = true)]
async fn an_endpoint_that_never_recovers_fails_waiters_when_the_deadline_passes() {
    let script = Script::new(DAY);
    let api = Api::new();
    let layer = script.layer();
    let handle = layer.handle();
    let svc = layer.layer(api.service());
    for _ in 0..1000 {
        script.fail_next(down());
    }
    let start = Instant::now();
    let waiters: Vec<_> = (0..20)
        .map(|_| tokio::spawn(send_owned(svc.clone(), get())))
        .collect();
    for waiter in waiters {
        let err = waiter.await.unwrap().unwrap_err();
        assert_eq!(error_kind(&err), ErrorKind::Unavailable);
    }
    // They all waited on one refresh, which tried until the next back-off would have
    // ended past the 30 s deadline.
    let gaps = script.gaps();
    assert_backoff_gaps(&gaps);
    let last = *script.times().last().unwrap() - start;
    let (_, longest_next) = backoff_range(script.calls() as u32);
    assert!(
        last + longest_next / 2 >= Duration::from_secs(30) - Duration::from_millis(1)
            || last + longest_next >= Duration::from_secs(30)
    );
    assert!(
        start.elapsed() <= Duration::from_secs(30),
        "{:?}",
        start.elapsed()
    );
    // Back-offs of 0.1–0.2, 0.2–0.4, 0.4–0.8, 0.8–1.6, 1.6–3.2 s, then 2.5–5 s: between
    // 10 calls (the longest draws) and 16 (the shortest) fit in 30 s.
    assert!(
        (10..=16).contains(&script.calls()),
        "{} calls",
        script.calls()
    );
    assert_eq!(handle.stats().failures_unavailable, script.calls() as u64);
    // The failure is not remembered (no Retry-After): the next request tries again,
    // once the back-off the last refresh stopped in has passed.
    script.state.failures.lock().unwrap().clear();
    let failed_at = Instant::now();
    let mut svc = svc;
    let res = send(&mut svc, get()).await.unwrap();
    assert!(res.body().starts_with("Bearer tok-"));
    let paused = *script.times().last().unwrap() - failed_at;
    let (low, high) = backoff_range(script.calls() as u32 - 1);
    assert!(paused >= low && paused <= high, "{paused:?}");
}

#[tokio::test(start_paused = true)]
async fn a_hanging_first_attempt_is_abandoned_and_retried_within_the_budget() {
    let calls = Arc::new(AtomicUsize::new(0));
    let counted = calls.clone();
    let source = source_fn(move || {
        let n = counted.fetch_add(1, Ordering::SeqCst) + 1;
        async move {
            if n == 1 {
                std::future::pending::<()>().await;
            }
            Ok(FetchedToken::new(format!("tok-{n}")))
        }
    });
    let layer = EshopboxAuthLayer::with_source(source).build().unwrap();
    let mut svc = layer.layer(Api::new().service());
    let start = Instant::now();
    let res = send(&mut svc, get()).await.unwrap();
    assert_eq!(res.body(), "Bearer tok-2");
    assert_eq!(calls.load(Ordering::SeqCst), 2);
    // The first attempt was given a third of the 30 s budget, then one back-off.
    let (low, high) = backoff_range(1);
    let elapsed = start.elapsed();
    assert!(
        elapsed >= Duration::from_secs(10) + low && elapsed <= Duration::from_secs(10) + high,
        "{elapsed:?}"
    );
    assert_eq!(layer.handle().stats().failures_unavailable, 1);
}

#[tokio::test(start_paused = true)]
async fn the_attempt_timeout_setter_bounds_each_attempt() {
    let script = Script::gated(DAY);
    let layer = script
        .builder()
        .attempt_timeout(Duration::from_secs(2))
        .token_timeout(Duration::from_secs(10))
        .build()
        .unwrap();
    let mut svc = layer.layer(Api::new().service());
    let start = Instant::now();
    let err = send(&mut svc, get()).await.unwrap_err();
    assert_eq!(error_kind(&err), ErrorKind::Unavailable);
    // Attempts of 2 s each (the last one cut at the 10 s deadline), separated by
    // back-offs: 4 or 5 fit.
    let times = script.times();
    assert!((4..=5).contains(&times.len()), "{} attempts", times.len());
    let last = *times.last().unwrap() - start;
    let deadline = Duration::from_secs(10);
    assert_eq!(
        start.elapsed(),
        (last + Duration::from_secs(2)).min(deadline)
    );
    for (i, gap) in script.gaps().iter().enumerate() {
        let (low, high) = backoff_range(i as u32 + 1);
        let took = *gap - Duration::from_secs(2);
        assert!(
            took >= low && took <= high,
            "attempt {} then {took:?}",
            i + 1
        );
    }
}

#[tokio::test(start_paused = true)]
async fn retry_after_is_honoured_between_attempts() {
    let script = Script::new(DAY);
    let api = Api::new();
    let mut svc = script.layer().layer(api.service());
    script.fail_next(down().with_retry_after(Some(Duration::from_secs(7))));
    let res = send(&mut svc, get()).await.unwrap();
    assert_eq!(res.body(), "Bearer tok-2");
    assert_eq!(script.gaps(), [Duration::from_secs(7)]);
}

#[tokio::test(start_paused = true)]
async fn a_retry_after_of_zero_still_waits_the_backoff() {
    // `Retry-After: 0` (or a date already past) on every answer: the attempts are
    // still spaced by the back-off, not made in a tight loop.
    let script = Script::new(DAY);
    for _ in 0..40 {
        script.fail_next(down().with_retry_after(Some(Duration::ZERO)));
    }
    let mut svc = script.layer().layer(Api::new().service());
    let start = Instant::now();
    let err = send(&mut svc, get()).await.unwrap_err();
    assert_eq!(error_kind(&err), ErrorKind::Unavailable);
    assert!(
        start.elapsed() > Duration::from_secs(25),
        "{:?}",
        start.elapsed()
    );
    assert_backoff_gaps(&script.gaps());
    // At most 16 attempts fit in the 30 s budget with the back-off (README).
    assert!(script.calls() <= 16, "{} token calls", script.calls());
}

#[tokio::test(start_paused = true)]
async fn retry_after_beyond_the_budget_fails_now_and_is_remembered() {
    let script = Script::new(DAY);
    let api = Api::new();
    let mut svc = script.layer().layer(api.service());
    script.fail_next(down().with_retry_after(Some(Duration::from_secs(60))));
    let start = Instant::now();
    let err = send(&mut svc, get()).await.unwrap_err();
    assert_eq!(
        start.elapsed(),
        Duration::ZERO,
        "no waiting past the budget"
    );
    let eshopbox = err.downcast_ref::<Error>().unwrap();
    assert_eq!(eshopbox.retry_after(), Some(Duration::from_secs(60)));
    // Requests within the minute get the error without a token request.
    pass(Duration::from_secs(59)).await;
    let err = send(&mut svc, get()).await.unwrap_err();
    assert_eq!(error_kind(&err), ErrorKind::Unavailable);
    assert_eq!(script.calls(), 1);
    pass(Duration::from_secs(1)).await;
    let res = send(&mut svc, get()).await.unwrap();
    assert_eq!(res.body(), "Bearer tok-2");
}

/// The back-off after a failed early refresh: half the token's remaining life,
/// between 1 and 30 s, and never past its expiry.
fn early_backoff(remaining: Duration) -> Duration {
    (remaining / 2)
        .clamp(Duration::from_secs(1), Duration::from_secs(30))
        .min(remaining)
}

#[tokio::test(start_paused = true)]
async fn stale_token_is_served_through_an_outage_until_it_expires() {
    let script = Script::new(Duration::from_secs(3600));
    let api = Api::new();
    let layer = script.layer();
    let handle = layer.handle();
    let mut svc = layer.layer(api.service());
    send(&mut svc, get()).await.unwrap();
    let expires_at = handle.info().unwrap().expires_at;
    // From here on, the endpoint fails every request.
    for _ in 0..1000 {
        script.fail_next(down());
    }
    pass(Duration::from_secs(3600 - 200)).await;
    let mut served = 0;
    while Instant::now() + Duration::from_secs(1) < expires_at {
        let res = send(&mut svc, get()).await.unwrap();
        assert_eq!(res.body(), "Bearer tok-1");
        served += 1;
        pass(Duration::from_secs(1)).await;
    }
    assert_eq!(served, 199);

    // Each early refresh makes its 4 attempts (back-offs under 1 s); between two
    // refreshes lies the back-off, and the next refresh starts with the first request
    // after it (requests come every second).
    let times = script.times()[1..].to_vec();
    let refreshes: Vec<&[Instant]> = times
        .chunk_by(|a, b| *b - *a < Duration::from_secs(1))
        .collect();
    for refresh in &refreshes {
        assert_eq!(refresh.len(), 4, "{refreshes:?}");
    }
    for pair in refreshes.windows(2) {
        let failed_at = *pair[0].last().unwrap();
        let backoff = early_backoff(expires_at - failed_at);
        let gap = pair[1][0] - failed_at;
        assert!(
            gap >= backoff && gap < backoff + Duration::from_secs(1),
            "a refresh {gap:?} after the last failed, within its back-off of {backoff:?}"
        );
    }
    // Derived from that rule: each refresh's 4 attempts take 0.7–1.4 s, then 30 s
    // back-offs while more than a minute is left, then halving — refreshes at about
    // 200, 169, 138, 107, 76, 44, 21, 9 and 4 s before expiry; the next would be due
    // less than 2 s before expiry, after the last request of the loop.
    assert_eq!(
        refreshes.len(),
        9,
        "refreshes at {:?} before expiry",
        refreshes
            .iter()
            .map(|r| expires_at - r[0])
            .collect::<Vec<_>>()
    );
    // Once the token has expired, requests see the error.
    pass(Duration::from_secs(2)).await;
    let err = send(&mut svc, get()).await.unwrap_err();
    assert_eq!(error_kind(&err), ErrorKind::Unavailable);
}

#[tokio::test(start_paused = true)]
async fn a_token_dead_on_arrival_is_used_for_a_second_not_refetched_per_request() {
    let script = Script::new(Duration::ZERO);
    let api = Api::new();
    let mut svc = script.layer().layer(api.service());
    for _ in 0..50 {
        let res = send(&mut svc, get()).await.unwrap();
        assert_eq!(res.body(), "Bearer tok-1");
    }
    assert_eq!(script.calls(), 1);
    pass(Duration::from_secs(1)).await;
    let res = send(&mut svc, get()).await.unwrap();
    assert_eq!(res.body(), "Bearer tok-2");
    assert_eq!(script.calls(), 2);
}

#[tokio::test(start_paused = true)]
async fn a_panicking_refresh_fails_its_waiters_and_does_not_wedge_the_cell() {
    let calls = Arc::new(AtomicUsize::new(0));
    let source = source_fn(move || {
        let n = calls.fetch_add(1, Ordering::SeqCst);
        async move {
            assert!(n > 0, "source panics on its first fetch");
            Ok(FetchedToken::new("after-panic").expires_in(Duration::from_secs(60)))
        }
    });
    let layer = EshopboxAuthLayer::with_source(source).build().unwrap();
    let api = Api::new();
    let mut svc = layer.layer(api.service());
    let err = send(&mut svc, get()).await.unwrap_err();
    assert_eq!(error_kind(&err), ErrorKind::Unavailable);
    assert!(err.to_string().contains("cancelled or panicked"), "{err}");
    let res = send(&mut svc, get()).await.unwrap();
    assert_eq!(res.body(), "Bearer after-panic");
}

#[test]
fn a_refresh_cancelled_with_its_runtime_does_not_wedge_the_cell() {
    let script = Script::gated(DAY);
    let api = Api::new();
    let svc = script.layer().layer(api.service());
    let runtime = || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
    };

    // The first runtime starts a refresh (held at the gate) and is shut down.
    let first = runtime();
    let waiting = svc.clone();
    first.block_on(async {
        tokio::spawn(send_owned(waiting, get()));
        script.wait_calls(1).await;
    });
    drop(first);

    // Another runtime gets a token: the dead refresh was cleared, not joined.
    runtime().block_on(async {
        script.release(1);
        let res = send(&mut svc.clone(), get()).await.unwrap();
        assert_eq!(res.body(), "Bearer tok-2");
    });
    assert_eq!(script.calls(), 2);
}

/// A current-thread runtime on a paused clock, for tests that need more than one.
fn paused_runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .start_paused(true)
        .build()
        .unwrap()
}

// A current-thread runtime runs timers only while driven (`block_on` now and then):
// a token got on one that is then left idle must not be sent once expired. Here the
// token comes from one paused runtime, and the next request runs on another whose
// clock is past the token's expiry, while the first one's timers never run again.
#[test]
fn a_token_got_on_an_idle_current_thread_runtime_is_not_sent_once_expired() {
    let script = Script::new(Duration::from_secs(2));
    let api = Api::new();
    let svc = script.layer().layer(api.service());
    let idle = paused_runtime();
    let res = idle.block_on(send(&mut svc.clone(), get())).unwrap();
    assert_eq!(res.body(), "Bearer tok-1");
    paused_runtime().block_on(async {
        tokio::time::advance(Duration::from_secs(3)).await;
        let res = send(&mut svc.clone(), get()).await.unwrap();
        assert_eq!(res.body(), "Bearer tok-2");
    });
    assert_eq!(script.calls(), 2);
    drop(idle);
}

// An early refresh (the token still valid) gives up after a few attempts, since its
// failure costs nothing; once the token has expired, requests wait for it, and it
// goes on until its deadline like any refresh they wait for.
#[tokio::test(start_paused = true)]
async fn an_early_refresh_that_outlives_the_token_keeps_trying_for_its_waiters() {
    let start = Instant::now();
    let calls = Arc::new(AtomicUsize::new(0));
    let source = {
        let calls = calls.clone();
        source_fn(move || {
            let n = calls.fetch_add(1, Ordering::SeqCst) + 1;
            async move {
                if n == 1 {
                    return Ok(FetchedToken::new("tok-1").expires_in(Duration::from_secs(100)));
                }
                // Down from just before the expiry until 4 s after it; each failure
                // takes 600 ms.
                tokio::time::sleep(Duration::from_millis(600)).await;
                if Instant::now() < start + Duration::from_secs(104) {
                    return Err(Error::unavailable("down"));
                }
                Ok(FetchedToken::new("tok-2").expires_in(Duration::from_secs(100)))
            }
        })
    };
    let layer = EshopboxAuthLayer::with_source(source)
        .refresh_margin(Duration::from_secs(2))
        .build()
        .unwrap();
    let api = Api::new();
    let mut svc = layer.layer(api.service());
    assert_eq!(send(&mut svc, get()).await.unwrap().body(), "Bearer tok-1");
    // In the soft window: the old token goes out, an early refresh starts.
    tokio::time::sleep_until(start + Duration::from_millis(99_700)).await;
    assert_eq!(send(&mut svc, get()).await.unwrap().body(), "Bearer tok-1");
    // Past the expiry: this request waits for that refresh.
    tokio::time::sleep_until(start + Duration::from_millis(100_010)).await;
    let res = send(&mut svc, get()).await.unwrap();
    assert_eq!(res.body(), "Bearer tok-2");
    assert!(Instant::now() >= start + Duration::from_secs(104));
}

// A `Retry-After` an early refresh was given holds for the refresh at expiry too.
#[tokio::test(start_paused = true)]
async fn a_retry_after_given_to_an_early_refresh_holds_at_expiry() {
    let start = Instant::now();
    let calls = Arc::new(Mutex::new(Vec::new()));
    let source = {
        let calls = calls.clone();
        source_fn(move || {
            let mut calls = calls.lock().unwrap();
            calls.push(Instant::now());
            let n = calls.len();
            async move {
                if n == 1 {
                    return Ok(FetchedToken::new("tok-1").expires_in(Duration::from_secs(600)));
                }
                if Instant::now() < start + Duration::from_secs(660) {
                    return Err(Error::unavailable("slow down")
                        .with_retry_after(Some(Duration::from_secs(60))));
                }
                Ok(FetchedToken::new("tok-2").expires_in(Duration::from_secs(600)))
            }
        })
    };
    let layer = EshopboxAuthLayer::with_source(source)
        .refresh_margin(Duration::from_secs(20))
        .build()
        .unwrap();
    let api = Api::new();
    let mut svc = layer.layer(api.service());
    assert_eq!(send(&mut svc, get()).await.unwrap().body(), "Bearer tok-1");
    // In the soft window: an early refresh, told to wait 60 s.
    tokio::time::sleep_until(start + Duration::from_secs(590)).await;
    assert_eq!(send(&mut svc, get()).await.unwrap().body(), "Bearer tok-1");
    for _ in 0..1000 {
        if calls.lock().unwrap().len() >= 2 {
            break;
        }
        tokio::task::yield_now().await;
    }
    let told = calls.lock().unwrap()[1];
    // A refresh asked for meanwhile makes no call either.
    assert!(layer.handle().refresh().await.is_err());
    assert_eq!(calls.lock().unwrap().len(), 2);
    // Past the expiry, requests keep asking until a token comes.
    tokio::time::sleep_until(start + Duration::from_millis(600_250)).await;
    let mut served = false;
    for _ in 0..120 {
        if let Ok(res) = send(&mut svc, get()).await {
            assert_eq!(res.body(), "Bearer tok-2");
            served = true;
            break;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    assert!(served);
    let calls = calls.lock().unwrap();
    assert!(
        calls[2..]
            .iter()
            .all(|at| *at >= told + Duration::from_secs(60)),
        "a call within the Retry-After: {:?}",
        calls.iter().map(|at| *at - start).collect::<Vec<_>>()
    );
}

// A `Retry-After` longer than the token timeout: a forced refresh (the handle's, the
// background refresher's) fails at once, as requests do, instead of sleeping out its
// whole token timeout for a certain failure (and holding the requests that join it).
#[tokio::test(start_paused = true)]
async fn a_forced_refresh_within_a_long_retry_after_fails_at_once() {
    let calls = Arc::new(AtomicUsize::new(0));
    let source = {
        let calls = calls.clone();
        source_fn(move || {
            let n = calls.fetch_add(1, Ordering::SeqCst) + 1;
            async move {
                if n == 1 {
                    return Ok(FetchedToken::new("tok-1").expires_in(Duration::from_secs(3600)));
                }
                Err(Error::unavailable("busy").with_retry_after(Some(Duration::from_secs(50))))
            }
        })
    };
    let layer = EshopboxAuthLayer::with_source(source).build().unwrap();
    let handle = layer.handle();
    handle.get().await.unwrap();
    assert!(handle.invalidate());
    assert!(handle.get().await.is_err());
    assert_eq!(calls.load(Ordering::SeqCst), 2);
    // Past the failure cooldown that spaces refreshes after an invalidation.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let asked = Instant::now();
    assert!(handle.refresh().await.is_err());
    assert_eq!(Instant::now(), asked, "failed at once");
    assert_eq!(calls.load(Ordering::SeqCst), 2);
}

// A refresh running on a current-thread runtime that nobody drives (a sync wrapper
// between two calls) does not hold a request on another runtime for ever: it waits at
// most three token timeouts and a minute.
#[test]
fn a_request_waits_for_a_stalled_refresh_at_most_three_token_timeouts() {
    let source = source_fn(|| async {
        tokio::time::sleep(Duration::from_millis(50)).await;
        Ok(FetchedToken::new("tok-1"))
    });
    let layer = EshopboxAuthLayer::with_source(source)
        .token_timeout(Duration::from_secs(5))
        .build()
        .unwrap();
    let handle = layer.handle();
    // The refresh starts on `idle`; the request that started it gives up first.
    let idle = paused_runtime();
    let gave_up = idle
        .block_on(async { tokio::time::timeout(Duration::from_millis(10), handle.get()).await });
    assert!(gave_up.is_err());
    paused_runtime().block_on(async {
        let started = Instant::now();
        let waited = tokio::time::timeout(Duration::from_secs(120), handle.get()).await;
        let error = waited.expect("waited past the bound").unwrap_err();
        assert_eq!(error.kind(), ErrorKind::Unavailable);
        assert_eq!(started.elapsed(), Duration::from_secs(75));
    });
    drop(idle);
}

// The bound needs a runtime's timer: a request polled outside any runtime still
// joins a running refresh (and gets its token), as before.
#[test]
fn a_request_polled_outside_a_runtime_joins_a_running_refresh() {
    let source = source_fn(|| async {
        tokio::time::sleep(Duration::from_secs(1)).await;
        Ok(FetchedToken::new("tok-1"))
    });
    let layer = EshopboxAuthLayer::with_source(source).build().unwrap();
    let handle = layer.handle();
    let runtime = paused_runtime();
    let gave_up = runtime
        .block_on(async { tokio::time::timeout(Duration::from_millis(10), handle.get()).await });
    assert!(gave_up.is_err());
    let mut waiting = tokio_test::task::spawn(handle.get());
    assert_pending!(waiting.poll());
    runtime.block_on(async { tokio::time::sleep(Duration::from_secs(2)).await });
    assert!(waiting.is_woken());
    assert!(assert_ready!(waiting.poll()).is_ok());
}

// Handle and counters ------------------------------------------------------------

#[tokio::test(start_paused = true)]
async fn handle_refresh_is_single_flight_and_exposes_the_token_redacted() {
    use eshopbox_auth::secrecy::ExposeSecret;
    let script = Script::gated(DAY);
    let layer = script.layer();
    let handle = layer.handle();
    assert!(handle.token().is_none());

    let (a, b) = (handle.clone(), handle.clone());
    let first = tokio::spawn(async move { a.refresh().await });
    let second = tokio::spawn(async move { b.refresh().await });
    script.wait_calls(1).await;
    script.release(1);
    assert_eq!(first.await.unwrap().unwrap().generation, 1);
    assert_eq!(second.await.unwrap().unwrap().generation, 1);
    assert_eq!(script.calls(), 1);

    let token = handle.token().unwrap();
    assert_eq!(token.secret().expose_secret(), "tok-1");
    let shown = format!("{token:?} {handle:?}");
    assert!(!shown.contains("tok-1"), "{shown}");
    assert!(shown.contains("generation: 1"), "{shown}");

    // Forcing while the token is valid still gets a new one.
    script.release(1);
    assert_eq!(handle.refresh().await.unwrap().generation, 2);
    assert_eq!(handle.token().unwrap().secret().expose_secret(), "tok-2");
}

#[tokio::test(start_paused = true)]
async fn handle_invalidate_and_subscribe() {
    let script = Script::new(DAY);
    let layer = script.layer();
    let handle = layer.handle();
    let mut changes = handle.subscribe();
    let api = Api::new();
    let mut svc = layer.layer(api.service());

    send(&mut svc, get()).await.unwrap();
    within(changes.changed()).await.unwrap();
    assert_eq!(changes.borrow_and_update().unwrap().generation, 1);

    assert!(handle.invalidate());
    assert!(!handle.invalidate(), "nothing left to invalidate");
    within(changes.changed()).await.unwrap();
    assert!(changes.borrow_and_update().is_none());

    let res = send(&mut svc, get()).await.unwrap();
    assert_eq!(res.body(), "Bearer tok-2");
    within(changes.changed()).await.unwrap();
    assert_eq!(changes.borrow_and_update().unwrap().generation, 2);
}

#[tokio::test(start_paused = true)]
async fn stats_count_requests_failures_invalidations_resends_and_waits() {
    let script = Script::new(DAY);
    let layer = script.layer();
    let handle = layer.handle();
    let api = Api::new();
    api.reject("Bearer tok-2");
    let mut svc = layer.layer(api.service());

    script.fail_next(down()); // retried inside the first refresh
    send(&mut svc, get()).await.unwrap(); // waits; tok-2 is refused, resent with tok-3
    let stats = handle.stats();
    assert_eq!(stats.token_requests, 3);
    assert_eq!(stats.failures_unavailable, 1);
    assert_eq!(stats.failures_rejected, 0);
    assert_eq!(stats.invalidations, 1);
    assert_eq!(stats.resends, 1);
    assert_eq!(
        stats.waited, 2,
        "the first attempt and the resend both waited"
    );
}

#[tokio::test(start_paused = true)]
async fn background_refresh_keeps_the_token_fresh_and_stops_with_the_last_user() {
    let script = Script::new(Duration::from_secs(100));
    let layer = script.builder().background_refresh(true).build().unwrap();
    // A token arrives before any request.
    script.wait_calls(1).await;
    let handle = layer.handle();
    let api = Api::new();
    let mut svc = layer.clone().layer(api.service());

    // Refresh time is 45–50 s (margin capped at half of 100 s, less jitter): the task
    // refreshes then, without any request.
    pass(Duration::from_secs(60)).await;
    script.wait_calls(2).await;
    let res = send(&mut svc, get()).await.unwrap();
    assert_eq!(res.body(), "Bearer tok-2");
    assert_eq!(handle.stats().waited, 0, "no request waited");

    // Once the layer, its services and handles are gone, no task is left. (On this
    // current-thread runtime the token's phase is read from the clock: no timer.)
    let metrics = tokio::runtime::Handle::current().metrics();
    assert!(metrics.num_alive_tasks() >= 1, "the refresher runs");
    drop((svc, layer, handle));
    until(|| metrics.num_alive_tasks() == 0).await;
}
