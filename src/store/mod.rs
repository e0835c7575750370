//! Sharing one token between several layers or processes.
//!
//! Without a store, each layer keeps its token to itself: N replicas of a service
//! make N token calls per expiry, and with a provider that rotates refresh tokens they
//! would spend each other's refresh token. With a [`TokenStore`]
//! ([`EshopboxAuthBuilder::token_store`](crate::EshopboxAuthBuilder::token_store)):
//!
//! - every layer still serves requests from its own in-process copy of the token,
//!   lock-free; the store is only used around refreshes and 401s;
//! - a layer that needs a new token first looks in the store, and adopts a usable
//!   token another replica put there;
//! - otherwise it takes the store's refresh lock (an owner id and a lease, renewed
//!   while the token call runs), makes the one token call, writes the token (and a
//!   rotated refresh token) back and releases the lock. Replicas that did not get the
//!   lock poll the store for the new token and take the lock over if its lease runs
//!   out (a holder that died or stalled); they never call the token endpoint while
//!   the lock is held;
//! - a 401 removes the stored token only if it is still the one that failed;
//! - when the store fails (down, slow, refusing), the layer logs it and refreshes on
//!   its own, as if it had no store, and uses the store again a few seconds later.
//!   No request fails because the store failed.
//!
//! Stores: [`InProcessStore`] shares a token between layers of one process;
//! `RedisStore` (feature `redis`) between processes.
//!
//! ```
//! use eshopbox_auth::store::InProcessStore;
//! use eshopbox_auth::{Credentials, EshopboxAuthLayer};
//! use tower::ServiceBuilder;
//!
//! # fn main() -> Result<(), eshopbox_auth::Error> {
//! let store = InProcessStore::new();
//! let credentials = Credentials::new("id", "secret", "refresh-token");
//! let first = EshopboxAuthLayer::builder(credentials.clone())
//!     .token_store(store.clone())
//!     .build()?;
//! let second = EshopboxAuthLayer::builder(credentials)
//!     .token_store(store)
//!     .build()?;
//! let _service = ServiceBuilder::new()
//!     .layer(first)
//!     .service(tower::service_fn(|_: http::Request<String>| async {
//!         Ok::<_, std::convert::Infallible>(http::Response::new(String::new()))
//!     }));
//! # let _ = second;
//! # Ok(())
//! # }
//! ```
//!
//! # How replicas agree
//!
//! The same steps run on any store; with `RedisStore` they are these Redis commands and
//! keys (`<prefix>` is set by `RedisStore::key_prefix`):
//!
//! ```text
//!  requests ──▶ replica A        requests ──▶ replica B        requests ──▶ replica C
//!               each replica serves requests from its own arc-swap copy of the token;
//!               the request path never touches Redis
//!                   │                             │                             │
//!    ① GET token (none usable)         ① GET token (none usable)       ① GET token
//!    ② SET lock A NX PX → won          ② SET lock B NX PX → lost       ⑥ GET token → found
//!    ④ SET token PX ttl,               ⑥ poll GET token → found
//!      SET refresh-token
//!    ⑤ DEL lock if still A
//!                   │                             │                             │
//!                   ▼                             ▼                             ▼
//!         ┌─────────────────────────────────────────────────────────────────────────┐
//!         │ Redis   <prefix>token          the token; TTL ends at its expiry        │
//!         │         <prefix>lock           the refresh lock: owner id + lease        │
//!         │         <prefix>refresh-token  the latest rotated refresh token          │
//!         └─────────────────────────────────────────────────────────────────────────┘
//!
//!    replica A only:  ③ POST /api/v1/generateToken ──────────────────────────▶ Eshopbox
//! ```
//!
//! 1. A replica that needs a token (cold, expiring, or after a 401) first reads
//!    `<prefix>token`; a usable token another replica stored is taken as is (and the
//!    stored refresh token with it, so every replica knows the newest one).
//! 2. Otherwise it takes the refresh lock (`<prefix>lock` = its owner id, with a lease,
//!    set only if absent — a Lua script that also renews the owner's own lock).
//!    Replicas that do not get it poll `<prefix>token` (10 ms, doubling to 200 ms).
//! 3. The holder reads the token once more, takes the stored refresh token if another
//!    replica rotated it, and makes the one token call, renewing its lease every third
//!    of it meanwhile: a slow but live holder keeps the lock; one that stops (a crash,
//!    a long pause) loses it when the lease runs out, and another replica takes over.
//! 4. It stores the token with a TTL ending at its expiry — unless a later token is
//!    already there — and a rotated refresh token (even one from an otherwise unusable
//!    answer).
//! 5. It releases the lock with a compare-and-delete script (only its own lock).
//! 6. The other replicas find the new token and copy it into their own cache.
//!
//! A waiting replica never calls the token endpoint while another holds the lock
//! (with a provider that rotates refresh tokens, that would spend the holder's token):
//! it waits at most its token timeout, and `lock_lease` must be shorter than that, so
//! a dead holder's lease runs out first. Rotated refresh tokens are versioned and only
//! stored over the version they replaced, so a write that arrives late (its answer was
//! lost, the store was down) never puts back a spent refresh token. A 401 deletes
//! `<prefix>token` only if it still holds the token that failed (compare on the token's
//! id), so one bad token causes one call across all replicas. Requests never touch
//! Redis: it is used only around refreshes and 401s.
//!
//! **Redis faults lose nothing.** Each Redis call is bounded by `store_timeout` (1 s).
//! When Redis is down, slow or restarting, a replica logs it, refreshes directly with the
//! token endpoint, leaves Redis alone for 3 s, then uses it again; a refresh token
//! rotated meanwhile is offered to Redis every 3 s until it takes it (or holds a newer
//! one). Requests only ever see the replica's local token, so none fails because Redis
//! did. (During an outage each replica refreshes on its own; with a provider that
//! rotates refresh tokens, replicas can then spend each other's refresh token — the
//! store cannot help while it is down.)
//!
//! **Secrets at rest.** The access token and a rotated refresh token are written to
//! Redis: protect the server (ACLs, private network), use a `rediss://` URL for TLS, and
//! set `encryption_key` to store them encrypted (XChaCha20-Poly1305, a random nonce per
//! value, bound to the key name and to the value's id). A replica with a different key
//! cannot read them and refreshes on its own. Stored expiry times are wall-clock times,
//! so replicas' clocks should agree to within a few seconds.
//!
//! `InProcessStore` does the same between layers of one process; `TokenStore` is a
//! public trait for other stores. Rotations are shared for the Eshopbox grant,
//! `OAuth2Source`, and any `TokenSource` that implements `refresh_token` and
//! `use_refresh_token`. `tests/redis.rs` runs the scenarios against real
//! `redis-server` processes (8 cold replicas × 500 requests → 1 token call; expiry under
//! traffic → 1 call per expiry; a stalled lock holder is taken over; Redis stopped and
//! restarted under traffic → no failed request; a slow Redis → no failed request; a
//! slow but live lock holder keeps its lock; rotation shared, also across a Redis
//! restart that lost the data; encryption; TLS).

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime};

