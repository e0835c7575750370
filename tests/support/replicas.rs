//! Scenarios of several layers ("replicas") sharing a token store, run against the
//! in-process store (`tests/store.rs`) and against Redis (`tests/redis.rs`). Each
//! replica gets a store of its own from `store()`, as separate processes would.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use eshopbox_auth::source::{source_fn, BoxFuture, FetchedToken, TokenSource};
use eshopbox_auth::store::{SharedRefreshToken, SharedToken, TokenStore};
use eshopbox_auth::{Error, EshopboxAuthLayer};
use http::{Request, StatusCode};
use http_body_util::Empty;
use secrecy::ExposeSecret;
use tokio::sync::Notify;
use tower::{Layer, ServiceExt};

use super::EchoApi;

/// The refresh lock's lease in these scenarios.
pub const LEASE: Duration = Duration::from_secs(1);

/// A source handing out `tok-1`, `tok-2`, … (valid for an hour); counts its calls.
pub fn counting(calls: Arc<AtomicUsize>) -> impl TokenSource {
    source_fn(move || {
        let calls = calls.clone();
        async move {
            let n = calls.fetch_add(1, Ordering::SeqCst) + 1;
            tokio::task::yield_now().await;
            Ok(FetchedToken::new(format!("tok-{n}")).expires_in(Duration::from_secs(3600)))
        }
    })
}

/// `n` layers, each on a source from `source` and a store from `store`.
pub fn replicas<S: TokenSource, T: TokenStore>(
    n: usize,
    source: impl Fn() -> S,
    store: impl Fn() -> T,
) -> Vec<EshopboxAuthLayer> {
    (0..n)
        .map(|_| {
            EshopboxAuthLayer::with_source(source())
                .token_store(store())
                .lock_lease(LEASE)
                .build()
                .unwrap()
        })
        .collect()
}

/// `per_layer` concurrent requests through each layer; the `Authorization` each
/// request was finally answered 200 with.
pub async fn burst(layers: &[EshopboxAuthLayer], api: &EchoApi, per_layer: usize) -> Vec<String> {
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

/// 8 cold replicas × 500 concurrent requests → one token call; the other seven
/// replicas take the stored token.
pub async fn cold_start<T: TokenStore>(store: impl Fn() -> T) {
    let calls = Arc::new(AtomicUsize::new(0));
    let layers = replicas(8, || counting(calls.clone()), store);
    let seen = burst(&layers, &EchoApi::default(), 500).await;

    assert_eq!(seen.len(), 4000);
    assert!(seen.iter().all(|auth| auth == "Bearer tok-1"));
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    let adopted: u64 = layers
        .iter()
        .map(|l| l.handle().stats().store_adopted)
        .sum();
    assert_eq!(adopted, 7, "the other seven replicas took the stored token");
}

/// The API refuses the shared token: every replica sees 401s, and together they make
/// one token call; the store then holds the new token.
pub async fn shared_401<T: TokenStore>(store: impl Fn() -> T) {
    let calls = Arc::new(AtomicUsize::new(0));
    let layers = replicas(8, || counting(calls.clone()), &store);
    burst(&layers, &EchoApi::default(), 1).await;
    assert_eq!(calls.load(Ordering::SeqCst), 1);

    let seen = burst(&layers, &EchoApi::refusing("Bearer tok-1"), 50).await;
    assert!(seen.iter().all(|auth| auth == "Bearer tok-2"), "{seen:?}");
    assert_eq!(calls.load(Ordering::SeqCst), 2);
    let stored = store().load().await.unwrap().unwrap();
    assert_eq!(stored.access_token().expose_secret(), "tok-2");
}

/// Which [`TokenStore`] method a call is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StoreCall {
    Load,
    Save,
    Remove,
    TryLock,
    Unlock,
    LoadRefreshToken,
    SaveRefreshToken,
}

/// What a [`Hooked`] store makes of one call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fate {
    /// Passed to the inner store.
    Pass,
    /// Fails at once, as with a refused connection (the inner store is not called).
    Fail,
    /// Never answers, as with a stopped process or server (nor is it called).
    Hang,
    /// Made on the inner store, but the caller is told it failed (a lost answer).
    LoseAnswer,
}

type Hook = dyn Fn(StoreCall) -> Fate + Send + Sync;

/// A store whose every call goes through a hook deciding its [`Fate`]; counts calls.
pub struct Hooked<T> {
    inner: T,
    hook: Arc<Hook>,
    calls: Arc<AtomicUsize>,
}

impl<T: Clone> Clone for Hooked<T> {
    fn clone(&self) -> Self {
        Hooked {
            inner: self.inner.clone(),
            hook: self.hook.clone(),
            calls: self.calls.clone(),
        }
    }
}

impl<T: TokenStore> Hooked<T> {
    pub fn new(inner: T, hook: impl Fn(StoreCall) -> Fate + Send + Sync + 'static) -> Self {
        Hooked {
            inner,
            hook: Arc::new(hook),
            calls: Arc::default(),
        }
    }

    /// Calls made, whatever their fate.
    pub fn calls(&self) -> usize {
        self.calls.load(Ordering::SeqCst)
    }

