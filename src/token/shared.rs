//! A refresh coordinated through a [`TokenStore`]: adopt another replica's token, or
//! take the store's lock and make the one token call for everybody.
//!
//! - Every store call is bounded by a timeout.
//! - A store failure before the token call hands the refresh back to the cache, which
//!   then calls the token endpoint directly. After the token call, the first store
//!   failure ends the store work for this refresh (the token is already in use here).
//!   Either way the store is left alone for a short while, so a dead store does not
//!   slow every refresh down.
//! - The lock holder renews its lease while its token call runs, so a slow but live
//!   holder is never taken over; a holder that stops answering loses the lock when
//!   the lease runs out.
//! - A replica waits for another's refresh for at most half the token timeout, then
//!   refreshes directly with the other half.

use std::future::Future;
use std::pin::pin;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::Poll;
use std::time::Duration;

use secrecy::{ExposeSecret, SecretString};
use tokio::time::Instant;

use super::cache::{Reason, TokenCache};
use super::Token;
use crate::error::Error;
use crate::store::{SharedToken, TokenStore};

/// First pause between two looks at the store while another replica refreshes.
const POLL_MIN: Duration = Duration::from_millis(10);
/// Longest pause between two looks.
const POLL_MAX: Duration = Duration::from_millis(200);
/// How long the store is left alone after it failed.
const STORE_PAUSE: Duration = Duration::from_secs(3);

/// The store side of a layer's token cache.
pub(crate) struct Shared {
    store: Arc<dyn TokenStore>,
    /// This layer's id as a lock owner.
    owner: String,
    lease: Duration,
    /// Bound on each store call.
    call_timeout: Duration,
    /// Set after a store failure: refresh directly until then.
    paused_until: Mutex<Option<Instant>>,
    /// The newest rotated refresh token this layer knows of.
    rotation: Mutex<Rotation>,
}

/// The newest rotated refresh token a layer knows of, and whether the store has it.
#[derive(Default)]
struct Rotation {
    latest: Option<SecretString>,
    /// False for a rotation the store has not taken yet (it failed): that one is newer
    /// than the stored one, so it is used, and written at the next chance.
    stored: bool,
}

/// The store failed; the refresh goes on without it.
pub(crate) struct StoreFailed(Error);

impl Shared {
    pub(crate) fn new(store: Arc<dyn TokenStore>, lease: Duration, call_timeout: Duration) -> Self {
        Shared {
            store,
            owner: format!("{:016x}{:016x}", fastrand::u64(..), fastrand::u64(..)),
            lease,
            call_timeout,
            paused_until: Mutex::new(None),
            rotation: Mutex::default(),
        }
    }