use secrecy::SecretString;
use tokio::time::Instant;

use crate::boxed::BoxFuture;
use crate::error::Error;

#[cfg(feature = "redis")]
#[cfg_attr(docsrs, doc(cfg(feature = "redis")))]
mod redis;
#[cfg(feature = "redis")]
pub use self::redis::RedisStore;

/// Default [`lock_lease`](crate::EshopboxAuthBuilder::lock_lease): 10 seconds.
pub const DEFAULT_LOCK_LEASE: Duration = Duration::from_secs(10);

/// An access token as it is kept in a [`TokenStore`].
#[derive(Clone)]
pub struct SharedToken {
    id: u64,
    access_token: SecretString,
    issued_at: SystemTime,
    expires_at: SystemTime,
}

impl SharedToken {
    /// A token, identified by `id` (a random number chosen by the layer that fetched
    /// it), valid from `issued_at` until `expires_at`.
    pub fn new(
        id: u64,
        access_token: SecretString,
        issued_at: SystemTime,
        expires_at: SystemTime,
    ) -> Self {
        SharedToken {
            id,
            access_token,
            issued_at,
            expires_at,
        }
    }

    /// Identifies this token, for [`TokenStore::remove`].
    pub fn id(&self) -> u64 {
        self.id
    }

    /// The access token (without `Bearer `).
    pub fn access_token(&self) -> &SecretString {
        &self.access_token
    }

