//! [`RedisStore`]: the token, its refresh lock and the rotated refresh token in Redis
//! (one server, a Redis Cluster, or a master found through Sentinels).

use std::fmt;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use chacha20poly1305::aead::{Aead, AeadCore, KeyInit, OsRng, Payload};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};
use redis::cluster::ClusterClient;
use redis::sentinel::{SentinelClient, SentinelServerType};
use redis::{Cmd, FromRedisValue, IntoConnectionInfo};
use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize};
use tokio::time::Instant;

use self::connection::Connector;
use self::scripts::{
    LOAD_TOKEN, RELEASE, REMOVE_IF_ID, SAVE_REFRESH, SAVE_UNLESS_LATER, TAKE_OR_RENEW,
};
use super::{SharedRefreshToken, SharedToken, TokenStore};
use crate::boxed::BoxFuture;
use crate::error::Error;

mod connection;
mod scripts;

/// Default [`key_prefix`](RedisStore::key_prefix).
const DEFAULT_PREFIX: &str = "eshopbox-auth:";
/// Shortest wait before a Redis Cluster command is retried (after a redirection the
/// client could not follow yet, `TRYAGAIN`, or a node that does not answer), in ms.
const CLUSTER_RETRY_MIN_MS: u64 = 50;
/// Longest wait between two retries, in ms.
const CLUSTER_RETRY_MAX_MS: u64 = 500;
/// A stored value's clear header: its id, 16 hex digits, and a space.
const HEADER_LEN: usize = 17;

/// How much longer than the truth a `PTTL` answer can be: Redis counts expiries on a
/// whole-millisecond clock.
const PTTL_ROUNDING: Duration = Duration::from_millis(1);
/// Marks a plain-text payload.
const PLAIN: u8 = b'p';
/// Marks an encrypted payload: nonce, then ciphertext.
const SEALED: u8 = b'e';
/// XChaCha20-Poly1305 nonce length.
const NONCE_LEN: usize = 24;

/// A [`TokenStore`] in Redis, shared by every replica that uses the same Redis and
/// key prefix. Needs the `redis` feature.
///
/// Deployments: [`new`](Self::new) for one server (or a proxy in front of several),
/// [`cluster`](Self::cluster) for a Redis Cluster (including cluster-mode managed
/// services), [`sentinel`](Self::sentinel) for a master and replicas watched by
/// Sentinels.
///
/// Keys: `{prefix}token` (the access token, with a TTL ending at its expiry),
/// `{prefix}lock` (the refresh lock: an owner id with a lease), `{prefix}refresh-token`
/// (the latest rotated refresh token), with the default prefix `eshopbox-auth:`. The
/// braces make the prefix the keys' *hash tag*: in a Redis Cluster all three keys live
/// in one slot, so every script runs on one node. A prefix that already holds a hash
/// tag (`app:{eshopbox}:`) is used as it is. Use one prefix per set of credentials.
///
/// **Expiry without clocks.** The token's expiry is its key's TTL: a replica writes
/// the token's remaining life, and a reader gets the remaining life back (`PTTL`, in
/// the same script as the value) and counts down on its own monotonic clock. The
/// replicas' wall clocks play no part; the stored wall-clock time is for display only.
///
/// **Secrets at rest.** The access token and a rotated refresh token are written to
/// Redis. Anyone who can read those keys can call Eshopbox as your app until the
/// token expires. Restrict access to the server (ACLs, a private network), use a
/// `rediss://` URL for TLS, and set an [`encryption_key`](Self::encryption_key) so
/// the values are stored encrypted (XChaCha20-Poly1305, bound to their key name and
/// id).
///
/// ```no_run
/// use eshopbox_auth::store::RedisStore;
/// use eshopbox_auth::{Credentials, EshopboxAuthLayer};
/// use tower::ServiceBuilder;
///
/// # fn main() -> Result<(), eshopbox_auth::Error> {
/// let store = RedisStore::new("rediss://:password@redis.internal:6380/0")?
///     .key_prefix("orders-app:eshopbox:")
///     .encryption_key([7; 32]); // from your secret manager
/// let layer = EshopboxAuthLayer::builder(Credentials::new("id", "secret", "refresh-token"))
///     .token_store(store)
///     .build()?;
/// let _service = ServiceBuilder::new()
///     .layer(layer)
///     .service(tower::service_fn(|_: http::Request<String>| async {
///         Ok::<_, std::convert::Infallible>(http::Response::new(String::new()))
///     }));
/// # Ok(())
/// # }
/// ```
#[derive(Clone)]
pub struct RedisStore {
    connector: Arc<Connector>,
    keys: Arc<Keys>,
    cipher: Option<Arc<XChaCha20Poly1305>>,
}

