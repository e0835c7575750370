//! Chaos soak: 20 000 requests through one layer while the token endpoint fails at
//! random (500, 429, dropped connections, slow answers, hangs) and the API revokes
//! tokens at random. Every request must complete — with a response or a typed
//! error — within a liveness bound, and the number of token requests must stay
//! within the bound derived below.

mod support;

use std::collections::HashSet;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use eshopbox_auth::{Error, EshopboxAuthLayer};
use http::{Request, Response, StatusCode};
use http_body_util::Empty;
use support::{credentials, Reply, TokenServer};
use tower::{service_fn, ServiceBuilder, ServiceExt};

const WORKERS: usize = 50;
const PER_WORKER: usize = 400;
const TOKEN_TIMEOUT: Duration = Duration::from_secs(2);
/// A request can wait for at most two refreshes (first attempt and resend), each
/// bounded by the token timeout, plus the API's own latency.
const LIVENESS: Duration = Duration::from_secs(5);
/// Every POST of a refresh after the first is preceded by a back-off of at least
/// 100, 200, 400 ms (half of 200 ms doubled); so a refresh that fails with no valid
/// token left took at least this long, or ended on a remembered `Retry-After`.
const MIN_FAILED_REFRESH: Duration = Duration::from_millis(700);
const MAX_ATTEMPTS: usize = 4;

#[derive(Default)]
struct Tally {
    ok: AtomicUsize,
    unauthorized: AtomicUsize,
    typed_errors: AtomicUsize,
    other_errors: AtomicUsize,
    hung: AtomicUsize,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_thousand_requests_through_chaos() {
    let rng = Mutex::new(fastrand::Rng::with_seed(0x5eed));
    let server = TokenServer::start(move |n| {
        let roll = rng.lock().unwrap().u32(0..100);
        let ok = Reply::token(&format!("tok-{n}"), 2);
        match roll {
            0..=49 => ok,
            50..=64 => Reply::raw(500, "text/plain", "internal error"),
            65..=69 => Reply::json(429, r#"{"message":"Too many requests"}"#),
            70..=74 => Reply::json(429, "{}").with_header("retry-after", "1"),
            75..=84 => Reply::close(),
            85..=94 => ok.after(Duration::from_millis(200)),
            _ => Reply::hang(),
        }
    })
    .await;

    let layer = EshopboxAuthLayer::builder(credentials())
        .token_url(&server.url())
        .token_timeout(TOKEN_TIMEOUT)
        .build()
        .unwrap();

    let revoked = Arc::new(Mutex::new(HashSet::<String>::new()));
    let revocations = Arc::new(AtomicUsize::new(0));
    let api = {
        let revoked = revoked.clone();
        let revocations = revocations.clone();
        let rng = Arc::new(Mutex::new(fastrand::Rng::with_seed(7)));
        service_fn(move |req: Request<Empty<Bytes>>| {
            let auth = req.headers()["authorization"]
                .to_str()
                .unwrap_or("")
                .to_owned();
            let refuse = {
                let mut revoked = revoked.lock().unwrap();
                if revoked.contains(&auth) {
                    true
                } else if rng.lock().unwrap().u32(0..1000) == 0 {
                    revoked.insert(auth.clone());
                    revocations.fetch_add(1, Ordering::SeqCst);
                    true
                } else {
                    false
                }
            };
            async move {
                // The API's own latency.
                tokio::time::sleep(Duration::from_millis(5)).await;
                let mut res = Response::new(auth);
                if refuse {
                    *res.status_mut() = StatusCode::UNAUTHORIZED;
                }
                Ok::<_, std::convert::Infallible>(res)
            }
        })
    };
    let svc = ServiceBuilder::new().layer(layer).service(api);

    let tally = Arc::new(Tally::default());
    let started = tokio::time::Instant::now();
    let workers: Vec<_> = (0..WORKERS)
        .map(|_| {
            let svc = svc.clone();
            let tally = tally.clone();
            tokio::spawn(async move {
                for _ in 0..PER_WORKER {
                    let req = Request::get("/api/v2/inventoryListing")
                        .body(Empty::new())
                        .unwrap();
                    let outcome = tokio::time::timeout(LIVENESS, svc.clone().oneshot(req)).await;
                    let counter = match outcome {
                        Err(_) => &tally.hung,
                        Ok(Ok(res)) if res.status() == StatusCode::OK => &tally.ok,
                        Ok(Ok(_)) => &tally.unauthorized,
                        Ok(Err(e)) if e.downcast_ref::<Error>().is_some() => &tally.typed_errors,
                        Ok(Err(_)) => &tally.other_errors,
                    };
                    counter.fetch_add(1, Ordering::Relaxed);
                }
            })
        })
        .collect();
    for worker in workers {
        worker.await.expect("no panic in a worker");
    }
    let elapsed = started.elapsed();

    let ok = tally.ok.load(Ordering::Relaxed);
    let unauthorized = tally.unauthorized.load(Ordering::Relaxed);
    let typed = tally.typed_errors.load(Ordering::Relaxed);
    let other = tally.other_errors.load(Ordering::Relaxed);
    let hung = tally.hung.load(Ordering::Relaxed);
    let posts = server.posts();
    let revocations = revocations.load(Ordering::SeqCst);
    println!(
        "chaos: {ok} ok, {unauthorized} 401, {typed} token errors, {other} other errors, \
         {hung} hung; {posts} token POSTs, {revocations} revocations, {elapsed:?}"
    );

    assert_eq!(
        ok + unauthorized + typed + other + hung,
        WORKERS * PER_WORKER
    );
    assert_eq!(hung, 0, "no request outlived the liveness bound");
    assert_eq!(other, 0, "every failure is a typed error");
    assert!(ok > WORKERS * PER_WORKER / 2, "most requests succeed");

    // Refreshes run one at a time. A new one starts only when (a) a token was
    // revoked, (b) the last token reached its refresh time — at least 1 s after it
    // arrived (the lifetime floor, and half of the 2 s lifetime), or (c) the last
    // refresh failed, which took at least MIN_FAILED_REFRESH, or was followed by a
    // back-off of at least 1 s, or by a remembered Retry-After. Each makes at most
    // MAX_ATTEMPTS POSTs.
    let secs = elapsed.as_secs_f64();
    let refreshes = 2
        + revocations
        + (secs / 1.0).ceil() as usize
        + (secs / MIN_FAILED_REFRESH.as_secs_f64()).ceil() as usize;
    let bound = MAX_ATTEMPTS * refreshes;
    assert!(posts <= bound, "{posts} token POSTs, bound {bound}");
}
