//! The bounded map of workspaces: each one's token cell, made once from the
//! credentials the resolver returns, kept in a `moka` cache (size bound, idle
//! timeout) and looked up without a lock on the request path.
//!
//! The request path reads a lock-free `papaya` map in front of the cache, holding
//! each resolved workspace weakly. The cache stays the owner: what it drops (evicted,
//! idle, forgotten) its eviction listener takes out of the front map, and the entry
//! ends with the cache's slot whatever the front map still holds. A warm request
//! tells the cache it was used only when the layer's coarse clock (a counter the
//! janitor moves on) has ticked since that workspace's last such report, so the
//! cache's per-read bookkeeping runs at most once a tick per workspace.
//!
//! With retry off, a warm request does not reach the entry at all: the front map's
//! node also holds the `ProxyHost` value and a snapshot of the workspace's token,
//! used while that token is fresh and its cell has announced no change (two loads;
//! see [`Snapshot`]). A request that finds the snapshot unusable takes the entry's
//! path, as the single-account layer would, and puts a new snapshot in the node once
//! the cell's token is fresh again. With retry on the request reaches the entry, whose
//! token cell the copy kept for a resend needs.
//!
//! A workspace's first requests share one resolution (single flight), which runs in a
//! spawned task: dropping the requests does not abort it. A failed or unknown lookup
//! is handed to the requests that waited for it and then forgotten, so the next
//! request asks the resolver again.

use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, PoisonError, Weak};
use std::time::Duration;

use http::HeaderValue;
use moka::notification::RemovalCause;
use moka::ops::compute::Op;
use moka::sync::Cache;
use secrecy::SecretString;
use tokio::sync::watch;
use tower::BoxError;

use super::Workspace;
use crate::boxed::BoxFuture;
use crate::builder::CellSettings;
use crate::credentials::Credentials;
use crate::error::{Error, ErrorKind};
use crate::store::TokenStore;
use crate::store_sync::StoreSync;
use crate::token::background::spawn_background;
use crate::token::cell::TokenCell;
use crate::token::endpoint::{GrantEndpoint, RotationHook};
use crate::token::key::CellKey;
use crate::token::refresh::Coordinator;
use crate::token::value::{Token, TokenInfo};

/// The resolver, boxed: credentials for a workspace, `None` if it is unknown.
pub(crate) type Resolve = Arc<
    dyn Fn(Workspace) -> BoxFuture<'static, Result<Option<Credentials>, BoxError>> + Send + Sync,
>;

/// Called with a workspace's rotated refresh token.
pub(crate) type WorkspaceRotationHook = Arc<dyn Fn(&Workspace, &SecretString) + Send + Sync>;

/// A resolved workspace: its token cell and its `ProxyHost` value.
pub(crate) struct Entry {
    pub(crate) cell: Arc<TokenCell>,
    pub(crate) proxy_host: HeaderValue,
    /// `eshopbox_auth_workspace{workspace}`: the parent of this workspace's refreshes.
    pub(crate) span: tracing::Span,
}

type Outcome = Option<Result<Arc<Entry>, Error>>;

/// A resolved workspace as the front map holds it: weakly (the cache's slot owns
/// the entry), with the coarse tick at which the cache last heard of a use, and
/// what a warm request needs to be sent without reaching the entry: the
/// `ProxyHost` value, the cell's key and a snapshot of the current token.
struct Hot {
    entry: Weak<Entry>,
    touched: AtomicU64,
    key: CellKey,
    proxy_host: HeaderValue,
    /// `None` until a request finds the workspace's token fresh.
    token: Option<Snapshot>,
}

/// The workspace's token as a request last found it, and a receiver of the cell's
/// changes subscribed before it was read. The snapshot is used only while the token
/// is fresh (one load of its phase) and the cell has published no change since (one
/// load of the channel's version): a new token, an invalidation after a 401 and
/// `forget` all publish one. Anything else (soft window, expired, changed, or a
/// token replaced without a change, as a backed-off refresh does) takes the
/// entry's path, which takes a new snapshot once the cell's token is fresh again.
struct Snapshot {
    token: Arc<Token>,
    changes: watch::Receiver<Option<TokenInfo>>,
}