struct Keys {
    prefix: String,
    token: String,
    lock: String,
    refresh_token: String,
}

impl Keys {
    fn new(prefix: &str) -> Self {
        let tagged = if has_hash_tag(prefix) {
            prefix.to_owned()
        } else {
            format!("{{{prefix}}}")
        };
        Keys {
            prefix: prefix.to_owned(),
            token: format!("{tagged}token"),
            lock: format!("{tagged}lock"),
            refresh_token: format!("{tagged}refresh-token"),
        }
    }
}

/// Whether `key` has a Redis Cluster hash tag: a `{`, later a `}`, and at least one
/// character between them.
fn has_hash_tag(key: &str) -> bool {
    key.split_once('{')
        .and_then(|(_, rest)| rest.find('}'))
        .is_some_and(|end| end > 0)
}

/// The stored access token, before sealing.
#[derive(Serialize, Deserialize)]
struct Stored {
    access_token: String,
    /// How long the token lives in all (its remaining life is the key's TTL).
    lifetime_ms: u64,
    /// When it was requested, by the writer's wall clock: for display only.
    issued_at_ms: u64,
}

/// The Redis URL did not parse; its text is not repeated (it may hold a password).
fn bad_url(what: &str) -> Error {
    Error::config(format!(
        "{what} is not valid (its text is not repeated here: it may hold a password)"
    ))
}

impl RedisStore {
    /// A store on the Redis server at `url` (`redis://`, `rediss://` for TLS, or
    /// `redis+unix://`). Nothing connects yet: the first refresh does, and a server
    /// that is down then only makes the layer request tokens directly.
    ///
    /// Fails with [`ErrorKind::Config`](crate::ErrorKind::Config) if the URL does
    /// not parse.
    pub fn new(url: &str) -> Result<Self, Error> {
        let client = redis::Client::open(url).map_err(|_| bad_url("the Redis URL"))?;
        Ok(Self::from_client(client))
    }

    /// A store on an already configured [`redis::Client`].
    pub fn from_client(client: redis::Client) -> Self {
        Self::with(Connector::single(client))
    }

    /// A store on a Redis Cluster, reached first through `nodes` (`redis://` or
    /// `rediss://` URLs of some of its nodes; it finds the others). The client
    /// follows the cluster's redirections (`MOVED`, `ASK`) and learns the new master
    /// of a slot after a failover; a command it gives up on meanwhile (a lost node,
    /// `TRYAGAIN`, `CLUSTERDOWN`) is sent again, a pause apart, within the layer's
    /// [`store_timeout`](crate::EshopboxAuthBuilder::store_timeout). Set that longer
    /// than the cluster's failover to ride failovers out; an error left after it
    /// counts as a store failure (the layer then refreshes directly), never as a
    /// failed request.
    ///
    /// Fails with [`ErrorKind::Config`](crate::ErrorKind::Config) if there is no node
    /// or a URL does not parse.
    ///
    /// ```no_run
    /// # fn main() -> Result<(), eshopbox_auth::Error> {
    /// let store = eshopbox_auth::store::RedisStore::cluster([
    ///     "rediss://:password@redis-1.internal:6379",
    ///     "rediss://:password@redis-2.internal:6379",
    /// ])?;
    /// # let _ = store;
    /// # Ok(())
    /// # }
    /// ```
    pub fn cluster<I>(nodes: I) -> Result<Self, Error>
    where
        I: IntoIterator,
        I::Item: AsRef<str>,
    {
        let nodes = nodes
            .into_iter()
            .map(|url| {
                url.as_ref()
                    .into_connection_info()
                    .map_err(|_| bad_url("a Redis Cluster node URL"))
            })
            .collect::<Result<Vec<_>, Error>>()?;
        if nodes.is_empty() {
            return Err(Error::config("a Redis Cluster needs at least one node URL"));
        }
        // Redirections and retries happen within each call; the layer's
        // `store_timeout` bounds the whole call, so a longer one rides out a failover.
        let client = ClusterClient::builder(nodes)
            .connection_timeout(Duration::from_secs(1))
            .response_timeout(Duration::from_secs(1))
            .min_retry_wait(CLUSTER_RETRY_MIN_MS)
            .max_retry_wait(CLUSTER_RETRY_MAX_MS)
            .build()
            .map_err(|_| bad_url("a Redis Cluster node URL"))?;
        Ok(Self::from_cluster_client(client))
    }

