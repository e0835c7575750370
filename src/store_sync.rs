//! [`StoreSync`]: refreshes coordinated through a [`TokenStore`] — adopt another
//! replica's token, or take the store's lock and make the one token call for
//! everybody.
//!
//! This is the step between the token core and the store: it implements the core's
//! [`Coordinator`] and sees a refresh only through its [`Job`]; it answers with what
//! it [`Obtained`], which the cell installs.
//!
//! - Every store call is bounded by a timeout. A store failure before the token call
//!   hands the refresh back to the cell, which then calls the token endpoint directly
//!   (with `store_required`, the refresh fails instead).
//!   After the token call, the first store failure ends the store work for this
//!   refresh (the token is already in use here). Either way the store is left alone
//!   for a short while, so a dead store does not slow every refresh down.
//! - The lock holder renews its lease while its token call runs, so a slow but live
//!   holder is never taken over; a holder that stops answering loses the lock when
//!   the lease runs out, and a waiting replica takes over.
//! - Waiting replicas never call the token endpoint while the lock is held: with a
//!   provider that rotates refresh tokens, that would spend the holder's token.
//! - Rotated refresh tokens are versioned, and a version is only stored over the one
//!   it replaced, so a late write never puts back a spent refresh token.

use std::future::Future;
use std::pin::pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::Poll;
use std::time::Duration;

use secrecy::SecretString;
use tokio::time::Instant;

use crate::boxed::BoxFuture;
use crate::error::{Error, ErrorKind};
use crate::stats::Counters;
use crate::store::{SharedRefreshToken, SharedToken, TokenStore};
use crate::token::fetch::Fetched;
use crate::token::refresh::{Adopted, Coordinator, Job, Obtained, StoredToken};
use crate::token::value::Bearer;

/// First pause between two looks at the store while another replica refreshes.
const POLL_MIN: Duration = Duration::from_millis(10);
/// Longest pause between two looks.
const POLL_MAX: Duration = Duration::from_millis(200);
/// How long the store is left alone after it failed.
const STORE_PAUSE: Duration = Duration::from_secs(3);
/// How often a rotation the store missed is offered to it again, a pause apart.
const FLUSH_ATTEMPTS: u32 = 20;

/// The store side of a layer's token cell.
pub(crate) struct StoreSync {
    inner: Arc<Inner>,
}

struct Inner {
    store: Arc<dyn TokenStore>,
    /// This layer's id as a lock owner.
    owner: String,
    lease: Duration,
    /// Bound on each store call.
    call_timeout: Duration,
    /// No direct token call when the store fails: the refresh fails.
    required: bool,
    /// Set after a store failure: refresh directly until then.
    paused_until: Mutex<Option<Instant>>,
    /// The refresh token version this layer sends.
    rotation: Mutex<Rotation>,
    /// True while a task offers an unsaved rotation to the store again.
    flushing: AtomicBool,
}

/// The refresh token version a layer sends, and whether the store still lacks it.
#[derive(Default)]
struct Rotation {
    /// `None`: the configured refresh token (or none at all).
    current: Option<SharedRefreshToken>,
    /// `current` is a rotation of this layer's that the store has not taken yet.
    unsaved: bool,
    /// The id of the version `current` replaced (`None`: the configured one).
    replaces: Option<u64>,
}

/// The store failed; the refresh goes on without it.
struct StoreFailed(Error);

/// A refresh made holding the lock.
struct Locked {
    outcome: Result<Obtained, Error>,
    /// False if the store failed after the token call (the lock is left to its lease).
    store_ok: bool,
}

impl StoreSync {
    pub(crate) fn new(
        store: Arc<dyn TokenStore>,
        lease: Duration,
        call_timeout: Duration,
        required: bool,
    ) -> Self {
        StoreSync {
            inner: Arc::new(Inner {
                store,
                owner: format!("{:016x}{:016x}", fastrand::u64(..), fastrand::u64(..)),
                lease,
                call_timeout,
                required,
                paused_until: Mutex::new(None),
                rotation: Mutex::default(),
                flushing: AtomicBool::new(false),
            }),
        }
    }
}

