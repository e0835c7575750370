//! Replicas sharing a token through Redis the way teams run it in production: a
//! Redis Cluster (3 masters, 3 replicas) and a master with a replica watched by three
//! Sentinels. Each test starts its own `redis-server`, `redis-cli` and
//! `redis-sentinel` processes on free 127.0.0.1 ports (`scripts/test.sh` installs
//! them when missing), fails a master over under traffic, and stops everything when it ends,
//! failed or not.

#![cfg(feature = "redis")]

mod support;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use eshopbox_auth::store::{RedisStore, TokenStore};
use eshopbox_auth::EshopboxAuthLayer;
use support::replicas;
use support::traffic::{endpoint_replicas, gaps, totals, traffic, until};
use support::TokenServer;

/// A process this test started, killed when dropped.
struct Process(Child);

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A directory of its own for a test's configuration files, removed when dropped.
struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> Self {
        let dir = std::env::temp_dir().join(format!(
            "eshopbox-auth-{name}-{}-{:x}",
            std::process::id(),
            fastrand::u64(..)
        ));
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }

    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn binary(name: &str, variable: &str) -> String {
    std::env::var(variable).unwrap_or_else(|_| name.to_owned())
}

/// A port on 127.0.0.1 that is free now, whose cluster bus port (the port + 10000) is
/// free too; not one of `taken`.
fn free_port(taken: &[u16]) -> u16 {
    for _ in 0..100 {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let Some(bus) = port.checked_add(10000) else {
            continue;
        };
        let clashes = |t: u16| {
            [Some(t), t.checked_add(10000)].contains(&Some(port))
                || [Some(t), t.checked_add(10000)].contains(&Some(bus))
        };
        if taken.iter().any(|&t| clashes(t)) {
            continue;
        }
        if std::net::TcpListener::bind(("127.0.0.1", bus)).is_ok() {
            return port;
        }
    }
    panic!("no free port pair on 127.0.0.1");
}

/// How long a server may take to answer once started, and a blocking wait may last:
/// generous, for a loaded machine.
const LIMIT: Duration = Duration::from_secs(60);

/// Starts the process `spawn` makes for a free port (not one of `taken`), and waits
/// until it answers there. A port is free when picked but bound a moment later:
/// should another process take it first, the server exits and another port is tried.
fn start_on_free_port(taken: &[u16], mut spawn: impl FnMut(u16) -> Child) -> (Process, u16) {
    for _ in 0..10 {
        let port = free_port(taken);
        let mut process = Process(spawn(port));
        if answers(&mut process, port) {
            return (process, port);
        }
    }
    panic!("no server could bind any of ten free ports");
}

