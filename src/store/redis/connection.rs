//! How a [`RedisStore`](super::RedisStore) reaches Redis: one server, a Redis Cluster,
//! or the master a set of Sentinels names.

use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig, MultiplexedConnection};
use redis::cluster::ClusterClient;
use redis::cluster_async::ClusterConnection;
use redis::sentinel::SentinelClient;
use redis::{AsyncConnectionConfig, Cmd, ErrorKind, FromRedisValue, RedisError, RedisResult};
use tokio::sync::{Mutex, OnceCell};

/// Bound on connecting and on each answer (the layer bounds each call as well).
const TIMEOUT: Duration = Duration::from_secs(1);

/// First pause before a Redis Cluster command the client gave up on is sent again.
const CLUSTER_PAUSE_MIN: Duration = Duration::from_millis(50);
/// Longest pause between two attempts.
const CLUSTER_PAUSE_MAX: Duration = Duration::from_millis(500);
/// Attempts at most (about 8 s of pauses), in case the layer's store timeout is
/// longer.
const CLUSTER_ATTEMPTS: u32 = 20;

/// The Redis deployment a store talks to.
pub(super) enum Connector {
    /// One server (or a proxy in front of several). The connection manager
    /// reconnects after I/O errors by itself; after a failure it does not recover
    /// from (a reconnect whose password was refused, say) it is made anew.
    Single {
        client: redis::Client,
        connection: Mutex<Option<ConnectionManager>>,
        /// Set when a command failed (or was given up, its future dropped by the
        /// layer's store timeout) with the connection in doubt: the next command makes
        /// a new manager.
        stale: AtomicBool,
    },
    /// A Redis Cluster: the client follows `MOVED` and `ASK` redirections, waits
    /// out `TRYAGAIN`, and learns the new slot map after a failover.
    Cluster {
        client: ClusterClient,
        connection: OnceCell<ClusterConnection>,
    },
    /// A master found through Sentinels, looked up again whenever its connection
    /// breaks or it answers as a replica (after a failover).
    Sentinel {
        sentinels: Mutex<SentinelClient>,
        master_name: String,
        master: Mutex<Option<MultiplexedConnection>>,
    },
}

impl Connector {
    pub(super) fn single(client: redis::Client) -> Self {
        Connector::Single {
            client,
            connection: Mutex::new(None),
            stale: AtomicBool::new(false),
        }
    }

    pub(super) fn cluster(client: ClusterClient) -> Self {
        Connector::Cluster {
            client,
            connection: OnceCell::new(),
        }
    }

    pub(super) fn sentinel(sentinels: SentinelClient, master_name: String) -> Self {
        Connector::Sentinel {
            sentinels: Mutex::new(sentinels),
            master_name,
            master: Mutex::new(None),
        }
    }