    /// A store on an already configured [`ClusterClient`](redis::cluster::ClusterClient).
    pub fn from_cluster_client(client: ClusterClient) -> Self {
        Self::with(Connector::cluster(client))
    }

    /// A store on the master that the Sentinels at `sentinels` (`redis://` URLs)
    /// know as `master_name`. When the Sentinels fail over to a replica, the store
    /// asks them for the new master as soon as the old one's connection breaks or
    /// answers as a replica; meanwhile its calls fail, and the layer refreshes
    /// directly.
    ///
    /// The master is reached without a password or TLS; for those, configure a
    /// [`SentinelClient`](redis::sentinel::SentinelClient) and use
    /// [`from_sentinel_client`](Self::from_sentinel_client).
    ///
    /// Fails with [`ErrorKind::Config`](crate::ErrorKind::Config) if there is no
    /// Sentinel, a URL does not parse, or `master_name` is blank.
    ///
    /// ```no_run
    /// # fn main() -> Result<(), eshopbox_auth::Error> {
    /// let store = eshopbox_auth::store::RedisStore::sentinel(
    ///     ["redis://sentinel-1.internal:26379", "redis://sentinel-2.internal:26379"],
    ///     "mymaster",
    /// )?;
    /// # let _ = store;
    /// # Ok(())
    /// # }
    /// ```
    pub fn sentinel<I>(sentinels: I, master_name: &str) -> Result<Self, Error>
    where
        I: IntoIterator,
        I::Item: AsRef<str>,
    {
        let sentinels = sentinels
            .into_iter()
            .map(|url| {
                url.as_ref()
                    .into_connection_info()
                    .map_err(|_| bad_url("a Sentinel URL"))
            })
            .collect::<Result<Vec<_>, Error>>()?;
        if sentinels.is_empty() {
            return Err(Error::config(
                "Sentinel mode needs at least one Sentinel URL",
            ));
        }
        if master_name.trim().is_empty() {
            return Err(Error::config("Sentinel mode needs the master's name"));
        }
        let client = SentinelClient::build(
            sentinels,
            master_name.to_owned(),
            None,
            SentinelServerType::Master,
        )
        .map_err(|_| bad_url("a Sentinel URL"))?;
        Ok(Self::from_sentinel_client(client, master_name))
    }

    /// A store on an already configured
    /// [`SentinelClient`](redis::sentinel::SentinelClient) for the master
    /// `master_name` (the name is only used in logs).
    pub fn from_sentinel_client(client: SentinelClient, master_name: &str) -> Self {
        Self::with(Connector::sentinel(client, master_name.to_owned()))
    }

    fn with(connector: Connector) -> Self {
        RedisStore {
            connector: Arc::new(connector),
            keys: Arc::new(Keys::new(DEFAULT_PREFIX)),
            cipher: None,
        }
    }

    /// The prefix of the store's keys (default `eshopbox-auth:`). Unless it holds a
    /// hash tag already, it becomes one: the keys are `{prefix}token` and so on.
    pub fn key_prefix(mut self, prefix: &str) -> Self {
        self.keys = Arc::new(Keys::new(prefix));
        self
    }

    /// Stores the access and refresh tokens encrypted with this 256-bit key
    /// (XChaCha20-Poly1305, a random nonce per value). Every replica needs the same
    /// key; one with another key cannot read the values and requests its own tokens.
    pub fn encryption_key(mut self, key: [u8; 32]) -> Self {
        self.cipher = Some(Arc::new(XChaCha20Poly1305::new(&key.into())));
        self
    }

    /// Runs one command.
    async fn query<T: FromRedisValue>(&self, doing: &str, command: &Cmd) -> Result<T, Error> {
        self.connector
            .query(command)
            .await
            .map_err(|e| redis_error(doing, e))
    }

