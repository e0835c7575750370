//! The boxed future that the crate's object-safe traits return.

use std::future::Future;
use std::pin::Pin;

/// A boxed, sendable future: what [`TokenSource`](crate::source::TokenSource) and
/// [`TokenStore`](crate::store::TokenStore) methods return. The token paths are off
/// the request path, so one allocation per call is fine.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;
