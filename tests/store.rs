//! Several layers sharing one token through a token store: the in-process store,
//! and stores that fail. The same scenarios run against Redis in `tests/redis.rs`.

mod support;

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use eshopbox_auth::store::{InProcessStore, TokenStore};
use eshopbox_auth::{Error, EshopboxAuthLayer};
use support::replicas::{self, burst, counting, Fate, Hooked, StoreCall};
use support::EchoApi;

/// One in-process store, which every replica of a scenario shares.
fn in_process() -> impl Fn() -> InProcessStore {
    let store = InProcessStore::new();
    move || store.clone()
}

// In-process only: on paused time.
#[tokio::test(start_paused = true)]
async fn eight_cold_layers_sharing_a_store_make_one_token_call() {
    replicas::cold_start(in_process()).await;
}

// In-process only: on paused time.
#[tokio::test(start_paused = true)]
async fn a_401_for_the_shared_token_makes_one_token_call_for_all_layers() {
    replicas::shared_401(in_process()).await;
}

// In-process only: on paused time.
#[tokio::test(start_paused = true)]
async fn a_stalled_lock_holder_is_taken_over_after_its_lease() {
    replicas::stalled_holder(in_process()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_but_live_lock_holder_keeps_its_lock() {
    replicas::slow_holder(in_process()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotated_refresh_token_is_used_by_every_layer() {
    replicas::rotation(in_process()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotation_in_an_unusable_answer_is_shared_too() {
    // The first answer rotates the refresh token but carries no access token.
    let endpoint = support::TokenServer::start(|n| match n {
        1 => support::Reply::json(200, r#"{"refresh_token":"rt-1"}"#),
        _ => support::Reply::token("tok-2", 3600),
    })
    .await;
    let store = InProcessStore::new();
    let layer = || {
        EshopboxAuthLayer::builder(support::credentials())
            .token_url(&endpoint.url())
            .token_store(store.clone())
            .build()
            .unwrap()
    };
    let (first, second) = (layer(), layer());
    let err = burst_result(&first).await.unwrap_err();
    assert_eq!(
        err.downcast_ref::<Error>().unwrap().kind(),
        eshopbox_auth::ErrorKind::InvalidResponse
    );
    let stored = store.load_refresh_token().await.unwrap().unwrap();
    assert_eq!(
        secrecy::ExposeSecret::expose_secret(stored.refresh_token()),
        "rt-1"
    );

    // The other replica sends the rotated refresh token, not the spent one.
    assert_eq!(burst_result(&second).await.unwrap(), "Bearer tok-2");
    let sent = support::sent_refresh_tokens(&endpoint);
    assert_eq!(sent, [support::REFRESH_TOKEN, "rt-1"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oauth2_source_shares_its_rotations_too() {
    use eshopbox_auth::source::OAuth2Source;
    let endpoint = support::rotating_endpoint(3600).await;
    let store = InProcessStore::new();
    let layer = || {
        let source = OAuth2Source::refresh_token(
            &endpoint.url(),
            support::CLIENT_ID,
            support::CLIENT_SECRET,
            support::REFRESH_TOKEN,
        )
        .build()
        .unwrap();
        EshopboxAuthLayer::with_source(source)
            .token_store(store.clone())
            .build()
            .unwrap()
    };
    let (first, second) = (layer(), layer());
    assert_eq!(burst_result(&first).await.unwrap(), "Bearer tok-1");
    assert_eq!(burst_result(&second).await.unwrap(), "Bearer tok-1");
    first.handle().invalidate();
    second.handle().invalidate();
    // The second layer never rotated, yet sends the refresh token the first one got.
    assert_eq!(burst_result(&second).await.unwrap(), "Bearer tok-2");
    assert_eq!(
        support::sent_refresh_tokens(&endpoint),
        [support::REFRESH_TOKEN, "rt-1"]
    );
}

/// One request through `layer`.
async fn burst_result(layer: &EshopboxAuthLayer) -> Result<String, tower::BoxError> {
    use tower::{Layer, ServiceExt};
    let response = layer
        .layer(EchoApi::default())
        .oneshot(http::Request::new(
            http_body_util::Empty::<bytes::Bytes>::new(),
        ))
        .await?;
    Ok(response.into_body())
}

/// A store that is down: every call fails at once, as with a refused connection.
fn refusing() -> Hooked<InProcessStore> {
    Hooked::new(InProcessStore::new(), |_| Fate::Fail)
}

/// A store that never answers, as with a server that stopped responding.
fn hanging() -> Hooked<InProcessStore> {
    Hooked::new(InProcessStore::new(), |_| Fate::Hang)
}

#[tokio::test(start_paused = true)]
async fn a_failing_store_costs_no_request() {
    let calls = Arc::new(AtomicUsize::new(0));
    let store = refusing();
    let layers = replicas::replicas(3, || counting(calls.clone()), || store.clone());
    let seen = burst(&layers, &EchoApi::default(), 100).await;

    assert_eq!(seen.len(), 300);
    // Each layer went to the source on its own, once.
    assert_eq!(calls.load(Ordering::SeqCst), 3);
    for layer in &layers {
        assert_eq!(layer.handle().stats().store_failures, 1);
    }
    // After a failure the store is left alone: a forced refresh does not touch it.
    let before = store.calls();
    layers[0].handle().refresh().await.unwrap();
    assert_eq!(store.calls(), before);
    assert_eq!(calls.load(Ordering::SeqCst), 4);
}

#[tokio::test(start_paused = true)]
async fn a_store_that_does_not_answer_is_given_up_on_after_the_store_timeout() {
    let calls = Arc::new(AtomicUsize::new(0));
    let layer = EshopboxAuthLayer::with_source(counting(calls.clone()))
        .token_store(hanging())
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

#[tokio::test(start_paused = true)]
async fn a_lock_left_by_a_dead_replica_is_taken_over_when_its_lease_runs_out() {
    let store = InProcessStore::new();
    // A replica took the lock with a 2 s lease and died.
    assert!(store
        .try_lock("dead-replica", Duration::from_secs(2))
        .await
        .unwrap());
    let calls = Arc::new(AtomicUsize::new(0));
    let layer = EshopboxAuthLayer::with_source(counting(calls.clone()))
        .token_store(store.clone())
        .token_timeout(Duration::from_secs(5))
        .lock_lease(Duration::from_secs(1))
        .build()
        .unwrap();
    let started = tokio::time::Instant::now();
    let seen = burst(std::slice::from_ref(&layer), &EchoApi::default(), 10).await;

    assert!(seen.iter().all(|auth| auth == "Bearer tok-1"));
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    // Taken over once the lease ran out (polled at most 200 ms apart).
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_secs(2) && waited <= Duration::from_millis(2200),
        "{waited:?}"
    );
    assert_eq!(layer.handle().stats().store_failures, 0);
    assert!(store.load().await.unwrap().is_some());
}

/// An in-process store that loses the answer to the first refresh-token write: the
/// write happens, the writer is told it failed (a timeout, a dropped connection).
fn loses_first_refresh_token_answer() -> Hooked<InProcessStore> {
    let lost = AtomicBool::new(false);
    Hooked::new(InProcessStore::new(), move |call| {
        if call == StoreCall::SaveRefreshToken && !lost.swap(true, Ordering::SeqCst) {
            Fate::LoseAnswer
        } else {
            Fate::Pass
        }
    })
}

#[tokio::test(start_paused = true)]
async fn a_late_refresh_token_write_never_puts_back_a_spent_one() {
    let provider = replicas::RotatingProvider::default();
    let store = loses_first_refresh_token_answer();
    let layer = || {
        EshopboxAuthLayer::with_source(provider.client())
            .token_store(store.clone())
            .lock_lease(Duration::from_millis(300))
            .build()
            .unwrap()
    };
    let (a, b) = (layer(), layer());
    let api = EchoApi::default();

    // A rotates to rt-1; the store takes it but A is told it failed.
    assert_eq!(
        burst(std::slice::from_ref(&a), &api, 1).await,
        ["Bearer tok-1"]
    );
    // B takes over A's lock when its lease runs out, sends rt-1, rotates to rt-2.
    assert_eq!(
        burst(std::slice::from_ref(&b), &api, 1).await,
        ["Bearer tok-2"]
    );
    // Once A uses the store again, its old rt-1 must not replace rt-2. (The stored
    // token is removed so that A has to make a token call.)
    tokio::time::sleep(Duration::from_secs(4)).await;
    let shared = store.load().await.unwrap().unwrap();
    assert!(store.remove(shared.id()).await.unwrap());
    a.handle().invalidate();
    assert_eq!(
        burst(std::slice::from_ref(&a), &api, 1).await,
        ["Bearer tok-3"]
    );

    assert_eq!(provider.sent(), [support::REFRESH_TOKEN, "rt-1", "rt-2"]);
    let stored = store.load_refresh_token().await.unwrap().unwrap();
    assert_eq!(
        secrecy::ExposeSecret::expose_secret(stored.refresh_token()),
        "rt-3"
    );
}

/// A store whose refresh lock cannot be taken: `try_lock` fails, everything else
/// works (as when the lock's key sits on an unreachable node).
fn lock_unavailable() -> Hooked<InProcessStore> {
    Hooked::new(InProcessStore::new(), |call| match call {
        StoreCall::TryLock => Fate::Fail,
        _ => Fate::Pass,
    })
}

#[tokio::test(start_paused = true)]
async fn a_lock_the_store_cannot_take_is_a_store_failure_and_a_direct_refresh() {
    let calls = Arc::new(AtomicUsize::new(0));
    let store = lock_unavailable();
    let layers = replicas::replicas(3, || counting(calls.clone()), || store.clone());
    let seen = burst(&layers, &EchoApi::default(), 50).await;

    // Not "held by another replica" (that would wait): each layer refreshed on its
    // own, once, and no request failed.
    assert_eq!(seen.len(), 150);
    assert_eq!(calls.load(Ordering::SeqCst), 3);
    for layer in &layers {
        assert_eq!(layer.handle().stats().store_failures, 1);
    }
}

#[tokio::test]
async fn forget_workspace_empties_that_workspaces_part_of_an_in_process_store() {
    use eshopbox_auth::secrecy::SecretString;
    use eshopbox_auth::store::{SharedRefreshToken, SharedToken};

    let store = InProcessStore::new();
    let acme = store.for_workspace("acme").unwrap();
    let globex = store.for_workspace("globex").unwrap();
    for part in [&acme, &globex] {
        let token = SharedToken::new(
            1,
            SecretString::from("tok"),
            Duration::from_secs(3600),
            Duration::from_secs(3600),
        );
        part.save(&token).await.unwrap();
        let refresh = SharedRefreshToken::new(2, SecretString::from("rt"));
        assert!(part.save_refresh_token(&refresh, None).await.unwrap());
    }
    store.forget_workspace("acme").await.unwrap();
    // The part layers already hold is emptied (they keep sharing it), and so is the
    // one handed out next.
    for part in [acme, store.for_workspace("acme").unwrap()] {
        assert!(part.load().await.unwrap().is_none());
        assert!(part.load_refresh_token().await.unwrap().is_none());
    }
    assert!(globex.load().await.unwrap().is_some());
    assert!(globex.load_refresh_token().await.unwrap().is_some());
    // A workspace the store never saw: nothing to do.
    store.forget_workspace("initech").await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_stored_refresh_token_gives_way_to_the_configured_one() {
    use secrecy::ExposeSecret;
    // An endpoint that rotates: each answer hands out the next refresh token; the app
    // can be authorised again, which voids every earlier refresh token.
    let valid = Arc::new(std::sync::Mutex::new(support::REFRESH_TOKEN.to_owned()));
    let endpoint = {
        let valid = valid.clone();
        let mut issued = 0;
        support::TokenServer::start_seeing(move |_, seen| {
            let mut valid = valid.lock().unwrap();
            if support::sent_refresh_token(seen).as_deref() != Some(valid.as_str()) {
                return support::Reply::json(400, r#"{"error":"invalid_grant"}"#);
            }
            issued += 1;
            *valid = format!("rt-{issued}");
            support::Reply::json(
                200,
                &format!(
                    r#"{{"access_token":"tok-{issued}","refresh_token":"rt-{issued}","expires_in":3600,"token_type":"Bearer"}}"#
                ),
            )
        })
        .await
    };
    let store = InProcessStore::new();
    let layer = |refresh_token: &str| {
        EshopboxAuthLayer::builder(eshopbox_auth::Credentials::new(
            support::CLIENT_ID,
            support::CLIENT_SECRET,
            refresh_token,
        ))
        .token_url(&endpoint.url())
        .token_store(store.clone())
        .build()
        .unwrap()
    };
    // The fleet runs, and the store keeps the rotated refresh token.
    let fleet = layer(support::REFRESH_TOKEN);
    fleet.handle().get().await.unwrap();
    let stored = store.load_refresh_token().await.unwrap().unwrap();
    assert_eq!(stored.refresh_token().expose_secret(), "rt-1");

    // The app is authorised again: only the new refresh token works, and the fleet
    // is redeployed with it.
    *valid.lock().unwrap() = "re-authorised".to_owned();
    let redeployed = layer("re-authorised");
    // It takes the stored access token, until the API refuses it (revoked too).
    let handle = redeployed.handle();
    assert_eq!(
        handle.get().await.unwrap().secret().expose_secret(),
        "tok-1"
    );
    assert!(handle.invalidate());
    let token = handle.get().await.unwrap();
    assert_eq!(token.secret().expose_secret(), "tok-2");
    let sent = support::sent_refresh_tokens(&endpoint);
    assert_eq!(sent, [support::REFRESH_TOKEN, "rt-1", "re-authorised"]);
    // The store now holds what that call rotated to, for the other replicas.
    let stored = store.load_refresh_token().await.unwrap().unwrap();
    assert_eq!(stored.refresh_token().expose_secret(), "rt-2");

    // Both refused: one call with each, the error is `Rejected`, and the store keeps
    // what it has.
    *valid.lock().unwrap() = "revoked-for-good".to_owned();
    let other = layer("re-authorised").handle();
    other.get().await.unwrap();
    assert!(other.invalidate());
    let err = other.get().await.unwrap_err();
    assert_eq!(err.kind(), eshopbox_auth::ErrorKind::Rejected);
    let sent = support::sent_refresh_tokens(&endpoint);
    assert_eq!(sent[3..], ["rt-2", "re-authorised"]);
    let stored = store.load_refresh_token().await.unwrap().unwrap();
    assert_eq!(stored.refresh_token().expose_secret(), "rt-2");
}

/// A source whose provider rotates refresh tokens and can void them all (the app
/// authorised again): it answers only the refresh token it considers valid.
struct Rotating {
    /// The one refresh token the provider accepts now.
    valid: Arc<std::sync::Mutex<String>>,
    /// The one this source sends next.
    sending: std::sync::Mutex<String>,
    /// When each token call was made.
    calls: Arc<std::sync::Mutex<Vec<tokio::time::Instant>>>,
    issued: AtomicUsize,
}

impl eshopbox_auth::source::TokenSource for Rotating {
    fn fetch(
        &self,
    ) -> eshopbox_auth::source::BoxFuture<'_, Result<eshopbox_auth::source::FetchedToken, Error>>
    {
        Box::pin(async move {
            self.calls.lock().unwrap().push(tokio::time::Instant::now());
            let mut valid = self.valid.lock().unwrap();
            let mut sending = self.sending.lock().unwrap();
            if *sending != *valid {
                return Err(Error::rejected("invalid_grant"));
            }
            let n = self.issued.fetch_add(1, Ordering::SeqCst) + 1;
            *valid = format!("rt-{n}");
            sending.clone_from(&valid);
            Ok(eshopbox_auth::source::FetchedToken::new(format!("tok-{n}"))
                .rotated_refresh_token(valid.clone()))
        })
    }

    fn refresh_token(&self) -> Option<secrecy::SecretString> {
        Some(self.sending.lock().unwrap().clone().into())
    }

    fn use_refresh_token(&self, refresh_token: secrecy::SecretString) {
        use secrecy::ExposeSecret;
        *self.sending.lock().unwrap() = refresh_token.expose_secret().to_owned();
    }
}

// The refresh after a 401 is spaced from the last one by the failure cooldown, but
// the configured refresh token, tried after the stored one was refused, is the same
// refresh: it goes at once.
#[tokio::test(start_paused = true)]
async fn the_configured_refresh_token_after_a_refused_stored_one_is_not_spaced_out() {
    let valid = Arc::new(std::sync::Mutex::new("configured-1".to_owned()));
    let calls = Arc::new(std::sync::Mutex::new(Vec::new()));
    let store = InProcessStore::new();
    let layer = |configured: &str| {
        EshopboxAuthLayer::with_source(Rotating {
            valid: valid.clone(),
            sending: std::sync::Mutex::new(configured.to_owned()),
            calls: calls.clone(),
            issued: AtomicUsize::new(0),
        })
        .token_store(store.clone())
        .build()
        .unwrap()
    };
    // The fleet rotates configured-1 into rt-1, which the store keeps.
    layer("configured-1").handle().get().await.unwrap();
    // Authorised again: only configured-2 works, and a replica is deployed with it. It
    // takes the stored access token until the API refuses it.
    *valid.lock().unwrap() = "configured-2".to_owned();
    let handle = layer("configured-2").handle();
    handle.get().await.unwrap();
    assert!(handle.invalidate());
    handle.get().await.unwrap();

    let calls = calls.lock().unwrap().clone();
    // The fleet's call; then rt-1 (refused) and configured-2, in the same instant.
    assert_eq!(calls.len(), 3);
    assert_eq!(calls[2] - calls[1], Duration::ZERO, "{calls:?}");
}

// A renewal that fails (the store did not answer once) must not give the lock up:
// the holder keeps renewing, so another replica does not take the lock while the
// token call goes on and spend the same refresh token.
#[tokio::test(start_paused = true)]
async fn a_failed_lease_renewal_is_tried_again_and_the_lock_kept() {
    let calls = Arc::new(AtomicUsize::new(0));
    let slow = {
        let calls = calls.clone();
        move || {
            let calls = calls.clone();
            eshopbox_auth::source::source_fn(move || {
                let calls = calls.clone();
                async move {
                    let n = calls.fetch_add(1, Ordering::SeqCst) + 1;
                    // Four leases.
                    tokio::time::sleep(Duration::from_secs(4)).await;
                    Ok(eshopbox_auth::source::FetchedToken::new(format!("tok-{n}")))
                }
            })
        }
    };
    let store = InProcessStore::new();
    let lock_calls = Arc::new(AtomicUsize::new(0));
    let holder_store = {
        let lock_calls = lock_calls.clone();
        Hooked::new(store.clone(), move |call| {
            // The first renewal (the second lock call) fails.
            if call == StoreCall::TryLock && lock_calls.fetch_add(1, Ordering::SeqCst) == 1 {
                Fate::Fail
            } else {
                Fate::Pass
            }
        })
    };
    let holder = EshopboxAuthLayer::with_source(slow())
        .token_store(holder_store)
        .lock_lease(Duration::from_secs(1))
        .build()
        .unwrap();
    let other = EshopboxAuthLayer::with_source(slow())
        .token_store(store.clone())
        .lock_lease(Duration::from_secs(1))
        .build()
        .unwrap();
    let api = EchoApi::default();
    let first = tokio::spawn({
        let (holder, api) = (holder.clone(), api.clone());
        async move { burst(&[holder], &api, 1).await }
    });
    // Past the lease the holder would have had without renewing.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let second = burst(&[other], &api, 1).await;
    assert_eq!(first.await.unwrap(), ["Bearer tok-1"]);
    assert_eq!(second, ["Bearer tok-1"]);
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    assert!(
        lock_calls.load(Ordering::SeqCst) > 2,
        "renewed after the failure"
    );
}

#[tokio::test(start_paused = true)]
async fn with_store_required_a_failing_store_fails_the_refresh_without_a_token_call() {
    let calls = Arc::new(AtomicUsize::new(0));
    let down = Arc::new(AtomicBool::new(true));
    let store = {
        let down = down.clone();
        Hooked::new(InProcessStore::new(), move |_| {
            if down.load(Ordering::SeqCst) {
                Fate::Fail
            } else {
                Fate::Pass
            }
        })
    };
    let layer = EshopboxAuthLayer::with_source(counting(calls.clone()))
        .token_store(store.clone())
        .store_required(true)
        .build()
        .unwrap();
    let handle = layer.handle();
    // The first refresh finds the store down; the next ones, moments later, fail at
    // once without asking it again (it is left alone for a while, as without
    // `store_required`).
    for _ in 0..3 {
        let error = handle.get().await.unwrap_err();
        assert_eq!(error.kind(), eshopbox_auth::ErrorKind::Unavailable);
        assert!(error.to_string().contains("only through it"), "{error}");
    }
    assert_eq!(calls.load(Ordering::SeqCst), 0);
    assert_eq!(handle.stats().store_failures, 1);
    assert_eq!(store.calls(), 1);
    // Back, and tried again after the pause.
    down.store(false, Ordering::SeqCst);
    tokio::time::sleep(Duration::from_secs(3)).await;
    let token = handle.get().await.unwrap();
    assert_eq!(calls.load(Ordering::SeqCst), 1);

    // In the soft window, a failing store puts the next refresh off, as a failed
    // token call would: many requests, one store call.
    tokio::time::sleep_until(token.info().refresh_at).await;
    down.store(true, Ordering::SeqCst);
    let before = store.calls();
    let api = EchoApi::default();
    for _ in 0..50 {
        let seen = burst(std::slice::from_ref(&layer), &api, 1).await;
        assert_eq!(seen, ["Bearer tok-1"]);
    }
    assert_eq!(store.calls() - before, 1);
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    let now = handle.token().unwrap().info();
    assert_eq!(now.generation, token.info().generation);
    assert!(now.refresh_at > token.info().refresh_at, "put off");
}

// After a 401, a refresh the request did not start (the background refresher's, the
// handle's) must not take the refused token back from the store.
#[tokio::test(start_paused = true)]
async fn a_refused_token_is_not_taken_back_from_the_store_by_any_refresh() {
    let calls = Arc::new(AtomicUsize::new(0));
    let layer = EshopboxAuthLayer::with_source(counting(calls.clone()))
        .token_store(InProcessStore::new())
        .build()
        .unwrap();
    let handle = layer.handle();
    let first = handle.get().await.unwrap();
    assert!(handle.invalidate());
    let next = handle.refresh().await.unwrap();
    assert_ne!(next.generation, first.info().generation);
    use secrecy::ExposeSecret;
    let token = handle.token().unwrap();
    assert_eq!(token.secret().expose_secret(), "tok-2");
    assert_eq!(calls.load(Ordering::SeqCst), 2);
}

#[test]
fn store_required_without_a_store_is_a_config_error() {
    let error = EshopboxAuthLayer::with_source(counting(Arc::default()))
        .store_required(true)
        .build()
        .unwrap_err();
    assert_eq!(error.kind(), eshopbox_auth::ErrorKind::Config);
    assert!(error.to_string().contains("store_required"), "{error}");
}

// A lock another process keeps past the token timeout (a replica configured with a
// much longer lease died holding it): no token call, a clear error, and a warning.
#[tokio::test(start_paused = true)]
async fn a_lock_held_for_the_whole_token_timeout_fails_the_refresh_with_a_warning() {
    let store = InProcessStore::new();
    assert!(store
        .try_lock("another-process", Duration::from_secs(3600))
        .await
        .unwrap());
    let calls = Arc::new(AtomicUsize::new(0));
    let layer = EshopboxAuthLayer::with_source(counting(calls.clone()))
        .token_store(store)
        .token_timeout(Duration::from_secs(10))
        .lock_lease(Duration::from_secs(1))
        .build()
        .unwrap();
    let (captured, _guard) = support::telemetry::capture(tracing::Level::WARN);
    let error = layer.handle().get().await.unwrap_err();
    assert_eq!(error.kind(), eshopbox_auth::ErrorKind::Unavailable);
    assert!(error.to_string().contains("whole token timeout"), "{error}");
    assert_eq!(calls.load(Ordering::SeqCst), 0);
    let log = captured.text();
    assert!(log.contains("held by another process"), "{log}");
}