/// Waits until the server on `port` answers and is `process` (not another one that
/// holds the port); false if `process` exited first.
fn answers(process: &mut Process, port: u16) -> bool {
    let pid = process.0.id();
    let deadline = Instant::now() + LIMIT;
    while Instant::now() < deadline {
        if process.0.try_wait().unwrap().is_some() {
            return false;
        }
        let info = query::<String>(port, redis::cmd("INFO").arg("server"));
        if info.is_ok_and(|info| info.contains(&format!("process_id:{pid}\r\n"))) {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    panic!("the server on port {port} did not come up within {LIMIT:?}");
}

/// A `redis-server` with extra arguments (given its port) on a free port (not one of
/// `taken`).
fn redis_server(dir: &Path, taken: &[u16], extra: impl Fn(u16) -> Vec<String>) -> (Process, u16) {
    start_on_free_port(taken, |port| {
        Command::new(binary("redis-server", "REDIS_SERVER"))
            .args(["--bind", "127.0.0.1", "--port", &port.to_string()])
            .args(["--save", "", "--appendonly", "no"])
            .arg("--dir")
            .arg(dir)
            .args(extra(port))
            .stdout(Stdio::null())
            .spawn()
            .expect("could not start redis-server: run the tests with scripts/test.sh, which installs it, or apt-get install -y redis-server")
    })
}

fn client(port: u16) -> redis::Client {
    redis::Client::open(format!("redis://127.0.0.1:{port}/")).unwrap()
}

/// Runs one command on a connection of its own, with a bounded wait (a stopped
/// server refuses the connection at once; these bound a hung one).
fn query<T: redis::FromRedisValue>(port: u16, command: &redis::Cmd) -> redis::RedisResult<T> {
    let mut connection = client(port).get_connection_with_timeout(Duration::from_secs(10))?;
    connection.set_read_timeout(Some(Duration::from_secs(10)))?;
    command.query(&mut connection)
}

/// Waits (at most [`LIMIT`], blocking) until `condition` holds.
fn wait_until(what: &str, mut condition: impl FnMut() -> bool) {
    let deadline = Instant::now() + LIMIT;
    while Instant::now() < deadline {
        if condition() {
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!("gave up waiting until {what} ({LIMIT:?})");
}

/// A Redis Cluster of three masters and three replicas on 127.0.0.1.
struct Cluster {
    ports: Vec<u16>,
    nodes: Vec<Option<Process>>,
    _dir: TempDir,
}

impl Cluster {
    fn start() -> Self {
        let dir = TempDir::new("cluster");
        let (mut ports, mut nodes) = (Vec::new(), Vec::new());
        for _ in 0..6 {
            let (node, port) = redis_server(dir.path(), &ports, |port| {
                let config = dir.path().join(format!("nodes-{port}.conf"));
                vec![
                    "--cluster-enabled".into(),
                    "yes".into(),
                    "--cluster-config-file".into(),
                    config.to_str().unwrap().into(),
                    "--cluster-node-timeout".into(),
                    "1000".into(),
                ]
            });
            ports.push(port);
            nodes.push(Some(node));
        }
        let cluster = Cluster {
            ports,
            nodes,
            _dir: dir,
        };
        let create = Command::new(binary("redis-cli", "REDIS_CLI"))
            .args(["--cluster", "create"])
            .args(cluster.ports.iter().map(|port| format!("127.0.0.1:{port}")))
            .args(["--cluster-replicas", "1", "--cluster-yes"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("could not run redis-cli: run the tests with scripts/test.sh, which installs it, or apt-get install -y redis-tools");
        let mut create = Process(create);
        let mut status = None;
        wait_until("redis-cli --cluster create finished", || {
            status = create.0.try_wait().unwrap();
            status.is_some()
        });
        assert!(
            status.is_some_and(|s| s.success()),
            "redis-cli --cluster create failed"
        );
        wait_until("every node sees the cluster as ok", || {
            cluster.ports.iter().all(|&port| {
                query::<String>(port, redis::cmd("CLUSTER").arg("INFO"))
                    .is_ok_and(|info| info.contains("cluster_state:ok"))
            })
        });
        wait_until("every replica is in sync", || {
            cluster.ports.iter().all(|&port| {
                query::<String>(port, redis::cmd("INFO").arg("replication")).is_ok_and(|info| {
                    info.contains("role:master") || info.contains("master_link_status:up")
                })
            })
        });
        cluster
    }

    fn urls(&self) -> Vec<String> {
        self.ports
            .iter()
            .map(|port| format!("redis://127.0.0.1:{port}"))
            .collect()
    }

    /// A store of its own, as another process would have.
    fn store(&self) -> RedisStore {
        RedisStore::cluster(self.urls())
            .unwrap()
            .key_prefix("test:")
    }

    /// The port of the master serving `key`, as a live node sees it.
    fn master_of(&self, key: &str) -> Option<u16> {
        let live = self
            .ports
            .iter()
            .zip(&self.nodes)
            .filter(|(_, node)| node.is_some())
            .map(|(&port, _)| port);
        for port in live {
            let Ok(slot) = query::<u16>(port, redis::cmd("CLUSTER").arg("KEYSLOT").arg(key)) else {
                continue;
            };
            let Ok(nodes) = query::<String>(port, redis::cmd("CLUSTER").arg("NODES")) else {
                continue;
            };
            return nodes.lines().find_map(|line| serves(line, slot));
        }
        None
    }

    /// The ports of the live masters.
    fn masters(&self) -> Vec<u16> {
        self.ports
            .iter()
            .zip(&self.nodes)
            .filter(|(_, node)| node.is_some())
            .map(|(&port, _)| port)
            .filter(|&port| {
                query::<String>(port, redis::cmd("INFO").arg("replication"))
                    .is_ok_and(|info| info.contains("role:master"))
            })
            .collect()
    }

    fn node_id(port: u16) -> String {
        query(port, redis::cmd("CLUSTER").arg("MYID")).unwrap()
    }

    fn kill(&mut self, port: u16) {
        let index = self.ports.iter().position(|&p| p == port).unwrap();
        self.nodes[index] = None;
    }
}

/// The port of the node a `CLUSTER NODES` line describes, if it is a healthy master
/// serving `slot`.
fn serves(line: &str, slot: u16) -> Option<u16> {
    let fields: Vec<&str> = line.split_whitespace().collect();
    let flags = fields.get(2)?;
    if !flags.contains("master") || flags.contains("fail") {
        return None;
    }
    let holds = fields.iter().skip(8).any(|range| {
        let (start, end) = range.split_once('-').unwrap_or((range, range));
        matches!((start.parse::<u16>(), end.parse::<u16>()), (Ok(s), Ok(e)) if s <= slot && slot <= e)
    });
    let address = fields.get(1)?.split('@').next()?;
    holds.then(|| address.rsplit(':').next()?.parse().ok())?
}

/// Replicas on the loopback token endpoint that ride out a failover on the store:
/// each store call may take up to 5 s (the client retries meanwhile), while a token
/// is still valid for 2 s after its refresh starts.
fn patient_replicas(
    n: usize,
    endpoint: &TokenServer,
    store: impl Fn() -> RedisStore,
) -> Vec<EshopboxAuthLayer> {
    (0..n)
        .map(|_| {
            EshopboxAuthLayer::builder(support::credentials())
                .token_url(&endpoint.url())
                .refresh_margin(Duration::from_secs(2))
                .token_store(store())
                .lock_lease(Duration::from_secs(1))
                .store_timeout(Duration::from_secs(5))
                .build()
                .unwrap()
        })
        .collect()
}

const KEY: &str = "{test:}token";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_one_token_call_on_a_cold_start_and_one_per_expiry() {
    let cluster = Cluster::start();
    replicas::cold_start(|| cluster.store()).await;

    // Tokens live 2 s and are refreshed about 1 s before expiry.
    let endpoint = TokenServer::counting(2).await;
    // (Another credential set: the cold start's hour-long token stays out of it.)
    let layers = endpoint_replicas(8, &endpoint, || cluster.store().key_prefix("traffic:"));
    let stop = Arc::new(AtomicBool::new(false));
    let tasks = traffic(&layers, stop.clone());
    until("five tokens were issued", || endpoint.posts() >= 5).await;
    stop.store(true, Ordering::Relaxed);
    let (ok, failed) = totals(tasks).await;

    assert_eq!(failed, 0, "{ok} requests succeeded");
    // Two replicas refreshing for one expiry would call within milliseconds of each
    // other; one call per expiry means about a second between calls.
    for gap in gaps(&endpoint) {
        assert!(
            gap >= Duration::from_millis(450),
            "two token calls {gap:?} apart"
        );
    }
    let failures: u64 = layers
        .iter()
        .map(|l| l.handle().stats().store_failures)
        .sum();
    assert_eq!(failures, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_master_killed_under_traffic_fails_over_without_failed_requests() {
    let mut cluster = Cluster::start();
    // Tokens live 4 s and are refreshed about 2 s before expiry.
    let endpoint = TokenServer::counting(4).await;
    let layers = patient_replicas(8, &endpoint, || cluster.store());
    let stop = Arc::new(AtomicBool::new(false));
    let tasks = traffic(&layers, stop.clone());
    until("every replica has the token", || {
        layers.iter().all(|l| l.handle().info().is_some())
    })
    .await;
    assert_eq!(endpoint.posts(), 1);

    // The master goes down just as the first replica starts its refresh, so the
    // refresh runs into the failover.
    let refresh_at = layers
        .iter()
        .filter_map(|l| l.handle().info())
        .map(|info| info.refresh_at)
        .min()
        .unwrap();
    let master = cluster.master_of(KEY).expect("a master serves the token");
    tokio::time::sleep_until(refresh_at).await;
    cluster.kill(master);
    until("a replica took over the token's slot", || {
        cluster.master_of(KEY).is_some_and(|port| port != master)
    })
    .await;
    let at_failover = endpoint.posts();
    until("two more expiries passed", || {
        endpoint.posts() >= at_failover + 2
    })
    .await;
    stop.store(true, Ordering::Relaxed);
    let (ok, failed) = totals(tasks).await;

    assert_eq!(failed, 0, "{ok} requests succeeded");
    // One call per expiry (about 2 s apart), but for at most one extra call for the
    // failover: one write the killed master had not passed on to its replica yet.
    let short = gaps(&endpoint)
        .into_iter()
        .filter(|gap| *gap < Duration::from_millis(900))
        .count();
    let failures: u64 = layers
        .iter()
        .map(|l| l.handle().stats().store_failures)
        .sum();
    eprintln!(
        "cluster failover: {ok} requests, token calls {:?} apart, {failures} store failures",
        gaps(&endpoint)
    );
    assert!(short <= 1, "token calls: {:?}", gaps(&endpoint));
    // The new master holds the current token.
    let stored = cluster.store().load().await.unwrap();
    assert!(stored.is_some());
}

/// Moves `keys` from the server on port `from` to the one on `to` (`MIGRATE`).
fn migrate(from: u16, to: u16, keys: &[String]) {
    if keys.is_empty() {
        return;
    }
    let mut command = redis::cmd("MIGRATE");
    command
        .arg("127.0.0.1")
        .arg(to)
        .arg("")
        .arg(0)
        .arg(5000)
        .arg("KEYS")
        .arg(keys);
    query::<String>(from, &command).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_resharding_under_traffic_is_followed_without_store_failures() {
    let cluster = Cluster::start();
    let endpoint = TokenServer::counting(2).await;
    let layers = endpoint_replicas(8, &endpoint, || cluster.store());
    let stop = Arc::new(AtomicBool::new(false));
    let tasks = traffic(&layers, stop.clone());
    until("every replica has the token", || {
        layers.iter().all(|l| l.handle().info().is_some())
    })
    .await;

    // The slot of the store's keys moves from its master to another one.
    let slot: u16 = query(
        cluster.ports[0],
        redis::cmd("CLUSTER").arg("KEYSLOT").arg(KEY),
    )
    .unwrap();
    let from = cluster.master_of(KEY).unwrap();
    let to = *cluster
        .masters()
        .iter()
        .find(|&&port| port != from)
        .unwrap();
    let (from_id, to_id) = (Cluster::node_id(from), Cluster::node_id(to));
    let setslot = |port: u16, state: &str, id: &str| {
        query::<String>(
            port,
            redis::cmd("CLUSTER")
                .arg("SETSLOT")
                .arg(slot)
                .arg(state)
                .arg(id),
        )
        .unwrap();
    };
    setslot(to, "IMPORTING", &from_id);
    setslot(from, "MIGRATING", &to_id);
    // Half-way: the token has moved, the lock and refresh token not yet. Commands on
    // the token are answered `ASK` by the old master.
    migrate(from, to, &[KEY.to_owned()]);
    let at = endpoint.posts();
    until("two expiries passed half-way", || {
        endpoint.posts() >= at + 2
    })
    .await;
    // The rest, and the slot itself: the old master answers `MOVED`.
    let rest: Vec<String> = query(
        from,
        redis::cmd("CLUSTER")
            .arg("GETKEYSINSLOT")
            .arg(slot)
            .arg(100),
    )
    .unwrap();
    migrate(from, to, &rest);
    for port in cluster.masters() {
        setslot(port, "NODE", &to_id);
    }
    let at = endpoint.posts();
    until("two expiries passed after the move", || {
        endpoint.posts() >= at + 2
    })
    .await;
    stop.store(true, Ordering::Relaxed);
    let (ok, failed) = totals(tasks).await;

    assert_eq!(failed, 0, "{ok} requests succeeded");
    // The client followed every redirection: no store failure, one call per expiry.
    let failures: u64 = layers
        .iter()
        .map(|l| l.handle().stats().store_failures)
        .sum();
    assert_eq!(failures, 0);
    for gap in gaps(&endpoint) {
        assert!(
            gap >= Duration::from_millis(450),
            "two token calls {gap:?} apart"
        );
    }
    // The half-way state really sent the clients to the new master with `ASK`.
    let stats: String = query(to, redis::cmd("INFO").arg("commandstats")).unwrap();
    assert!(
        stats.contains("cmdstat_asking"),
        "no ASKING on the new master"
    );
    assert_eq!(cluster.master_of(KEY), Some(to));
    let stored: Option<Vec<u8>> = query(to, redis::cmd("GET").arg(KEY)).unwrap();
    assert!(stored.is_some(), "the token lives on the new master");
}

/// One master, one replica and three Sentinels on 127.0.0.1.
struct Sentinels {
    master: u16,
    replica: u16,
    sentinels: Vec<u16>,
    processes: Vec<Option<Process>>,
    _dir: TempDir,
}

const MASTER_NAME: &str = "mymaster";

impl Sentinels {
    fn start() -> Self {
        let dir = TempDir::new("sentinel");
        let (master_process, master) = redis_server(dir.path(), &[], |_| Vec::new());
        let (replica_process, replica) = redis_server(dir.path(), &[master], |_| {
            vec!["--replicaof".into(), "127.0.0.1".into(), master.to_string()]
        });
        let mut processes = vec![Some(master_process), Some(replica_process)];
        wait_until("the replica is in sync", || {
            query::<String>(replica, redis::cmd("INFO").arg("replication"))
                .is_ok_and(|info| info.contains("master_link_status:up"))
        });
        let mut sentinels: Vec<u16> = Vec::new();
        for _ in 0..3 {
            let taken = [&[master, replica][..], &sentinels].concat();
            let (process, port) = start_on_free_port(&taken, |port| {
                let config = dir.path().join(format!("sentinel-{port}.conf"));
                std::fs::write(
                    &config,
                    format!(
                        "port {port}\nbind 127.0.0.1\ndir {dir}\n\
                         sentinel monitor {MASTER_NAME} 127.0.0.1 {master} 2\n\
                         sentinel down-after-milliseconds {MASTER_NAME} 1000\n\
                         sentinel failover-timeout {MASTER_NAME} 10000\n",
                        dir = dir.path().display()
                    ),
                )
                .unwrap();
                Command::new(binary("redis-sentinel", "REDIS_SENTINEL"))
                    .arg(&config)
                    .stdout(Stdio::null())
                    .spawn()
                    .expect("could not start redis-sentinel: run the tests with scripts/test.sh, which installs it, or apt-get install -y redis-sentinel")
            });
            processes.push(Some(process));
            sentinels.push(port);
        }
        let setup = Sentinels {
            master,
            replica,
            sentinels,
            processes,
            _dir: dir,
        };
        wait_until("the Sentinels know each other and the replica", || {
            setup.sentinels.iter().all(|&port| {
                let known = |what: &str| {
                    query::<Vec<redis::Value>>(
                        port,
                        redis::cmd("SENTINEL").arg(what).arg(MASTER_NAME),
                    )
                    .map_or(0, |list| list.len())
                };
                known("SENTINELS") == 2 && known("REPLICAS") == 1
            })
        });
        setup
    }

    fn urls(&self) -> Vec<String> {
        self.sentinels
            .iter()
            .map(|port| format!("redis://127.0.0.1:{port}"))
            .collect()
    }

    fn store(&self) -> RedisStore {
        RedisStore::sentinel(self.urls(), MASTER_NAME)
            .unwrap()
            .key_prefix("test:")
    }

    /// The master's port, as the Sentinels report it.
    fn current_master(&self) -> Option<u16> {
        let (_, port): (String, String) = query(
            self.sentinels[0],
            redis::cmd("SENTINEL")
                .arg("GET-MASTER-ADDR-BY-NAME")
                .arg(MASTER_NAME),
        )
        .ok()?;
        port.parse().ok()
    }

    fn kill_master(&mut self) {
        self.processes[0] = None;
    }

    /// The id header of the token stored on the server at `port`.
    fn stored_id(&self, port: u16) -> Option<Vec<u8>> {
        let value: Option<Vec<u8>> = query(port, redis::cmd("GET").arg(KEY)).ok()?;
        value.map(|v| v[..16].to_vec())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sentinel_failover_under_traffic_fails_no_request_and_the_store_works_after() {
    let mut setup = Sentinels::start();
    let endpoint = TokenServer::counting(2).await;
    let layers = endpoint_replicas(8, &endpoint, || setup.store());
    let stop = Arc::new(AtomicBool::new(false));
    let tasks = traffic(&layers, stop.clone());
    until("the first token was shared", || {
        setup.stored_id(setup.master).is_some()
    })
    .await;

    setup.kill_master();
    until("the Sentinels promoted the replica", || {
        setup.current_master() == Some(setup.replica)
    })
    .await;
    // The replica held a copy of the old master's token; the store works again once a
    // replica writes a new one to the new master.
    let copied = setup.stored_id(setup.replica);
    until("a new token was stored on the new master", || {
        let now = setup.stored_id(setup.replica);
        now.is_some() && now != copied
    })
    .await;
    let at = endpoint.posts();
    until("two more expiries passed", || endpoint.posts() >= at + 2).await;
    stop.store(true, Ordering::Relaxed);
    let (ok, failed) = totals(tasks).await;

    assert_eq!(failed, 0, "{ok} requests succeeded");
    let stored = setup.store().load().await.unwrap();
    assert!(stored.is_some(), "a fresh store finds the new master");
}

#[test]
fn cluster_and_sentinel_need_valid_urls_that_errors_do_not_repeat() {
    let error = RedisStore::cluster(Vec::<String>::new()).unwrap_err();
    assert_eq!(error.kind(), eshopbox_auth::ErrorKind::Config);
    let error = RedisStore::cluster(["redis://:hunter2@127.0.0.1:notaport"]).unwrap_err();
    assert_eq!(error.kind(), eshopbox_auth::ErrorKind::Config);
    assert!(!format!("{error} {error:?}").contains("hunter2"));
    let error = RedisStore::sentinel(Vec::<String>::new(), MASTER_NAME).unwrap_err();
    assert_eq!(error.kind(), eshopbox_auth::ErrorKind::Config);
    for blank in ["", " "] {
        let error = RedisStore::sentinel(["redis://127.0.0.1:26379"], blank).unwrap_err();
        assert_eq!(error.kind(), eshopbox_auth::ErrorKind::Config);
        assert!(error.to_string().contains("master's name"), "{error}");
    }
    let error = RedisStore::sentinel(["redis://:hunter2@[::1"], MASTER_NAME).unwrap_err();
    assert!(!format!("{error} {error:?}").contains("hunter2"));
    let store = RedisStore::cluster(["rediss://:hunter2@redis.example:6380"]).unwrap();
    assert!(!format!("{store:?}").contains("hunter2"));
    let store =
        RedisStore::sentinel(["redis://:hunter2@sentinel.example:26379"], MASTER_NAME).unwrap();
    assert!(!format!("{store:?}").contains("hunter2"));
}