    /// `payload`, sealed to `key` and `context` when encryption is on, behind its
    /// marker byte.
    fn seal(&self, key: &str, context: &[u8], payload: &[u8]) -> Result<Vec<u8>, Error> {
        let Some(cipher) = &self.cipher else {
            let mut out = Vec::with_capacity(payload.len() + 1);
            out.push(PLAIN);
            out.extend_from_slice(payload);
            return Ok(out);
        };
        let nonce = XChaCha20Poly1305::generate_nonce(&mut OsRng);
        let sealed = cipher
            .encrypt(
                &nonce,
                Payload {
                    msg: payload,
                    aad: &[key.as_bytes(), context].concat(),
                },
            )
            .map_err(|_| Error::unavailable("could not encrypt a value for the token store"))?;
        let mut out = Vec::with_capacity(1 + NONCE_LEN + sealed.len());
        out.push(SEALED);
        out.extend_from_slice(&nonce);
        out.extend_from_slice(&sealed);
        Ok(out)
    }

    /// The payload of a value written by [`seal`](Self::seal).
    fn open(&self, key: &str, context: &[u8], value: &[u8]) -> Result<Vec<u8>, Error> {
        match (value.split_first(), &self.cipher) {
            (Some((&PLAIN, payload)), None) => Ok(payload.to_vec()),
            (Some((&SEALED, rest)), Some(cipher)) if rest.len() > NONCE_LEN => {
                let (nonce, sealed) = rest.split_at(NONCE_LEN);
                cipher
                    .decrypt(
                        XNonce::from_slice(nonce),
                        Payload {
                            msg: sealed,
                            aad: &[key.as_bytes(), context].concat(),
                        },
                    )
                    .map_err(|_| {
                        Error::invalid_response(format!(
                            "could not decrypt `{key}` from Redis: another encryption key?"
                        ))
                    })
            }
            (Some((&PLAIN, _)), Some(_)) => Err(Error::invalid_response(format!(
                "`{key}` in Redis is not encrypted, but this store has an encryption key"
            ))),
            (Some((&SEALED, _)), None) => Err(Error::invalid_response(format!(
                "`{key}` in Redis is encrypted, but this store has no encryption key"
            ))),
            _ => Err(Error::invalid_response(format!(
                "`{key}` in Redis was not written by this crate"
            ))),
        }
    }

    /// The id and payload of a stored value: the clear header (the id in 16 hex
    /// digits, a space), then the sealed payload. A value in
    /// another format (not written by this crate, or by another version) counts as
    /// nothing stored, so the next write replaces it; a value this store cannot
    /// decrypt is an error: it belongs to replicas with another key.
    fn unseal(&self, key: &str, value: &[u8]) -> Result<Option<(u64, Vec<u8>)>, Error> {
        let id = header_id(value);
        let (header, sealed) = value.split_at(HEADER_LEN.min(value.len()));
        match id {
            Some(id) if matches!(sealed.first(), Some(&PLAIN | &SEALED)) => {
                Ok(Some((id, self.open(key, header, sealed)?)))
            }
            _ => {
                tracing::warn!(%key, "ignoring a value in Redis in another format");
                Ok(None)
            }
        }
    }

    async fn load_token(&self) -> Result<Option<SharedToken>, Error> {
        let key = &self.keys.token;
        // The remaining life is counted from when the question was sent: at worst the
        // token is taken to expire a round trip (and a millisecond) early.
        let asked_at = Instant::now();
        let (value, ttl_ms): (Option<Vec<u8>>, i64) = self
            .script("reading the token", LOAD_TOKEN, key, &[])
            .await?;
        let Some(value) = value else {
            return Ok(None);
        };
        let token = self.decode_token(&value, ttl_ms, asked_at)?;
        if token.is_none() {
            // In this crate's format but unusable (a payload that does not parse): the
            // next save would keep it while it has more life left than the new token,
            // and every replica would refresh on its own until then. Removed, by its id.
            if let Some(id) = header_id(&value) {
                tracing::warn!(%key, "removing an unusable token from Redis");
                TokenStore::remove(self, id).await?;
            }
        }
        Ok(token)
    }