    /// Whether the store is in use now (not paused after a failure).
    pub(crate) fn available(&self) -> bool {
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

    /// Notes a store failure: logged, and the store is left alone for a while.
    pub(crate) fn failed(&self, cache: &TokenCache, StoreFailed(error): StoreFailed) {
        tracing::warn!(%error, "token store unavailable; requesting tokens directly for now");
        cache.counters.store_failure();
        *self
            .paused_until
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = Some(Instant::now() + STORE_PAUSE);
    }

    /// Keeps a refresh token rotated by a direct token call, to be stored (and used by
    /// the other replicas) once the store answers again.
    pub(crate) fn keep_rotation(&self, rotated: SecretString) {
        *self.rotation() = Rotation {
            latest: Some(rotated),
            stored: false,
        };
    }

    fn rotation(&self) -> MutexGuard<'_, Rotation> {
        self.rotation.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// One refresh through the store. `Err` means the store failed (or another
    /// replica held the lock too long) before any token call was made; the caller then
    /// refreshes directly.
    pub(crate) async fn refresh(
        &self,
        cache: &TokenCache,
        reason: Reason,
        deadline: Instant,
    ) -> Result<Result<Arc<Token>, Error>, StoreFailed> {
        self.flush_rotation().await?;
        // The token being replaced, and one a 401 refused: stored tokens with these
        // ids are no use.
        let replacing = cache.peek().map(|t| t.shared_id);
        let failed = match reason {
            Reason::Invalidated => cache.failed_shared_id(),
            _ => None,
        };
        if let Some(id) = failed {
            self.call(self.store.remove(id)).await?;
            cache.forget_failed_shared_id(id);
        }
        let usable =
            |stored: &SharedToken| Some(stored.id()) != replacing && Some(stored.id()) != failed;
        let now = Instant::now();
        let wait_until = now + deadline.saturating_duration_since(now) / 2;
        let mut pause = POLL_MIN;
        loop {
            if let Some(token) = self.adopt(cache, reason, &usable).await? {
                return Ok(Ok(token));
            }
            if self
                .call(self.store.try_lock(&self.owner, self.lease))
                .await?
            {
                return self.refresh_locked(cache, reason, deadline, &usable).await;
            }
            if Instant::now() + pause >= wait_until {
                return Err(StoreFailed(Error::unavailable(
                    "another process held the token store's refresh lock for half the token timeout",
                )));
            }
            tracing::trace!(?pause, "another process is refreshing the token; waiting");
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(POLL_MAX);
        }
    }

    /// The stored token, installed in `cache`, if it is usable for this refresh.
    async fn adopt(
        &self,
        cache: &TokenCache,
        reason: Reason,
        usable: &impl Fn(&SharedToken) -> bool,
    ) -> Result<Option<Arc<Token>>, StoreFailed> {
        let stored = self.call(self.store.load()).await?;
        let adopted = stored
            .filter(usable)
            .and_then(|stored| cache.adopt(&stored, reason));
        if adopted.is_some() {
            self.follow_rotation(cache).await;
        }
        Ok(adopted)
    }

    /// Holding the lock: look once more, then make the token call (renewing the lease
    /// meanwhile) and share its result. Releases the lock unless the store failed.
    async fn refresh_locked(
        &self,
        cache: &TokenCache,
        reason: Reason,
        deadline: Instant,
        usable: &impl Fn(&SharedToken) -> bool,
    ) -> Result<Result<Arc<Token>, Error>, StoreFailed> {
        if let Some(token) = self.adopt(cache, reason, usable).await? {
            self.release(cache).await;
            return Ok(Ok(token));
        }
        self.sync_refresh_token(cache).await?;
        let before = cache.refresh_token();
        let fetched = self.renewing(cache.fetch(reason, deadline)).await;
        // The source may have switched to a rotated refresh token even if the answer
        // was otherwise unusable: share it either way.
        let rotated = cache
            .refresh_token()
            .filter(|after| !same(Some(after), before.as_ref()));
        let outcome = fetched.map(|(response, sent_at)| cache.install(response, sent_at));
        if self.publish(cache, outcome.as_ref().ok(), rotated).await {
            self.release(cache).await;
        }
        Ok(outcome)
    }

    /// Runs `work` while renewing the lock's lease every third of it. If a renewal
    /// fails or finds the lock taken, renewing stops and `work` goes on.
    async fn renewing<F: Future>(&self, work: F) -> F::Output {
        let renew = async {
            loop {
                tokio::time::sleep(self.lease / 3).await;
                match self
                    .call(self.store.try_lock(&self.owner, self.lease))
                    .await
                {
                    Ok(true) => {}
                    Ok(false) => {
                        tracing::warn!("lost the token store's refresh lock during the token call");
                        break;
                    }
                    Err(StoreFailed(error)) => {
                        tracing::warn!(%error, "could not renew the token store's refresh lock");
                        break;
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

    /// Writes a rotation the store has not taken yet.
    async fn flush_rotation(&self) -> Result<(), StoreFailed> {
        let unsaved = {
            let rotation = self.rotation();
            rotation.latest.clone().filter(|_| !rotation.stored)
        };
        if let Some(latest) = unsaved {
            self.call(self.store.save_refresh_token(&latest)).await?;
            let mut rotation = self.rotation();
            if same(rotation.latest.as_ref(), Some(&latest)) {
                rotation.stored = true;
            }
        }
        Ok(())
    }

    /// Before a token call: the refresh token to send is the newest one — the stored
    /// one (ours, if ours was newer, has just been written by `flush_rotation`). A
    /// store that lost its copy (a restart without persistence) gets ours back.
    async fn sync_refresh_token(&self, cache: &TokenCache) -> Result<(), StoreFailed> {
        self.flush_rotation().await?;
        match self.call(self.store.load_refresh_token()).await? {
            Some(from_store) => self.take_refresh_token(cache, from_store),
            None => {
                let latest = self.rotation().latest.clone();
                if let Some(latest) = latest {
                    self.call(self.store.save_refresh_token(&latest)).await?;
                }
            }
        }
        Ok(())
    }

    /// After adopting another layer's token: also take the refresh token it may have
    /// rotated, so this layer knows the newest one even if the store later loses it.
    async fn follow_rotation(&self, cache: &TokenCache) {
        if self.flush_rotation().await.is_err() {
            return;
        }
        if let Ok(Some(from_store)) = self.call(self.store.load_refresh_token()).await {
            self.take_refresh_token(cache, from_store);
        }
    }

    /// Uses a refresh token from the store from now on.
    fn take_refresh_token(&self, cache: &TokenCache, from_store: SecretString) {
        cache.use_refresh_token(from_store.clone());
        *self.rotation() = Rotation {
            latest: Some(from_store),
            stored: true,
        };
    }

    /// After a token call: writes a rotated refresh token and the new access token to
    /// the store (a later token already stored stays). Returns `false` if the store
    /// failed: the rest is skipped, the store paused, and an unwritten rotation kept
    /// for later.
    async fn publish(
        &self,
        cache: &TokenCache,
        token: Option<&Arc<Token>>,
        rotated: Option<SecretString>,
    ) -> bool {
        if let Some(rotated) = rotated {
            self.keep_rotation(rotated);
            if let Err(failure) = self.flush_rotation().await {
                self.failed(cache, failure);
                return false;
            }
        }
        if let Some(shared) = token.and_then(|t| t.to_shared()) {
            if let Err(failure) = self.call(self.store.save(&shared)).await {
                self.failed(cache, failure);
                return false;
            }
        }
        true
    }

    /// Releases the lock; a failure only delays the other replicas until the lease
    /// runs out.
    async fn release(&self, cache: &TokenCache) {
        if let Err(failure) = self.call(self.store.unlock(&self.owner)).await {
            self.failed(cache, failure);
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

/// Whether two refresh tokens are the same.
fn same(a: Option<&SecretString>, b: Option<&SecretString>) -> bool {
    match (a, b) {
        (Some(a), Some(b)) => a.expose_secret() == b.expose_secret(),
        (None, None) => true,
        _ => false,
    }
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shared")
            .field("lease", &self.lease)
            .field("call_timeout", &self.call_timeout)
            .finish_non_exhaustive()
    }
}