    /// When the token was requested.
    pub fn issued_at(&self) -> SystemTime {
        self.issued_at
    }

    /// When the token expires; the store may forget it from then on.
    pub fn expires_at(&self) -> SystemTime {
        self.expires_at
    }

    /// How long until the token expires (zero once it has).
    pub fn remaining(&self) -> Duration {
        self.expires_at
            .duration_since(SystemTime::now())
            .unwrap_or_default()
    }
}

impl fmt::Debug for SharedToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SharedToken")
            .field("id", &self.id)
            .field("access_token", &"[redacted]")
            .field("issued_at", &self.issued_at)
            .field("expires_at", &self.expires_at)
            .finish()
    }
}

/// A rotated refresh token as it is kept in a [`TokenStore`], with an id (random,
/// chosen by the layer that stored it) that identifies this version.
#[derive(Clone)]
pub struct SharedRefreshToken {
    id: u64,
    refresh_token: SecretString,
}

impl SharedRefreshToken {
    /// A version `id` of the refresh token.
    pub fn new(id: u64, refresh_token: SecretString) -> Self {
        SharedRefreshToken { id, refresh_token }
    }

    /// Identifies this version, for [`TokenStore::save_refresh_token`].
    pub fn id(&self) -> u64 {
        self.id
    }

    /// The refresh token.
    pub fn refresh_token(&self) -> &SecretString {
        &self.refresh_token
    }
}

impl fmt::Debug for SharedRefreshToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SharedRefreshToken")
            .field("id", &self.id)
            .field("refresh_token", &"[redacted]")
            .finish()
    }
}

/// Where several layers share their token, its refresh lock and the current refresh
/// token.
///
/// Implementations report failures as [`Error`]s (typically
/// [`Error::unavailable`]); the layer then refreshes on its own. Each call should
/// answer promptly: the layer also bounds every call with its own timeout.
pub trait TokenStore: Send + Sync + 'static {
    /// The stored token, if any.
    fn load(&self) -> BoxFuture<'_, Result<Option<SharedToken>, Error>>;

    /// Stores `token` in place of the stored one, to be forgotten at its expiry —
    /// unless the stored one expires later (atomically): a replica that finishes late
    /// does not replace a newer token.
    fn save<'a>(&'a self, token: &'a SharedToken) -> BoxFuture<'a, Result<(), Error>>;

    /// Removes the stored token if its id is `id` (atomically). Returns whether it did.
    fn remove(&self, id: u64) -> BoxFuture<'_, Result<bool, Error>>;

    /// Takes the refresh lock for `owner` for `lease` if no one holds it, or extends
    /// it to `lease` from now if `owner` holds it (atomically). Returns whether
    /// `owner` holds the lock now. The layer calls it again every third of the lease
    /// while its token call runs.
    fn try_lock<'a>(
        &'a self,
        owner: &'a str,
        lease: Duration,
    ) -> BoxFuture<'a, Result<bool, Error>>;

    /// Releases the refresh lock if `owner` (exactly) holds it, atomically: a lock
    /// whose lease ran out and was taken by another owner stays.
    fn unlock<'a>(&'a self, owner: &'a str) -> BoxFuture<'a, Result<(), Error>>;

    /// The refresh token to use next, if one was rotated and stored.
    fn load_refresh_token(&self) -> BoxFuture<'_, Result<Option<SharedRefreshToken>, Error>>;

    /// Stores a rotated refresh token for the other layers — only if the stored
    /// version is the one it `replaces` (`None`: nothing stored) or `refresh_token`
    /// itself, atomically. Returns whether the store holds `refresh_token` now. A
    /// `false` means another layer rotated since: the stored version is newer.
    fn save_refresh_token<'a>(
        &'a self,
        refresh_token: &'a SharedRefreshToken,
        replaces: Option<u64>,
    ) -> BoxFuture<'a, Result<bool, Error>>;

    /// The part of this store that belongs to one workspace of a per-workspace layer
    /// (`EshopboxAuthLayer::per_workspace`, feature `workspaces`): a token, lock and
    /// refresh token of its own, shared with every replica's store for the same
    /// workspace and apart from every other workspace's. `workspace` is a name
    /// without whitespace (empty only when the layer is built, to ask whether the
    /// store supports workspaces at all).
    ///
    /// The default, `None`, means the store cannot keep workspaces apart; a
    /// per-workspace layer refuses it when it is built.
    fn for_workspace(&self, workspace: &str) -> Option<Arc<dyn TokenStore>> {
        let _ = workspace;
        None
    }
}