    /// A stored token value, read at `asked_at` with `ttl_ms` left (`PTTL`: negative
    /// for a key without a TTL, which this crate never writes).
    fn decode_token(
        &self,
        value: &[u8],
        ttl_ms: i64,
        asked_at: Instant,
    ) -> Result<Option<SharedToken>, Error> {
        let key = &self.keys.token;
        let Some((id, payload)) = self.unseal(key, value)? else {
            return Ok(None);
        };
        let Ok(stored) = serde_json::from_slice::<Stored>(&payload) else {
            tracing::warn!(%key, "ignoring a malformed token in Redis");
            return Ok(None);
        };
        let Ok(ttl_ms) = u64::try_from(ttl_ms) else {
            tracing::warn!(%key, "ignoring a token without a TTL in Redis");
            return Ok(None);
        };
        // Redis keeps expiries on a whole-millisecond clock, so `PTTL` can read up to
        // 1 ms more than is left: count that millisecond off too.
        let remaining = Duration::from_millis(ttl_ms)
            .saturating_sub(PTTL_ROUNDING + Instant::now().saturating_duration_since(asked_at));
        let token = SharedToken::new(
            id,
            SecretString::from(stored.access_token),
            Duration::from_millis(stored.lifetime_ms),
            remaining,
        )
        .with_issued_at(UNIX_EPOCH + Duration::from_millis(stored.issued_at_ms));
        Ok(Some(token))
    }

    async fn save_token(&self, token: &SharedToken) -> Result<(), Error> {
        let ttl_ms = u64::try_from(token.remaining().as_millis()).unwrap_or(u64::MAX);
        if ttl_ms == 0 {
            return Ok(());
        }
        let stored = Stored {
            access_token: token.access_token().expose_secret().to_owned(),
            lifetime_ms: u64::try_from(token.lifetime().as_millis()).unwrap_or(u64::MAX),
            issued_at_ms: unix_ms(token.issued_at()),
        };
        let payload = serde_json::to_vec(&stored)
            .map_err(|_| Error::unavailable("could not encode the token for Redis"))?;
        let value = self.seal_value(&self.keys.token, token.id(), &payload)?;
        let ttl_ms = ttl_ms.to_string();
        let _: i64 = self
            .script(
                "writing the token",
                SAVE_UNLESS_LATER,
                &self.keys.token,
                &[&value, ttl_ms.as_bytes()],
            )
            .await?;
        Ok(())
    }

    /// A value as stored: the clear `header`, then the payload sealed to the key and
    /// the header ([`unseal`](Self::unseal) reads it back).
    fn seal_value(&self, key: &str, id: u64, payload: &[u8]) -> Result<Vec<u8>, Error> {
        let header = id_prefix(id);
        let sealed = self.seal(key, header.as_bytes(), payload)?;
        let mut value = header.into_bytes();
        value.extend(sealed);
        Ok(value)
    }

    /// Runs one of the [`scripts`] on `key` with `args`.
    async fn script<T: FromRedisValue>(
        &self,
        doing: &str,
        script: &str,
        key: &str,
        args: &[&[u8]],
    ) -> Result<T, Error> {
        let mut command = redis::cmd("EVAL");
        command.arg(script).arg(1).arg(key);
        for arg in args {
            command.arg(*arg);
        }
        self.query(doing, &command).await
    }

    async fn load_refresh(&self) -> Result<Option<SharedRefreshToken>, Error> {
        let key = &self.keys.refresh_token;
        let value: Option<Vec<u8>> = self
            .query("reading the refresh token", redis::cmd("GET").arg(key))
            .await?;
        let Some(value) = value else {
            return Ok(None);
        };
        let Some((id, payload)) = self.unseal(key, &value)? else {
            return Ok(None);
        };
        let Ok(token) = String::from_utf8(payload) else {
            tracing::warn!(%key, "ignoring a malformed refresh token in Redis");
            return Ok(None);
        };
        Ok(Some(SharedRefreshToken::new(id, SecretString::from(token))))
    }

    async fn save_refresh(
        &self,
        refresh_token: &SharedRefreshToken,
        replaces: Option<u64>,
    ) -> Result<bool, Error> {
        let value = self.seal_value(
            &self.keys.refresh_token,
            refresh_token.id(),
            refresh_token.refresh_token().expose_secret().as_bytes(),
        )?;
        let replaces = replaces.map_or_else(String::new, |id| format!("{id:016x}"));
        let own = format!("{:016x}", refresh_token.id());
        let saved: i64 = self
            .script(
                "writing the refresh token",
                SAVE_REFRESH,
                &self.keys.refresh_token,
                &[&value, replaces.as_bytes(), own.as_bytes()],
            )
            .await?;
        Ok(saved > 0)
    }
}

