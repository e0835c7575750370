//! Replicas sharing a token through a real Redis server. Each test starts its own
//! `redis-server` on a free 127.0.0.1 port (`scripts/test.sh` installs it when
//! missing), so tests can stop and restart it.

#![cfg(feature = "redis")]

mod support;

use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use eshopbox_auth::store::{RedisStore, TokenStore};
use eshopbox_auth::EshopboxAuthLayer;
use http::Request;
use http_body_util::Empty;
use support::replicas::{self, burst};
use support::{EchoApi, TokenServer};
use tower::{Layer, ServiceExt};

/// A `redis-server` on 127.0.0.1, stopped when dropped.
struct RedisServer {
    port: u16,
    child: Option<Child>,
    /// With TLS: the directory holding the CA and the server's certificate and key.
    tls: Option<std::path::PathBuf>,
}

impl RedisServer {
    fn start() -> Self {
        Self::start_with(None)
    }

    fn start_with(tls: Option<std::path::PathBuf>) -> Self {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let mut server = RedisServer {
            port,
            child: None,
            tls,
        };
        server.restart();
        server
    }

    /// Starts the server (again) on its port, and waits until it answers.
    fn restart(&mut self) {
        let port = self.port.to_string();
        let mut command =
            Command::new(std::env::var("REDIS_SERVER").unwrap_or("redis-server".into()));
        command
            .args(["--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .stdout(Stdio::null());
        match &self.tls {
            None => command.args(["--port", &port]),
            Some(dir) => command
                .args([
                    "--port",
                    "0",
                    "--tls-port",
                    &port,
                    "--tls-auth-clients",
                    "no",
                ])
                .arg("--tls-cert-file")
                .arg(dir.join("server.pem"))
                .arg("--tls-key-file")
                .arg(dir.join("server.key"))
                .arg("--tls-ca-cert-file")
                .arg(dir.join("ca.pem")),
        };
        let child = command
            .spawn()
            .expect("could not start redis-server: run the tests with scripts/test.sh, which installs it, or apt-get install -y redis-server");
        self.child = Some(child);
        let client = self.client();
        for _ in 0..500 {
            if let Ok(mut connection) = client.get_connection() {
                if redis::cmd("PING").query::<String>(&mut connection).is_ok() {
                    return;
                }
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        panic!("redis-server did not come up on port {}", self.port);
    }

    fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    fn url(&self) -> String {
        match self.tls {
            None => format!("redis://127.0.0.1:{}/", self.port),
            Some(_) => format!("rediss://127.0.0.1:{}/", self.port),
        }
    }

    /// A client; with TLS, one that trusts the test CA.
    fn client(&self) -> redis::Client {
        match &self.tls {
            None => redis::Client::open(self.url()).unwrap(),
            Some(dir) => redis::Client::build_with_tls(
                self.url(),
                redis::TlsCertificates {
                    client_tls: None,
                    root_cert: Some(std::fs::read(dir.join("ca.pem")).unwrap()),
                },
            )
            .unwrap(),
        }
    }

    /// A store of its own (its own connection), as another process would have.
    fn store(&self) -> RedisStore {
        RedisStore::from_client(self.client()).key_prefix("test:")
    }

    /// The raw value of a key.
    fn get(&self, key: &str) -> Option<Vec<u8>> {
        let mut connection = self.client().get_connection().unwrap();
        redis::cmd("GET").arg(key).query(&mut connection).unwrap()
    }

    /// Runs a command on a connection of its own.
    fn command(&self, command: &mut redis::Cmd) {
        let mut connection = self.client().get_connection().unwrap();
        command.query::<()>(&mut connection).unwrap();
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.stop();
    }
}

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

/// `n` replicas on the loopback token endpoint, refreshing 1 s before expiry.
fn endpoint_replicas(
    n: usize,
    endpoint: &TokenServer,
    store: impl Fn() -> RedisStore,
) -> Vec<EshopboxAuthLayer> {
    (0..n)
        .map(|_| {
            EshopboxAuthLayer::builder(support::credentials())
                .token_url(&endpoint.url())
                .refresh_margin(Duration::from_secs(1))
                .token_store(store())
                .lock_lease(Duration::from_secs(1))
                .build()
                .unwrap()
        })
        .collect()
}

/// Requests from every replica, a few milliseconds apart, until `stop` is set;
/// returns how many succeeded and how many failed.
fn traffic(
    layers: &[EshopboxAuthLayer],
    stop: Arc<AtomicBool>,
) -> tokio::task::JoinSet<(usize, usize)> {
    let mut tasks = tokio::task::JoinSet::new();
    for layer in layers {
        for _ in 0..4 {
            let service = layer.layer(EchoApi::default());
            let stop = stop.clone();
            tasks.spawn(async move {
                let (mut ok, mut failed) = (0, 0);
                while !stop.load(Ordering::Relaxed) {
                    match service
                        .clone()
                        .oneshot(Request::new(Empty::<Bytes>::new()))
                        .await
                    {
                        Ok(_) => ok += 1,
                        Err(_) => failed += 1,
                    }
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                (ok, failed)
            });
        }
    }
    tasks
}

async fn totals(mut tasks: tokio::task::JoinSet<(usize, usize)>) -> (usize, usize) {
    let (mut ok, mut failed) = (0, 0);
    while let Some(result) = tasks.join_next().await {
        let (o, f) = result.unwrap();
        ok += o;
        failed += f;
    }
    (ok, failed)
}

/// Waits until `condition` holds, looking every 20 ms, for at most a minute.
async fn until(what: &str, condition: impl Fn() -> bool) {
    for _ in 0..3000 {
        if condition() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("gave up waiting until {what}");
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
    let times: Vec<_> = endpoint.seen().iter().map(|seen| seen.at).collect();
    for pair in times.windows(2) {
        let gap = pair[1] - pair[0];
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
        redis.get("test:token").is_some()
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
    // Replica 1 never rotated, yet sends rt-2, and stores it again.
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
    let raw = redis.get("test:token").unwrap();
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
    assert_eq!(redis.get("test:lock").as_deref(), Some(&b"owner-a"[..]));
    store.unlock("owner-a").await.unwrap();
    assert!(store
        .try_lock("owner-b", Duration::from_secs(5))
        .await
        .unwrap());

    let token = eshopbox_auth::store::SharedToken::new(
        0xfeed,
        "tok".to_owned().into(),
        std::time::SystemTime::now(),
        std::time::SystemTime::now() + Duration::from_secs(60),
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
    assert!(redis.get("test:token").is_some());
    drop(redis);
    let _ = std::fs::remove_dir_all(certificates);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_malformed_value_in_redis_is_replaced() {
    let redis = RedisServer::start();
    for garbage in ["not a token", "0123456789abcdef zzzzzzzzzzzzzzzz x"] {
        redis.command(redis::cmd("SET").arg("test:token").arg(garbage));
        let endpoint = TokenServer::counting(3600).await;
        let layers = endpoint_replicas(2, &endpoint, || redis.store());
        let seen = burst(&layers, &EchoApi::default(), 10).await;
        assert!(seen.iter().all(|auth| auth == "Bearer tok-1"));
        assert_eq!(
            endpoint.posts(),
            1,
            "one call, then the other replica adopted it"
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

#[cfg(feature = "workspaces")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_of_a_per_workspace_layer_make_one_token_call_per_workspace() {
    let redis = RedisServer::start();
    support::workspaces::one_token_call_per_workspace(|| redis.store(), 3, 4).await;
    // Each workspace's keys, with the workspace as their hash tag; no shared key.
    for i in 0..4 {
        assert!(redis.get(&format!("test:{{shop-{i}}}:token")).is_some());
    }
    assert!(redis.get("test:token").is_none());
}
