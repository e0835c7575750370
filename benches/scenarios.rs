//! Whole-scenario measurements, printed as a table (`cargo bench --bench scenarios`):
//!
//! - 10 000 concurrent requests on a cold cache: time to finish, token POSTs;
//! - 1 000 concurrent requests that all get 401 for the same token: token POSTs;
//! - latency of requests sent while an early (soft-window) refresh is in flight,
//!   against the same requests with no refresh running.

#[path = "../tests/support/mod.rs"]
mod support;

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use eshopbox_auth::EshopboxAuthLayer;
use http::{Request, Response, StatusCode};
use http_body_util::Empty;
use support::{Reply, TokenServer};
use tokio::sync::Barrier;
use tower::{service_fn, Layer, ServiceExt};

fn get() -> Request<Empty<Bytes>> {
    Request::get("/api/v2/inventoryListing")
        .body(Empty::new())
        .unwrap()
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

async fn cold_start(n: usize) -> (Duration, usize) {
    let server = TokenServer::counting(86400).await;
    let layer = EshopboxAuthLayer::builder(support::credentials())
        .token_url(&server.url())
        .build()
        .unwrap();
    let api = service_fn(|_: Request<Empty<Bytes>>| async {
        Ok::<_, std::convert::Infallible>(Response::new(()))
    });
    let svc = layer.layer(api);
    let start = Instant::now();
    let tasks: Vec<_> = (0..n)
        .map(|_| tokio::spawn(svc.clone().oneshot(get())))
        .collect();
    for t in tasks {
        t.await.unwrap().unwrap();
    }
    (start.elapsed(), server.posts())
}

async fn all_unauthorized(n: usize) -> usize {
    let server = TokenServer::counting(86400).await;
    let layer = EshopboxAuthLayer::builder(support::credentials())
        .token_url(&server.url())
        .build()
        .unwrap();
    // Hold every first attempt until all n have tok-1, then refuse them together.
    let barrier = Arc::new(Barrier::new(n));
    let api = service_fn(move |req: Request<Empty<Bytes>>| {
        let barrier = barrier.clone();
        async move {
            let mut res = Response::new(());
            let listing = req.uri().path() == "/api/v2/inventoryListing";
            if listing && req.headers()["authorization"] == "Bearer tok-1" {
                barrier.wait().await;
                *res.status_mut() = StatusCode::UNAUTHORIZED;
            }
            Ok::<_, std::convert::Infallible>(res)
        }
    });
    let svc = layer.layer(api);
    svc.clone()
        .oneshot(Request::get("/").body(Empty::new()).unwrap())
        .await
        .unwrap(); // warms tok-1
    let tasks: Vec<_> = (0..n)
        .map(|_| tokio::spawn(svc.clone().oneshot(get())))
        .collect();
    for t in tasks {
        assert_eq!(t.await.unwrap().unwrap().status(), StatusCode::OK);
    }
    server.posts() - 1
}

async fn latencies(
    svc: &(impl tower::Service<
        Request<Empty<Bytes>>,
        Response = Response<()>,
        Error = tower::BoxError,
        Future = impl Send + 'static,
    > + Clone
          + Send
          + 'static),
    n: usize,
) -> Vec<Duration> {
    let tasks: Vec<_> = (0..n)
        .map(|_| {
            let svc = svc.clone();
            tokio::spawn(async move {
                let start = Instant::now();
                svc.oneshot(get()).await.unwrap();
                start.elapsed()
            })
        })
        .collect();
    let mut all = Vec::with_capacity(n);
    for t in tasks {
        all.push(t.await.unwrap());
    }
    all.sort();
    all
}

async fn soft_window(n: usize) -> (Vec<Duration>, Vec<Duration>, usize) {
    // 4 s tokens: the 5 min margin is capped at 2 s. The second token request takes
    // 500 ms to answer.
    let server = TokenServer::start(|n| {
        let reply = Reply::token(&format!("tok-{n}"), 4);
        if n == 1 {
            reply
        } else {
            reply.after(Duration::from_millis(500))
        }
    })
    .await;
    let layer = EshopboxAuthLayer::builder(support::credentials())
        .token_url(&server.url())
        .build()
        .unwrap();
    let api = service_fn(|_: Request<Empty<Bytes>>| async {
        Ok::<_, std::convert::Infallible>(Response::new(()))
    });
    let svc = layer.layer(api);
    let quiet = latencies(&svc, n).await;
    tokio::time::sleep(Duration::from_millis(2300)).await; // into the soft window
    let during = latencies(&svc, n).await;
    (quiet, during, server.posts())
}

fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let mut times = Vec::new();
        let mut posts = Vec::new();
        for _ in 0..5 {
            let (t, p) = cold_start(10_000).await;
            times.push(t);
            posts.push(p);
        }
        times.sort();
        println!(
            "cold start, 10 000 concurrent requests: median {:?} (of 5 runs), token POSTs per run {:?}",
            times[2], posts
        );

        let mut refreshes = Vec::new();
        for _ in 0..5 {
            refreshes.push(all_unauthorized(1000).await);
        }
        println!("1 000 concurrent 401s for one token: refresh POSTs per run {refreshes:?}");

        let (quiet, during, posts) = soft_window(1000).await;
        println!(
            "1 000 concurrent requests, no refresh running: p50 {:?} p99 {:?} max {:?}",
            percentile(&quiet, 0.5),
            percentile(&quiet, 0.99),
            quiet[quiet.len() - 1]
        );
        println!(
            "1 000 concurrent requests during a 500 ms early refresh: p50 {:?} p99 {:?} max {:?} (token POSTs {posts})",
            percentile(&during, 0.5),
            percentile(&during, 0.99),
            during[during.len() - 1]
        );
    });
}
