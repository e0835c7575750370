//! The token core: where the access token comes from, where it is kept, and when it
//! is refreshed. Nothing here knows about the layer, the service, the response
//! future, the handle, the builder or the token store: those depend on this module,
//! never the reverse (see `ARCHITECTURE.md`).
//!
//! - [`value`]: the [`Token`](value::Token) — its secret, the header built from it
//!   once, its phase timer.
//! - [`cell`]: the current token in an `arc-swap` cell; admission (fresh / soft
//!   window / expired), 401 invalidation, failure memory and back-off.
//! - [`flight`]: single flight — one spawned refresh task per cell, shared by
//!   everyone who waits.
//! - [`refresh`]: one refresh, through a [`Coordinator`](refresh::Coordinator) (a
//!   token store) or straight from the fetcher.
//! - [`fetch`]: the attempt loop — back-off, `Retry-After`, the deadline.
//! - [`background`]: the optional background refresher.
//! - [`local`]: a service clone's own view of the cell (the request path's fast lane).
//! - [`key`]: a cell's copyable key, which response futures carry instead of an
//!   `Arc` of the cell, and the registry that resolves it after a 401.
//! - [`source`]: the one [`TokenSource`](source::TokenSource) trait.
//! - [`endpoint`] and [`response`]: the OAuth 2 token call and its answer; [`client`]:
//!   the HTTP client for it and the token URL checks.

pub(crate) mod background;
pub(crate) mod cell;
pub(crate) mod client;
pub(crate) mod endpoint;
pub(crate) mod fetch;
pub(crate) mod flight;
pub(crate) mod key;
pub(crate) mod local;
pub(crate) mod refresh;
pub(crate) mod response;
pub(crate) mod source;
pub(crate) mod value;