/// What the request path finds for a known workspace.
pub(crate) enum Warm {
    /// The workspace's token is fresh: the headers to set, and what the response
    /// future carries.
    Fresh {
        proxy_host: HeaderValue,
        authorization: HeaderValue,
        key: CellKey,
        generation: u64,
    },
    /// Anything else: the entry, for the single-account path (token cell, waits,
    /// the copy kept for a resend).
    Entry(Arc<Entry>),
}

/// The lock-free map the request path reads. Names are hashed with a randomly
/// seeded `foldhash` (they come from the integrator's own records). The map holds
/// each `Hot` in its own node, next to the name: one pointer less to follow.
///
/// A removed or replaced node is freed once no reader can still hold it (epoch
/// reclamation). Its collector is asked to retire removed nodes in batches of one
/// (`batch_size(1)`) rather than dozens, so that an evicted or forgotten workspace's
/// token snapshot is usually dropped when the readers active at its removal are done.
/// It is not guaranteed: the collector frees a thread's batch only once the batch
/// holds as many nodes as threads were active, so with several busy threads a
/// removed node can wait for that thread's later removals. The forgotten
/// workspace's token cell is retired at once either way (no use, no refresh, nothing
/// stored); what may wait is the memory of one token per thread.
type Front = papaya::HashMap<Workspace, Hot, foldhash::quality::RandomState>;

/// What the cache keeps per workspace: the entry once resolved, and the resolution
/// under way until then.
#[derive(Default)]
pub(crate) struct Slot {
    entry: OnceLock<Arc<Entry>>,
    lookup: Mutex<Lookup>,
}

/// A slot's lookup, behind the lock that `forget` also takes.
#[derive(Default)]
struct Lookup {
    /// The resolution under way, if any.
    pending: Option<watch::Receiver<Outcome>>,
    /// Set by `forget`: a lookup that ends after it must not leave a usable entry
    /// behind.
    forgotten: bool,
}

/// Counters of the workspace map (the token counters are per workspace, in each cell).
#[derive(Default)]
struct Counters {
    resolved: AtomicU64,
    unknown: AtomicU64,
    resolver_failures: AtomicU64,
    evicted: AtomicU64,
    refused: AtomicU64,
}

/// The `metrics` names of the map's counters (feature `metrics`).
mod names {
    pub(super) const RESOLVED: &str = "eshopbox_auth_workspaces_resolved_total";
    pub(super) const UNKNOWN: &str = "eshopbox_auth_workspaces_unknown_total";
    pub(super) const RESOLVER_FAILURES: &str = "eshopbox_auth_workspaces_resolver_failures_total";
    pub(super) const EVICTED: &str = "eshopbox_auth_workspaces_evicted_total";
    /// The single-account layer's name: a refusal happens before any workspace.
    pub(super) const REFUSED: &str = "eshopbox_auth_refused_total";
}

fn count(counter: &AtomicU64, _name: &'static str) {
    counter.fetch_add(1, Ordering::Relaxed);
    #[cfg(feature = "metrics")]
    metrics::counter!(_name).increment(1);
}

/// The workspaces of one per-workspace layer and everything needed to add one.
pub(crate) struct Registry {
    cache: Cache<Workspace, Arc<Slot>>,
    front: Arc<Front>,
    /// The coarse clock: ticks counted by the janitor.
    ticks: AtomicU64,
    /// How often the clock ticks.
    tick_every: Duration,
    resolve: Resolve,
    cells: CellSettings,
    on_rotated: Option<WorkspaceRotationHook>,
    counters: Arc<Counters>,
    /// How often the janitor runs the cache's housekeeping. It is started with the
    /// first lookup, on that lookup's runtime, and again by the next warm request if
    /// that runtime shut down.
    janitor_every: Duration,
    janitor_running: AtomicBool,
    /// This registry, for restarting the janitor from the request path.
    this: OnceLock<Weak<Registry>>,
}

/// A snapshot of the workspace map's counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct MapStats {
    pub(crate) resolved: u64,
    pub(crate) unknown: u64,
    pub(crate) resolver_failures: u64,
    pub(crate) evicted: u64,
    pub(crate) refused: u64,
}

