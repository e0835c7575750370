//! Which request bodies may be sent a second time after a 401.
//!
//! To resend a request, the layer keeps a copy of it from before the first attempt.
//! A body can only be copied if that is safe: a stream that has been (partly) read
//! cannot be, and resending it as zero bytes would be a silent data bug. A
//! [`ReplayPolicy`] decides, per request, whether a copy exists; when it returns
//! `None`, a 401 goes back to the caller unchanged (the token is still invalidated,
//! so the caller's own retry gets a fresh one).
//!
//! - [`EmptyBodies`] (the default): bodies whose size hint is exactly 0 — GET, DELETE,
//!   HEAD … — are replayed as `B::default()`.
//! - [`CloneBodies`]: any `B: Clone` body, such as `http_body_util::Full<Bytes>`, is
//!   cloned before the first attempt.
//! - A closure `Fn(&B) -> Option<B>` decides for itself.
//!
//! ```
//! use bytes::Bytes;
//! use eshopbox_auth::{Credentials, EshopboxAuthLayer};
//! use http_body_util::Full;
//!
//! # fn main() -> Result<(), eshopbox_auth::Error> {
//! let creds = Credentials::new("id", "secret", "refresh-token");
//! // Replay POST bodies too: `Full<Bytes>` is cheap to clone.
//! let layer = EshopboxAuthLayer::builder(creds)
//!     .replay_cloneable_bodies()
//!     .build()?;
//! # let _ = layer;
//! # Ok(())
//! # }
//! ```

use http_body::Body;

/// Decides whether, and how, a request body can be sent again after a 401.
pub trait ReplayPolicy<B>: Clone + Send + Sync + 'static {
    /// A copy of `body` to send with the retried request, or `None` if it cannot be
    /// replayed. Called once per request, before the first attempt, while the body
    /// is still unread.
    fn replay(&self, body: &B) -> Option<B>;
}

/// Replays only bodies that are known to be empty (size hint exactly 0), as
/// `B::default()`. The default policy.
#[derive(Debug, Clone, Copy, Default)]
pub struct EmptyBodies;

impl<B> ReplayPolicy<B> for EmptyBodies
where
    B: Body + Default,
{
    fn replay(&self, body: &B) -> Option<B> {
        (body.size_hint().exact() == Some(0)).then(B::default)
    }
}

/// Replays any body that implements `Clone`, by cloning it before the first attempt.
#[derive(Debug, Clone, Copy, Default)]
pub struct CloneBodies;

impl<B> ReplayPolicy<B> for CloneBodies
where
    B: Clone,
{
    fn replay(&self, body: &B) -> Option<B> {
        Some(body.clone())
    }
}

impl<B, F> ReplayPolicy<B> for F
where
    F: Fn(&B) -> Option<B> + Clone + Send + Sync + 'static,
{
    fn replay(&self, body: &B) -> Option<B> {
        self(body)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use http_body_util::{Empty, Full};

    #[test]
    fn empty_bodies_replays_only_known_empty_bodies() {
        assert!(EmptyBodies.replay(&Empty::<Bytes>::new()).is_some());
        assert!(EmptyBodies.replay(&Full::<Bytes>::default()).is_some());
        assert!(EmptyBodies
            .replay(&Full::new(Bytes::from_static(b"{}")))
            .is_none());
    }

    #[test]
    fn clone_bodies_copies_the_bytes() {
        let body = Full::new(Bytes::from_static(b"payload"));
        let copy = CloneBodies.replay(&body).unwrap();
        assert_eq!(copy.size_hint().exact(), Some(7));
    }

    /// A streaming body of unknown size.
    #[derive(Default)]
    struct Streaming;

    impl Body for Streaming {
        type Data = Bytes;
        type Error = std::convert::Infallible;
        fn poll_frame(
            self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
        ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, Self::Error>>> {
            std::task::Poll::Pending
        }
    }

    #[test]
    fn streams_of_unknown_size_are_not_replayed_by_default() {
        assert!(EmptyBodies.replay(&Streaming).is_none());
    }

    #[test]
    fn a_closure_decides_for_itself() {
        let always = |_: &Streaming| Some(Streaming);
        assert!(always.replay(&Streaming).is_some());
        let never = |_: &Streaming| -> Option<Streaming> { None };
        assert!(never.replay(&Streaming).is_none());
    }
}