    /// Runs one command. A command that finds the connection dropped (Redis restarted,
    /// or a Sentinel failover moved the master) is sent once more, on a new
    /// connection. Every command this store sends is safe to send twice.
    pub(super) async fn query<T: FromRedisValue>(&self, command: &Cmd) -> RedisResult<T> {
        match self {
            Connector::Single {
                client,
                connection,
                stale,
            } => {
                // No connection retries inside the manager: its first pause is a
                // second or more, longer than the layer's default store timeout, so a
                // refused password or a server that is down showed only as a timeout.
                // A dropped connection is retried once below; after a failure that is
                // not the command's own, the next command makes a new manager.
                let mut manager = {
                    let mut kept = connection.lock().await;
                    if stale.swap(false, Ordering::AcqRel) {
                        *kept = None;
                    }
                    match kept.as_ref() {
                        Some(manager) => manager.clone(),
                        None => {
                            let config = ConnectionManagerConfig::new()
                                .set_connection_timeout(TIMEOUT)
                                .set_response_timeout(TIMEOUT)
                                .set_number_of_retries(0);
                            let manager =
                                ConnectionManager::new_with_config(client.clone(), config).await?;
                            *kept = Some(manager.clone());
                            manager
                        }
                    }
                };
                // Until the answer, the connection is in doubt: a command given up
                // mid-way (a silent connection the manager would never replace) marks
                // it stale.
                let mut doubt = Doubt(stale, true);
                let result = match command.query_async(&mut manager).await {
                    // A dropped connection is made again by the manager: send once
                    // more. A timeout is not: the next command gets a new manager.
                    Err(e) if lost(&e) && !e.is_timeout() => {
                        tracing::debug!(error = %e, "Redis connection lost; sending the command again");
                        command.query_async(&mut manager).await
                    }
                    result => result,
                };
                doubt.1 = result.as_ref().is_err_and(|e| !answered(e));
                result
            }
            // The cluster connection follows redirections, retries and reconnects by
            // itself; what it gives up on while the cluster is failing over is tried
            // again here, a pause apart, until the layer's store timeout ends the call.
            Connector::Cluster { client, connection } => {
                let mut pause = CLUSTER_PAUSE_MIN;
                let mut attempt = 1;
                loop {
                    let result = match connection
                        .get_or_try_init(|| client.get_async_connection())
                        .await
                    {
                        Ok(connection) => command.query_async(&mut connection.clone()).await,
                        Err(e) => Err(e),
                    };
                    match result {
                        Err(e) if attempt < CLUSTER_ATTEMPTS && in_transit(&e) => {
                            tracing::debug!(error = %e, attempt, "Redis Cluster not ready; trying again");
                            tokio::time::sleep(pause).await;
                            pause = (pause * 2).min(CLUSTER_PAUSE_MAX);
                            attempt += 1;
                        }
                        result => return result,
                    }
                }
            }
            Connector::Sentinel {
                sentinels,
                master_name,
                master,
            } => {
                let mut first = true;
                loop {
                    let mut connection = self::master(sentinels, master).await?;
                    match command.query_async(&mut connection).await {
                        Err(e) if first && (lost(&e) || e.kind() == ErrorKind::ReadOnly) => {
                            tracing::debug!(error = %e, %master_name, "Redis master lost; asking the Sentinels again");
                            *master.lock().await = None;
                            first = false;
                        }
                        result => return result,
                    }
                }
            }
        }
    }
}

/// The connection to the current master, asking the Sentinels for it if there is
/// none yet (or it broke).
async fn master(
    sentinels: &Mutex<SentinelClient>,
    master: &Mutex<Option<MultiplexedConnection>>,
) -> RedisResult<MultiplexedConnection> {
    let mut current = master.lock().await;
    if let Some(connection) = current.as_ref() {
        return Ok(connection.clone());
    }
    let client = sentinels.lock().await.async_get_client().await?;
    let config = AsyncConnectionConfig::new()
        .set_connection_timeout(TIMEOUT)
        .set_response_timeout(TIMEOUT);
    let connection = client
        .get_multiplexed_async_connection_with_config(&config)
        .await?;
    *current = Some(connection.clone());
    Ok(connection)
}

/// Whether a Redis Cluster error can pass by itself: a node that went away or does
/// not answer, a cluster that is failing over or moving slots.
fn in_transit(error: &RedisError) -> bool {
    lost(error)
        || error.is_timeout()
        || matches!(
            error.kind(),
            ErrorKind::TryAgain
                | ErrorKind::ClusterDown
                | ErrorKind::MasterDown
                | ErrorKind::BusyLoadingError
                | ErrorKind::ClusterConnectionNotFound
                | ErrorKind::Moved
                | ErrorKind::Ask
        )
}

/// Marks the connection stale when dropped armed.
struct Doubt<'a>(&'a AtomicBool, bool);

impl Drop for Doubt<'_> {
    fn drop(&mut self) {
        if self.1 {
            self.0.store(true, Ordering::Release);
        }
    }
}

/// Whether the server answered the command (with an error of the command's own, such
/// as a script's `NOPERM`), as opposed to a failure of the connection or of
/// reconnecting (a refused password, a timeout, a TLS error).
fn answered(error: &RedisError) -> bool {
    !lost(error)
        && !error.is_timeout()
        && !matches!(
            error.kind(),
            ErrorKind::AuthenticationFailed
                | ErrorKind::InvalidClientConfig
                | ErrorKind::ClientError
        )
}

/// Whether the connection (not the command) failed.
fn lost(error: &RedisError) -> bool {
    error.is_connection_dropped() || error.is_io_error() || error.is_connection_refusal()
}

impl fmt::Debug for Connector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Addresses and names only: passwords stay out.
        match self {
            Connector::Single { client, .. } => f
                .debug_tuple("Single")
                .field(&client.get_connection_info().addr.to_string())
                .finish(),
            Connector::Cluster { .. } => f.write_str("Cluster"),
            Connector::Sentinel { master_name, .. } => {
                f.debug_tuple("Sentinel").field(master_name).finish()
            }
        }
    }
}