impl TokenStore for RedisStore {
    /// The workspace's keys: `<prefix>{<workspace>}:token`, `…:lock` and
    /// `…:refresh-token`, on the same connection and with the same encryption key.
    fn for_workspace(&self, workspace: &str) -> Option<Arc<dyn TokenStore>> {
        let mut part = self.clone();
        part.keys = Arc::new(Keys::new(&workspace_prefix(&self.keys.prefix, workspace)));
        Some(Arc::new(part))
    }

    /// Deletes the workspace's three keys, in one command (they share a slot).
    fn forget_workspace(&self, workspace: &str) -> BoxFuture<'_, Result<(), Error>> {
        let keys = Keys::new(&workspace_prefix(&self.keys.prefix, workspace));
        Box::pin(async move {
            let _: i64 = self
                .query(
                    "deleting a workspace's keys",
                    redis::cmd("DEL")
                        .arg(&keys.token)
                        .arg(&keys.lock)
                        .arg(&keys.refresh_token),
                )
                .await?;
            Ok(())
        })
    }

    fn load(&self) -> BoxFuture<'_, Result<Option<SharedToken>, Error>> {
        Box::pin(self.load_token())
    }

    fn save<'a>(&'a self, token: &'a SharedToken) -> BoxFuture<'a, Result<(), Error>> {
        Box::pin(self.save_token(token))
    }

    fn remove(&self, id: u64) -> BoxFuture<'_, Result<bool, Error>> {
        Box::pin(async move {
            let removed: i64 = self
                .script(
                    "removing the token",
                    REMOVE_IF_ID,
                    &self.keys.token,
                    &[id_prefix(id).as_bytes()],
                )
                .await?;
            Ok(removed > 0)
        })
    }

    fn try_lock<'a>(
        &'a self,
        owner: &'a str,
        lease: Duration,
    ) -> BoxFuture<'a, Result<bool, Error>> {
        Box::pin(async move {
            let lease_ms = u64::try_from(lease.as_millis())
                .unwrap_or(u64::MAX)
                .max(1)
                .to_string();
            let held: i64 = self
                .script(
                    "taking the refresh lock",
                    TAKE_OR_RENEW,
                    &self.keys.lock,
                    &[owner.as_bytes(), lease_ms.as_bytes()],
                )
                .await?;
            Ok(held > 0)
        })
    }

    fn unlock<'a>(&'a self, owner: &'a str) -> BoxFuture<'a, Result<(), Error>> {
        Box::pin(async move {
            let _: i64 = self
                .script(
                    "releasing the refresh lock",
                    RELEASE,
                    &self.keys.lock,
                    &[owner.as_bytes()],
                )
                .await?;
            Ok(())
        })
    }

    fn load_refresh_token(&self) -> BoxFuture<'_, Result<Option<SharedRefreshToken>, Error>> {
        Box::pin(self.load_refresh())
    }

    fn save_refresh_token<'a>(
        &'a self,
        refresh_token: &'a SharedRefreshToken,
        replaces: Option<u64>,
    ) -> BoxFuture<'a, Result<bool, Error>> {
        Box::pin(self.save_refresh(refresh_token, replaces))
    }
}

/// The prefix of one workspace's keys: `<prefix>{<workspace>}:`. The workspace is a
/// Redis Cluster hash tag, so a workspace's keys share a slot (unless the prefix has
/// a tag of its own, which then comes first and holds every workspace's keys); `{`,
/// `}` and `%` in its name are percent-escaped, so that the tag is the whole name
/// and two names never share keys.
fn workspace_prefix(prefix: &str, workspace: &str) -> String {
    let mut tag = String::with_capacity(workspace.len());
    for c in workspace.chars() {
        match c {
            '{' => tag.push_str("%7B"),
            '}' => tag.push_str("%7D"),
            '%' => tag.push_str("%25"),
            c => tag.push(c),
        }
    }
    format!("{prefix}{{{tag}}}:")
}

