//! [`WorkspaceAuthBuilder`]: the settings of a per-workspace layer.

use std::fmt;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use secrecy::SecretString;
use tower::BoxError;

use super::layer::WorkspaceAuthLayer;
use super::registry::{Registry, Resolve, WorkspaceRotationHook};
use super::Workspace;
use crate::builder::EshopboxAuthBuilder;
use crate::classify::Http401;
use crate::credentials::Credentials;
use crate::error::Error;
use crate::layer::EshopboxAuthLayer;
use crate::replay::{CloneBodies, EmptyBodies};
use crate::store::TokenStore;
use crate::token::endpoint::RequestFormat;

/// Default [`max_workspaces`](WorkspaceAuthBuilder::max_workspaces): 10 000.
pub const DEFAULT_MAX_WORKSPACES: usize = 10_000;

/// Default [`idle_timeout`](WorkspaceAuthBuilder::idle_timeout): one hour.
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(60 * 60);
/// The longest [`idle_timeout`](WorkspaceAuthBuilder::idle_timeout) accepted: a year.
const MAX_IDLE_TIMEOUT: Duration = Duration::from_secs(365 * 24 * 3600);

impl EshopboxAuthLayer {
    /// A builder for one layer serving many workspaces, each with its own
    /// credentials (feature `workspaces`; see [`crate::workspace`]).
    ///
    /// `resolver` is called with a request's [`Workspace`] the first time it is seen
    /// (and again after it was dropped from the map): `Ok(Some(credentials))` for a
    /// known workspace, `Ok(None)` for an unknown one (the request fails with
    /// [`UnknownWorkspace`](crate::ErrorKind::UnknownWorkspace)), `Err` when the lookup
    /// failed (the request fails with [`Unavailable`](crate::ErrorKind::Unavailable),
    /// the error as its source; the next request asks again). A lookup that takes
    /// longer than [`token_timeout`](crate::EshopboxAuthBuilder::token_timeout) fails
    /// the same way.
    pub fn per_workspace<R, Fut>(resolver: R) -> WorkspaceAuthBuilder
    where
        R: Fn(Workspace) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<Option<Credentials>, BoxError>> + Send + 'static,
    {
        let resolve: Resolve = Arc::new(move |workspace| Box::pin(resolver(workspace)));
        WorkspaceAuthBuilder {
            base: EshopboxAuthBuilder::per_workspace(),
            resolve,
            max_workspaces: DEFAULT_MAX_WORKSPACES,
            idle_timeout: DEFAULT_IDLE_TIMEOUT,
            on_rotated: None,
        }
    }
}

/// Builder for [`WorkspaceAuthLayer`], from [`EshopboxAuthLayer::per_workspace`].
///
/// It has the options of [`EshopboxAuthBuilder`], applied to every workspace, and
/// the map's bounds. Setters take and return the builder; [`build`](Self::build)
/// checks everything.
#[must_use]
pub struct WorkspaceAuthBuilder<P = EmptyBodies, C = Http401> {
    base: EshopboxAuthBuilder<P, C>,
    resolve: Resolve,
    max_workspaces: usize,
    idle_timeout: Duration,
    on_rotated: Option<WorkspaceRotationHook>,
}

