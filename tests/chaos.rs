//! Chaos: a soak of 20 000 requests through one layer while the token endpoint fails
//! at random and the API revokes tokens, and a sustained outage longer than the token
//! timeout.
//!
//! The soak's chaos is transient (500s, 429s with and without `Retry-After`, stalls,
//! dropped connections, revocations): a refresh keeps trying until its 30 s deadline,
//! so no request may fail. The outage shows what does fail, and when.

mod support;

use std::collections::HashSet;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use eshopbox_auth::source::{source_fn, FetchedToken};
use eshopbox_auth::{Error, ErrorKind, EshopboxAuthLayer};
use http::{Request, Response, StatusCode};
use http_body_util::Empty;
use support::{credentials, Reply, TokenServer};
use tokio::time::Instant;
use tower::{service_fn, ServiceBuilder, ServiceExt};

const WORKERS: usize = 64;
const PER_WORKER: usize = 313;
/// A plain hang guard: a request waits for at most two refreshes (the first attempt
/// and the resend), each bounded by the 30 s token timeout.
const HANG_GUARD: Duration = Duration::from_secs(70);

#[derive(Default)]
struct Tally {
    ok: AtomicUsize,
    unauthorized: AtomicUsize,
    typed_errors: AtomicUsize,
    other_errors: AtomicUsize,
    hung: AtomicUsize,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_thousand_requests_through_transient_chaos_all_succeed() {
    let rng = Mutex::new(fastrand::Rng::new());
    let server = TokenServer::start(move |n| {
        let roll = rng.lock().unwrap().u32(0..100);
        let ok = Reply::token(&format!("tok-{n}"), 3);
        match roll {
            0..=49 => ok,
            50..=64 => Reply::raw(500, "text/plain", "internal error"),
            65..=69 => Reply::json(429, r#"{"message":"Too many requests"}"#),
            70..=74 => Reply::json(429, "{}").with_header("retry-after", "1"),
            75..=84 => Reply::close(),
            _ => ok.after(Duration::from_millis(300)),
        }
    })
    .await;

    let layer = EshopboxAuthLayer::builder(credentials())
        .token_url(&server.url())
        .build()
        .unwrap();
    let handle = layer.handle();

    let revoked = Arc::new(Mutex::new(HashSet::<String>::new()));
    let revocations = Arc::new(AtomicUsize::new(0));
    let api = {
        let revoked = revoked.clone();
        let revocations = revocations.clone();
        let rng = Arc::new(Mutex::new(fastrand::Rng::new()));
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
    let started = Instant::now();
    let workers: Vec<_> = (0..WORKERS)
        .map(|_| {
            let svc = svc.clone();
            let tally = tally.clone();
            tokio::spawn(async move {
                for _ in 0..PER_WORKER {
                    let outcome =
                        tokio::time::timeout(HANG_GUARD, svc.clone().oneshot(support::get())).await;
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
    let stats = handle.stats();
    println!(
        "chaos: {ok} ok, {unauthorized} 401, {typed} token errors, {other} other errors, \
         {hung} hung; {posts} token POSTs, {revocations} revocations, {} invalidations, \
         {elapsed:?}",
        stats.invalidations
    );

    assert_eq!(
        ok + unauthorized + typed + other + hung,
        WORKERS * PER_WORKER
    );
    assert_eq!(hung, 0, "no request hung");
    assert_eq!(other, 0, "every failure is a typed error");
    assert_eq!(typed, 0, "transient chaos fails no request");
    // A resent request can meet a fresh revocation of its new token: that 401 is
    // passed on (to every worker resending with that token, at most). Anything else
    // succeeds.
    assert!(
        unauthorized <= WORKERS * revocations,
        "{unauthorized} 401s passed on"
    );
    // What the behaviour promises about token calls: one refresh per revocation at
    // most (401s for a token already replaced do not refresh again), and never two
    // token calls at once.
    assert!(
        stats.invalidations <= revocations as u64,
        "{} invalidations for {revocations} revocations",
        stats.invalidations
    );
    assert_eq!(server.max_in_flight(), 1, "one token call at a time");
    assert_eq!(stats.token_requests, posts as u64);
}

/// The most token calls one refresh makes when every one fails at once: back-offs of
/// 0.1, 0.2, 0.4, 0.8, 1.6 s, then 2.5 s (the shortest draws) fit 16 calls in 30 s.
const MAX_CALLS_PER_REFRESH: usize = 16;
/// The fewest: with the longest draws (0.2, 0.4, 0.8, 1.6, 3.2, then 5 s), 10.
const MIN_CALLS_PER_REFRESH: usize = 10;

#[tokio::test(start_paused = true)]
async fn an_outage_longer_than_the_token_timeout_fails_waiters_at_each_deadline() {
    // The endpoint answers 503 for 95 s, then tokens valid for an hour. With the
    // default 30 s token timeout, each refresh tries for 25 to 30 s (it stops when the
    // next back-off, at most 5 s, would end past its deadline): the first three end
    // before 90 s and fail; the fourth is still trying after 95 s and succeeds. Each
    // refresh after the first resumes the back-off where the last one stopped.
    let outage = Duration::from_secs(95);
    let start = Instant::now();
    let calls = Arc::new(Mutex::new(Vec::<Instant>::new()));
    let in_flight = Arc::new(AtomicUsize::new(0));
    let max_in_flight = Arc::new(AtomicUsize::new(0));
    let source = {
        let (calls, in_flight, max_in_flight) =
            (calls.clone(), in_flight.clone(), max_in_flight.clone());
        source_fn(move || {
            let now = Instant::now();
            calls.lock().unwrap().push(now);
            let n = calls.lock().unwrap().len();
            let current = in_flight.fetch_add(1, Ordering::SeqCst) + 1;
            max_in_flight.fetch_max(current, Ordering::SeqCst);
            let in_flight = in_flight.clone();
            async move {
                in_flight.fetch_sub(1, Ordering::SeqCst);
                if now - start < outage {
                    Err(Error::unavailable("down")
                        .with_status(StatusCode::SERVICE_UNAVAILABLE, None))
                } else {
                    Ok(FetchedToken::new(format!("tok-{n}")).expires_in(Duration::from_secs(3600)))
                }
            }
        })
    };
    let layer = EshopboxAuthLayer::with_source(source).build().unwrap();
    let svc = ServiceBuilder::new()
        .layer(layer)
        .service(support::EchoApi::default());

    // Every worker sends one request after another until one succeeds.
    let failures = Arc::new(Mutex::new(Vec::<(Instant, ErrorKind)>::new()));
    let workers: Vec<_> = (0..WORKERS)
        .map(|_| {
            let svc = svc.clone();
            let failures = failures.clone();
            tokio::spawn(async move {
                loop {
                    match support::within(svc.clone().oneshot(support::get())).await {
                        Ok(res) => return res.into_body(),
                        Err(e) => {
                            let kind = e.downcast_ref::<Error>().expect("a typed error").kind();
                            failures.lock().unwrap().push((Instant::now(), kind));
                        }
                    }
                }
            })
        })
        .collect();
    let mut tokens = HashSet::new();
    for worker in workers {
        tokens.insert(worker.await.unwrap());
    }
    assert_eq!(
        tokens.len(),
        1,
        "everybody got the one new token: {tokens:?}"
    );

    let failures = failures.lock().unwrap().clone();
    let calls = calls.lock().unwrap().clone();
    // Three refreshes failed, each answering all 64 waiters at its deadline with
    // Unavailable.
    assert!(failures
        .iter()
        .all(|(_, kind)| *kind == ErrorKind::Unavailable));
    let mut ends: Vec<Instant> = failures.iter().map(|(at, _)| *at).collect();
    ends.dedup();
    assert_eq!(ends.len(), 3, "failed refreshes ended at {ends:?}");
    assert_eq!(failures.len(), 3 * WORKERS);
    // Each lasted 25 to 30 s, and made the calls its back-off allows, one at a time:
    // the first 10 to 16, the later ones — which resume the back-off where the last
    // stopped (2.5–5 s, from their start) — 5 to 11.
    let mut begin = start;
    for (i, end) in ends.iter().enumerate() {
        let took = *end - begin;
        assert!(
            took >= Duration::from_secs(25) && took <= Duration::from_secs(30),
            "a failed refresh took {took:?}"
        );
        let made: Vec<Instant> = calls
            .iter()
            .copied()
            // The previous refresh's last call was at `begin`.
            .filter(|at| (*at > begin || i == 0) && *at <= *end)
            .collect();
        let allowed = match i {
            0 => MIN_CALLS_PER_REFRESH..=MAX_CALLS_PER_REFRESH,
            _ => 5..=11,
        };
        assert!(
            allowed.contains(&made.len()),
            "{} calls in refresh {i}",
            made.len()
        );
        if i > 0 {
            let pause = made[0] - begin;
            assert!(
                pause >= Duration::from_millis(2500),
                "a refresh called {pause:?} after the last one failed"
            );
        }
        begin = *end;
    }
    assert!(
        calls.len() <= MAX_CALLS_PER_REFRESH + 3 * 11,
        "{} calls",
        calls.len()
    );
    assert_eq!(max_in_flight.load(Ordering::SeqCst), 1);
    // The token came with the first call after the outage.
    let after: Vec<_> = calls.iter().filter(|at| **at - start >= outage).collect();
    assert_eq!(after.len(), 1);
}