impl Coordinator for StoreSync {
    fn obtain<'a>(&'a self, job: Job<'a>) -> BoxFuture<'a, Option<Result<Obtained, Error>>> {
        Box::pin(async move {
            // A failed store is left alone for a while: refreshes go to the token
            // endpoint directly meanwhile or, when the store is required, fail at once.
            let failure = if self.inner.available() {
                match self.inner.refresh(&job).await {
                    Ok(outcome) => return Some(outcome),
                    Err(failure) => Some(self.inner.failed(job.counters(), failure)),
                }
            } else {
                None
            };
            if !self.inner.required {
                return None;
            }
            let error = match failure {
                Some(cause) => Error::unavailable(
                    "the token store failed, and this layer requests tokens only through it",
                )
                .with_source(cause),
                None => Error::unavailable(
                    "the token store failed moments ago, and this layer requests tokens only \
                     through it",
                ),
            };
            // Like a failed token call: a still-valid token's next refresh is put off.
            job.back_off(&error);
            Some(Err(error))
        })
    }

    fn rotated_directly(&self, refresh_token: SecretString) {
        self.inner.rotated_directly(refresh_token);
    }
}

impl Inner {
    /// Whether the store is in use now (not paused after a failure).
    fn available(&self) -> bool {
        let mut paused = self
            .paused_until
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        match *paused {
            Some(until) if Instant::now() < until => false,
            Some(_) => {
                *paused = None;
                tracing::info!("using the token store again");
                true
            }
            None => true,
        }
    }

    /// Notes a store failure: logged, counted, and the store is left alone for a
    /// while. Returns the store's error.
    fn failed(&self, counters: &Counters, StoreFailed(error): StoreFailed) -> Error {
        if self.required {
            tracing::warn!(
                error = &error as &dyn std::error::Error,
                "token store unavailable; refreshes fail until it answers (store_required)"
            );
        } else {
            tracing::warn!(
                error = &error as &dyn std::error::Error,
                "token store unavailable; requesting tokens directly for now"
            );
        }
        counters.store_failure();
        *self
            .paused_until
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = Some(Instant::now() + STORE_PAUSE);
        error
    }

    fn rotation(&self) -> MutexGuard<'_, Rotation> {
        self.rotation.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// A token call made without the store rotated the refresh token: remember the new
    /// version and offer it to the store until it takes it (or has a newer one).
    fn rotated_directly(self: &Arc<Self>, refresh_token: SecretString) {
        self.rotated(refresh_token);
        self.offer_later();
    }

    /// Offers an unsaved rotation to the store again, a pause apart, until it takes it
    /// (or holds a newer one), from a task of its own.
    fn offer_later(self: &Arc<Self>) {
        if self.flushing.swap(true, Ordering::AcqRel) {
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            self.flushing.store(false, Ordering::Release);
            return;
        };
        let shared = Arc::downgrade(self);
        runtime.spawn(async move {
            for _ in 0..FLUSH_ATTEMPTS {
                tokio::time::sleep(STORE_PAUSE).await;
                let Some(shared) = shared.upgrade() else {
                    return;
                };
                if !shared.rotation().unsaved || shared.flush_rotation().await.is_ok() {
                    break;
                }
            }
            if let Some(shared) = shared.upgrade() {
                shared.flushing.store(false, Ordering::Release);
            }
        });
    }

    /// Records a new version of the refresh token, not stored yet.
    fn rotated(&self, refresh_token: SecretString) {
        let mut rotation = self.rotation();
        // Several rotations without the store still replace the version it holds.
        if !rotation.unsaved {
            rotation.replaces = rotation.current.as_ref().map(SharedRefreshToken::id);
        }
        rotation.current = Some(SharedRefreshToken::new(fastrand::u64(..), refresh_token));
        rotation.unsaved = true;
    }

    /// One refresh through the store. `Err` means the store failed before any token
    /// call was made; the caller then refreshes directly.
    async fn refresh(
        self: &Arc<Self>,
        job: &Job<'_>,
    ) -> Result<Result<Obtained, Error>, StoreFailed> {
        self.flush_rotation().await?;
        // The token being replaced, and one a 401 refused: stored tokens with these
        // ids are no use.
        let replacing = job.replacing();
        let failed = job.refused();
        if let Some(id) = failed {
            self.call(self.store.remove(id)).await?;
            job.forget_refused(id);
        }
        let usable =
            |stored: &SharedToken| Some(stored.id()) != replacing && Some(stored.id()) != failed;
        let mut pause = POLL_MIN;
        loop {
            if let Some(adopted) = self.adopt(job, &usable).await? {
                return Ok(Ok(Obtained::Adopted(adopted)));
            }
            if self
                .call(self.store.try_lock(&self.owner, self.lease))
                .await?
            {
                let result = self.refresh_locked(job, &usable).await;
                // After a store failure the lock is left to its lease.
                if matches!(result, Ok(Locked { store_ok: true, .. })) {
                    self.release().await;
                }
                return result.map(|locked| locked.outcome);
            }
            if Instant::now() + pause >= job.deadline() {
                // The holder is alive (it renews its lease) but slow. Calling the
                // endpoint now could spend the refresh token it is using.
                tracing::warn!(
                    "the token store's refresh lock was held by another process for the \
                     whole token timeout; no token call was made"
                );
                return Ok(Err(Error::unavailable(
                    "another process's token call took the whole token timeout",
                )));
            }
            tracing::trace!(?pause, "another process is refreshing the token; waiting");
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(POLL_MAX);
        }
    }

