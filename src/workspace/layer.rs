//! [`WorkspaceAuthLayer`]: one layer, many workspaces.

use std::sync::Arc;

use tower::Layer;

use super::registry::Registry;
use super::service::WorkspaceAuth;
use super::Workspace;
use crate::classify::Http401;
use crate::handle::TokenHandle;
use crate::layer::Shape;
use crate::replay::EmptyBodies;

/// Layer that applies [`WorkspaceAuth`] to a service, from
/// [`EshopboxAuthLayer::per_workspace`](crate::EshopboxAuthLayer::per_workspace).
///
/// Every service made from one layer, or from any of its clones, shares one map of
/// workspaces: per workspace one token and one refresh at a time.
#[derive(Clone, Debug)]
pub struct WorkspaceAuthLayer<P = EmptyBodies, C = Http401> {
    registry: Arc<Registry>,
    shape: Shape,
    replay: P,
    unauthorized: C,
}

impl<P, C> WorkspaceAuthLayer<P, C> {
    pub(crate) fn from_parts(
        registry: Arc<Registry>,
        shape: Shape,
        replay: P,
        unauthorized: C,
    ) -> Self {
        WorkspaceAuthLayer {
            registry,
            shape,
            replay,
            unauthorized,
        }
    }

    /// A handle on the workspace's token, if the workspace is resolved and kept: its
    /// token, stats, refresh and invalidation, as [`TokenHandle`] gives them for a
    /// single account. Looking counts as a use for the idle timeout. The handle keeps
    /// the workspace's token cell (not its place in the map) while it lives: once the
    /// workspace is dropped for size or idleness, the handle's cell is no longer the
    /// one requests use; its background refresher (with `background_refresh`) stops,
    /// and the handle refreshes on demand until it is dropped. Keep handles only
    /// while you need them. (A handle on a workspace that was
    /// [forgotten](Self::forget) stops at once.)
    pub fn handle(&self, workspace: &Workspace) -> Option<TokenHandle> {
        self.registry
            .entry_of(workspace)
            .map(|entry| TokenHandle::new(entry.cell.clone()))
    }

    /// Drops the workspace now — for a merchant who uninstalled the app. Its token
    /// cell is retired: the token is invalidated, no token call is made for it any
    /// more (a request still waiting on it, or a [`TokenHandle`] kept on it, gets
    /// [`ErrorKind::UnknownWorkspace`](crate::ErrorKind::UnknownWorkspace)), and a
    /// token call under way at that moment neither installs nor stores its token (the
    /// endpoint may still have rotated the refresh token: the rotation hook is told,
    /// as the new one is then the only one that works). A credentials lookup under
    /// way ends without a token: its requests get `UnknownWorkspace` too. The
    /// credentials and token are freed as soon as nothing uses them. The workspace's
    /// next request asks the resolver again. Returns whether the workspace was kept
    /// (or being looked up).
    ///
    /// With a [token store](crate::store), the workspace's token, lock and rotated
    /// refresh token are also deleted from the store
    /// ([`TokenStore::forget_workspace`](crate::store::TokenStore::forget_workspace)),
    /// kept or not, by a task spawned on the current tokio runtime (without one,
    /// nothing is deleted and a warning is logged); a failure is logged. Another
    /// replica that still keeps the workspace goes on using its own token, and may
    /// store a new one, until it forgets the workspace too.
    pub fn forget(&self, workspace: &Workspace) -> bool {
        self.registry.forget(workspace)
    }

    /// How many workspaces are kept now (those being resolved included).
    pub fn workspaces(&self) -> u64 {
        self.registry.len()
    }

    /// How many workspaces were dropped for size or idleness since the layer was
    /// built (not counting [`forget`](Self::forget)).
    pub fn evictions(&self) -> u64 {
        self.registry.stats().evicted
    }

    /// How many requests the destination check refused before they were sent (see
    /// [`ErrorKind::UntrustedDestination`](crate::ErrorKind::UntrustedDestination));
    /// also counted as `eshopbox_auth_refused_total` with the `metrics` feature.
    pub fn refused(&self) -> u64 {
        self.registry.stats().refused
    }
}

impl<S, P: Clone, C: Clone> Layer<S> for WorkspaceAuthLayer<P, C> {
    type Service = WorkspaceAuth<S, P, C>;

    fn layer(&self, inner: S) -> Self::Service {
        WorkspaceAuth::new(
            inner,
            self.registry.clone(),
            self.shape.clone(),
            self.replay.clone(),
            self.unauthorized.clone(),
        )
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::{Credentials, EshopboxAuthLayer};

    fn layer(max_workspaces: usize) -> WorkspaceAuthLayer {
        EshopboxAuthLayer::per_workspace(|_: Workspace| async {
            Ok(Some(Credentials::new("id", "secret", "refresh")))
        })
        .max_workspaces(max_workspaces)
        .build()
        .unwrap()
    }

    fn paused_runtime() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .start_paused(true)
            .build()
            .unwrap()
    }