    fn run<'a, R: Send + 'a>(
        &'a self,
        call: StoreCall,
        inner: impl FnOnce(&'a T) -> BoxFuture<'a, Result<R, Error>>,
    ) -> BoxFuture<'a, Result<R, Error>> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        match (self.hook)(call) {
            Fate::Pass => inner(&self.inner),
            Fate::Fail => Box::pin(async { Err(Error::unavailable("connection refused")) }),
            Fate::Hang => Box::pin(std::future::pending()),
            Fate::LoseAnswer => {
                let made = inner(&self.inner);
                Box::pin(async move {
                    made.await?;
                    Err(Error::unavailable("the answer was lost"))
                })
            }
        }
    }
}

impl<T: TokenStore> TokenStore for Hooked<T> {
    fn load(&self) -> BoxFuture<'_, Result<Option<SharedToken>, Error>> {
        self.run(StoreCall::Load, |s| s.load())
    }
    fn save<'a>(&'a self, token: &'a SharedToken) -> BoxFuture<'a, Result<(), Error>> {
        self.run(StoreCall::Save, |s| s.save(token))
    }
    fn remove(&self, id: u64) -> BoxFuture<'_, Result<bool, Error>> {
        self.run(StoreCall::Remove, move |s| s.remove(id))
    }
    fn try_lock<'a>(
        &'a self,
        owner: &'a str,
        lease: Duration,
    ) -> BoxFuture<'a, Result<bool, Error>> {
        self.run(StoreCall::TryLock, move |s| s.try_lock(owner, lease))
    }
    fn unlock<'a>(&'a self, owner: &'a str) -> BoxFuture<'a, Result<(), Error>> {
        self.run(StoreCall::Unlock, |s| s.unlock(owner))
    }
    fn load_refresh_token(&self) -> BoxFuture<'_, Result<Option<SharedRefreshToken>, Error>> {
        self.run(StoreCall::LoadRefreshToken, |s| s.load_refresh_token())
    }
    fn save_refresh_token<'a>(
        &'a self,
        token: &'a SharedRefreshToken,
        replaces: Option<u64>,
    ) -> BoxFuture<'a, Result<bool, Error>> {
        self.run(StoreCall::SaveRefreshToken, move |s| {
            s.save_refresh_token(token, replaces)
        })
    }
}

/// A store that can be frozen: while `frozen` is set, no call answers, as with a
/// replica whose process stopped (a long GC pause, a suspended VM).
pub fn freezable<T: TokenStore>(inner: T, frozen: Arc<AtomicBool>) -> Hooked<T> {
    Hooked::new(inner, move |_| {
        if frozen.load(Ordering::SeqCst) {
            Fate::Hang
        } else {
            Fate::Pass
        }
    })
}

/// The replica holding the refresh lock stalls as a whole in its token call (its
/// store calls stop answering too, so it cannot renew its lease): once the lease runs
/// out another replica refreshes. No request is lost; two token calls in all.
pub async fn stalled_holder<T: TokenStore>(store: impl Fn() -> T) {
    let lease = LEASE;
    let calls = Arc::new(AtomicUsize::new(0));
    let stall = Arc::new(Notify::new());
    let took_over = Arc::new(Notify::new());
    let layers: Vec<EshopboxAuthLayer> = (0..8)
        .map(|_| {
            let frozen = Arc::new(AtomicBool::new(false));
            let (calls, stall, took_over) = (calls.clone(), stall.clone(), took_over.clone());
            let freeze = frozen.clone();
            let source = source_fn(move || {
                let (calls, stall, took_over) = (calls.clone(), stall.clone(), took_over.clone());
                let freeze = freeze.clone();
                async move {
                    let n = calls.fetch_add(1, Ordering::SeqCst) + 1;
                    if n == 1 {
                        // This replica stalls until the test lets it go.
                        freeze.store(true, Ordering::SeqCst);
                        stall.notified().await;
                        freeze.store(false, Ordering::SeqCst);
                    } else {
                        took_over.notify_one();
                    }
                    Ok(FetchedToken::new(format!("tok-{n}")).expires_in(Duration::from_secs(3600)))
                }
            });
            EshopboxAuthLayer::with_source(source)
                .token_store(freezable(store(), frozen))
                .lock_lease(lease)
                .store_timeout(lease)
                .build()
                .unwrap()
        })
        .collect();
    let all = tokio::spawn({
        let layers = layers.clone();
        async move { burst(&layers, &EchoApi::default(), 20).await }
    });
    // Another replica takes the lock once the stalled holder's lease ran out; then the
    // stalled replica resumes, and its requests, which waited for its own call, go
    // through too.
    super::within(took_over.notified()).await;
    stall.notify_one();
    let seen = super::within(all).await.unwrap();

    assert_eq!(seen.len(), 160, "no request was lost");
    assert_eq!(calls.load(Ordering::SeqCst), 2);
    let count = |token: &str| seen.iter().filter(|auth| *auth == token).count();
    // The stalled replica's requests waited for its call; the replica that took over
    // used its token at least; no request got anything else.
    assert!(count("Bearer tok-1") >= 20);
    assert!(count("Bearer tok-2") >= 20);
    assert_eq!(count("Bearer tok-1") + count("Bearer tok-2"), 160);
}

