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
//! keys (`{prefix}`: the prefix set by `RedisStore::key_prefix`, in braces, which makes
//! it the keys' Redis Cluster hash tag, so all three keys live in one slot):
//!
//! ```text
//!  requests ──▶ replica A        requests ──▶ replica B        requests ──▶ replica C
//!               each replica serves requests from its own arc-swap copy of the token;
//!               the request path never touches Redis
//!                   │                             │                             │
//!    ① GET+PTTL token (none usable)    ① GET+PTTL token (none usable)  ① GET+PTTL token
//!    ② SET lock A NX PX → won          ② SET lock B NX PX → lost       ⑥ → found, TTL
//!    ④ SET token PX remaining life,    ⑥ poll GET+PTTL token → found
//!      SET refresh-token
//!    ⑤ DEL lock if still A
//!                   │                             │                             │
//!                   ▼                             ▼                             ▼
//!         ┌─────────────────────────────────────────────────────────────────────────┐
//!         │ Redis   {prefix}token          the token; its TTL is its remaining life │
//!         │ (one    {prefix}lock           the refresh lock: owner id + lease        │
//!         │  slot)  {prefix}refresh-token  the latest rotated refresh token          │
//!         └─────────────────────────────────────────────────────────────────────────┘
//!
//!    replica A only:  ③ POST /api/v1/generateToken ──────────────────────────▶ Eshopbox
//! ```
//!
//! 1. A replica that needs a token (cold, expiring, or after a 401) first reads
//!    `{prefix}token` and its remaining life (`PTTL`) in one script; a usable token
//!    another replica stored is taken as is (and the stored refresh token with it, so
//!    every replica knows the newest one).
//! 2. Otherwise it takes the refresh lock (`{prefix}lock` = its owner id, with a lease,
//!    set only if absent — a Lua script that also renews the owner's own lock).
//!    Replicas that do not get it poll `{prefix}token` (10 ms, doubling to 200 ms).
//! 3. The holder reads the token once more, takes the stored refresh token if another
//!    replica rotated it, and makes the one token call, renewing its lease every third
//!    of it meanwhile: a slow but live holder keeps the lock; one that stops (a crash,
//!    a long pause) loses it when the lease runs out, and another replica takes over.
//!    If the endpoint refuses the stored refresh token and this replica was
//!    configured with a different one (the app was authorised again), it tries that
//!    one once; if it works, it is stored like a rotation.
//! 4. It stores the token with its remaining life as the key's TTL — unless the stored
//!    token has more life left — and a rotated refresh token (even one from an
//!    otherwise unusable answer).
//! 5. It releases the lock with a compare-and-delete script (only its own lock).
//! 6. The other replicas find the new token and copy it into their own cache.
//!
//! Taking the lock has three outcomes ([`TokenStore::try_lock`]): **acquired** — the
//! replica makes the token call; **held by another replica** — it waits for that
//! replica's token as above; **store unavailable** (an error, or no answer within
//! `store_timeout`) — it counts a store failure and refreshes directly.
//!
//! A waiting replica never calls the token endpoint while another holds the lock
//! (with a provider that rotates refresh tokens, that would spend the holder's token):
//! it waits at most its token timeout, and `lock_lease` must be shorter than that, so
//! a dead holder's lease runs out first. Rotated refresh tokens are versioned and only
//! stored over the version they replaced, so a write that arrives late (its answer was
//! lost, the store was down) never puts back a spent refresh token. A 401 deletes
//! `{prefix}token` only if it still holds the token that failed (compare on the token's
//! id), so one bad token causes one call across all replicas. Requests never touch
//! Redis: it is used only around refreshes and 401s.
//!
//! **Redis faults lose nothing.** Each Redis call is bounded by `store_timeout` (1 s).
//! When Redis is down, slow or restarting, a replica logs it, refreshes directly with the
//! token endpoint, leaves Redis alone for 3 s, then uses it again; a refresh token
//! rotated meanwhile is offered to Redis every 3 s until it takes it (or holds a newer
//! one). Requests only ever see the replica's local token, so none fails because Redis
//! did — with the exceptions below: `store_required`, and a provider that rotates
//! refresh tokens while replicas refresh on their own. (During an outage each replica
//! refreshes on its own; with a provider that rotates refresh tokens, replicas can then
//! spend each other's refresh token — the store cannot help while it is down. With
//! [`store_required`](crate::EshopboxAuthBuilder::store_required) a replica does not
//! refresh on its own: its refreshes fail while the store is out, and requests use
//! the still-valid token meanwhile.) In a Redis Cluster the client follows `MOVED`
//! and `ASK` redirections and a failover's new master itself, within `store_timeout`;
//! behind Sentinels the store asks them for the new master when the old one's
//! connection breaks or it answers `READONLY`.
//!
//! **Secrets at rest.** The access token and a rotated refresh token are written to
//! Redis: protect the server (ACLs, private network), use a `rediss://` URL for TLS, and
//! set `encryption_key` to store them encrypted (XChaCha20-Poly1305, a random nonce per
//! value, bound to the key name and to the value's id). A replica with a different key
//! cannot read them and refreshes on its own (it logs "could not decrypt"); so does
//! one that finds a value moved under another key, relabelled or altered. Give every
//! replica the same key: with a provider that rotates refresh tokens, the replicas
//! whose key differs from the one that stored the refresh token last send spent ones
//! and are refused. With `store_required`, such a replica fails its refreshes
//! instead of calling the endpoint on its own.
//!
//! **A restart that loses the data during a token call** loses the lock too: another
//! replica can then take it and make a call of its own. With a provider that rotates
//! refresh tokens, one of the two calls is refused, and that replica's waiting
//! requests fail (`Rejected`) until its next refresh adopts the other's token.
//! Redis persistence (AOF or RDB) or a replicated setup avoids it.
//!
//! `InProcessStore` does the same between layers of one process; `TokenStore` is a
//! public trait for other stores. Rotations are shared for the Eshopbox grant,
//! `OAuth2Source`, and any `TokenSource` that implements `refresh_token` and
//! `use_refresh_token`. `tests/redis.rs` (one server) and `tests/redis_ha.rs` (a
//! Redis Cluster, Sentinels) run the scenarios against real servers, listed with their
//! numbers [below](#what-the-tests-show).
//!
//! ## Expiry without clock agreement
//!
//! Replicas exchange a token's *remaining life* ([`SharedToken`]), not a wall-clock
//! expiry: the writer sets the key's TTL to what the token has left,
//! and a reader gets the TTL back in the same script as the value and counts down on
//! its own monotonic clock, from when it sent the read, less a millisecond for Redis's
//! whole-millisecond TTLs. The reader's expiry can be later than the writer's only by
//! the write's own latency (the TTL starts when Redis runs the write), and earlier by
//! the read's round trip. "Is the stored token newer?" is a comparison of TTLs made inside
//! Redis. The replicas' wall clocks play no part; the wall-clock time stored with the
//! token is only for display.
//!
//! ## The hash tag
//!
//! The keys are `{prefix}token`, `{prefix}lock` and `{prefix}refresh-token` (default prefix `eshopbox-auth:`): the braces make the prefix
//! a Redis Cluster *hash tag*, so one credential set's keys live in one slot and no
//! script can fail with `CROSSSLOT`, whichever node serves it. A prefix that already has
//! a hash tag (`orders:{eshopbox}:`) is used as it is. The same key names are used on a
//! single server and behind Sentinels, so moving to a cluster needs no migration.
//!
//! ## Failover
//!
//! - *Cluster:* the client follows `MOVED` and `ASK` redirections during a resharding
//!   and learns the new master of a slot after a failover; what it gives up on meanwhile
//!   (a lost node, `TRYAGAIN`, `CLUSTERDOWN`) the store sends again, 50 ms apart doubling
//!   to 500 ms. What is not done within `store_timeout` is a store failure (a direct
//!   refresh), never a failed request. Set `store_timeout` longer than your cluster's failover (`cluster-node-timeout` plus the election)
//!   to ride failovers out through Redis: requests keep using the still-valid token
//!   meanwhile, and the failover costs at most one extra token call (a write the old
//!   master had not passed on to its replica yet). With a shorter timeout each replica
//!   that needs a token during the failover refreshes on its own.
//! - *Sentinel:* when the master's connection breaks, or the old master answers
//!   `READONLY` after it was demoted, the store asks the Sentinels for the master again
//!   and resends the command once. Until the Sentinels have promoted a replica, calls
//!   fail and replicas refresh directly; afterwards the store works again by itself.
//! - *Single server:* a dropped connection is re-established and the command resent
//!   once; a restart that lost the data only costs one token call. A replica does not
//!   put the refresh token it knows back before its call (another may have rotated it
//!   since): what its call rotates is stored after it. With a rotating provider, a
//!   replica that stayed idle while others rotated knows only a spent one, so its own
//!   refresh is refused until a replica with the newest one has stored a token.
//!
//! # What the tests show
//!
//! Against real servers the tests start on 127.0.0.1:
//!
//! | scenario (test file) | result |
//! |---|---|
//! | single server (`tests/redis.rs`): 8 cold replicas × 500 requests | 1 token call |
//! | single server: expiry under traffic (2 s tokens, 8 replicas) | 1 call per expiry |
//! | single server: stopped and restarted, or paused 3 s, under traffic | 0 failed requests |
//! | single server: stalled lock holder / slow but live holder | taken over after its lease / keeps its lock |
//! | single server: rotation shared, also across a restart that lost the data | newest refresh token survives |
//! | scripts: a late or older token, a late rotated refresh token | never replace a newer one |
//! | scripts: the token key's TTL | the token's remaining life, not its lifetime |
//! | a writer whose wall clock is 10 minutes ahead or behind | readers expire the token with the writer, not 10 minutes off |
//! | encryption: values swapped between prefixes, relabelled, one byte flipped | refused; the replica refreshes (1 store failure) |
//! | encryption: token and rotated refresh token | sealed, a fresh nonce per write |
//! | TLS-only server | token shared |
//! | Cluster, 3 masters + 3 replicas (`tests/redis_ha.rs`): 8 cold replicas × 500 requests | 1 token call |
//! | Cluster: expiry under traffic (2 s tokens, 8 replicas) | 1 call per expiry, 0 store failures |
//! | Cluster: the master holding the keys killed under traffic (`store_timeout` 5 s) | 0 failed requests, 0 store failures, no extra token call in our runs (at most 1 allowed) |
//! | Cluster: the keys' slot resharded under traffic (`ASK`, then `MOVED`) | 0 failed requests, 0 store failures, 1 call per expiry |
//! | Sentinel, 1 master + 1 replica + 3 Sentinels: master killed under traffic | 0 failed requests; the store writes to the new master afterwards |

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
///
/// Its expiry is kept as a remaining life, counted on this process's monotonic clock
/// (`tokio::time::Instant`) from when the token was read, never as a wall-clock time:
/// replicas whose wall clocks disagree still agree on when a shared token expires.
/// A store hands over how long the token has left (Redis: the key's TTL) and the
/// reader counts down from there.
#[derive(Clone)]
pub struct SharedToken {
    id: u64,
    access_token: SecretString,
    lifetime: Duration,
    expires_at: Instant,
    issued_at: SystemTime,
}

