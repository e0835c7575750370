//! Several layers sharing one token through a token store (the in-process store and
//! stores that fail); the Redis store is tested in `tests/redis.rs`.

mod support;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use eshopbox_auth::source::{source_fn, BoxFuture, FetchedToken, TokenSource};
use eshopbox_auth::store::{InProcessStore, SharedToken, TokenStore};
use eshopbox_auth::{Error, EshopboxAuthLayer};
use http::{Request, StatusCode};
use http_body_util::Empty;
use secrecy::{ExposeSecret, SecretString};
use support::EchoApi;
use tokio::sync::Notify;
use tower::{Layer, ServiceExt};

/// A source handing out `tok-1`, `tok-2`, … (valid for an hour); counts its calls.
fn counting(calls: Arc<AtomicUsize>) -> impl TokenSource {
    source_fn(move || {
        let calls = calls.clone();
        async move {
            let n = calls.fetch_add(1, Ordering::SeqCst) + 1;
            tokio::task::yield_now().await;
            Ok(FetchedToken::new(format!("tok-{n}")).expires_in(Duration::from_secs(3600)))
        }
    })
}

/// `n` layers, each on a source from `source`, sharing `store`.
fn replicas<S: TokenSource>(
    n: usize,
    source: impl Fn() -> S,
    store: impl TokenStore + Clone,
) -> Vec<EshopboxAuthLayer> {
    (0..n)
        .map(|_| {
            EshopboxAuthLayer::with_source(source())
                .token_store(store.clone())
                .lock_lease(Duration::from_millis(300))
                .build()
                .unwrap()
        })
        .collect()
}