/// A [`TokenStore`] in this process's memory: layers built with clones of one
/// `InProcessStore` share a token. (A layer without a store keeps its token to
/// itself, which is as good for a single layer.)
#[derive(Clone, Default)]
pub struct InProcessStore {
    state: Arc<Mutex<State>>,
    /// Each workspace's part, for per-workspace layers (kept as long as the store).
    workspaces: Arc<Mutex<HashMap<String, InProcessStore>>>,
}

#[derive(Default)]
struct State {
    token: Option<SharedToken>,
    lock: Option<(String, Instant)>,
    refresh_token: Option<SharedRefreshToken>,
}

impl InProcessStore {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl fmt::Debug for InProcessStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = self.state();
        f.debug_struct("InProcessStore")
            .field("token", &state.token)
            .field("locked", &state.lock.is_some())
            .finish_non_exhaustive()
    }
}

impl TokenStore for InProcessStore {
    fn load(&self) -> BoxFuture<'_, Result<Option<SharedToken>, Error>> {
        let mut state = self.state();
        if state
            .token
            .as_ref()
            .is_some_and(|t| t.remaining().is_zero())
        {
            state.token = None;
        }
        let token = state.token.clone();
        Box::pin(async move { Ok(token) })
    }

    fn save<'a>(&'a self, token: &'a SharedToken) -> BoxFuture<'a, Result<(), Error>> {
        let mut state = self.state();
        let later = state
            .token
            .as_ref()
            .is_some_and(|stored| stored.expires_at > token.expires_at);
        if !later {
            state.token = Some(token.clone());
        }
        Box::pin(async { Ok(()) })
    }

    fn remove(&self, id: u64) -> BoxFuture<'_, Result<bool, Error>> {
        let mut state = self.state();
        let removed = state.token.as_ref().is_some_and(|t| t.id == id);
        if removed {
            state.token = None;
        }
        Box::pin(async move { Ok(removed) })
    }

    fn try_lock<'a>(
        &'a self,
        owner: &'a str,
        lease: Duration,
    ) -> BoxFuture<'a, Result<bool, Error>> {
        let mut state = self.state();
        let now = Instant::now();
        let ours = state
            .lock
            .as_ref()
            .is_none_or(|(holder, until)| holder == owner || now >= *until);
        if ours {
            let until = now
                .checked_add(lease)
                .unwrap_or_else(|| now + Duration::from_secs(365 * 24 * 3600));
            state.lock = Some((owner.to_owned(), until));
        }
        Box::pin(async move { Ok(ours) })
    }

    fn unlock<'a>(&'a self, owner: &'a str) -> BoxFuture<'a, Result<(), Error>> {
        let mut state = self.state();
        if state.lock.as_ref().is_some_and(|(held, _)| held == owner) {
            state.lock = None;
        }
        Box::pin(async { Ok(()) })
    }

    fn load_refresh_token(&self) -> BoxFuture<'_, Result<Option<SharedRefreshToken>, Error>> {
        let token = self.state().refresh_token.clone();
        Box::pin(async move { Ok(token) })
    }

    fn save_refresh_token<'a>(
        &'a self,
        refresh_token: &'a SharedRefreshToken,
        replaces: Option<u64>,
    ) -> BoxFuture<'a, Result<bool, Error>> {
        let mut state = self.state();
        let stored = state.refresh_token.as_ref().map(|t| t.id);
        let saved = stored.is_none() || stored == replaces || stored == Some(refresh_token.id);
        if saved {
            state.refresh_token = Some(refresh_token.clone());
        }
        Box::pin(async move { Ok(saved) })
    }

    fn for_workspace(&self, workspace: &str) -> Option<Arc<dyn TokenStore>> {
        let mut workspaces = self
            .workspaces
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let part = workspaces.entry(workspace.to_owned()).or_default().clone();
        Some(Arc::new(part))
    }
}