impl SharedToken {
    /// A token, identified by `id` (a random number chosen by the layer that fetched
    /// it), that lived `lifetime` in all and has `remaining` left from now on.
    ///
    /// Its [`issued_at`](Self::issued_at) is estimated from this process's wall clock;
    /// [`with_issued_at`](Self::with_issued_at) sets the one the fetching replica saw.
    pub fn new(
        id: u64,
        access_token: SecretString,
        lifetime: Duration,
        remaining: Duration,
    ) -> Self {
        let now = Instant::now();
        let expires_at = now
            .checked_add(remaining)
            .unwrap_or_else(|| now + Duration::from_secs(365 * 24 * 3600));
        let issued_at = SystemTime::now()
            .checked_sub(lifetime.saturating_sub(remaining))
            .unwrap_or_else(SystemTime::now);
        SharedToken {
            id,
            access_token,
            lifetime: lifetime.max(remaining),
            expires_at,
            issued_at,
        }
    }

    /// The same token, with the wall-clock time it was requested at, as the replica
    /// that fetched it saw it. For display only: expiry never depends on it.
    pub fn with_issued_at(mut self, issued_at: SystemTime) -> Self {
        self.issued_at = issued_at;
        self
    }

    /// Identifies this token, for [`TokenStore::remove`].
    pub fn id(&self) -> u64 {
        self.id
    }