    /// The stored token, if it is usable for this refresh.
    async fn adopt(
        &self,
        job: &Job<'_>,
        usable: &impl Fn(&SharedToken) -> bool,
    ) -> Result<Option<Adopted>, StoreFailed> {
        let Some(stored) = self.call(self.store.load()).await?.filter(usable) else {
            return Ok(None);
        };
        if Bearer::new(stored.access_token().clone()).is_err() {
            // It would stay until it expires (a save keeps a token with more life
            // left), and every replica would refresh on its own meanwhile.
            tracing::warn!(
                "removing a token from the token store that cannot be sent (whitespace or \
                 control characters in it)"
            );
            self.call(self.store.remove(stored.id())).await?;
            return Ok(None);
        }
        let adopted = job.adopt(from_store(&stored));
        if adopted.is_some() {
            // Also take the refresh token it may have rotated, so this layer knows the
            // newest one even if the store later loses it.
            let _ = self.sync_refresh_token(job).await;
        }
        Ok(adopted)
    }

    /// Holding the lock: look once more, then make the token call (renewing the lease
    /// meanwhile) and share its result. `Err` is a store failure before the token
    /// call.
    async fn refresh_locked(
        self: &Arc<Self>,
        job: &Job<'_>,
        usable: &impl Fn(&SharedToken) -> bool,
    ) -> Result<Locked, StoreFailed> {
        if let Some(adopted) = self.adopt(job, usable).await? {
            return Ok(Locked {
                outcome: Ok(Obtained::Adopted(adopted)),
                store_ok: true,
            });
        }
        self.sync_refresh_token(job).await?;
        let before = job.refresh_token();
        // The token call gets the whole token timeout: the store calls above do not
        // eat into it.
        let mut fetched = self.renewing(job.fetch()).await;
        if let Some(configured) = fallback(job, &fetched) {
            // The store's refresh token was refused, and this layer was configured with
            // another: the app was authorised again since, say. Try that one once; if
            // it works, the store takes it (below) like a rotation.
            tracing::warn!(
                "the token store's refresh token was refused; trying the one this layer was \
                 configured with"
            );
            job.use_refresh_token(configured);
            fetched = self.renewing(job.fetch()).await;
            if fetched.is_err() {
                // Refused too: keep the store's, so nothing is shared.
                if let Some(stored) = before.clone() {
                    job.use_refresh_token(stored);
                }
            }
        }
        // The source may have switched to a rotated refresh token even if the answer
        // was otherwise unusable: share it either way.
        if let Some(rotated) = job.rotated_since(before) {
            self.rotated(rotated);
        }
        // A cell retired during the call (its workspace forgotten) stores nothing: the
        // store's keys for it were deleted, and must stay so.
        if job.retired() {
            return Ok(Locked {
                outcome: fetched.map(Obtained::Fetched),
                store_ok: true,
            });
        }
        let store_ok = match self.publish(fetched.as_ref().ok()).await {
            Ok(()) => true,
            Err(failure) => {
                let _ = self.failed(job.counters(), failure);
                if self.rotation().unsaved {
                    self.offer_later();
                }
                false
            }
        };
        Ok(Locked {
            outcome: fetched.map(Obtained::Fetched),
            store_ok,
        })
    }

    /// Runs `work` while renewing the lock's lease every third of it. A renewal that
    /// fails is tried again a tenth of the lease later, while the lease may still
    /// hold; if one finds the lock taken, renewing stops and `work` goes on.
    async fn renewing<F: Future>(&self, work: F) -> F::Output {
        let renew = async {
            let mut wait = self.lease / 3;
            loop {
                tokio::time::sleep(wait).await;
                match self
                    .call(self.store.try_lock(&self.owner, self.lease))
                    .await
                {
                    Ok(true) => wait = self.lease / 3,
                    Ok(false) => {
                        tracing::warn!("lost the token store's refresh lock during the token call");
                        break;
                    }
                    Err(StoreFailed(error)) => {
                        tracing::warn!(
                            error = &error as &dyn std::error::Error,
                            "could not renew the token store's refresh lock; trying again"
                        );
                        wait = self.lease / 10;
                    }
                }
            }
            std::future::pending::<()>().await;
        };
        let mut work = pin!(work);
        let mut renew = pin!(renew);
        std::future::poll_fn(|cx| {
            if let Poll::Ready(output) = work.as_mut().poll(cx) {
                return Poll::Ready(output);
            }
            let _ = renew.as_mut().poll(cx);
            Poll::Pending
        })
        .await
    }

