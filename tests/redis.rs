//! Replicas sharing a token through a real Redis server. Each test starts its own
//! `redis-server` on a free 127.0.0.1 port (`scripts/test.sh` installs it when
//! missing), so tests can stop and restart it.

#![cfg(feature = "redis")]

mod support;

use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use eshopbox_auth::source::BoxFuture;
use eshopbox_auth::store::{RedisStore, SharedRefreshToken, SharedToken, TokenStore};
use eshopbox_auth::{Error, EshopboxAuthLayer};
use secrecy::ExposeSecret;
use support::redis::RedisServer;
use support::replicas::{self, burst};
use support::traffic::{endpoint_replicas, gaps, totals, traffic, until};
use support::{EchoApi, TokenServer};
use tokio::time::Instant;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eight_cold_replicas_make_one_token_call() {
    let redis = RedisServer::start();
    replicas::cold_start(|| redis.store()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_401_is_shared_through_redis() {
    let redis = RedisServer::start();
    replicas::shared_401(|| redis.store()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_lock_holder_is_taken_over_after_its_lease() {
    let redis = RedisServer::start();
    replicas::stalled_holder(|| redis.store()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_but_live_lock_holder_keeps_its_lock() {
    let redis = RedisServer::start();
    replicas::slow_holder(|| redis.store()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotated_refresh_token_is_shared_through_redis() {
    let redis = RedisServer::start();
    replicas::rotation(|| redis.store()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expiry_under_traffic_costs_one_token_call_per_expiry() {
    let redis = RedisServer::start();
    // Tokens live 2 s and are refreshed about 1 s before expiry.
    let endpoint = TokenServer::counting(2).await;
    let layers = endpoint_replicas(8, &endpoint, || redis.store());
    let stop = Arc::new(AtomicBool::new(false));
    let tasks = traffic(&layers, stop.clone());
    until("five tokens were issued", || endpoint.posts() >= 5).await;
    stop.store(true, Ordering::Relaxed);
    let (ok, failed) = totals(tasks).await;

    assert_eq!(failed, 0);
    assert!(ok > 0);
    // Two replicas refreshing for the same expiry would call within milliseconds of
    // each other; one call per expiry means about a second between calls. Half of
    // that is the bound: well above a duplicate, well below a refresh period.
    for gap in gaps(&endpoint) {
        assert!(
            gap >= Duration::from_millis(450),
            "two token calls {gap:?} apart"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_stopped_and_restarted_under_traffic_fails_no_request() {
    let mut redis = RedisServer::start();
    let endpoint = TokenServer::counting(2).await;
    let layers = endpoint_replicas(8, &endpoint, || redis.store());
    let stop = Arc::new(AtomicBool::new(false));
    let tasks = traffic(&layers, stop.clone());
    until("the first token was shared", || endpoint.posts() >= 1).await;

    redis.stop();
    let at_stop = endpoint.posts();
    // With Redis down the replicas refresh on their own, through a couple of expiries.
    until("replicas refreshed without Redis", || {
        endpoint.posts() >= at_stop + 8
    })
    .await;
    redis.restart();
    // Back with Redis: a token is stored again.
    until("a token was stored in the restarted Redis", || {
        redis.get("{test:}token").is_some()
    })
    .await;
    let at_rejoin = endpoint.posts();
    until("two more expiries passed", || {
        endpoint.posts() >= at_rejoin + 2
    })
    .await;
    stop.store(true, Ordering::Relaxed);
    let (ok, failed) = totals(tasks).await;

    assert_eq!(failed, 0, "{ok} requests succeeded");
    let failures: u64 = layers
        .iter()
        .map(|l| l.handle().stats().store_failures)
        .sum();
    assert!(failures > 0, "the replicas noticed Redis was down");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_redis_fails_no_request() {
    let redis = RedisServer::start();
    let endpoint = TokenServer::counting(2).await;
    let layers = endpoint_replicas(8, &endpoint, || redis.store());
    let stop = Arc::new(AtomicBool::new(false));
    let tasks = traffic(&layers, stop.clone());
    until("the first token was shared", || endpoint.posts() >= 1).await;

    // Redis stops answering for 3 s (longer than the 1 s store timeout).
    redis.command(redis::cmd("CLIENT").arg("PAUSE").arg(3000).arg("ALL"));
    let store_failures = || -> u64 {
        layers
            .iter()
            .map(|l| l.handle().stats().store_failures)
            .sum()
    };
    until("a replica gave up on the slow store", || {
        store_failures() > 0
    })
    .await;
    let at = endpoint.posts();
    until("two more expiries passed", || endpoint.posts() >= at + 2).await;
    stop.store(true, Ordering::Relaxed);
    let (ok, failed) = totals(tasks).await;
    assert_eq!(failed, 0, "{ok} requests succeeded");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_newest_refresh_token_survives_a_redis_restart_that_lost_the_data() {
    let mut redis = RedisServer::start();
    let endpoint = support::rotating_endpoint(3600).await;
    let layers: Vec<EshopboxAuthLayer> = (0..3)
        .map(|_| {
            EshopboxAuthLayer::builder(support::credentials())
                .token_url(&endpoint.url())
                .token_store(redis.store())
                .build()
                .unwrap()
        })
        .collect();
    let api = EchoApi::default();
    let invalidate_all = || {
        for layer in &layers {
            layer.handle().invalidate();
        }
    };
    burst(&layers, &api, 5).await; // tok-1, rt-1
    invalidate_all();
    burst(&layers[..1], &api, 5).await; // replica 0 rotates: tok-2, rt-2
    burst(&layers, &api, 5).await; // the others take tok-2 (and rt-2)

    // Redis comes back empty (no persistence): the stored refresh token is gone.
    redis.stop();
    redis.restart();
    invalidate_all();
    // Replica 1 never rotated, yet sends rt-2 (learnt from the store), and stores
    // what that call rotated to.
    let seen = burst(&layers[1..2], &api, 5).await;
    assert!(seen.iter().all(|auth| auth == "Bearer tok-3"), "{seen:?}");
    let sent = support::sent_refresh_tokens(&endpoint);
    assert_eq!(sent, [support::REFRESH_TOKEN, "rt-1", "rt-2"]);
    let stored = redis.store().load_refresh_token().await.unwrap().unwrap();
    assert_eq!(
        secrecy::ExposeSecret::expose_secret(stored.refresh_token()),
        "rt-3"
    );
}

// A replica that stayed idle while another rotated the refresh token on does not put
// its spent copy into a store that lost its data: the others would take it and be
// refused too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_spent_refresh_token_is_not_put_back_into_a_store_that_lost_its_data() {
    let mut redis = RedisServer::start();
    let endpoint = support::rotating_endpoint(3600).await;
    let layers = endpoint_replicas(2, &endpoint, || redis.store());
    let (busy, idle) = (layers[0].clone(), layers[1].clone());
    let api = EchoApi::default();
    burst(&[busy.clone(), idle.clone()], &api, 5).await; // tok-1, rt-1 for both
    for _ in 0..3 {
        busy.handle().invalidate();
        burst(std::slice::from_ref(&busy), &api, 1).await;
    }
    // The busy replica rotated on to rt-4; the idle one still knows rt-1.
    redis.stop();
    redis.restart();

    idle.handle().invalidate();
    let error = idle.handle().get().await.unwrap_err();
    assert_eq!(error.kind(), eshopbox_auth::ErrorKind::Rejected);
    assert!(
        redis.store().load_refresh_token().await.unwrap().is_none(),
        "a spent refresh token was put into the store"
    );
    // The busy replica goes on with the one it knows.
    busy.handle().invalidate();
    let token = busy.handle().get().await.unwrap();
    assert_eq!(token.secret().expose_secret(), "tok-5");
    let sent = support::sent_refresh_tokens(&endpoint);
    assert_eq!(sent[sent.len() - 1], "rt-4");
    let stored = redis.store().load_refresh_token().await.unwrap().unwrap();
    assert_eq!(stored.refresh_token().expose_secret(), "rt-5");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_are_stored_encrypted_with_an_encryption_key() {
    let redis = RedisServer::start();
    let endpoint = TokenServer::counting(3600).await;
    let redis = &redis;
    let keyed = |key: u8| move || redis.store().encryption_key([key; 32]);
    let api = EchoApi::default();

    let first = endpoint_replicas(2, &endpoint, keyed(1));
    let seen = burst(&first, &api, 10).await;
    assert!(seen.iter().all(|auth| auth == "Bearer tok-1"));
    assert_eq!(
        endpoint.posts(),
        1,
        "the second replica read the encrypted token"
    );
    let raw = redis.get("{test:}token").unwrap();
    let text = String::from_utf8_lossy(&raw);
    assert!(!text.contains("tok-1"), "stored in the clear: {text}");

    // A replica with another key cannot read it: it gets its own token, and its
    // requests do not fail.
    let other = endpoint_replicas(1, &endpoint, keyed(2));
    let seen = burst(&other, &api, 10).await;
    assert!(seen.iter().all(|auth| auth == "Bearer tok-2"));
    assert_eq!(other[0].handle().stats().store_failures, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lock_and_token_removal_are_owner_and_id_checked() {
    let redis = RedisServer::start();
    let store = redis.store();
    assert!(store
        .try_lock("owner-a", Duration::from_secs(5))
        .await
        .unwrap());
    assert!(!store
        .try_lock("owner-b", Duration::from_secs(5))
        .await
        .unwrap());
    store.unlock("owner-b").await.unwrap();
    assert_eq!(redis.get("{test:}lock").as_deref(), Some(&b"owner-a"[..]));
    store.unlock("owner-a").await.unwrap();
    assert!(store
        .try_lock("owner-b", Duration::from_secs(5))
        .await
        .unwrap());
    // A lock without an expiry (set by hand) is not taken, but given one lease.
    redis.command(redis::cmd("SET").arg("{test:}lock").arg("by-hand"));
    assert_eq!(redis.pttl("{test:}lock"), -1);
    assert!(!store
        .try_lock("owner-c", Duration::from_secs(5))
        .await
        .unwrap());
    assert_eq!(redis.get("{test:}lock").as_deref(), Some(&b"by-hand"[..]));
    assert!((1..=5000).contains(&redis.pttl("{test:}lock")));
    redis.command(redis::cmd("DEL").arg("{test:}lock"));

    let token = eshopbox_auth::store::SharedToken::new(
        0xfeed,
        "tok".to_owned().into(),
        Duration::from_secs(60),
        Duration::from_secs(60),
    );
    store.save(&token).await.unwrap();
    assert!(!store.remove(0xbeef).await.unwrap());
    assert_eq!(store.load().await.unwrap().unwrap().id(), 0xfeed);
    assert!(store.remove(0xfeed).await.unwrap());
    assert!(store.load().await.unwrap().is_none());
}

/// A CA and a certificate for 127.0.0.1 signed by it, made with the `openssl` tool.
fn test_certificates() -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("eshopbox-auth-tls-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let openssl = |args: &[&str]| {
        let status = Command::new("openssl")
            .args(args)
            .current_dir(&dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .expect("could not run openssl: run the tests with scripts/test.sh, which installs it, or apt-get install -y openssl");
        assert!(status.success(), "openssl {args:?} failed");
    };
    openssl(&[
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-days",
        "1",
        "-subj",
        "/CN=test CA",
        "-keyout",
        "ca.key",
        "-out",
        "ca.pem",
    ]);
    openssl(&[
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-subj",
        "/CN=127.0.0.1",
        "-keyout",
        "server.key",
        "-out",
        "server.csr",
    ]);
    std::fs::write(dir.join("san.ext"), "subjectAltName=IP:127.0.0.1\n").unwrap();
    openssl(&[
        "x509",
        "-req",
        "-in",
        "server.csr",
        "-CA",
        "ca.pem",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-days",
        "1",
        "-extfile",
        "san.ext",
        "-out",
        "server.pem",
    ]);
    dir
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_share_a_token_over_tls() {
    let certificates = test_certificates();
    let redis = RedisServer::start_with(Some(certificates.clone()));
    replicas::cold_start(|| redis.store()).await;
    // The server speaks TLS only: the token really went through it.
    assert!(redis.get("{test:}token").is_some());
    drop(redis);
    let _ = std::fs::remove_dir_all(certificates);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_malformed_value_in_redis_is_replaced() {
    let redis = RedisServer::start();
    // Values with an hour to live, which a save would keep (they have more life left
    // than a new token of an hour): one in this crate's format whose payload does not
    // parse, and one holding a token with a line break.
    let unparsable = || {
        redis.command(
            redis::cmd("SET")
                .arg("{test:}token")
                .arg("0123456789abcdef p{broken")
                .arg("PX")
                .arg(7_200_000),
        );
    };
    let unsendable = || async {
        let token = SharedToken::new(
            7,
            "tok\r\nX-Injected: 1".to_owned().into(),
            Duration::from_secs(7200),
            Duration::from_secs(7200),
        );
        redis.store().save(&token).await.unwrap();
    };
    for garbage in [
        "not a token",
        "0123456789abcdef zzzzzzzzzzzzzzzz x",
        "unparsable",
        "unsendable",
    ] {
        match garbage {
            "unparsable" => unparsable(),
            "unsendable" => unsendable().await,
            _ => redis.command(redis::cmd("SET").arg("{test:}token").arg(garbage)),
        }
        let endpoint = TokenServer::counting(3600).await;
        let layers = endpoint_replicas(2, &endpoint, || redis.store());
        let seen = burst(&layers, &EchoApi::default(), 10).await;
        assert!(seen.iter().all(|auth| auth == "Bearer tok-1"), "{garbage}");
        assert_eq!(
            endpoint.posts(),
            1,
            "{garbage}: one call, then the other replica adopted it"
        );
        let stored = redis.store().load().await.unwrap().unwrap();
        assert_eq!(
            secrecy::ExposeSecret::expose_secret(stored.access_token()),
            "tok-1"
        );
    }
}

#[test]
fn a_bad_url_is_a_config_error_that_does_not_repeat_the_url() {
    let error = RedisStore::new("redis://:hunter2@127.0.0.1:notaport/").unwrap_err();
    assert_eq!(error.kind(), eshopbox_auth::ErrorKind::Config);
    assert!(!format!("{error} {error:?}").contains("hunter2"));
    let store = RedisStore::new("rediss://:hunter2@redis.example:6380/0").unwrap();
    assert!(!format!("{store:?}").contains("hunter2"));
}

/// A token as the layer shares it: `lifetime` in all, `remaining` from now.
fn shared(id: u64, token: &str, lifetime: u64, remaining: u64) -> SharedToken {
    SharedToken::new(
        id,
        token.to_owned().into(),
        Duration::from_secs(lifetime),
        Duration::from_secs(remaining),
    )
}

fn secret(token: &SharedToken) -> &str {
    token.access_token().expose_secret()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_late_or_older_token_never_replaces_a_newer_one() {
    let redis = RedisServer::start();
    let (first, late) = (redis.store(), redis.store());
    first.save(&shared(1, "newer", 3600, 3000)).await.unwrap();
    // Another replica's write arrives late with a token that has less life left.
    late.save(&shared(2, "older", 3600, 2000)).await.unwrap();
    let stored = first.load().await.unwrap().unwrap();
    assert_eq!((stored.id(), secret(&stored)), (1, "newer"));
    // One with more life left does replace it.
    late.save(&shared(3, "newest", 3600, 3500)).await.unwrap();
    let stored = first.load().await.unwrap().unwrap();
    assert_eq!((stored.id(), secret(&stored)), (3, "newest"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_late_rotated_refresh_token_never_replaces_a_newer_version() {
    let redis = RedisServer::start();
    let (a, b) = (redis.store(), redis.store());
    let version = |id: u64, token: &str| SharedRefreshToken::new(id, token.to_owned().into());
    assert!(a
        .save_refresh_token(&version(1, "rt-1"), None)
        .await
        .unwrap());
    assert!(a
        .save_refresh_token(&version(2, "rt-2"), Some(1))
        .await
        .unwrap());
    // Replica b also rotated from version 1, but later: version 2 stays.
    assert!(!b
        .save_refresh_token(&version(3, "rt-3"), Some(1))
        .await
        .unwrap());
    // Nor does a write that claims nothing was stored.
    assert!(!b
        .save_refresh_token(&version(4, "rt-4"), None)
        .await
        .unwrap());
    let stored = b.load_refresh_token().await.unwrap().unwrap();
    assert_eq!(stored.id(), 2);
    assert_eq!(stored.refresh_token().expose_secret(), "rt-2");
    // Resending the stored version is fine (the scripts are safe to send twice).
    assert!(a
        .save_refresh_token(&version(2, "rt-2"), Some(1))
        .await
        .unwrap());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_token_keys_ttl_is_its_remaining_life() {
    let redis = RedisServer::start();
    let store = redis.store();
    let started = Instant::now();
    // Half of its hour is gone: the key lives the other half, not a whole hour.
    let token = shared(7, "tok", 3600, 1800);
    store.save(&token).await.unwrap();
    let saved = Instant::now();
    let ttl = Duration::from_millis(redis.pttl("{test:}token") as u64);
    let done = Instant::now();
    // At most what the token had left when it was saved, at least that less the time
    // the test took and two whole-millisecond roundings (the TTL written is rounded
    // down, and so is Redis's clock when it ran the write).
    let ms = Duration::from_millis(1);
    assert!(ttl <= token.expires_at() - started + ms, "{ttl:?}");
    assert!(
        ttl + (done - started) + 2 * ms >= Duration::from_secs(1800),
        "{ttl:?}"
    );
    // What a reader gets back is that TTL, counted from when it asked. It can end
    // later than the writer's expiry only by the write's latency: the TTL was
    // counted from before the write was sent, and runs from when Redis ran it.
    let loaded = store.load().await.unwrap().unwrap();
    let done = Instant::now();
    assert_eq!(loaded.lifetime(), Duration::from_secs(3600));
    assert!(loaded.expires_at() <= token.expires_at() + (saved - started));
    // Earlier by at most the time the test took and three whole-millisecond
    // roundings: the TTL written, Redis's clock when it ran the write, and the
    // millisecond a reader counts off `PTTL`.
    assert!(loaded.expires_at() + (done - started) + 3 * ms >= token.expires_at());
}

/// A store whose writer's wall clock is `ahead` of the others (or behind): what it
/// writes carries that wall-clock time.
struct SkewedClock {
    inner: RedisStore,
    ahead: Duration,
    behind: bool,
}

impl TokenStore for SkewedClock {
    fn load(&self) -> BoxFuture<'_, Result<Option<SharedToken>, Error>> {
        self.inner.load()
    }
    fn save<'a>(&'a self, token: &'a SharedToken) -> BoxFuture<'a, Result<(), Error>> {
        let shown = if self.behind {
            token.issued_at() - self.ahead
        } else {
            token.issued_at() + self.ahead
        };
        let skewed = token.clone().with_issued_at(shown);
        Box::pin(async move { self.inner.save(&skewed).await })
    }
    fn remove(&self, id: u64) -> BoxFuture<'_, Result<bool, Error>> {
        self.inner.remove(id)
    }
    fn try_lock<'a>(
        &'a self,
        owner: &'a str,
        lease: Duration,
    ) -> BoxFuture<'a, Result<bool, Error>> {
        self.inner.try_lock(owner, lease)
    }
    fn unlock<'a>(&'a self, owner: &'a str) -> BoxFuture<'a, Result<(), Error>> {
        self.inner.unlock(owner)
    }
    fn load_refresh_token(&self) -> BoxFuture<'_, Result<Option<SharedRefreshToken>, Error>> {
        self.inner.load_refresh_token()
    }
    fn save_refresh_token<'a>(
        &'a self,
        token: &'a SharedRefreshToken,
        replaces: Option<u64>,
    ) -> BoxFuture<'a, Result<bool, Error>> {
        self.inner.save_refresh_token(token, replaces)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_with_wall_clocks_minutes_apart_agree_on_the_expiry() {
    let redis = RedisServer::start();
    let endpoint = TokenServer::counting(60).await;
    let api = EchoApi::default();
    for behind in [false, true] {
        redis.command(&mut redis::cmd("FLUSHALL"));
        let at = endpoint.posts();
        let layer = |ahead: u64| {
            EshopboxAuthLayer::builder(support::credentials())
                .token_url(&endpoint.url())
                .refresh_margin(Duration::from_secs(10))
                .token_store(SkewedClock {
                    inner: redis.store(),
                    ahead: Duration::from_secs(ahead),
                    behind,
                })
                .build()
                .unwrap()
        };
        // The writer's wall clock is ten minutes off; the reader's is right.
        let writer = [layer(600)];
        let before = Instant::now();
        burst(&writer, &api, 1).await;
        let written = writer[0].handle().info().unwrap();
        let reader = [layer(0)];
        burst(&reader, &api, 1).await;
        let after = Instant::now();
        let read = reader[0].handle().info().unwrap();

        assert_eq!(endpoint.posts(), at + 1, "the reader took the stored token");
        // The reader's token expires with the writer's, not ten minutes off. The two
        // differ by no more than the time the test took: the reader counts from when
        // it asked (earlier), and the writer's TTL starts when Redis ran the write
        // (later than the writer counted it from, by that write's latency).
        let took = after - before;
        assert!(read.expires_at <= written.expires_at + took);
        // (Three whole-millisecond roundings on the way: see the test above.)
        assert!(read.expires_at + took + Duration::from_millis(3) >= written.expires_at);
        // And it refreshes before that expiry, on time.
        assert!(read.refresh_at < read.expires_at);
        assert!(read.refresh_at + Duration::from_secs(10) >= read.expires_at);
    }
}

/// `n` replicas with an encryption key on the store prefix `prefix`.
fn sealed_replicas(
    n: usize,
    endpoint: &TokenServer,
    redis: &RedisServer,
    prefix: &str,
) -> Vec<EshopboxAuthLayer> {
    endpoint_replicas(n, endpoint, || {
        RedisStore::from_client(redis.client())
            .key_prefix(prefix)
            .encryption_key([9; 32])
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_swapped_or_altered_sealed_value_is_refused_and_the_replica_refreshes() {
    let redis = RedisServer::start();
    let endpoint = TokenServer::counting(3600).await;
    let api = EchoApi::default();
    // Two credential sets (two prefixes), each with its token stored, sealed.
    let seen = burst(&sealed_replicas(1, &endpoint, &redis, "a:"), &api, 1).await;
    assert_eq!(seen, ["Bearer tok-1"]);
    let seen = burst(&sealed_replicas(1, &endpoint, &redis, "b:"), &api, 1).await;
    assert_eq!(seen, ["Bearer tok-2"]);
    let (a, b) = (
        redis.get("{a:}token").unwrap(),
        redis.get("{b:}token").unwrap(),
    );

    // Swapped: each value is valid, under the other key name.
    redis.replace("{a:}token", &b);
    redis.replace("{b:}token", &a);
    let fresh = sealed_replicas(1, &endpoint, &redis, "a:");
    let seen = burst(&fresh, &api, 1).await;
    assert_eq!(
        seen,
        ["Bearer tok-3"],
        "the replica refused tok-2 and refreshed"
    );
    assert_eq!(fresh[0].handle().stats().store_failures, 1);

    // The id in the clear header swapped for another: refused too.
    let mut relabelled = redis.get("{b:}token").unwrap();
    assert_eq!(relabelled[16], b' ');
    relabelled[..16].copy_from_slice(b"00000000000000ff");
    redis.replace("{b:}token", &relabelled);
    let fresh = sealed_replicas(1, &endpoint, &redis, "b:");
    let seen = burst(&fresh, &api, 1).await;
    assert_eq!(seen, ["Bearer tok-4"]);
    assert_eq!(fresh[0].handle().stats().store_failures, 1);

    // One byte of the ciphertext flipped: refused.
    let mut flipped = redis.get("{a:}token").unwrap();
    *flipped.last_mut().unwrap() ^= 1;
    redis.replace("{a:}token", &flipped);
    let fresh = sealed_replicas(1, &endpoint, &redis, "a:");
    let seen = burst(&fresh, &api, 1).await;
    assert_eq!(seen, ["Bearer tok-5"]);
    assert_eq!(fresh[0].handle().stats().store_failures, 1);
    assert_eq!(endpoint.posts(), 5);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_rotated_refresh_token_is_sealed_with_a_fresh_nonce_per_write() {
    let redis = RedisServer::start();
    let store = |prefix: &str| {
        RedisStore::from_client(redis.client())
            .key_prefix(prefix)
            .encryption_key([9; 32])
    };
    let version = SharedRefreshToken::new(5, "rt-secret-5".to_owned().into());
    store("a:")
        .save_refresh_token(&version, None)
        .await
        .unwrap();
    let first = redis.get("{a:}refresh-token").unwrap();
    assert!(!String::from_utf8_lossy(&first).contains("rt-secret"));
    // The same version written again: another nonce, another ciphertext.
    store("a:")
        .save_refresh_token(&version, Some(5))
        .await
        .unwrap();
    let second = redis.get("{a:}refresh-token").unwrap();
    assert_eq!(first[..18], second[..18], "same id header and marker");
    assert_ne!(first[18..42], second[18..42], "a nonce used twice");
    let stored = store("a:").load_refresh_token().await.unwrap().unwrap();
    assert_eq!(stored.refresh_token().expose_secret(), "rt-secret-5");

    // Bound to its key name: moved under another prefix, it does not open.
    redis.command(redis::cmd("SET").arg("{b:}refresh-token").arg(&second));
    assert!(store("b:").load_refresh_token().await.is_err());

    // Each token write gets a fresh nonce too.
    let tokens = store("a:");
    tokens.save(&shared(1, "tok-a", 3600, 1000)).await.unwrap();
    let one = redis.get("{a:}token").unwrap();
    tokens.save(&shared(1, "tok-a", 3600, 2000)).await.unwrap();
    let two = redis.get("{a:}token").unwrap();
    assert_ne!(one[18..42], two[18..42], "a nonce used twice");
    assert!(!String::from_utf8_lossy(&two).contains("tok-a"));
}

#[cfg(feature = "workspaces")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_of_a_per_workspace_layer_make_one_token_call_per_workspace() {
    let redis = RedisServer::start();
    support::workspaces::one_token_call_per_workspace(|| redis.store(), 3, 4).await;
    // Each workspace's keys, with the workspace as their hash tag; no shared key.
    for i in 0..4 {
        assert!(redis.get(&format!("test:{{shop-{i}}}:token")).is_some());
    }
    assert!(redis.get("{test:}token").is_none());
}

#[cfg(feature = "workspaces")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forgetting_a_workspace_deletes_its_keys_from_redis() {
    use eshopbox_auth::mock::MockEshopbox;
    use eshopbox_auth::Workspace;
    use tower::{BoxError, Layer, ServiceExt};

    let redis = RedisServer::start();
    let eshopbox = MockEshopbox::start().await.unwrap();
    let apps = [
        ("acme", eshopbox.add_workspace("acme")),
        ("globex", eshopbox.add_workspace("globex")),
    ];
    let layer = EshopboxAuthLayer::per_workspace(move |workspace: Workspace| {
        let found = apps
            .iter()
            .find(|(name, _)| *name == workspace.name())
            .map(|(_, credentials)| credentials.clone());
        async move { Ok::<_, BoxError>(found) }
    })
    .token_url(&eshopbox.token_url())
    .token_store(redis.store())
    .build()
    .unwrap();
    let service = layer.layer(support::EchoApi::default());
    for name in ["acme", "globex"] {
        let mut request = http::Request::get("https://api.myeshopbox.com/api/v1/orders")
            .body(http_body_util::Empty::<bytes::Bytes>::new())
            .unwrap();
        request.extensions_mut().insert(Workspace::new(name));
        service.clone().oneshot(request).await.unwrap();
    }
    // A rotated refresh token and a lock, as another replica may have left them.
    redis.command(redis::cmd("SET").arg("test:{acme}:refresh-token").arg("x"));
    redis.command(redis::cmd("SET").arg("test:{acme}:lock").arg("y"));
    assert!(redis.get("test:{acme}:token").is_some());

    assert!(layer.forget(&Workspace::new("acme")));
    let acme_gone = || {
        ["token", "lock", "refresh-token"]
            .iter()
            .all(|key| redis.get(&format!("test:{{acme}}:{key}")).is_none())
    };
    until("acme's keys are deleted", acme_gone).await;
    assert!(
        redis.get("test:{globex}:token").is_some(),
        "another workspace's token went too"
    );

    // Forgetting a workspace this replica does not keep still clears the store.
    redis.command(
        redis::cmd("SET")
            .arg("test:{initech}:refresh-token")
            .arg("z"),
    );
    assert!(!layer.forget(&Workspace::new("initech")));
    until("initech's refresh token is deleted", || {
        redis.get("test:{initech}:refresh-token").is_none()
    })
    .await;
}

/// A reconnect the server refuses (its password changed) does not leave the store
/// failing for good: once the password is right again, the store works again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_recovers_after_a_refused_reconnect() {
    let redis = RedisServer::start();
    redis.command(
        redis::cmd("CONFIG")
            .arg("SET")
            .arg("requirepass")
            .arg("password-1"),
    );
    let with = |password: &str| {
        redis
            .url()
            .replace("redis://", &format!("redis://:{password}@"))
    };
    let admin = |password: &str| {
        redis::Client::open(with(password))
            .unwrap()
            .get_connection()
            .unwrap()
    };
    let store = RedisStore::new(&with("password-1")).unwrap();
    store.load().await.unwrap();

    // The password changes and connections are cut: the store's reconnect is refused.
    let mut connection = admin("password-1");
    redis::cmd("CONFIG")
        .arg("SET")
        .arg("requirepass")
        .arg("password-2")
        .query::<()>(&mut connection)
        .unwrap();
    redis::cmd("CLIENT")
        .arg("KILL")
        .arg("TYPE")
        .arg("normal")
        .query::<()>(&mut connection)
        .unwrap();
    let error = store.load().await.unwrap_err();
    assert!(
        full_report_of(&error).contains("uthentication"),
        "{error:?}"
    );

    // The old password is back: so is the store.
    redis::cmd("CONFIG")
        .arg("SET")
        .arg("requirepass")
        .arg("password-1")
        .query::<()>(&mut admin("password-2"))
        .unwrap();
    store.load().await.unwrap();
}

/// A connection that goes silent (a failover behind a virtual IP, lost NAT state) is
/// given up at the store timeout, and the next call makes a new connection instead of
/// waiting on the silent one again. Here a proxy on 127.0.0.1 silences the
/// connections it has, and serves new ones.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_connection_is_replaced_after_a_timeout() {
    use std::sync::Mutex;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let redis = RedisServer::start();
    let target = redis
        .url()
        .trim_start_matches("redis://")
        .trim_end_matches('/')
        .to_owned();
    let proxy = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = proxy.local_addr().unwrap();
    let silenced: Arc<Mutex<Vec<Arc<AtomicBool>>>> = Arc::default();
    let accepting = {
        let silenced = silenced.clone();
        tokio::spawn(async move {
            loop {
                let (inbound, _) = proxy.accept().await.unwrap();
                let outbound = tokio::net::TcpStream::connect(&target).await.unwrap();
                let silent = Arc::new(AtomicBool::new(false));
                silenced.lock().unwrap().push(silent.clone());
                let (in_read, in_write) = inbound.into_split();
                let (out_read, out_write) = outbound.into_split();
                let forward = |silent: Arc<AtomicBool>| {
                    move |mut from: tokio::net::tcp::OwnedReadHalf,
                          mut to: tokio::net::tcp::OwnedWriteHalf| async move {
                        let mut buffer = [0u8; 4096];
                        while let Ok(n @ 1..) = from.read(&mut buffer).await {
                            if !silent.load(Ordering::SeqCst)
                                && to.write_all(&buffer[..n]).await.is_err()
                            {
                                break;
                            }
                        }
                    }
                };
                tokio::spawn(forward(silent.clone())(in_read, out_write));
                tokio::spawn(forward(silent)(out_read, in_write));
            }
        })
    };
    let store = RedisStore::new(&format!("redis://{address}/")).unwrap();
    store.load().await.unwrap();

    for silent in silenced.lock().unwrap().iter() {
        silent.store(true, Ordering::SeqCst);
    }
    // Given up (the layer's default store timeout is 1 s).
    let first = tokio::time::timeout(Duration::from_millis(1500), store.load()).await;
    assert!(
        !matches!(first, Ok(Ok(_))),
        "answered on a silent connection"
    );
    // A new connection, through the proxy, answers.
    let second = tokio::time::timeout(Duration::from_secs(10), store.load()).await;
    assert!(matches!(second, Ok(Ok(_))), "{second:?}");
    accepting.abort();
}

/// An error with its causes.
fn full_report_of(error: &Error) -> String {
    let mut text = format!("{error}");
    let mut cause = std::error::Error::source(error);
    while let Some(next) = cause {
        text.push_str(&format!(": {next}"));
        cause = next.source();
    }
    text
}

/// A Redis that refuses the layer's password says so at once, in the log: it is not
/// reported as a store that did not answer, and the connection is not tried again a
/// second later.
#[tokio::test]
async fn a_refused_redis_password_is_logged_as_such() {
    let redis = RedisServer::start();
    redis.command(
        redis::cmd("CONFIG")
            .arg("SET")
            .arg("requirepass")
            .arg("right-password"),
    );
    let admin =
        redis::Client::open(redis.url().replace("redis://", "redis://:right-password@")).unwrap();
    let connections_so_far = || -> u64 {
        let mut connection = admin.get_connection().unwrap();
        let info: String = redis::cmd("INFO")
            .arg("stats")
            .query(&mut connection)
            .unwrap();
        info.lines()
            .find_map(|line| line.strip_prefix("total_connections_received:"))
            .unwrap()
            .trim()
            .parse()
            .unwrap()
    };
    let endpoint = TokenServer::counting(3600).await;
    let store =
        RedisStore::new(&redis.url().replace("redis://", "redis://:wrong-password@")).unwrap();
    let layer = EshopboxAuthLayer::builder(support::credentials())
        .token_url(&endpoint.url())
        .token_store(store)
        .build()
        .unwrap();
    let (captured, _guard) = support::telemetry::capture(tracing::Level::WARN);
    let before = connections_so_far();

    let seen = burst(&[layer], &EchoApi::default(), 1).await;

    // The request was served with a token asked for directly.
    assert_eq!(seen, ["Bearer tok-1"]);
    // One connection from the layer, one for this reading.
    assert_eq!(connections_so_far() - before, 2);
    let log = captured.text();
    assert!(log.contains("token store unavailable"), "{log}");
    assert!(log.contains("AuthenticationFailed"), "{log}");
    assert!(!log.contains("did not answer"), "{log}");
    assert!(!log.contains("wrong-password"), "{log}");
}
