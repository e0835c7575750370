//! [`RedisStore`]: the token, its refresh lock and the rotated refresh token in Redis.

use std::fmt;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use chacha20poly1305::aead::{Aead, AeadCore, KeyInit, OsRng, Payload};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{Cmd, FromRedisValue};
use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize};
use tokio::sync::OnceCell;

use super::{SharedRefreshToken, SharedToken, TokenStore};
use crate::boxed::BoxFuture;
use crate::error::Error;

/// Default [`key_prefix`](RedisStore::key_prefix).
const DEFAULT_PREFIX: &str = "eshopbox-auth:";
/// Bound on connecting (the layer bounds each call as well).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
/// The stored token's clear prefix: its id and expiry (Unix ms), 16 hex digits each,
/// each followed by a space.
const HEADER_LEN: usize = 34;
/// Marks a plain-text payload.
const PLAIN: u8 = b'p';
/// Marks an encrypted payload: nonce, then ciphertext.
const SEALED: u8 = b'e';
/// XChaCha20-Poly1305 nonce length.
const NONCE_LEN: usize = 24;

/// Stores the token `ARGV[1]` (with a TTL of `ARGV[3]` ms) unless the stored one
/// expires after `ARGV[2]` (hex Unix ms, characters 18 to 33 of a stored value). A
/// stored value that is not in that format is replaced.
const SAVE_UNLESS_LATER: &str = r"
local stored = redis.call('GET', KEYS[1])
local expires = stored and tonumber(string.sub(stored, 18, 33), 16)
if expires and expires > tonumber(ARGV[2], 16) then
    return 0
end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[3])
return 1
";

/// The stored refresh token's clear prefix: its id, 16 hex digits, and a space.
const REFRESH_HEADER_LEN: usize = 17;

/// Stores the refresh token `ARGV[1]` unless the stored one (in this crate's format)
/// has an id other than `ARGV[2]` (the version it replaces; empty: none) and
/// `ARGV[3]` (its own).
const SAVE_REFRESH: &str = r"
local stored = redis.call('GET', KEYS[1])
if stored and string.sub(stored, 17, 17) == ' ' then
    local id = string.sub(stored, 1, 16)
    if id ~= ARGV[2] and id ~= ARGV[3] then
        return 0
    end
end
redis.call('SET', KEYS[1], ARGV[1])
return 1
";

/// Deletes the token if its id (the first 17 characters: 16 hex digits and a space)
/// is `ARGV[1]`.
const REMOVE_IF_ID: &str = r"
local stored = redis.call('GET', KEYS[1])
if stored and string.sub(stored, 1, 17) == ARGV[1] then
    return redis.call('DEL', KEYS[1])
end
return 0
";

/// Takes the lock for owner `ARGV[1]` for `ARGV[2]` ms, or extends it if that owner
/// holds it. Safe to send twice.
const TAKE_OR_RENEW: &str = r"
local holder = redis.call('GET', KEYS[1])
if holder == ARGV[1] then
    redis.call('PEXPIRE', KEYS[1], ARGV[2])
    return 1
end
if holder then
    return 0
end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return 1
";

/// Deletes the lock if owner `ARGV[1]` holds it.
const RELEASE: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[1] then
    return redis.call('DEL', KEYS[1])
end
return 0
";

/// A [`TokenStore`] in Redis, shared by every replica that uses the same server and
/// key prefix. Needs the `redis` feature.
///
/// Keys, under the prefix (default `eshopbox-auth:`): `token` (the access token, with
/// a TTL ending at its expiry), `lock` (the refresh lock: an owner id with a lease),
/// `refresh-token` (the latest rotated refresh token). Use one prefix per set of
/// credentials.
///
/// **Secrets at rest.** The access token and a rotated refresh token are written to
/// Redis. Anyone who can read those keys can call Eshopbox as your app until the
/// token expires. Restrict access to the server (ACLs, a private network), use a
/// `rediss://` URL for TLS, and set an [`encryption_key`](Self::encryption_key) so
/// the values are stored encrypted (XChaCha20-Poly1305, bound to their key name).
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
    client: redis::Client,
    connection: Arc<OnceCell<ConnectionManager>>,
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
        Keys {
            prefix: prefix.to_owned(),
            token: format!("{prefix}token"),
            lock: format!("{prefix}lock"),
            refresh_token: format!("{prefix}refresh-token"),
        }
    }
}

/// The stored access token, before sealing.
#[derive(Serialize, Deserialize)]
struct Stored {
    access_token: String,
    issued_at_ms: u64,
    expires_at_ms: u64,
}

impl RedisStore {
    /// A store on the Redis server at `url` (`redis://`, `rediss://` for TLS, or
    /// `redis+unix://`). Nothing connects yet: the first refresh does, and a server
    /// that is down then only makes the layer request tokens directly.
    ///
    /// Fails with [`ErrorKind::Config`](crate::ErrorKind::Config) if the URL does
    /// not parse.
    pub fn new(url: &str) -> Result<Self, Error> {
        let client = redis::Client::open(url)
            .map_err(|_| Error::config("the Redis URL is not valid (its text is not repeated here: it may hold a password)"))?;
        Ok(Self::from_client(client))
    }

    /// A store on an already configured [`redis::Client`].
    pub fn from_client(client: redis::Client) -> Self {
        RedisStore {
            client,
            connection: Arc::new(OnceCell::new()),
            keys: Arc::new(Keys::new(DEFAULT_PREFIX)),
            cipher: None,
        }
    }

    /// The prefix of the store's keys (default `eshopbox-auth:`).
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