impl fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Addresses and key names only: passwords and values stay out.
        f.debug_struct("RedisStore")
            .field("redis", &self.connector)
            .field("token_key", &self.keys.token)
            .field("encrypted", &self.cipher.is_some())
            .finish_non_exhaustive()
    }
}

/// The id in a stored value's header (16 hex digits and a space), if it has one.
fn header_id(value: &[u8]) -> Option<u64> {
    (value.len() > HEADER_LEN && value[HEADER_LEN - 1] == b' ')
        .then(|| std::str::from_utf8(&value[..HEADER_LEN - 1]).ok())
        .flatten()
        .and_then(|hex| u64::from_str_radix(hex, 16).ok())
}

fn id_prefix(id: u64) -> String {
    format!("{id:016x} ")
}

fn unix_ms(time: SystemTime) -> u64 {
    time.duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

fn redis_error(doing: &str, error: redis::RedisError) -> Error {
    Error::unavailable(format!("token store: {doing} failed")).with_source(error)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_workspace_is_the_hash_tag_of_its_keys() {
        let keys = Keys::new(&workspace_prefix("app:", "acme"));
        assert_eq!(keys.token, "app:{acme}:token");
        assert_eq!(keys.lock, "app:{acme}:lock");
        assert_eq!(keys.refresh_token, "app:{acme}:refresh-token");
        // Braces cannot end the tag early or make two names share keys.
        assert_eq!(workspace_prefix("app:", "a}b{"), "app:{a%7Db%7B}:");
        assert_ne!(
            workspace_prefix("app:", "a%7D"),
            workspace_prefix("app:", "a}")
        );
    }

    #[test]
    fn keys_share_the_prefix_as_their_hash_tag() {
        let keys = Keys::new("orders:eshopbox:");
        assert_eq!(keys.token, "{orders:eshopbox:}token");
        assert_eq!(keys.lock, "{orders:eshopbox:}lock");
        assert_eq!(keys.refresh_token, "{orders:eshopbox:}refresh-token");
        // A prefix with a hash tag of its own keeps it.
        let keys = Keys::new("orders:{acme}:");
        assert_eq!(keys.token, "orders:{acme}:token");
        // An empty tag is no tag (Redis hashes the whole key then).
        assert_eq!(Keys::new("a{}b:").token, "{a{}b:}token");
        assert!(!has_hash_tag("no-tag"));
        assert!(!has_hash_tag("open{only"));
        assert!(has_hash_tag("x{y}"));
    }

    #[tokio::test(start_paused = true)]
    async fn a_read_tokens_expiry_is_its_ttl_whatever_wall_clock_wrote_it() {
        let store = RedisStore::new("redis://127.0.0.1:1/").unwrap();
        let now = SystemTime::now();
        let minutes = Duration::from_secs(600);
        for written_at in [now - minutes, now, now + minutes] {
            let stored = Stored {
                access_token: "tok".into(),
                lifetime_ms: 3_600_000,
                issued_at_ms: unix_ms(written_at),
            };
            let value = store
                .seal_value(&store.keys.token, 42, &serde_json::to_vec(&stored).unwrap())
                .unwrap();
            let asked_at = Instant::now();
            tokio::time::advance(Duration::from_millis(5)).await;
            let token = store
                .decode_token(&value, 90_000, asked_at)
                .unwrap()
                .unwrap();
            // 90 s from when the question was sent, on the monotonic clock, less the
            // millisecond `PTTL` may have rounded up.
            assert_eq!(
                token.expires_at(),
                asked_at + Duration::from_secs(90) - Duration::from_millis(1)
            );
            assert_eq!(token.lifetime(), Duration::from_secs(3600));
            assert_eq!(
                token.issued_at(),
                UNIX_EPOCH + Duration::from_millis(stored.issued_at_ms)
            );
        }
        // A key without a TTL (not written by this crate) is no token.
        let stored = Stored {
            access_token: "tok".into(),
            lifetime_ms: 3_600_000,
            issued_at_ms: unix_ms(now),
        };
        let payload = serde_json::to_vec(&stored).unwrap();
        let value = store.seal_value(&store.keys.token, 42, &payload).unwrap();
        assert!(store
            .decode_token(&value, 1000, Instant::now())
            .unwrap()
            .is_some());
        assert!(store
            .decode_token(&value, -1, Instant::now())
            .unwrap()
            .is_none());
    }
}