impl Registry {
    pub(crate) fn new(
        resolve: Resolve,
        cells: CellSettings,
        on_rotated: Option<WorkspaceRotationHook>,
        max_workspaces: u64,
        idle_timeout: Duration,
    ) -> Self {
        let counters = Arc::new(Counters::default());
        let evictions = counters.clone();
        let front = Arc::new(
            papaya::HashMap::builder()
                .hasher(foldhash::quality::RandomState::default())
                .collector(seize::Collector::new().batch_size(1))
                .build(),
        );
        let kept = front.clone();
        let cache = Cache::builder()
            .max_capacity(max_workspaces)
            .time_to_idle(idle_timeout)
            .eviction_listener(move |workspace: Arc<Workspace>, slot: Arc<Slot>, cause| {
                unfront(&kept, &workspace, &slot);
                // Explicit removals (`forget`, a failed lookup) are not evictions.
                if matches!(cause, RemovalCause::Size | RemovalCause::Expired) {
                    // The cache may hold the slot a while longer (until its next
                    // housekeeping); the refresher must not go on meanwhile.
                    if let Some(entry) = slot.entry.get() {
                        entry.cell.end_background();
                    }
                    count(&evictions.evicted, names::EVICTED);
                    tracing::debug!(workspace = %workspace, ?cause, "workspace dropped from the map");
                }
            })
            .build();
        // The cache hears of a warm workspace's use at least four times per idle
        // timeout, and at most once a second.
        let tick_every = (idle_timeout / 4).clamp(Duration::from_millis(1), Duration::from_secs(1));
        Registry {
            cache,
            front,
            ticks: AtomicU64::new(0),
            tick_every,
            resolve,
            cells,
            on_rotated,
            counters,
            janitor_every: (idle_timeout / 2)
                .clamp(Duration::from_millis(100), Duration::from_secs(60)),
            janitor_running: AtomicBool::new(false),
            this: OnceLock::new(),
        }
    }

    /// The cache evicts while it is used; the janitor makes sure that idle workspaces
    /// are dropped (and their timers and refreshers end) even when no request comes.
    /// It holds the registry weakly and ends with it. It also moves the coarse clock
    /// on: without it, warm requests would stop reporting their use and busy
    /// workspaces would be dropped as idle. So when its runtime shuts down, it moves
    /// the clock once more as it goes, and the next warm request starts another on
    /// its own runtime (see [`Registry::touch`]).
    fn start_janitor(self: &Arc<Self>, runtime: &tokio::runtime::Handle) {
        if self.janitor_running.swap(true, Ordering::AcqRel) {
            return;
        }
        let weak = Arc::downgrade(self);
        let _ = self.this.set(weak.clone());
        let tick = self.tick_every;
        let housekeeping = self.janitor_every;
        // Made before the task: a runtime that is shutting down drops the task
        // without running it, and the guard then still says the janitor is gone.
        let gone = JanitorGone(weak.clone());
        runtime.spawn(async move {
            let _gone = gone;
            let mut since = Duration::ZERO;
            loop {
                tokio::time::sleep(tick).await;
                let Some(registry) = weak.upgrade() else {
                    return;
                };
                registry.ticks.fetch_add(1, Ordering::Relaxed);
                since += tick;
                if since >= housekeeping {
                    since = Duration::ZERO;
                    registry.cache.run_pending_tasks();
                }
            }
        });
    }

    /// The request path: what is known of the workspace if it is resolved and kept.
    /// No lock; the cache is told of the use once per tick of the coarse clock.
    /// With `snapshot_allowed` false (retry on: the copy kept for a resend needs the
    /// token cell) the entry is always returned.
    #[inline]
    pub(crate) fn warm(&self, workspace: &Workspace, snapshot_allowed: bool) -> Option<Warm> {
        let front = self.front.pin();
        let hot = front.get(workspace)?;
        self.used(workspace, hot);
        if snapshot_allowed {
            if let Some(snapshot) = &hot.token {
                if snapshot.token.is_fresh_now()
                    && matches!(snapshot.changes.has_changed(), Ok(false))
                {
                    return Some(Warm::Fresh {
                        proxy_host: hot.proxy_host.clone(),
                        authorization: snapshot.token.header().clone(),
                        key: hot.key,
                        generation: snapshot.token.generation,
                    });
                }
            }
        }
        let entry = hot.entry.upgrade()?;
        if snapshot_allowed {
            self.snapshot(&front, workspace, &entry);
        }
        Some(Warm::Entry(entry))
    }

    /// The workspace's entry, if it is resolved and kept (a look counts as a use).
    pub(crate) fn entry_of(&self, workspace: &Workspace) -> Option<Arc<Entry>> {
        let front = self.front.pin();
        let hot = front.get(workspace)?;
        self.used(workspace, hot);
        hot.entry.upgrade()
    }