    /// Offers a rotation the store has not taken yet. If the store holds a newer
    /// version (another layer rotated since), this one is dropped: the next
    /// `sync_refresh_token` takes the stored one.
    async fn flush_rotation(&self) -> Result<(), StoreFailed> {
        let pending = {
            let rotation = self.rotation();
            match (&rotation.current, rotation.unsaved) {
                (Some(current), true) => Some((current.clone(), rotation.replaces)),
                _ => None,
            }
        };
        let Some((version, replaces)) = pending else {
            return Ok(());
        };
        let taken = self
            .call(self.store.save_refresh_token(&version, replaces))
            .await?;
        if !taken {
            tracing::warn!("the token store holds a newer refresh token than ours; using it");
        }
        let mut rotation = self.rotation();
        if rotation.current.as_ref().map(SharedRefreshToken::id) == Some(version.id()) {
            rotation.unsaved = false;
        }
        Ok(())
    }

    /// Before a token call: the refresh token to send is the newest one. Ours, if the
    /// store had not taken it yet, is offered first; then the stored version is used.
    /// A store that lost its copy (a restart without persistence) is not given ours
    /// back before the call: another replica may have rotated it since, and the others
    /// would take a spent one from the store. What our call rotates is stored after
    /// it, as always.
    async fn sync_refresh_token(&self, job: &Job<'_>) -> Result<(), StoreFailed> {
        self.flush_rotation().await?;
        if let Some(stored) = self.call(self.store.load_refresh_token()).await? {
            let mut rotation = self.rotation();
            let known = rotation.current.as_ref().map(SharedRefreshToken::id);
            if known != Some(stored.id()) {
                job.use_refresh_token(stored.refresh_token().clone());
                rotation.current = Some(stored);
                rotation.unsaved = false;
            }
        }
        Ok(())
    }

    /// After a token call: writes a rotated refresh token and the new access token to
    /// the store (a later token already stored stays).
    async fn publish(&self, fetched: Option<&Fetched>) -> Result<(), StoreFailed> {
        self.flush_rotation().await?;
        if let Some(fetched) = fetched {
            self.call(self.store.save(&to_store(fetched.stored())))
                .await?;
        }
        Ok(())
    }

    /// Releases the lock; a failure only delays the other replicas until the lease
    /// runs out.
    async fn release(&self) {
        if let Err(StoreFailed(error)) = self.call(self.store.unlock(&self.owner)).await {
            tracing::warn!(
                error = &error as &dyn std::error::Error,
                "could not release the token store's refresh lock"
            );
        }
    }

    /// One store call, bounded by the call timeout.
    async fn call<T>(
        &self,
        call: impl Future<Output = Result<T, Error>>,
    ) -> Result<T, StoreFailed> {
        match tokio::time::timeout(self.call_timeout, call).await {
            Ok(result) => result.map_err(StoreFailed),
            Err(_) => Err(StoreFailed(Error::unavailable(format!(
                "the token store did not answer within {:?}",
                self.call_timeout
            )))),
        }
    }
}

impl std::fmt::Debug for StoreSync {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StoreSync")
            .field("lease", &self.inner.lease)
            .field("call_timeout", &self.inner.call_timeout)
            .finish_non_exhaustive()
    }
}

/// A stored token in the cell's terms.
fn from_store(stored: &SharedToken) -> StoredToken {
    StoredToken {
        id: stored.id(),
        access_token: stored.access_token().clone(),
        issued_at: stored.issued_at(),
        lifetime: stored.lifetime(),
        expires_at: stored.expires_at(),
    }
}

/// A fetched token as the store keeps it: its remaining life by this process's
/// monotonic clock is what replicas exchange.
fn to_store(token: StoredToken) -> SharedToken {
    let remaining = token.expires_at.saturating_duration_since(Instant::now());
    SharedToken::new(token.id, token.access_token, token.lifetime, remaining)
        .with_issued_at(token.issued_at)
}

/// The refresh token to try after `fetched` failed, if the source's refresh token (the
/// store's) was refused and this layer was configured with a different one.
fn fallback(job: &Job<'_>, fetched: &Result<Fetched, Error>) -> Option<SecretString> {
    match fetched {
        Err(error) if error.kind() == ErrorKind::Rejected => job.configured_refresh_token(),
        _ => None,
    }
}