/// Forwards a setter to the single-account builder's.
macro_rules! forward {
    ($(#[$doc:meta])* $name:ident($arg:ident: $ty:ty)) => {
        $(#[$doc])*
        pub fn $name(mut self, $arg: $ty) -> Self {
            self.base = self.base.$name($arg);
            self
        }
    };
}

impl<P, C> WorkspaceAuthBuilder<P, C> {
    /// How many workspaces are kept at most (default [`DEFAULT_MAX_WORKSPACES`]).
    /// When the map is full, the cache keeps the workspaces used most; a workspace
    /// it declines or drops is still served, and resolved again on its next request.
    pub fn max_workspaces(mut self, max: usize) -> Self {
        self.max_workspaces = max;
        self
    }

    /// A workspace that no request used for this long is dropped, with its token and
    /// credentials (default [`DEFAULT_IDLE_TIMEOUT`]); its next request resolves it
    /// again. At most a year: for workspaces that are never dropped for idleness, use
    /// a year.
    pub fn idle_timeout(mut self, idle: Duration) -> Self {
        self.idle_timeout = idle;
        self
    }

    /// Called with the workspace and its new refresh token whenever the token
    /// endpoint rotates one, so the integrator can store it with that workspace's
    /// credentials. The hook runs on the refresh task: keep it short.
    pub fn on_refresh_token_rotated<F>(mut self, hook: F) -> Self
    where
        F: Fn(&Workspace, &SecretString) + Send + Sync + 'static,
    {
        self.on_rotated = Some(Arc::new(hook));
        self
    }

    forward!(
        /// The token endpoint; see [`EshopboxAuthBuilder::token_url`].
        token_url(url: &str)
    );
    forward!(
        /// See [`EshopboxAuthBuilder::refresh_margin`].
        refresh_margin(margin: Duration)
    );
    forward!(
        /// See [`EshopboxAuthBuilder::token_timeout`].
        token_timeout(timeout: Duration)
    );
    forward!(
        /// See [`EshopboxAuthBuilder::attempt_timeout`].
        attempt_timeout(timeout: Duration)
    );
    forward!(
        /// See [`EshopboxAuthBuilder::retry_on_unauthorized`].
        retry_on_unauthorized(retry: bool)
    );
    forward!(
        /// See [`EshopboxAuthBuilder::request_format`].
        request_format(format: RequestFormat)
    );
    forward!(
        /// The HTTP client for every workspace's token requests; see
        /// [`EshopboxAuthBuilder::http_client`].
        http_client(client: reqwest::Client)
    );
    forward!(
        /// Per workspace; see [`EshopboxAuthBuilder::failure_cooldown`].
        failure_cooldown(cooldown: Duration)
    );
    forward!(
        /// A refresh task per kept workspace; see
        /// [`EshopboxAuthBuilder::background_refresh`]. A dropped workspace's task ends.
        background_refresh(enabled: bool)
    );
    forward!(
        /// See [`EshopboxAuthBuilder::lock_lease`].
        lock_lease(lease: Duration)
    );
    forward!(
        /// See [`EshopboxAuthBuilder::store_timeout`].
        store_timeout(timeout: Duration)
    );
    forward!(
        /// See [`EshopboxAuthBuilder::store_required`].
        store_required(required: bool)
    );
    forward!(
        /// See [`EshopboxAuthBuilder::allow_host`].
        allow_host(pattern: &str)
    );
    forward!(
        /// See [`EshopboxAuthBuilder::allow_insecure_http`].
        allow_insecure_http(allow: bool)
    );

    /// Shares each workspace's token with the other replicas through `store`; see
    /// [`EshopboxAuthBuilder::token_store`]. Each workspace has a part of its own
    /// ([`TokenStore::for_workspace`]); with `RedisStore`, the keys
    /// `<prefix>{<workspace>}:token`, `…:lock` and `…:refresh-token` (the workspace
    /// is their Redis Cluster hash tag). One token call per workspace per expiry
    /// across all replicas.
    pub fn token_store(mut self, store: impl TokenStore) -> Self {
        self.base = self.base.token_store(store);
        self
    }

    /// Which request bodies may be resent after a 401; see [`crate::replay`].
    pub fn replay_bodies<Q>(self, policy: Q) -> WorkspaceAuthBuilder<Q, C> {
        WorkspaceAuthBuilder {
            base: self.base.replay_bodies(policy),
            resolve: self.resolve,
            max_workspaces: self.max_workspaces,
            idle_timeout: self.idle_timeout,
            on_rotated: self.on_rotated,
        }
    }

    /// Which responses mean the token was refused; see [`crate::classify`].
    pub fn unauthorized_when<D>(self, policy: D) -> WorkspaceAuthBuilder<P, D> {
        WorkspaceAuthBuilder {
            base: self.base.unauthorized_when(policy),
            resolve: self.resolve,
            max_workspaces: self.max_workspaces,
            idle_timeout: self.idle_timeout,
            on_rotated: self.on_rotated,
        }
    }

    /// Resends any `Clone` body after a 401. Shorthand for `replay_bodies(CloneBodies)`.
    pub fn replay_cloneable_bodies(self) -> WorkspaceAuthBuilder<CloneBodies, C> {
        self.replay_bodies(CloneBodies)
    }

    /// Checks the settings and builds the layer.
    ///
    /// Fails with [`ErrorKind::Config`](crate::ErrorKind::Config) on what
    /// [`EshopboxAuthBuilder::build`] refuses, a zero `max_workspaces`, or an
    /// `idle_timeout` of zero or over a year. Credentials are checked when a workspace
    /// is resolved.
    pub fn build(self) -> Result<WorkspaceAuthLayer<P, C>, Error> {
        if self.max_workspaces == 0 {
            return Err(Error::config("max_workspaces must be at least 1"));
        }
        if self.idle_timeout.is_zero() {
            return Err(Error::config("idle_timeout must be more than zero"));
        }
        if self.idle_timeout > MAX_IDLE_TIMEOUT {
            return Err(Error::config("idle_timeout must be at most a year"));
        }
        let (cells, shape, replay, unauthorized) = self.base.into_cell_settings()?;
        if cells
            .store
            .as_ref()
            .is_some_and(|store| store.for_workspace("").is_none())
        {
            return Err(Error::config(
                "the token store cannot keep workspaces apart (TokenStore::for_workspace)",
            ));
        }
        let registry = Registry::new(
            self.resolve,
            cells,
            self.on_rotated,
            u64::try_from(self.max_workspaces).unwrap_or(u64::MAX),
            self.idle_timeout,
        );
        Ok(WorkspaceAuthLayer::from_parts(
            Arc::new(registry),
            shape,
            replay,
            unauthorized,
        ))
    }
}

impl<P: fmt::Debug, C: fmt::Debug> fmt::Debug for WorkspaceAuthBuilder<P, C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WorkspaceAuthBuilder")
            .field("base", &self.base)
            .field("max_workspaces", &self.max_workspaces)
            .field("idle_timeout", &self.idle_timeout)
            .field("on_refresh_token_rotated", &self.on_rotated.is_some())
            .finish_non_exhaustive()
    }
}