    /// The access token (without `Bearer `).
    pub fn access_token(&self) -> &SecretString {
        &self.access_token
    }

    /// How long the token lived in all, from its token call to its expiry.
    pub fn lifetime(&self) -> Duration {
        self.lifetime
    }

    /// When the token expires, on this process's monotonic clock.
    pub fn expires_at(&self) -> Instant {
        self.expires_at
    }

    /// How long until the token expires (zero once it has).
    pub fn remaining(&self) -> Duration {
        self.expires_at.saturating_duration_since(Instant::now())
    }

    /// When the token was requested, by a wall clock (see
    /// [`with_issued_at`](Self::with_issued_at)). For display and logs only.
    pub fn issued_at(&self) -> SystemTime {
        self.issued_at
    }
}

impl fmt::Debug for SharedToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SharedToken")
            .field("id", &self.id)
            .field("access_token", &"[redacted]")
            .field("lifetime", &self.lifetime)
            .field("remaining", &self.remaining())
            .field("issued_at", &self.issued_at)
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

    /// Stores `token` in place of the stored one, to be forgotten when its
    /// [`remaining`](SharedToken::remaining) life runs out — unless the stored one has
    /// more life left (atomically): a replica that finishes late does not replace a
    /// newer token. Stores compare and expire tokens by remaining life (a TTL), never
    /// by wall-clock times, so replicas' clocks need not agree.
    fn save<'a>(&'a self, token: &'a SharedToken) -> BoxFuture<'a, Result<(), Error>>;

    /// Removes the stored token if its id is `id` (atomically). Returns whether it did.
    fn remove(&self, id: u64) -> BoxFuture<'_, Result<bool, Error>>;

    /// Takes the refresh lock for `owner` for `lease` if no one holds it, or extends
    /// it to `lease` from now if `owner` holds it (atomically). The layer calls it
    /// again every third of the lease while its token call runs.
    ///
    /// Three outcomes, and what the layer does on each:
    /// - `Ok(true)`, acquired: it makes the token call and shares the result;
    /// - `Ok(false)`, held by another replica: it waits for the holder's token
    ///   (polling the store), and takes the lock over if the holder's lease runs out;
    /// - `Err(_)`, store unavailable: it counts a store failure
    ///   ([`Stats::store_failures`](crate::Stats::store_failures)), refreshes directly, and leaves
    ///   the store alone for a few seconds. The request does not fail.
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

    /// Deletes what this store keeps for one workspace (the token, lock and rotated
    /// refresh token of its [`for_workspace`](Self::for_workspace) part). A
    /// per-workspace layer calls it when it forgets the workspace (`forget`, feature
    /// `workspaces`: the merchant uninstalled the app), so that no secret of the
    /// workspace stays in the store (replicas that still keep the workspace may store
    /// a new token until they forget it too).
    ///
    /// The default does nothing: a store without workspaces keeps nothing for one.
    fn forget_workspace(&self, workspace: &str) -> BoxFuture<'_, Result<(), Error>> {
        let _ = workspace;
        Box::pin(async { Ok(()) })
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
        // (Both are instants of this process's monotonic clock.)
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

    /// Empties the workspace's part (layers that already use it keep sharing it).
    fn forget_workspace(&self, workspace: &str) -> BoxFuture<'_, Result<(), Error>> {
        let part = self
            .workspaces
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(workspace)
            .cloned();
        if let Some(part) = part {
            *part.state() = State::default();
        }
        Box::pin(async { Ok(()) })
    }
}