    /// Tells the cache of a use of the workspace if the coarse clock has ticked since
    /// the last time.
    #[inline]
    fn used(&self, workspace: &Workspace, hot: &Hot) {
        let now = self.ticks.load(Ordering::Relaxed);
        if hot.touched.load(Ordering::Relaxed) != now {
            // Without a janitor (none could be started here, outside a runtime) the
            // clock will not tick: the next request looks again.
            let seen = if self.touch(workspace) {
                now
            } else {
                now.wrapping_sub(1)
            };
            hot.touched.store(seen, Ordering::Relaxed);
        }
    }

    /// Replaces the workspace's node with one holding a snapshot of its token, if
    /// that token is fresh and the node is still this entry's.
    #[cold]
    #[inline(never)]
    fn snapshot<G: papaya::Guard>(
        &self,
        front: &papaya::HashMapRef<'_, Workspace, Hot, foldhash::quality::RandomState, G>,
        workspace: &Workspace,
        entry: &Arc<Entry>,
    ) {
        // Subscribed before the read: a change after it shows in the receiver.
        let changes = entry.cell.subscribe();
        let Some(token) = entry.cell.peek().filter(|token| token.is_fresh_now()) else {
            return;
        };
        let entry = Arc::downgrade(entry);
        let _ = front.compute(workspace.clone(), |kept| match kept {
            Some((_, hot)) if Weak::ptr_eq(&hot.entry, &entry) => papaya::Operation::Insert(Hot {
                entry: hot.entry.clone(),
                touched: AtomicU64::new(hot.touched.load(Ordering::Relaxed)),
                key: hot.key,
                proxy_host: hot.proxy_host.clone(),
                token: Some(Snapshot {
                    token: token.clone(),
                    changes: changes.clone(),
                }),
            }),
            _ => papaya::Operation::Abort(()),
        });
    }

    /// Records a use of the workspace with the cache (its idle clock and eviction
    /// policy), and starts the janitor again if its runtime shut down. Returns
    /// whether a janitor runs.
    #[cold]
    #[inline(never)]
    fn touch(&self, workspace: &Workspace) -> bool {
        let _ = self.cache.get(workspace);
        if !self.janitor_running.load(Ordering::Acquire) {
            if let (Some(this), Ok(runtime)) = (
                self.this.get().and_then(Weak::upgrade),
                tokio::runtime::Handle::try_current(),
            ) {
                this.start_janitor(&runtime);
            }
        }
        self.janitor_running.load(Ordering::Acquire)
    }

    /// Puts a resolved workspace in the front map, unless the cache no longer keeps
    /// its slot (declined or already dropped it): then the listener may have run
    /// before the insert, so the entry is taken out again here.
    fn enfront(&self, workspace: &Workspace, slot: &Arc<Slot>, entry: &Arc<Entry>) {
        let hot = Hot {
            entry: Arc::downgrade(entry),
            touched: AtomicU64::new(self.ticks.load(Ordering::Relaxed)),
            key: entry.cell.key(),
            proxy_host: entry.proxy_host.clone(),
            token: None,
        };
        self.front.pin().insert(workspace.clone(), hot);
        let kept = self
            .cache
            .get(workspace)
            .is_some_and(|kept| Arc::ptr_eq(&kept, slot));
        if !kept {
            unfront(&self.front, workspace, slot);
            // Served, but not kept: its requests refresh it on demand while they
            // last, and no refresher outlives them.
            entry.cell.end_background();
        }
    }

