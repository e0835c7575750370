//! Behaviour tests of the layer with a scripted token source, tower-test mocks and
//! paused time. The network-facing parts are tested in `tests/`.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderValue, Request, Response, StatusCode};
use http_body_util::{BodyExt, Empty, Full};
use tokio::sync::{watch, Semaphore};
use tokio_test::{assert_pending, assert_ready};
use tower::{service_fn, BoxError, Layer, Service, ServiceExt};

use crate::replay::{CloneBodies, EmptyBodies, ReplayPolicy};
use crate::token::cache::{Timing, TokenCache};
use crate::token::{Source, SourceFuture, TokenResponse};
use crate::{Error, ErrorKind, EshopboxAuthLayer};

const MARGIN: Duration = Duration::from_secs(300);

/// A token source that hands out `tok-1`, `tok-2`, … and can be held at a gate or told
/// to fail.
#[derive(Clone)]
struct Script {
    shared: Arc<ScriptState>,
}

struct ScriptState {
    calls: watch::Sender<usize>,
    /// When each fetch started.
    times: Mutex<Vec<tokio::time::Instant>>,
    lifetime: Mutex<Duration>,
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
            shared: Arc::new(ScriptState {
                calls: watch::channel(0).0,
                times: Mutex::new(Vec::new()),
                lifetime: Mutex::new(lifetime),
                failures: Mutex::new(VecDeque::new()),
                gate,
            }),
        }
    }

    fn calls(&self) -> usize {
        *self.shared.calls.borrow()
    }

    async fn wait_calls(&self, n: usize) {
        let mut rx = self.shared.calls.subscribe();
        rx.wait_for(|c| *c >= n).await.unwrap();
    }

    fn release(&self, n: usize) {
        if let Some(gate) = &self.shared.gate {
            gate.add_permits(n);
        }
    }

    /// The gaps between consecutive fetches.
    fn gaps(&self) -> Vec<Duration> {
        let times = self.shared.times.lock().unwrap();
        times.windows(2).map(|w| w[1] - w[0]).collect()
    }

    fn fail_next(&self, error: Error) {
        self.shared.failures.lock().unwrap().push_back(error);
    }

    fn layer(&self) -> EshopboxAuthLayer {
        self.layer_with(true, EmptyBodies)
    }

    fn layer_with<P>(&self, retry: bool, replay: P) -> EshopboxAuthLayer<P> {
        let cache = TokenCache::new(Box::new(self.clone()), None, timing());
        EshopboxAuthLayer::from_parts(
            Arc::new(cache),
            shape(retry),
            replay,
            crate::classify::Http401,
        )
    }
}

