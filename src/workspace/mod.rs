//! Many workspaces through one layer: per-request credentials for integrators
//! (feature `workspaces`).
//!
//! A sales channel, OMS or ERP connector serves many merchants, each with its own
//! Eshopbox workspace and its own custom-app credentials. Build one
//! [`WorkspaceAuthLayer`] with [`EshopboxAuthLayer::per_workspace`](crate::EshopboxAuthLayer::per_workspace), name the
//! workspace on each request with the [`Workspace`] extension, and the layer looks
//! the credentials up (once, through your resolver), keeps that workspace's token
//! fresh, and sends the request with its token and `ProxyHost: <workspace>`.
//!
//! Every guarantee of the single-account layer holds per workspace (one token call
//! however many requests arrive cold, refresh ahead of expiry, one resend after a 401,
//! the failure cooldown, the destination guard); workspaces refresh independently.
//! At most [`max_workspaces`](WorkspaceAuthBuilder::max_workspaces) are kept, in a
//! bounded concurrent cache ([`moka`](https://docs.rs/moka)), read on the request
//! path through a lock-free map ([`papaya`](https://docs.rs/papaya)); one unused for
//! [`idle_timeout`](WorkspaceAuthBuilder::idle_timeout) is dropped, and its next
//! request resolves its credentials again.
//!
//! ```
//! use eshopbox_auth::mock::MockEshopbox;
//! use eshopbox_auth::{Credentials, EshopboxAuthLayer, Workspace};
//! use http::{Request, Response};
//! use std::convert::Infallible;
//! use tower::{service_fn, Service, ServiceBuilder, ServiceExt};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
//! # let eshopbox = MockEshopbox::start().await?;
//! # let token_url = eshopbox.token_url();
//! # let app = eshopbox.credentials();
//! // Your database of installed merchants.
//! let lookup = move |workspace: Workspace| {
//!     let app = app.clone();
//!     async move {
//!         Ok(match workspace.name() {
//!             "acme" => Some(app), // Credentials::new(client_id, client_secret, refresh_token)
//!             _ => None,
//!         })
//!     }
//! };
//! let auth = EshopboxAuthLayer::per_workspace(lookup)
//! #   .token_url(&token_url)
//!     .max_workspaces(5_000)
//!     .build()?;
//!
//! let client = service_fn(|req: Request<String>| async move {
//!     let workspace = req.headers()["proxyhost"].to_str().unwrap().to_owned();
//!     Ok::<_, Infallible>(Response::new(workspace))
//! });
//! let mut client = ServiceBuilder::new().layer(auth.clone()).service(client);
//!
//! let mut request = Request::get("https://acme.myeshopbox.com/api/v1/orders").body(String::new())?;
//! request.extensions_mut().insert(Workspace::new("acme"));
//! let response = client.ready().await?.call(request).await?;
//! assert_eq!(response.body(), "acme");
//! assert_eq!(auth.workspaces(), 1);
//! # Ok(())
//! # }
//! ```

use std::fmt;
use std::hash::{Hash, Hasher};
use std::sync::Arc;

mod builder;
mod future;
mod layer;
mod registry;
mod service;

pub use builder::{WorkspaceAuthBuilder, DEFAULT_IDLE_TIMEOUT, DEFAULT_MAX_WORKSPACES};
pub use future::ResponseFuture;
pub use layer::WorkspaceAuthLayer;
pub use service::WorkspaceAuth;

/// The merchant workspace a request is for: put it in the request's extensions
/// (`request.extensions_mut().insert(Workspace::new("acme"))`) before a
/// [`WorkspaceAuthLayer`].
///
/// The name is the workspace's Eshopbox name, sent as `ProxyHost`. Cheap to clone.
#[derive(Clone, Eq, PartialOrd, Ord)]
pub struct Workspace {
    name: Arc<str>,
}

impl PartialEq for Workspace {
    /// Equal names. Clones of one `Workspace` share their name, which is then not
    /// read (the request path compares the request's workspace with the map's).
    #[inline]
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.name, &other.name) || self.name == other.name
    }
}

impl Hash for Workspace {
    /// The name's hash, as `PartialEq` compares names.
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.name.hash(state);
    }
}

impl Workspace {
    /// A workspace by name. Any string is accepted here; a name that cannot be sent as
    /// a header value (empty, whitespace, control characters) fails the request with
    /// [`UnknownWorkspace`](crate::ErrorKind::UnknownWorkspace).
    pub fn new(name: impl Into<String>) -> Self {
        Workspace {
            name: Arc::from(name.into()),
        }
    }

    /// The workspace's name.
    pub fn name(&self) -> &str {
        &self.name
    }
}

impl fmt::Debug for Workspace {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("Workspace").field(&self.name()).finish()
    }
}

impl fmt::Display for Workspace {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Escaped: the name comes from the caller and may contain anything. A name
        // longer than a workspace name may be (a DNS name's 253 bytes) shows its
        // start only.
        const SHOWN: usize = 253;
        let name = self.name();
        match name.char_indices().nth(SHOWN) {
            None => write!(f, "{}", name.escape_debug()),
            Some((end, _)) => write!(f, "{}… ({} bytes)", name[..end].escape_debug(), name.len()),
        }
    }
}

impl From<&str> for Workspace {
    fn from(name: &str) -> Self {
        Workspace::new(name)
    }
}

impl From<String> for Workspace {
    fn from(name: String) -> Self {
        Workspace::new(name)
    }
}