    /// The entry, resolving the workspace first if needed; the first of a
    /// workspace's concurrent callers starts one resolution, the others join it.
    pub(crate) fn resolve(
        self: &Arc<Self>,
        workspace: Workspace,
    ) -> BoxFuture<'static, Result<Arc<Entry>, Error>> {
        let registry = self.clone();
        Box::pin(async move {
            let proxy_host = match proxy_host(&workspace) {
                Ok(value) => value,
                Err(error) => {
                    count(&registry.counters.unknown, names::UNKNOWN);
                    return Err(error);
                }
            };
            // A cache that declines to keep a new workspace (it is full of busier
            // ones) still hands the slot out: the request is served all the same.
            let slot = registry
                .cache
                .get_with_by_ref(&workspace, || Arc::new(Slot::default()));
            let mut rx = match registry.join_or_start(&slot, &workspace, proxy_host) {
                Joined::Ready(entry) => return Ok(entry),
                Joined::Wait(rx) => rx,
            };
            loop {
                if let Some(outcome) = rx.borrow_and_update().as_ref() {
                    return outcome.clone();
                }
                if rx.changed().await.is_err() {
                    // The resolution task was dropped unfinished (runtime shut down or
                    // the resolver panicked).
                    if let Some(outcome) = rx.borrow().as_ref() {
                        return outcome.clone();
                    }
                    return Err(Error::unavailable(
                        "the workspace's credentials lookup ended without an answer",
                    ));
                }
            }
        })
    }

    fn join_or_start(
        self: &Arc<Self>,
        slot: &Arc<Slot>,
        workspace: &Workspace,
        proxy_host: HeaderValue,
    ) -> Joined {
        let mut lookup = slot.lookup.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(entry) = slot.entry.get() {
            return Joined::Ready(entry.clone());
        }
        if lookup.forgotten {
            // Taken from the map just before `forget`: no new lookup for it.
            return Joined::Wait(watch::channel(Some(Err(forgotten(workspace)))).1);
        }
        if let Some(rx) = lookup.pending.as_ref() {
            // A live resolution: join it. One whose task is gone: start another.
            if rx.has_changed().is_ok() {
                return Joined::Wait(rx.clone());
            }
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            // Nothing can run the lookup: the slot goes, like a failed lookup's.
            drop(lookup);
            self.drop_slot(workspace, slot);
            return Joined::Wait(
                watch::channel(Some(Err(Error::config(
                    "no tokio runtime: a workspace's credentials lookup must run inside a tokio \
                 runtime",
                ))))
                .1,
            );
        };
        let (tx, rx) = watch::channel(None);
        lookup.pending = Some(rx.clone());
        drop(lookup);
        self.start_janitor(&runtime);
        let registry = self.clone();
        let slot = slot.clone();
        let workspace = workspace.clone();
        let span = tracing::debug_span!("eshopbox_auth_workspace_lookup", workspace = %workspace);
        let task = async move {
            // The resolver runs in a task of its own, so that a panic in it fails
            // this lookup like any resolver error (counted, not remembered) instead
            // of leaving the slot behind.
            let lookup = tokio::spawn({
                let (registry, workspace) = (registry.clone(), workspace.clone());
                tracing::Instrument::in_current_span(async move {
                    registry.lookup(&workspace, proxy_host).await
                })
            });
            let mut outcome = match lookup.await {
                Ok(outcome) => outcome,
                Err(ended) => {
                    count(
                        &registry.counters.resolver_failures,
                        names::RESOLVER_FAILURES,
                    );
                    let how = if ended.is_panic() {
                        "panicked"
                    } else {
                        "was cancelled"
                    };
                    tracing::warn!(workspace = %workspace, "workspace credentials lookup {how}");
                    Err(Error::unavailable(format!(
                        "credentials lookup for workspace {workspace} {how}"
                    )))
                }
            };
            {
                // Under the lock `forget` takes: either it sees the entry (and retires
                // it) or this sees that the workspace was forgotten.
                let mut lookup = slot.lookup.lock().unwrap_or_else(PoisonError::into_inner);
                if let Ok(entry) = &outcome {
                    if lookup.forgotten {
                        entry.cell.retire();
                        outcome = Err(forgotten(&workspace));
                    } else {
                        let _ = slot.entry.set(entry.clone());
                    }
                }
                lookup.pending = None;
            }
            match &outcome {
                Ok(entry) => registry.enfront(&workspace, &slot, entry),
                Err(_) => registry.drop_slot(&workspace, &slot),
            }
            tx.send_replace(Some(outcome));
        };
        runtime.spawn(tracing::Instrument::instrument(task, span));
        Joined::Wait(rx)
    }

    /// Asks the resolver and builds the workspace's token cell.
    async fn lookup(
        &self,
        workspace: &Workspace,
        proxy_host: HeaderValue,
    ) -> Result<Arc<Entry>, Error> {
        // Bounded like a refresh: a resolver that hangs fails this lookup (not
        // remembered) instead of holding every request for the workspace.
        let timeout = self.cells.timing.timeout;
        let answer = tokio::time::timeout(timeout, (self.resolve)(workspace.clone()))
            .await
            .unwrap_or_else(|_| {
                Err(format!("no answer within the token timeout of {timeout:?}").into())
            });
        let credentials = match answer {
            Ok(Some(credentials)) => credentials,
            Ok(None) => {
                count(&self.counters.unknown, names::UNKNOWN);
                return Err(unknown(workspace, "the resolver does not know it"));
            }
            Err(source) => {
                count(&self.counters.resolver_failures, names::RESOLVER_FAILURES);
                tracing::debug!(workspace = %workspace, "workspace credentials lookup failed");
                return Err(Error::unavailable(format!(
                    "credentials lookup for workspace {workspace} failed"
                ))
                .with_boxed_source(source));
            }
        };
        if let Err(error) = credentials.validate() {
            count(&self.counters.resolver_failures, names::RESOLVER_FAILURES);
            return Err(Error::config(format!(
                "the resolver's credentials for workspace {workspace} cannot be used"
            ))
            .with_boxed_source(Box::new(error)));
        }
        let entry = self.entry(workspace, credentials, proxy_host)?;
        count(&self.counters.resolved, names::RESOLVED);
        Ok(entry)
    }

    /// A new token cell for this workspace, with the layer's settings.
    fn entry(
        &self,
        workspace: &Workspace,
        credentials: Credentials,
        proxy_host: HeaderValue,
    ) -> Result<Arc<Entry>, Error> {
        let settings = &self.cells;
        let on_rotated = self.on_rotated.clone().map(|hook| {
            let workspace = workspace.clone();
            Arc::new(move |token: &SecretString| hook(&workspace, token)) as RotationHook
        });
        let endpoint = GrantEndpoint::eshopbox(
            settings.client.clone(),
            settings.url.clone(),
            settings.format,
            credentials,
            on_rotated,
        );
        let coordinator = match &settings.store {
            Some(store) => {
                let part = store
                    .for_workspace(workspace.name())
                    .ok_or_else(|| Error::config("the token store cannot keep workspaces apart"))?;
                Some(Box::new(StoreSync::new(
                    part,
                    settings.lock_lease,
                    settings.store_timeout,
                    settings.store_required,
                )) as Box<dyn Coordinator>)
            }
            None => None,
        };
        let cell = TokenCell::new(Box::new(endpoint), None, coordinator, settings.timing);
        if settings.background_refresh {
            spawn_background(&cell)?;
        }
        Ok(Arc::new(Entry {
            cell,
            proxy_host,
            span: tracing::debug_span!(parent: None, "eshopbox_auth_workspace", workspace = %workspace),
        }))
    }

    /// Removes `slot` from the map if it is still the one kept for `workspace`.
    fn drop_slot(&self, workspace: &Workspace, slot: &Arc<Slot>) {
        self.cache
            .entry_by_ref(workspace)
            .and_compute_with(|kept| match kept {
                Some(kept) if Arc::ptr_eq(kept.value(), slot) => Op::Remove,
                _ => Op::Nop,
            });
    }

    /// Drops the workspace at once: its token is invalidated and its cell (with the
    /// credentials) freed when the last request using it ends.
    pub(crate) fn forget(&self, workspace: &Workspace) -> bool {
        // The store's keys go whether or not this replica keeps the workspace.
        if let Some(store) = &self.cells.store {
            forget_in_store(store.clone(), workspace, self.cells.store_timeout);
        }
        let Some(slot) = self.cache.remove(workspace) else {
            return false;
        };
        // At once, whatever the listener's timing: no new request finds it.
        unfront(&self.front, workspace, &slot);
        // A lookup under way ends without an entry (see `join_or_start`).
        let mut lookup = slot.lookup.lock().unwrap_or_else(PoisonError::into_inner);
        lookup.forgotten = true;
        if let Some(entry) = slot.entry.get() {
            entry.cell.retire();
        }
        true
    }

    /// The coarse clock's ticks so far.
    #[cfg(test)]
    pub(crate) fn ticks(&self) -> u64 {
        self.ticks.load(Ordering::Relaxed)
    }

    /// How many workspaces the map keeps (after its pending evictions ran).
    pub(crate) fn len(&self) -> u64 {
        self.cache.run_pending_tasks();
        self.cache.entry_count()
    }

    pub(crate) fn stats(&self) -> MapStats {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        MapStats {
            resolved: get(&self.counters.resolved),
            unknown: get(&self.counters.unknown),
            resolver_failures: get(&self.counters.resolver_failures),
            evicted: get(&self.counters.evicted),
            refused: get(&self.counters.refused),
        }
    }

    /// Counts a request the destination check refused.
    #[cold]
    pub(crate) fn refused(&self) {
        count(&self.counters.refused, names::REFUSED);
    }

    /// A request without a `Workspace` extension: counted with the unknown ones.
    #[cold]
    pub(crate) fn unnamed(&self) -> Error {
        count(&self.counters.unknown, names::UNKNOWN);
        Error::new(
            ErrorKind::UnknownWorkspace,
            "the request names no workspace (no Workspace extension)",
        )
    }
}