impl Source for Script {
    fn fetch(&self) -> SourceFuture<'_> {
        let shared = self.shared.clone();
        Box::pin(async move {
            let mut n = 0;
            shared
                .times
                .lock()
                .unwrap()
                .push(tokio::time::Instant::now());
            shared.calls.send_modify(|c| {
                *c += 1;
                n = *c;
            });
            if let Some(gate) = &shared.gate {
                gate.acquire().await.unwrap().forget();
            }
            if let Some(error) = shared.failures.lock().unwrap().pop_front() {
                return Err(error);
            }
            let mut header = HeaderValue::try_from(format!("Bearer tok-{n}")).unwrap();
            header.set_sensitive(true);
            Ok(TokenResponse {
                header,
                lifetime: *shared.lifetime.lock().unwrap(),
                scope: None,
                has_id_token: false,
                rotated: None,
            })
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

fn get() -> Request<Empty<Bytes>> {
    Request::get("https://acme.myeshopbox.com/api/v2/inventoryListing")
        .body(Empty::new())
        .unwrap()
}

fn post(body: &'static str) -> Request<Full<Bytes>> {
    Request::post("https://acme.myeshopbox.com/api/v1/orders")
        .body(Full::new(Bytes::from_static(body.as_bytes())))
        .unwrap()
}

async fn send<S, B>(svc: &mut S, req: Request<B>) -> Result<Response<String>, BoxError>
where
    S: Service<Request<B>, Response = Response<String>, Error = BoxError>,
{
    svc.ready().await?.call(req).await
}

fn error_kind(err: &BoxError) -> ErrorKind {
    err.downcast_ref::<Error>()
        .unwrap_or_else(|| panic!("not an eshopbox_auth::Error: {err}"))
        .kind()
}

// 2. Header ------------------------------------------------------------------------

#[tokio::test(start_paused = true)]
async fn header_replaces_any_authorization_and_is_sensitive() {
    let script = Script::new(Duration::from_secs(86400));
    let (mock, mut handle) = tower_test::mock::pair::<Request<Empty<Bytes>>, Response<()>>();
    let svc = script.layer().layer(mock);

    let mut req = get();
    req.headers_mut()
        .insert("authorization", HeaderValue::from_static("Basic old"));
    let fut = tokio::spawn(send_unit(svc.clone(), req));
    let (seen, reply) = handle.next_request().await.unwrap();
    let values: Vec<_> = seen.headers().get_all("authorization").iter().collect();
    assert_eq!(values, ["Bearer tok-1"]);
    assert!(values[0].is_sensitive());
    reply.send_response(Response::new(()));
    fut.await.unwrap().unwrap();

    // The second request reuses the header built for the token.
    let fut = tokio::spawn(send_unit(svc.clone(), get()));
    let (seen, reply) = handle.next_request().await.unwrap();
    assert_eq!(seen.headers()["authorization"], "Bearer tok-1");
    reply.send_response(Response::new(()));
    fut.await.unwrap().unwrap();
    assert_eq!(script.calls(), 1);
}

async fn send_unit<S>(mut svc: S, req: Request<Empty<Bytes>>) -> Result<Response<()>, BoxError>
where
    S: Service<Request<Empty<Bytes>>, Response = Response<()>, Error = BoxError>,
{
    svc.ready().await?.call(req).await
}

// 3. Lock-free read: a warm token makes no token call ------------------------------

#[tokio::test(start_paused = true)]
async fn warm_token_is_read_without_token_calls() {
    let script = Script::new(Duration::from_secs(86400));
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

// 4. Single flight -----------------------------------------------------------------

#[tokio::test(start_paused = true)]
async fn a_thousand_cold_requests_make_one_token_call() {
    let script = Script::gated(Duration::from_secs(86400));
    let api = Api::new();
    let svc = script.layer().layer(api.service());

    let tasks: Vec<_> = (0..1000)
        .map(|_| {
            let mut svc = svc.clone();
            tokio::spawn(async move { send(&mut svc, get()).await })
        })
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
    let script = Script::new(Duration::from_secs(86400));
    let layer = script.layer();
    let api = Api::new();
    let mut a = layer.clone().layer(api.service());
    let mut b = layer.layer(api.service());
    send(&mut a, get()).await.unwrap();
    let res = send(&mut b, get()).await.unwrap();
    assert_eq!(res.body(), "Bearer tok-1");
    assert_eq!(script.calls(), 1);
}

// 5. Cancellation-safe -------------------------------------------------------------

#[tokio::test(start_paused = true)]
async fn dropping_every_waiter_does_not_abort_the_refresh() {
    let script = Script::gated(Duration::from_secs(86400));
    let api = Api::new();
    let svc = script.layer().layer(api.service());

    let waiters: Vec<_> = (0..10)
        .map(|_| {
            let mut svc = svc.clone();
            tokio::spawn(async move { send(&mut svc, get()).await })
        })
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
    cache_of_service(&svc).settled().await;

    let mut svc = svc;
    let res = send(&mut svc, get()).await.unwrap();
    assert_eq!(res.body(), "Bearer tok-1");
    assert_eq!(script.calls(), 1);
    assert_eq!(api.calls(), 1);
}

fn cache_of_service<S, P, C>(svc: &crate::EshopboxAuth<S, P, C>) -> Arc<TokenCache> {
    svc.shared().clone()
}

// 6. Before expiry -----------------------------------------------------------------

#[tokio::test(start_paused = true)]
async fn short_token_is_refreshed_after_half_its_life_not_on_every_request() {
    let script = Script::new(Duration::from_secs(2));
    let api = Api::new();
    let mut svc = script.layer().layer(api.service());
    send(&mut svc, get()).await.unwrap();

    // The 5 min margin is capped at half of the 2 s lifetime.
    pass(&svc, Duration::from_millis(999)).await;
    for _ in 0..10 {
        send(&mut svc, get()).await.unwrap();
    }
    assert_eq!(script.calls(), 1);

    // Past half-life plus the largest jitter, one request starts one refresh.
    pass(&svc, Duration::from_millis(150)).await;
    for _ in 0..10 {
        send(&mut svc, get()).await.unwrap();
    }
    cache_of_service(&svc).settled().await;
    assert_eq!(script.calls(), 2);
    let res = send(&mut svc, get()).await.unwrap();
    assert_eq!(res.body(), "Bearer tok-2");
}

#[tokio::test(start_paused = true)]
async fn early_refresh_runs_in_background_while_requests_use_the_old_token() {
    let script = Script::gated(Duration::from_secs(3600));
    let api = Api::new();
    let mut svc = script.layer().layer(api.service());
    script.release(1);
    send(&mut svc, get()).await.unwrap();

    // Into the soft window (margin 300 s, jitter ≤ 30 s).
    pass(&svc, Duration::from_secs(3600 - 200)).await;
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
    cache_of_service(&svc).settled().await;
    let res = send(&mut svc, get()).await.unwrap();
    assert_eq!(res.body(), "Bearer tok-2");
}

#[tokio::test(start_paused = true)]
async fn failed_early_refresh_keeps_the_valid_token_and_backs_off() {
    let script = Script::new(Duration::from_secs(3600));
    let api = Api::new();
    let mut svc = script.layer().layer(api.service());
    send(&mut svc, get()).await.unwrap();

    script.fail_next(Error::new(ErrorKind::Rejected, "refused"));
    pass(&svc, Duration::from_secs(3600 - 200)).await;
    let res = send(&mut svc, get()).await.unwrap();
    assert_eq!(res.body(), "Bearer tok-1");
    cache_of_service(&svc).settled().await;
    assert_eq!(script.calls(), 2);

    // The failure left tok-1 in place, and the next attempt is not made at once.
    for _ in 0..10 {
        let res = send(&mut svc, get()).await.unwrap();
        assert_eq!(res.body(), "Bearer tok-1");
    }
    assert_eq!(script.calls(), 2);

    // After the back-off (half the remaining 200 s, capped at 30 s) it tries again.
    pass(&svc, Duration::from_secs(31)).await;
    send(&mut svc, get()).await.unwrap();
    cache_of_service(&svc).settled().await;
    assert_eq!(script.calls(), 3);
    let res = send(&mut svc, get()).await.unwrap();
    assert_eq!(res.body(), "Bearer tok-3");
}

#[tokio::test(start_paused = true)]
async fn expiry_counts_from_when_the_token_request_was_sent() {
    let script = Script::gated(Duration::from_secs(2));
    let api = Api::new();
    let mut svc = script.layer().layer(api.service());
    let cache = cache_of_service(&svc);

    let mut other = svc.clone();
    let mut first = tokio_test::task::spawn(send(&mut other, get()));
    assert_pending!(first.poll());
    script.wait_calls(1).await;
    // The endpoint takes 500 ms to answer.
    pass(&svc, Duration::from_millis(500)).await;
    script.release(1);
    cache.settled().await;
    assert_eq!(assert_ready!(first.poll()).unwrap().body(), "Bearer tok-1");
    drop(first);

    // 1.5 s after the answer, 2 s after the request was sent: the token has expired,
    // so the next request waits for a new one (held at the gate).
    pass(&svc, Duration::from_millis(1500)).await;
    let mut next = tokio_test::task::spawn(send(&mut svc, get()));
    assert_pending!(next.poll());
    script.wait_calls(2).await;
    script.release(1);
    cache.settled().await;
    assert_eq!(assert_ready!(next.poll()).unwrap().body(), "Bearer tok-2");
}

#[tokio::test(start_paused = true)]
async fn expired_token_makes_requests_wait() {
    let script = Script::gated(Duration::from_secs(60));
    let api = Api::new();
    let mut svc = script.layer().layer(api.service());
    script.release(1);
    send(&mut svc, get()).await.unwrap();

    pass(&svc, Duration::from_secs(61)).await;
    let mut clone = svc.clone();
    let mut waiting = tokio_test::task::spawn(send(&mut clone, get()));
    assert_pending!(waiting.poll());
    assert_eq!(api.calls(), 1, "no request went out with the expired token");
    script.release(1);
    cache_of_service(&svc).settled().await;
    assert_eq!(
        assert_ready!(waiting.poll()).unwrap().body(),
        "Bearer tok-2"
    );
}

// 7. 401 once ----------------------------------------------------------------------

#[tokio::test(start_paused = true)]
async fn unauthorized_get_is_resent_once_with_a_new_token() {
    let script = Script::new(Duration::from_secs(86400));
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
    let script = Script::gated(Duration::from_secs(86400));
    let mut api = Api::new();
    api.reject("Bearer tok-1");
    // All 200 first attempts are answered 401 together.
    api.hold_rejected = Some(Arc::new(tokio::sync::Barrier::new(200)));
    let svc = script.layer().layer(api.service());
    // Warm the cache with tok-1 without sending a request.
    script.release(1);
    cache_of_service(&svc).wait().await.unwrap();

    let tasks: Vec<_> = (0..200)
        .map(|_| {
            let mut svc = svc.clone();
            tokio::spawn(async move { send(&mut svc, get()).await })
        })
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
    let script = Script::new(Duration::from_secs(86400));
    let (mock, mut handle) = tower_test::mock::pair::<Request<Empty<Bytes>>, Response<()>>();
    handle.allow(1000);
    let svc = script.layer().layer(mock);
    cache_of_service(&svc).wait().await.unwrap();

    let tasks: Vec<_> = (0..50)
        .map(|_| tokio::spawn(send_unit_owned(svc.clone(), get())))
        .collect();
    let mut pending = Vec::new();
    for _ in 0..50 {
        let (req, reply) = handle.next_request().await.unwrap();
        assert_eq!(req.headers()["authorization"], "Bearer tok-1");
        pending.push(reply);
    }
    let unauthorized = || {
        let mut res = Response::new(());
        *res.status_mut() = StatusCode::UNAUTHORIZED;
        res
    };
    // The first 401 replaces tok-1 with tok-2 ...
    pending.remove(0).send_response(unauthorized());
    let (req, reply) = handle.next_request().await.unwrap();
    assert_eq!(req.headers()["authorization"], "Bearer tok-2");
    reply.send_response(Response::new(()));
    assert_eq!(script.calls(), 2);
    // ... and the 49 401s that arrive afterwards, for tok-1, leave tok-2 alone.
    for reply in pending {
        reply.send_response(unauthorized());
    }
    for _ in 0..49 {
        let (req, reply) = handle.next_request().await.unwrap();
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
    let script = Script::new(Duration::from_secs(86400));
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
    let script = Script::new(Duration::from_secs(86400));
    let api = Api::new();
    api.reject("Bearer tok-1");
    let mut svc = script.layer_with(true, CloneBodies).layer(api.service());

    let res = send(&mut svc, post(r#"{"sku":"A1"}"#)).await.unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    assert_eq!(res.body(), "Bearer tok-2");
    let bodies = api.bodies.lock().unwrap().clone();
    assert_eq!(bodies, [&br#"{"sku":"A1"}"#[..], &br#"{"sku":"A1"}"#[..]]);
}

#[tokio::test(start_paused = true)]
async fn retry_off_returns_the_401_and_drops_the_token() {
    let script = Script::new(Duration::from_secs(86400));
    let api = Api::new();
    api.reject("Bearer tok-1");
    let mut svc = script.layer_with(false, EmptyBodies).layer(api.service());

    let res = send(&mut svc, get()).await.unwrap();
    assert_eq!(res.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(api.calls(), 1);
    let res = send(&mut svc, get()).await.unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    assert_eq!(res.body(), "Bearer tok-2");
}

#[tokio::test(start_paused = true)]
async fn second_401_is_returned_and_does_not_drop_the_new_token() {
    let script = Script::new(Duration::from_secs(86400));
    let api = Api::new();
    api.reject("Bearer tok-1");
    api.reject("Bearer tok-2");
    let mut svc = script.layer().layer(api.service());

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
    let (header, _) = cache_of_service(&svc).get().unwrap();
    assert_eq!(header, "Bearer tok-2");
    assert_eq!(script.calls(), 2);
}

#[tokio::test(start_paused = true)]
async fn a_closure_policy_decides_which_bodies_are_replayed() {
    let script = Script::new(Duration::from_secs(86400));
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
    let mut svc = script.layer_with(true, small_only).layer(api.service());
    let res = send(&mut svc, post("{}")).await.unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    api.reject("Bearer tok-2");
    let res = send(&mut svc, post("a long body")).await.unwrap();
    assert_eq!(res.status(), StatusCode::UNAUTHORIZED);
}

// 8. poll_ready contract (tower-test's Mock panics on an unready clone) ---------------

#[tokio::test(start_paused = true)]
async fn waiting_first_call_uses_the_service_that_was_polled_ready() {
    let script = Script::gated(Duration::from_secs(86400));
    let (mock, mut handle) = tower_test::mock::pair::<Request<Empty<Bytes>>, Response<()>>();
    let mut svc = script.layer().layer(mock);

    handle.allow(1);
    svc.ready().await.unwrap();
    let mut call = tokio_test::task::spawn(svc.call(get()));
    assert_pending!(call.poll());
    script.wait_calls(1).await;
    script.release(1);
    cache_of_service(&svc).settled().await;
    assert_pending!(call.poll());
    let (req, reply) = handle.next_request().await.unwrap();
    assert_eq!(req.headers()["authorization"], "Bearer tok-1");
    reply.send_response(Response::new(()));
    assert_ready!(call.poll()).unwrap();

    // The service left behind is a fresh clone that must be polled ready again.
    handle.allow(1);
    svc.ready().await.unwrap();
    let call = svc.call(get());
    let (_, reply) = handle.next_request().await.unwrap();
    reply.send_response(Response::new(()));
    call.await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn resend_polls_the_inner_service_ready_again() {
    let script = Script::new(Duration::from_secs(86400));
    let (mock, mut handle) = tower_test::mock::pair::<Request<Empty<Bytes>>, Response<()>>();
    let mut svc = script.layer().layer(mock);
    cache_of_service(&svc).wait().await.unwrap();

    handle.allow(1);
    svc.ready().await.unwrap();
    let mut call = tokio_test::task::spawn(svc.call(get()));
    assert_pending!(call.poll());
    let (req, reply) = handle.next_request().await.unwrap();
    assert_eq!(req.headers()["authorization"], "Bearer tok-1");
    let mut unauthorized = Response::new(());
    *unauthorized.status_mut() = StatusCode::UNAUTHORIZED;
    reply.send_response(unauthorized);

    // The 401 dropped tok-1; the resend waits for tok-2 ...
    assert_pending!(call.poll());
    cache_of_service(&svc).settled().await;
    // ... and then for the inner service to be ready again.
    assert_pending!(call.poll());
    assert!(handle.poll_request().is_pending());
    handle.allow(1);
    assert!(call.is_woken());
    assert_pending!(call.poll());
    let (req, reply) = handle.next_request().await.unwrap();
    assert_eq!(req.headers()["authorization"], "Bearer tok-2");
    reply.send_response(Response::new(()));
    let res = assert_ready!(call.poll()).unwrap();
    assert_eq!(res.status(), StatusCode::OK);
}

#[tokio::test(start_paused = true)]
async fn inner_errors_pass_through_boxed() {
    let script = Script::new(Duration::from_secs(86400));
    let (mock, mut handle) = tower_test::mock::pair::<Request<Empty<Bytes>>, Response<()>>();
    let svc = script.layer().layer(mock);
    handle.allow(1);
    let call = tokio::spawn(send_unit_owned(svc.clone(), get()));
    let (_, reply) = handle.next_request().await.unwrap();
    reply.send_error("connection reset by peer");
    let err = call.await.unwrap().unwrap_err();
    assert!(err.downcast_ref::<Error>().is_none());
    assert_eq!(err.to_string(), "connection reset by peer");
}

async fn send_unit_owned<S>(svc: S, req: Request<Empty<Bytes>>) -> Result<Response<()>, BoxError>
where
    S: Service<Request<Empty<Bytes>>, Response = Response<()>, Error = BoxError>,
{
    send_unit(svc, req).await
}

// 9. Errors, not panics ------------------------------------------------------------

#[tokio::test(start_paused = true)]
async fn token_failure_fails_every_waiter_with_the_typed_error() {
    let script = Script::gated(Duration::from_secs(86400));
    let api = Api::new();
    let svc = script.layer().layer(api.service());
    script.fail_next(
        Error::new(ErrorKind::Rejected, "refused")
            .with_status(StatusCode::BAD_REQUEST, Some("invalid_grant".into())),
    );
    let tasks: Vec<_> = (0..50)
        .map(|_| {
            let mut svc = svc.clone();
            tokio::spawn(async move { send(&mut svc, get()).await })
        })
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

    // The permanent failure is remembered for 1 to 5 s: a burst right after it
    // gets the same error without a new token request ...
    for _ in 0..20 {
        let err = send(&mut svc.clone(), get()).await.unwrap_err();
        assert_eq!(error_kind(&err), ErrorKind::Rejected);
    }
    assert_eq!(script.calls(), 1);
    // ... and after that, the next request tries again (and here succeeds).
    pass(&svc, Duration::from_secs(5)).await;
    script.release(1);
    let res = send(&mut svc.clone(), get()).await.unwrap();
    assert_eq!(res.body(), "Bearer tok-2");
}

#[tokio::test(start_paused = true)]
async fn a_hanging_endpoint_fails_waiters_at_the_timeout() {
    let script = Script::gated(Duration::from_secs(86400));
    let api = Api::new();
    let mut svc = script.layer().layer(api.service());
    // The gate is never opened: the token request hangs until the 30 s timeout.
    let err = send(&mut svc, get()).await.unwrap_err();
    assert_eq!(error_kind(&err), ErrorKind::Unavailable);
    assert!(err.to_string().contains("token timeout of 30s"), "{err}");
}

// 10. Debug shows no secret ---------------------------------------------------------

#[tokio::test(start_paused = true)]
async fn debug_of_layer_and_service_shows_no_token() {
    let script = Script::new(Duration::from_secs(86400));
    let layer = script.layer();
    let api = Api::new();
    let mut svc = layer.layer(api.service());
    send(&mut svc, get()).await.unwrap();
    let shown = format!("{layer:?} {:?}", cache_of_service(&svc));
    assert!(shown.contains("generation: 1"), "{shown}");
    assert!(!shown.contains("tok-1"), "{shown}");
}

// Resilience ------------------------------------------------------------------------

fn down() -> Error {
    Error::unavailable("endpoint down").with_status(StatusCode::SERVICE_UNAVAILABLE, None)
}

#[tokio::test(start_paused = true)]
async fn transient_failures_are_retried_with_backoff_inside_one_refresh() {
    let script = Script::new(Duration::from_secs(86400));
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

#[tokio::test(start_paused = true)]
async fn transient_failures_stop_after_max_attempts_and_recover_later() {
    let script = Script::new(Duration::from_secs(86400));
    let api = Api::new();
    let mut svc = script.layer().layer(api.service());
    for _ in 0..crate::token::cache::MAX_ATTEMPTS {
        script.fail_next(down());
    }
    let err = send(&mut svc, get()).await.unwrap_err();
    assert_eq!(error_kind(&err), ErrorKind::Unavailable);
    assert_eq!(script.calls(), 4);
    // The endpoint is back: the very next request succeeds (no "failed forever").
    let res = send(&mut svc, get()).await.unwrap();
    assert_eq!(res.body(), "Bearer tok-5");
}

#[tokio::test(start_paused = true)]
async fn retry_after_is_honoured_between_attempts() {
    let script = Script::new(Duration::from_secs(86400));
    let api = Api::new();
    let mut svc = script.layer().layer(api.service());
    script.fail_next(down().with_retry_after(Some(Duration::from_secs(7))));
    let res = send(&mut svc, get()).await.unwrap();
    assert_eq!(res.body(), "Bearer tok-2");
    assert_eq!(script.gaps(), [Duration::from_secs(7)]);
}

#[tokio::test(start_paused = true)]
async fn retry_after_beyond_the_budget_fails_now_and_is_remembered() {
    let script = Script::new(Duration::from_secs(86400));
    let api = Api::new();
    let mut svc = script.layer().layer(api.service());
    script.fail_next(down().with_retry_after(Some(Duration::from_secs(60))));
    let start = tokio::time::Instant::now();
    let err = send(&mut svc, get()).await.unwrap_err();
    assert_eq!(
        start.elapsed(),
        Duration::ZERO,
        "no waiting past the budget"
    );
    let eshopbox = err.downcast_ref::<Error>().unwrap();
    assert_eq!(eshopbox.retry_after(), Some(Duration::from_secs(60)));
    // Requests within the minute get the error without a token request.
    pass(&svc, Duration::from_secs(59)).await;
    let err = send(&mut svc, get()).await.unwrap_err();
    assert_eq!(error_kind(&err), ErrorKind::Unavailable);
    assert_eq!(script.calls(), 1);
    pass(&svc, Duration::from_secs(1)).await;
    let res = send(&mut svc, get()).await.unwrap();
    assert_eq!(res.body(), "Bearer tok-2");
}

#[tokio::test(start_paused = true)]
async fn stale_token_is_served_through_an_outage_until_it_expires() {
    let script = Script::new(Duration::from_secs(3600));
    let api = Api::new();
    let mut svc = script.layer().layer(api.service());
    send(&mut svc, get()).await.unwrap();
    // From here on, the endpoint fails every request.
    for _ in 0..1000 {
        script.fail_next(down());
    }
    pass(&svc, Duration::from_secs(3600 - 200)).await;
    let mut served = 0;
    while tokio::time::Instant::now() + Duration::from_secs(1) < script_expiry(&svc) {
        let res = send(&mut svc, get()).await.unwrap();
        assert_eq!(res.body(), "Bearer tok-1");
        served += 1;
        pass(&svc, Duration::from_secs(1)).await;
    }
    assert!(served > 100);
    let attempts = script.calls() - 1;
    // Refreshes are spaced by back-off (≥ 1 s between refreshes, ≤ 4 attempts each).
    assert!(
        attempts <= 4 * 200,
        "{attempts} token requests during a 200 s outage"
    );
    // Once the token has expired, requests see the error.
    pass(&svc, Duration::from_secs(2)).await;
    let err = send(&mut svc, get()).await.unwrap_err();
    assert_eq!(error_kind(&err), ErrorKind::Unavailable);
}

fn script_expiry<S, P, C>(svc: &crate::EshopboxAuth<S, P, C>) -> tokio::time::Instant {
    svc.shared().expiry().unwrap()
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
    pass(&svc, crate::token::cache::MIN_LIFETIME).await;
    let res = send(&mut svc, get()).await.unwrap();
    assert_eq!(res.body(), "Bearer tok-2");
    assert_eq!(script.calls(), 2);
}

/// A source whose first fetch panics.
struct PanicsOnce(AtomicUsize);

impl Source for PanicsOnce {
    fn fetch(&self) -> SourceFuture<'_> {
        let n = self.0.fetch_add(1, Ordering::SeqCst);
        Box::pin(async move {
            assert!(n > 0, "source panics on its first fetch");
            Ok(TokenResponse {
                header: HeaderValue::from_static("Bearer after-panic"),
                lifetime: Duration::from_secs(60),
                scope: None,
                has_id_token: false,
                rotated: None,
            })
        })
    }
}

#[tokio::test(start_paused = true)]
async fn a_panicking_refresh_fails_its_waiters_and_does_not_wedge_the_cache() {
    let cache = TokenCache::new(Box::new(PanicsOnce(AtomicUsize::new(0))), None, timing());
    let layer = EshopboxAuthLayer::from_parts(
        Arc::new(cache),
        shape(true),
        EmptyBodies,
        crate::classify::Http401,
    );
    let api = Api::new();
    let mut svc = layer.layer(api.service());
    let err = send(&mut svc, get()).await.unwrap_err();
    assert_eq!(error_kind(&err), ErrorKind::Unavailable);
    assert!(err.to_string().contains("cancelled or panicked"), "{err}");
    let res = send(&mut svc, get()).await.unwrap();
    assert_eq!(res.body(), "Bearer after-panic");
}

#[test]
fn a_refresh_cancelled_with_its_runtime_does_not_wedge_the_cache() {
    let script = Script::gated(Duration::from_secs(86400));
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
    let mut waiting = svc.clone();
    first.block_on(async {
        tokio::spawn(async move { send(&mut waiting, get()).await });
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

/// Advances the paused clock and lets the token's phase timer catch up.
async fn pass<S, P, C>(svc: &crate::EshopboxAuth<S, P, C>, by: Duration) {
    tokio::time::advance(by).await;
    svc.shared().catch_up().await;
}

#[tokio::test(start_paused = true)]
async fn a_custom_classifier_decides_what_counts_as_unauthorized() {
    let script = Script::new(Duration::from_secs(86400));
    let cache = TokenCache::new(Box::new(script.clone()), None, timing());
    // This API answers 200 with "expired" in the body's place: a header says it.
    let expired = |res: &Response<String>| res.headers().contains_key("x-token-expired");
    let layer = EshopboxAuthLayer::from_parts(Arc::new(cache), shape(true), EmptyBodies, expired);
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

// Handle and counters ------------------------------------------------------------

#[tokio::test(start_paused = true)]
async fn handle_refresh_is_single_flight_and_exposes_the_token_redacted() {
    use secrecy::ExposeSecret;
    let script = Script::gated(Duration::from_secs(86400));
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
    let script = Script::new(Duration::from_secs(86400));
    let layer = script.layer();
    let handle = layer.handle();
    let mut changes = handle.subscribe();
    let api = Api::new();
    let mut svc = layer.layer(api.service());

    send(&mut svc, get()).await.unwrap();
    changes.changed().await.unwrap();
    assert_eq!(changes.borrow_and_update().unwrap().generation, 1);

    assert!(handle.invalidate());
    assert!(!handle.invalidate(), "nothing left to invalidate");
    changes.changed().await.unwrap();
    assert!(changes.borrow_and_update().is_none());

    let res = send(&mut svc, get()).await.unwrap();
    assert_eq!(res.body(), "Bearer tok-2");
    changes.changed().await.unwrap();
    assert_eq!(changes.borrow_and_update().unwrap().generation, 2);
}

#[tokio::test(start_paused = true)]
async fn stats_count_requests_failures_invalidations_resends_and_waits() {
    let script = Script::new(Duration::from_secs(86400));
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

fn shape(retry: bool) -> crate::layer::Shape {
    crate::layer::Shape {
        retry_on_unauthorized: retry,
        proxy_host: None,
        destinations: Default::default(),
    }
}

#[tokio::test(start_paused = true)]
async fn background_refresh_keeps_the_token_fresh_and_stops_with_the_last_user() {
    let script = Script::new(Duration::from_secs(100));
    let layer = script.layer();
    crate::token::cache::spawn_background(layer.shared()).unwrap();
    // A token arrives before any request.
    script.wait_calls(1).await;
    let handle = layer.handle();
    let api = Api::new();
    let mut svc = layer.clone().layer(api.service());

    // Refresh time is 45–50 s (margin capped at half of 100 s, less jitter): the task
    // refreshes then, without any request.
    pass(&svc, Duration::from_secs(60)).await;
    script.wait_calls(2).await;
    let res = send(&mut svc, get()).await.unwrap();
    assert_eq!(res.body(), "Bearer tok-2");
    assert_eq!(handle.stats().waited, 0, "no request waited");

    // Once the layer, its services and handles are gone, no task is left.
    let metrics = tokio::runtime::Handle::current().metrics();
    assert!(
        metrics.num_alive_tasks() >= 2,
        "the refresher and a phase timer run"
    );
    drop((svc, layer, handle));
    for _ in 0..100 {
        if metrics.num_alive_tasks() == 0 {
            break;
        }
        tokio::task::yield_now().await;
    }
    assert_eq!(metrics.num_alive_tasks(), 0);
}

#[test]
fn a_refresh_started_on_a_runtime_that_shut_down_fails_instead_of_hanging() {
    let script = Script::new(Duration::from_secs(86400));
    let layer = script.layer();
    let cache = layer.shared().clone();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let handle = runtime.handle().clone();
    runtime.shutdown_background();
    // On a runtime that shut down, the spawned refresh is dropped at once; its guard
    // must answer the waiter (a regression would hang, hence the thread and bound).
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _entered = handle.enter();
        let mut wait = tokio_test::task::spawn(cache.wait());
        let _ = tx.send(format!("{:?}", wait.poll()));
    });
    let polled = rx
        .recv_timeout(Duration::from_secs(30))
        .expect("the refresh did not deadlock");
    assert!(polled.contains("cancelled or panicked"), "{polled}");
}

#[test]
fn a_token_whose_timer_is_gone_falls_back_to_the_clock() {
    use crate::token::{Token, EXPIRED, FRESH, STALE, UNTIMED};
    use std::sync::atomic::Ordering as O;
    let now = tokio::time::Instant::now();
    let header = HeaderValue::from_static("Bearer t");
    let hour = Duration::from_secs(3600);
    let fresh = Arc::new(Token::new(header.clone(), 1, now + hour, now + 2 * hour));
    let stale = Arc::new(Token::new(header.clone(), 2, now, now + hour));
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        Token::schedule(&fresh);
        Token::schedule(&stale);
    });
    // The timers never ran: their runtime is dropped with them.
    drop(runtime);
    assert_eq!(fresh.phase.load(O::Acquire), UNTIMED);
    assert_eq!(fresh.phase_now(), FRESH);
    assert_eq!(stale.phase_now(), STALE);
    let expired = Token::new(header, 3, now, now);
    assert_eq!(expired.phase_now(), EXPIRED);
}

/// The timing every unit test uses: a 5 min margin, 30 s timeout, 2 s cooldown.
fn timing() -> Timing {
    Timing {
        margin: MARGIN,
        timeout: Duration::from_secs(30),
        failure_cooldown: Duration::from_secs(2),
    }
}