/// The lock holder's token call takes four leases, but the holder is alive and renews
/// its lease: nobody takes over or calls on their own, one token call in all, and
/// against an endpoint that rotates refresh tokens no replica sends a spent one.
pub async fn slow_holder<T: TokenStore>(store: impl Fn() -> T) {
    // Renewed every third of the lease: a stall of the holder's runtime shorter than
    // about 600 ms cannot lose it on a busy machine (this runs on real sockets).
    let lease = Duration::from_secs(1);
    // The call takes four leases; the 10 s token timeout leaves a wide margin.
    let endpoint = super::rotating_endpoint_slow(3600, Duration::from_secs(4)).await;
    let layers: Vec<EshopboxAuthLayer> = (0..8)
        .map(|_| {
            EshopboxAuthLayer::builder(super::credentials())
                .token_url(&endpoint.url())
                .token_store(store())
                .lock_lease(lease)
                .token_timeout(Duration::from_secs(10))
                .build()
                .unwrap()
        })
        .collect();
    let seen = burst(&layers, &EchoApi::default(), 20).await;

    assert!(seen.iter().all(|auth| auth == "Bearer tok-1"), "{seen:?}");
    assert_eq!(endpoint.posts(), 1);
}

/// Against an endpoint that rotates the refresh token on every call and refuses spent
/// ones: each round a different replica makes the token call, and it sends the
/// refresh token the previous round stored, whichever replica rotated it.
pub async fn rotation<T: TokenStore>(store: impl Fn() -> T) {
    let endpoint = super::rotating_endpoint(3600).await;
    let layers: Vec<EshopboxAuthLayer> = (0..4)
        .map(|_| {
            EshopboxAuthLayer::builder(super::credentials())
                .token_url(&endpoint.url())
                .token_store(store())
                .build()
                .unwrap()
        })
        .collect();
    let api = EchoApi::default();
    burst(&layers, &api, 20).await;

    for round in 0..4 {
        // Every replica picks up the current token first, so that invalidating it
        // everywhere leaves nothing usable in the store.
        burst(&layers, &api, 1).await;
        for layer in &layers {
            layer.handle().invalidate();
        }
        let seen = burst(&layers[round..=round], &api, 5).await;
        let expected = format!("Bearer tok-{}", round + 2);
        assert!(seen.iter().all(|auth| *auth == expected), "{seen:?}");
    }
    let sent = super::sent_refresh_tokens(&endpoint);
    // Five calls, each with the newest refresh token: none was refused as spent.
    assert_eq!(sent, [super::REFRESH_TOKEN, "rt-1", "rt-2", "rt-3", "rt-4"]);
    let stored = store().load_refresh_token().await.unwrap().unwrap();
    assert_eq!(stored.refresh_token().expose_secret(), "rt-5");
}

/// An in-process provider that rotates the refresh token on every call and refuses
/// spent ones, for tests on paused time. Each layer gets a [`RotatingClient`].
#[derive(Clone, Default)]
pub struct RotatingProvider {
    state: Arc<std::sync::Mutex<ProviderState>>,
}

#[derive(Default)]
struct ProviderState {
    issued: usize,
    /// The refresh tokens sent, in order.
    sent: Vec<String>,
}

impl RotatingProvider {
    /// A client starting from the configured refresh token.
    pub fn client(&self) -> RotatingClient {
        RotatingClient {
            provider: self.clone(),
            mine: std::sync::Mutex::new(super::REFRESH_TOKEN.to_owned()),
        }
    }

    /// The refresh tokens sent so far.
    pub fn sent(&self) -> Vec<String> {
        self.state.lock().unwrap().sent.clone()
    }
}

/// One layer's view of a [`RotatingProvider`].
pub struct RotatingClient {
    provider: RotatingProvider,
    mine: std::sync::Mutex<String>,
}

impl TokenSource for RotatingClient {
    fn fetch(&self) -> BoxFuture<'_, Result<FetchedToken, Error>> {
        Box::pin(async move {
            let sent = self.mine.lock().unwrap().clone();
            let mut state = self.provider.state.lock().unwrap();
            state.sent.push(sent.clone());
            let valid = match state.issued {
                0 => super::REFRESH_TOKEN.to_owned(),
                n => format!("rt-{n}"),
            };
            if sent != valid {
                return Err(Error::rejected(
                    "invalid_grant: the refresh token was spent",
                ));
            }
            state.issued += 1;
            let n = state.issued;
            *self.mine.lock().unwrap() = format!("rt-{n}");
            Ok(FetchedToken::new(format!("tok-{n}"))
                .expires_in(Duration::from_secs(3600))
                .rotated_refresh_token(format!("rt-{n}")))
        })
    }

    fn refresh_token(&self) -> Option<secrecy::SecretString> {
        Some(self.mine.lock().unwrap().clone().into())
    }

    fn use_refresh_token(&self, refresh_token: secrecy::SecretString) {
        *self.mine.lock().unwrap() = refresh_token.expose_secret().to_owned();
    }
}