    async fn connection(&self) -> Result<ConnectionManager, Error> {
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(CONNECT_TIMEOUT)
            .set_response_timeout(CONNECT_TIMEOUT)
            .set_number_of_retries(1);
        self.connection
            .get_or_try_init(|| ConnectionManager::new_with_config(self.client.clone(), config))
            .await
            .cloned()
            .map_err(|e| redis_error("connecting to Redis", e))
    }

    /// Runs one command. A command that finds the connection dropped (Redis restarted)
    /// is sent once more, on the connection the manager re-establishes.
    async fn query<T: FromRedisValue>(&self, doing: &str, command: &Cmd) -> Result<T, Error> {
        let mut connection = self.connection().await?;
        match command.query_async(&mut connection).await {
            Err(e) if e.is_connection_dropped() || e.is_io_error() => {
                tracing::debug!(error = %e, "Redis connection lost; sending the command again");
                command.query_async(&mut connection).await
            }
            result => result,
        }
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

    /// The id and payload of a stored value: `header_len` bytes of clear header (the
    /// id in 16 hex digits first, a space last), then the sealed payload. A value in
    /// another format (not written by this crate, or by another version) counts as
    /// nothing stored, so the next write replaces it; a value this store cannot
    /// decrypt is an error: it belongs to replicas with another key.
    fn unseal(
        &self,
        key: &str,
        value: &[u8],
        header_len: usize,
    ) -> Result<Option<(u64, Vec<u8>)>, Error> {
        let id = (value.len() > header_len && value[16] == b' ' && value[header_len - 1] == b' ')
            .then(|| std::str::from_utf8(&value[..16]).ok())
            .flatten()
            .and_then(|hex| u64::from_str_radix(hex, 16).ok());
        let (header, sealed) = value.split_at(header_len.min(value.len()));
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
        let value: Option<Vec<u8>> = self
            .query("reading the token", redis::cmd("GET").arg(&self.keys.token))
            .await?;
        let Some(value) = value else {
            return Ok(None);
        };
        let Some((id, payload)) = self.unseal(&self.keys.token, &value, HEADER_LEN)? else {
            return Ok(None);
        };
        let Ok(stored) = serde_json::from_slice::<Stored>(&payload) else {
            tracing::warn!(key = %self.keys.token, "ignoring a malformed token in Redis");
            return Ok(None);
        };
        Ok(Some(SharedToken::new(
            id,
            SecretString::from(stored.access_token),
            UNIX_EPOCH + Duration::from_millis(stored.issued_at_ms),
            UNIX_EPOCH + Duration::from_millis(stored.expires_at_ms),
        )))
    }

    async fn save_token(&self, token: &SharedToken) -> Result<(), Error> {
        let ttl = token.remaining().as_millis() as u64;
        if ttl == 0 {
            return Ok(());
        }
        let stored = Stored {
            access_token: token.access_token().expose_secret().to_owned(),
            issued_at_ms: unix_ms(token.issued_at()),
            expires_at_ms: unix_ms(token.expires_at()),
        };
        let payload = serde_json::to_vec(&stored)
            .map_err(|_| Error::unavailable("could not encode the token for Redis"))?;
        let expires_ms = format!("{:016x}", stored.expires_at_ms);
        let header = format!("{}{expires_ms} ", id_prefix(token.id()));
        let value = self.seal_value(&self.keys.token, header, &payload)?;
        let ttl = ttl.to_string();
        self.script(
            "writing the token",
            SAVE_UNLESS_LATER,
            &self.keys.token,
            &[&value, expires_ms.as_bytes(), ttl.as_bytes()],
        )
        .await?;
        Ok(())
    }

    /// A value as stored: the clear `header`, then the payload sealed to the key and
    /// the header ([`unseal`](Self::unseal) reads it back).
    fn seal_value(&self, key: &str, header: String, payload: &[u8]) -> Result<Vec<u8>, Error> {
        let sealed = self.seal(key, header.as_bytes(), payload)?;
        let mut value = header.into_bytes();
        value.extend(sealed);
        Ok(value)
    }

    /// Runs one of the scripts above on `key` with `args`; returns its number.
    async fn script(
        &self,
        doing: &str,
        script: &str,
        key: &str,
        args: &[&[u8]],
    ) -> Result<i64, Error> {
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
        let Some((id, payload)) = self.unseal(key, &value, REFRESH_HEADER_LEN)? else {
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
            id_prefix(refresh_token.id()),
            refresh_token.refresh_token().expose_secret().as_bytes(),
        )?;
        let replaces = replaces.map_or_else(String::new, |id| format!("{id:016x}"));
        let own = format!("{:016x}", refresh_token.id());
        let saved = self
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

    fn load(&self) -> BoxFuture<'_, Result<Option<SharedToken>, Error>> {
        Box::pin(self.load_token())
    }

    fn save<'a>(&'a self, token: &'a SharedToken) -> BoxFuture<'a, Result<(), Error>> {
        Box::pin(self.save_token(token))
    }

    fn remove(&self, id: u64) -> BoxFuture<'_, Result<bool, Error>> {
        Box::pin(async move {
            let removed = self
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
            let held = self
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
            self.script(
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
/// Redis Cluster hash tag, so a workspace's keys share a slot; `{`, `}` and `%` in
/// its name are percent-escaped, so that the tag is the whole name and two names
/// never share keys.
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
        // The address only: the URL's password and the values stay out.
        f.debug_struct("RedisStore")
            .field(
                "server",
                &self.client.get_connection_info().addr.to_string(),
            )
            .field("token_key", &self.keys.token)
            .field("encrypted", &self.cipher.is_some())
            .finish_non_exhaustive()
    }
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
}