/// Deletes the workspace's keys from the token store, in a spawned task (bounded by
/// the store timeout); a failure is logged. Without a tokio runtime nothing can be
/// sent, which is logged too.
fn forget_in_store(store: Arc<dyn TokenStore>, workspace: &Workspace, timeout: Duration) {
    let Ok(runtime) = tokio::runtime::Handle::try_current() else {
        tracing::warn!(
            %workspace,
            "cannot delete a forgotten workspace's keys from the token store: no tokio runtime"
        );
        return;
    };
    let workspace = workspace.clone();
    runtime.spawn(async move {
        match tokio::time::timeout(timeout, store.forget_workspace(workspace.name())).await {
            Ok(Ok(())) => {
                tracing::debug!(%workspace, "forgotten workspace's keys deleted from the token store");
            }
            Ok(Err(error)) => tracing::warn!(
                %workspace,
                error = &error as &dyn std::error::Error,
                "could not delete a forgotten workspace's keys from the token store"
            ),
            Err(_) => tracing::warn!(
                %workspace,
                "timed out deleting a forgotten workspace's keys from the token store"
            ),
        }
    });
}

/// Marks the janitor gone when its task ends (its runtime shut down, or the registry
/// was dropped), and moves the coarse clock once so that the next warm request of
/// every workspace reaches [`Registry::touch`].
struct JanitorGone(Weak<Registry>);