/// `per_layer` concurrent requests through each layer; the `Authorization` each
/// request was finally answered 200 with.
async fn burst(layers: &[EshopboxAuthLayer], api: &EchoApi, per_layer: usize) -> Vec<String> {
    let mut tasks = tokio::task::JoinSet::new();
    for layer in layers {
        for _ in 0..per_layer {
            let service = layer.layer(api.clone());
            tasks.spawn(async move {
                let response = service
                    .oneshot(Request::new(Empty::<Bytes>::new()))
                    .await
                    .expect("request failed");
                assert_eq!(response.status(), StatusCode::OK);
                response.into_body()
            });
        }
    }
    let mut seen = Vec::new();
    while let Some(result) = tasks.join_next().await {
        seen.push(result.unwrap());
    }
    seen
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eight_cold_layers_sharing_a_store_make_one_token_call() {
    let calls = Arc::new(AtomicUsize::new(0));
    let store = InProcessStore::new();
    let layers = replicas(8, || counting(calls.clone()), store.clone());
    let seen = burst(&layers, &EchoApi::default(), 500).await;

    assert_eq!(seen.len(), 4000);
    assert!(seen.iter().all(|auth| auth == "Bearer tok-1"));
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    let adopted: u64 = layers
        .iter()
        .map(|l| l.handle().stats().store_adopted)
        .sum();
    assert_eq!(adopted, 7, "the other seven layers took the stored token");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_401_for_the_shared_token_makes_one_token_call_for_all_layers() {
    let calls = Arc::new(AtomicUsize::new(0));
    let store = InProcessStore::new();
    let layers = replicas(8, || counting(calls.clone()), store.clone());
    burst(&layers, &EchoApi::default(), 1).await;
    assert_eq!(calls.load(Ordering::SeqCst), 1);

    // The API now refuses tok-1: every layer sees a 401, and the resends carry tok-2.
    let seen = burst(&layers, &EchoApi::refusing("Bearer tok-1"), 50).await;
    assert!(seen.iter().all(|auth| auth == "Bearer tok-2"), "{seen:?}");
    assert_eq!(calls.load(Ordering::SeqCst), 2);
    let stored = store.load().await.unwrap().unwrap();
    assert_eq!(stored.access_token().expose_secret(), "tok-2");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_lock_holder_is_taken_over_after_its_lease() {
    let calls = Arc::new(AtomicUsize::new(0));
    let stall = Arc::new(Notify::new());
    let took_over = Arc::new(Notify::new());
    let source = || {
        let (calls, stall, took_over) = (calls.clone(), stall.clone(), took_over.clone());
        source_fn(move || {
            let (calls, stall, took_over) = (calls.clone(), stall.clone(), took_over.clone());
            async move {
                let n = calls.fetch_add(1, Ordering::SeqCst) + 1;
                if n == 1 {
                    // The first token call hangs until the test lets it go.
                    stall.notified().await;
                } else {
                    took_over.notify_one();
                }
                Ok(FetchedToken::new(format!("tok-{n}")).expires_in(Duration::from_secs(3600)))
            }
        })
    };
    let layers = replicas(8, source, InProcessStore::new());
    let all = tokio::spawn({
        let layers = layers.clone();
        async move { burst(&layers, &EchoApi::default(), 20).await }
    });
    // Another layer takes the lock once the hung holder's lease ran out; then the hung
    // call is let go, and its layer's requests, which waited for it, go through too.
    took_over.notified().await;
    stall.notify_one();
    let seen = all.await.unwrap();

    assert_eq!(seen.len(), 160, "no request was lost");
    assert_eq!(calls.load(Ordering::SeqCst), 2);
    let count = |token: &str| seen.iter().filter(|auth| *auth == token).count();
    // The hung holder's own requests waited for its call; the layer that took over
    // used its token at least; no request got anything else.
    assert!(count("Bearer tok-1") >= 20);
    assert!(count("Bearer tok-2") >= 20);
    assert_eq!(count("Bearer tok-1") + count("Bearer tok-2"), 160);
}

/// A store that is down: every call fails at once, as with a refused connection, or
/// never answers, as with a server that stopped responding. Counts its calls.
#[derive(Clone)]
struct Broken {
    hangs: bool,
    calls: Arc<AtomicUsize>,
}

impl Broken {
    fn refusing() -> Self {
        Broken {
            hangs: false,
            calls: Arc::default(),
        }
    }

    fn hanging() -> Self {
        Broken {
            hangs: true,
            calls: Arc::default(),
        }
    }

    fn answer<T: Send + 'static>(&self) -> BoxFuture<'_, Result<T, Error>> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        if self.hangs {
            Box::pin(std::future::pending())
        } else {
            Box::pin(async { Err(Error::unavailable("connection refused")) })
        }
    }
}

impl TokenStore for Broken {
    fn load(&self) -> BoxFuture<'_, Result<Option<SharedToken>, Error>> {
        self.answer()
    }
    fn save<'a>(&'a self, _: &'a SharedToken) -> BoxFuture<'a, Result<(), Error>> {
        self.answer()
    }
    fn remove(&self, _: u64) -> BoxFuture<'_, Result<bool, Error>> {
        self.answer()
    }
    fn try_lock<'a>(&'a self, _: &'a str, _: Duration) -> BoxFuture<'a, Result<bool, Error>> {
        self.answer()
    }
    fn unlock<'a>(&'a self, _: &'a str) -> BoxFuture<'a, Result<(), Error>> {
        self.answer()
    }
    fn load_refresh_token(&self) -> BoxFuture<'_, Result<Option<SecretString>, Error>> {
        self.answer()
    }
    fn save_refresh_token<'a>(&'a self, _: &'a SecretString) -> BoxFuture<'a, Result<(), Error>> {
        self.answer()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_store_costs_no_request() {
    let calls = Arc::new(AtomicUsize::new(0));
    let store = Broken::refusing();
    let store_calls = store.calls.clone();
    let layers = replicas(3, || counting(calls.clone()), store);
    let seen = burst(&layers, &EchoApi::default(), 100).await;

    assert_eq!(seen.len(), 300);
    // Each layer went to the source on its own, once.
    assert_eq!(calls.load(Ordering::SeqCst), 3);
    for layer in &layers {
        assert_eq!(layer.handle().stats().store_failures, 1);
    }
    // After a failure the store is left alone: a forced refresh does not touch it.
    let before = store_calls.load(Ordering::SeqCst);
    layers[0].handle().refresh().await.unwrap();
    assert_eq!(store_calls.load(Ordering::SeqCst), before);
    assert_eq!(calls.load(Ordering::SeqCst), 4);
}

#[tokio::test(start_paused = true)]
async fn a_store_that_does_not_answer_is_given_up_on_after_the_store_timeout() {
    let calls = Arc::new(AtomicUsize::new(0));
    let layer = EshopboxAuthLayer::with_source(counting(calls.clone()))
        .token_store(Broken::hanging())
        .store_timeout(Duration::from_millis(250))
        .build()
        .unwrap();
    let started = tokio::time::Instant::now();
    let seen = burst(std::slice::from_ref(&layer), &EchoApi::default(), 10).await;

    assert!(seen.iter().all(|auth| auth == "Bearer tok-1"));
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    assert_eq!(started.elapsed(), Duration::from_millis(250));
    assert_eq!(layer.handle().stats().store_failures, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotated_refresh_token_is_used_by_every_layer() {
    let endpoint = support::rotating_endpoint(3600).await;
    let store = InProcessStore::new();
    let layers: Vec<EshopboxAuthLayer> = (0..4)
        .map(|_| {
            EshopboxAuthLayer::builder(support::credentials())
                .token_url(&endpoint.url())
                .token_store(store.clone())
                .build()
                .unwrap()
        })
        .collect();
    let api = EchoApi::default();
    burst(&layers, &api, 20).await;

    // Each round, the token is invalidated everywhere and a different layer makes the
    // token call: it must send the refresh token the previous round stored, whichever
    // layer rotated it.
    for round in 0..4 {
        // Every layer picks up the current token first, so that invalidating it
        // everywhere leaves nothing usable in the store.
        burst(&layers, &api, 1).await;
        for layer in &layers {
            layer.handle().invalidate();
        }
        let seen = burst(&layers[round..=round], &api, 5).await;
        let expected = format!("Bearer tok-{}", round + 2);
        assert!(seen.iter().all(|auth| *auth == expected), "{seen:?}");
    }
    let sent: Vec<String> = endpoint
        .seen()
        .iter()
        .map(|seen| {
            let body: serde_json::Value = serde_json::from_slice(&seen.body).unwrap();
            body["refresh_token"].as_str().unwrap().to_owned()
        })
        .collect();
    // Five calls, each with the newest refresh token: none was refused as spent.
    assert_eq!(
        sent,
        [support::REFRESH_TOKEN, "rt-1", "rt-2", "rt-3", "rt-4"]
    );
    let stored = store.load_refresh_token().await.unwrap().unwrap();
    assert_eq!(stored.expose_secret(), "rt-5");
}
