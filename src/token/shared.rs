//! A refresh coordinated through a [`TokenStore`]: adopt another replica's token, or
//! take the store's lock and make the one token call for everybody.
//!
//! Every store call is bounded by a timeout. A store failure before the token call
//! hands the refresh back to the cache, which then calls the token endpoint directly;
//! after the token call, store failures are only logged. Either way the store is left
//! alone for a short while, so a dead store does not slow every refresh down.

use std::future::Future;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use secrecy::SecretString;
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

    /// Keeps a refresh token rotated by a direct token call, to be stored (and used
    /// by the other replicas) once the store answers again.
    pub(crate) fn keep_rotation(&self, rotated: SecretString) {
        *self.rotation() = Rotation {
            latest: Some(rotated),
            stored: false,
        };
    }

    fn rotation(&self) -> std::sync::MutexGuard<'_, Rotation> {
        self.rotation.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Notes a store failure: logged, and the store is left alone for a while.
    pub(crate) fn failed(&self, StoreFailed(error): StoreFailed) {
        tracing::warn!(%error, "token store unavailable; requesting tokens directly for now");
        *self
            .paused_until
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = Some(Instant::now() + STORE_PAUSE);
    }

    /// One refresh through the store. `Err` means the store failed before any token
    /// call was made; the caller then refreshes directly.
    pub(crate) async fn refresh(
        &self,
        cache: &TokenCache,
        reason: Reason,
        deadline: Instant,
    ) -> Result<Result<Arc<Token>, Error>, StoreFailed> {
        // The token being replaced: a stored token with its id is no use.
        let replacing = cache.peek().map(|t| t.shared_id);
        let failed = match reason {
            Reason::Invalidated => cache.take_failed_shared_id(),
            _ => None,
        };
        if let Some(id) = failed {
            self.call(self.store.remove(id)).await?;
        }
        let usable =
            |stored: &SharedToken| Some(stored.id()) != replacing && Some(stored.id()) != failed;
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
            if Instant::now() + pause >= deadline {
                return Ok(Err(Error::unavailable(
                    "another process held the token store's refresh lock for the whole token timeout",
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

    /// Holding the lock: look once more, then make the token call and share its result.
    async fn refresh_locked(
        &self,
        cache: &TokenCache,
        reason: Reason,
        deadline: Instant,
        usable: &impl Fn(&SharedToken) -> bool,
    ) -> Result<Result<Arc<Token>, Error>, StoreFailed> {
        let ready = match self.adopt(cache, reason, usable).await {
            Ok(adopted) => adopted,
            Err(failure) => {
                self.release().await;
                return Err(failure);
            }
        };
        if let Some(token) = ready {
            self.release().await;
            return Ok(Ok(token));
        }
        if let Err(failure) = self.sync_refresh_token(cache).await {
            self.release().await;
            return Err(failure);
        }
        let result = cache.fetch(reason, deadline).await;
        let outcome = match result {
            Ok((response, sent_at)) => {
                let rotated = response.rotated.clone();
                let token = cache.install(response, sent_at);
                self.publish(&token, rotated).await;
                Ok(token)
            }
            Err(error) => Err(error),
        };
        self.release().await;
        Ok(outcome)
    }

    /// Before a token call: the refresh token to send is the newest one. That is ours
    /// if the store has not taken our last rotation yet (it is written now), else the
    /// stored one. A store that lost its copy (a restart without persistence) gets
    /// ours back.
    async fn sync_refresh_token(&self, cache: &TokenCache) -> Result<(), StoreFailed> {
        let (latest, stored) = {
            let rotation = self.rotation();
            (rotation.latest.clone(), rotation.stored)
        };
        match latest {
            Some(latest) if !stored => {
                self.call(self.store.save_refresh_token(&latest)).await?;
                self.rotation().stored = true;
            }
            latest => match self.call(self.store.load_refresh_token()).await? {
                Some(from_store) => self.take_refresh_token(cache, from_store),
                None => {
                    if let Some(latest) = latest {
                        self.call(self.store.save_refresh_token(&latest)).await?;
                    }
                }
            },
        }
        Ok(())
    }

    /// After adopting another layer's token: also take the refresh token it may have
    /// rotated, so this layer knows the newest one even if the store later loses it.
    async fn follow_rotation(&self, cache: &TokenCache) {
        let unsaved = {
            let rotation = self.rotation();
            rotation.latest.is_some() && !rotation.stored
        };
        if unsaved {
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

    /// After a token call: writes the token and a rotated refresh token to the store.
    /// Failures are logged; a rotation that could not be written is kept for later.
    async fn publish(&self, token: &Token, rotated: Option<SecretString>) {
        if let Some(rotated) = rotated {
            let saved = self.call(self.store.save_refresh_token(&rotated)).await;
            if let Err(StoreFailed(error)) = &saved {
                tracing::warn!(%error, "could not store the rotated refresh token; will retry");
            }
            *self.rotation() = Rotation {
                latest: Some(rotated),
                stored: saved.is_ok(),
            };
        }
        let Some(shared) = token.to_shared() else {
            return;
        };
        // A holder that stalled past its lease may finish after the replica that took
        // over: it then leaves the later token in place.
        if let Ok(Some(stored)) = self.call(self.store.load()).await {
            if stored.expires_at() > shared.expires_at() {
                tracing::debug!("the token store already holds a later token; not replacing it");
                return;
            }
        }
        if let Err(StoreFailed(error)) = self.call(self.store.save(&shared)).await {
            tracing::warn!(%error, "could not store the new access token");
        }
    }

    /// Releases the lock; a failure only delays the other replicas until the lease
    /// runs out.
    async fn release(&self) {
        if let Err(StoreFailed(error)) = self.call(self.store.unlock(&self.owner)).await {
            tracing::warn!(%error, "could not release the token store's refresh lock");
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

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shared")
            .field("lease", &self.lease)
            .field("call_timeout", &self.call_timeout)
            .finish_non_exhaustive()
    }
}