impl Drop for JanitorGone {
    fn drop(&mut self) {
        if let Some(registry) = self.0.upgrade() {
            registry.janitor_running.store(false, Ordering::Release);
            registry.ticks.fetch_add(1, Ordering::Relaxed);
        }
    }
}

impl fmt::Debug for Registry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Registry")
            .field("workspaces", &self.len())
            .field("max_workspaces", &self.cache.policy().max_capacity())
            .field("idle_timeout", &self.cache.policy().time_to_idle())
            .field("stats", &self.stats())
            .finish_non_exhaustive()
    }
}

enum Joined {
    Ready(Arc<Entry>),
    Wait(watch::Receiver<Outcome>),
}

/// Takes the workspace out of the front map if it is there for this slot's entry
/// (a newer slot's entry stays).
fn unfront(front: &Front, workspace: &Workspace, slot: &Slot) {
    let Some(entry) = slot.entry.get() else {
        return;
    };
    let entry = Arc::downgrade(entry);
    let _ = front
        .pin()
        .remove_if(workspace, |_, hot| Weak::ptr_eq(&hot.entry, &entry));
}

/// The longest workspace name: a DNS name's longest text form.
const MAX_NAME: usize = 253;

/// The `ProxyHost` value for a workspace name: non-empty, no whitespace, at most
/// [`MAX_NAME`] bytes, a valid header value; else the request fails with
/// `UnknownWorkspace`.
fn proxy_host(workspace: &Workspace) -> Result<HeaderValue, Error> {
    let name = workspace.name();
    if name.is_empty() || name.bytes().any(|b| b.is_ascii_whitespace()) {
        return Err(unknown(workspace, "not a workspace name"));
    }
    if name.len() > MAX_NAME {
        return Err(unknown(workspace, "longer than a workspace name may be"));
    }
    HeaderValue::from_str(name).map_err(|_| unknown(workspace, "not a valid header value"))
}

/// The error of requests whose workspace was forgotten while they waited for its
/// lookup.
fn forgotten(workspace: &Workspace) -> Error {
    unknown(
        workspace,
        "it was forgotten while its credentials were looked up",
    )
}

pub(crate) fn unknown(workspace: &Workspace, why: &str) -> Error {
    Error::new(
        ErrorKind::UnknownWorkspace,
        format!("workspace {workspace}: {why}"),
    )
}