    // Warm requests report their use to the cache on the clock's ticks; a clock that
    // stopped with the first lookup's runtime would let busy workspaces expire.
    #[test]
    fn the_clock_goes_on_after_the_first_lookups_runtime_is_gone() {
        let layer = layer(10);
        let registry = &layer.registry;
        let acme = Workspace::new("acme");
        paused_runtime()
            .block_on(registry.resolve(acme.clone()))
            .unwrap();
        ticks_on_a_new_runtime(registry, &acme);
    }

    // A warm request outside any runtime cannot start a janitor: it leaves the next
    // request to try again.
    #[test]
    fn a_warm_request_outside_a_runtime_leaves_the_janitor_to_the_next() {
        let layer = layer(10);
        let registry = &layer.registry;
        let acme = Workspace::new("acme");
        paused_runtime()
            .block_on(registry.resolve(acme.clone()))
            .unwrap();
        assert!(registry.warm(&acme, false).is_some());
        ticks_on_a_new_runtime(registry, &acme);
    }

    /// On a new runtime, a warm request for `workspace`, then ten seconds: the clock
    /// ticks every second (the default idle timeout's tick).
    fn ticks_on_a_new_runtime(registry: &Registry, workspace: &Workspace) {
        paused_runtime().block_on(async {
            assert!(registry.warm(workspace, false).is_some());
            let before = registry.ticks();
            tokio::time::sleep(Duration::from_secs(10)).await;
            assert!(
                registry.ticks() >= before + 9,
                "{} ticks",
                registry.ticks() - before
            );
        });
    }

    // A janitor started on a runtime that is shutting down is dropped unrun: the next
    // warm request on a live runtime starts another.
    #[test]
    fn a_janitor_dropped_unrun_is_started_again() {
        let layer = layer(10);
        let registry = &layer.registry;
        let acme = Workspace::new("acme");
        let first = paused_runtime();
        first.block_on(registry.resolve(acme.clone())).unwrap();
        let dead = first.handle().clone();
        drop(first);
        {
            let _entered = dead.enter();
            assert!(registry.warm(&acme, false).is_some());
        }
        ticks_on_a_new_runtime(registry, &acme);
    }

    // The cache may hold a dropped slot until its next housekeeping: the listener
    // (or, for a workspace it declined, the lookup) stops the refresher at once.
    #[test]
    fn a_workspace_dropped_for_size_stops_its_refresher() {
        let layer = layer(1);
        let registry = &layer.registry;
        paused_runtime().block_on(async {
            let acme = registry.resolve(Workspace::new("acme")).await.unwrap();
            let globex = registry.resolve(Workspace::new("globex")).await.unwrap();
            assert_eq!(registry.len(), 1);
            let kept = |name: &str| registry.entry_of(&Workspace::new(name)).is_some();
            for (name, entry) in [("acme", &acme), ("globex", &globex)] {
                assert_eq!(entry.cell.background_over(), !kept(name), "{name}");
            }
        });
    }

    // A workspace the cache declined while it was being looked up: the listener ran
    // before there was a cell, so the lookup stops the refresher as it ends.
    #[test]
    fn a_workspace_declined_during_its_lookup_gets_no_refresher() {
        let gate = Arc::new(tokio::sync::Semaphore::new(0));
        let asked = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let layer = {
            let (gate, asked) = (gate.clone(), asked.clone());
            EshopboxAuthLayer::per_workspace(move |workspace: Workspace| {
                let (gate, asked) = (gate.clone(), asked.clone());
                async move {
                    if workspace.name() == "globex" {
                        asked.store(true, std::sync::atomic::Ordering::SeqCst);
                        gate.acquire().await.unwrap().forget();
                    }
                    Ok(Some(Credentials::new("id", "secret", "refresh")))
                }
            })
            .max_workspaces(1)
            .build()
            .unwrap()
        };
        let registry = layer.registry.clone();
        paused_runtime().block_on(async {
            let acme = registry.resolve(Workspace::new("acme")).await.unwrap();
            let globex = tokio::spawn(registry.resolve(Workspace::new("globex")));
            // Until the resolver is asked for globex (its slot is in the cache by then).
            for _ in 0..1000 {
                if asked.load(std::sync::atomic::Ordering::SeqCst) {
                    break;
                }
                tokio::task::yield_now().await;
            }
            assert!(asked.load(std::sync::atomic::Ordering::SeqCst));
            // The cache settles on one of the two while globex has no cell yet.
            assert_eq!(registry.len(), 1);
            gate.add_permits(1);
            let globex = globex.await.unwrap().unwrap();
            let kept = |name: &str| registry.entry_of(&Workspace::new(name)).is_some();
            assert!(kept("acme") != kept("globex"));
            for (name, entry) in [("acme", &acme), ("globex", &globex)] {
                assert_eq!(entry.cell.background_over(), !kept(name), "{name}");
            }
        });
    }
}
