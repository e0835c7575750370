//! Which request bodies may be sent a second time after a 401.
//!
//! To resend a request, the layer keeps a copy of it from before the first attempt.
//! A body can only be copied if that is safe: a stream that has been (partly) read
//! cannot be, and resending it as zero bytes would be a silent data bug. A
//! [`ReplayPolicy`] decides, per request, whether a copy exists; when there is none,
//! a 401 goes back to the caller unchanged (the token is still invalidated, so the
//! caller's own retry gets a fresh one).
//!
//! - [`EmptyBodies`] (the default): bodies whose size hint is exactly 0 — GET, DELETE,
//!   HEAD … — are replayed as `B::default()`.
//! - [`CloneBodies`]: any `B: Clone` body, such as `http_body_util::Full<Bytes>`, is
//!   cloned before the first attempt.
//! - A closure `Fn(&B) -> Option<B>` decides for itself.
//! - `GrpcBodies` (feature `tonic`): a tonic request body whose frames are all ready
//!   at once — a unary call's encoded message — is read into memory and replayed.
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
    /// Called once per request, before the first attempt, with the still unread
    /// body: returns the body to send now and, if the request can be resent, a copy
    /// of it for the resend.
    fn prepare(&self, body: B) -> (B, Option<B>);
}

/// Replays only bodies that are known to be empty (size hint exactly 0), as
/// `B::default()`. The default policy.
#[derive(Debug, Clone, Copy, Default)]
pub struct EmptyBodies;

impl<B> ReplayPolicy<B> for EmptyBodies
where
    B: Body + Default,
{
    fn prepare(&self, body: B) -> (B, Option<B>) {
        let copy = (body.size_hint().exact() == Some(0)).then(B::default);
        (body, copy)
    }
}

/// Replays any body that implements `Clone`, by cloning it before the first attempt.
#[derive(Debug, Clone, Copy, Default)]
pub struct CloneBodies;

impl<B> ReplayPolicy<B> for CloneBodies
where
    B: Clone,
{
    fn prepare(&self, body: B) -> (B, Option<B>) {
        let copy = body.clone();
        (body, Some(copy))
    }
}

impl<B, F> ReplayPolicy<B> for F
where
    F: Fn(&B) -> Option<B> + Clone + Send + Sync + 'static,
{
    fn prepare(&self, body: B) -> (B, Option<B>) {
        let copy = self(&body);
        (body, copy)
    }
}

/// Replays tonic request bodies that are in memory: a unary call's encoded message.
///
/// Before the first attempt the body is read as far as it goes without waiting
/// (polled with a no-op waker), up to 4 MiB. If it ends there, both attempts send
/// those bytes. If it would wait (a client stream) or is larger, it is sent on,
/// unchanged in content — the frames read so far first — and not replayed.
#[cfg(feature = "tonic")]
#[cfg_attr(docsrs, doc(cfg(feature = "tonic")))]
#[derive(Debug, Clone, Copy, Default)]
pub struct GrpcBodies;

#[cfg(feature = "tonic")]
mod grpc {
    use std::pin::Pin;
    use std::task::{Context, Poll, Waker};

    use bytes::{Bytes, BytesMut};
    use http_body::{Body as _, Frame, SizeHint};
    use http_body_util::Full;
    use tonic::body::Body;
    use tonic::Status;

    use super::{GrpcBodies, ReplayPolicy};

    /// The largest body read into memory for a replay.
    const MAX_BUFFERED: usize = 4 << 20;

    impl ReplayPolicy<Body> for GrpcBodies {
        fn prepare(&self, mut body: Body) -> (Body, Option<Body>) {
            let mut cx = Context::from_waker(Waker::noop());
            let mut read = BytesMut::new();
            loop {
                let next = match Pin::new(&mut body).poll_frame(&mut cx) {
                    Poll::Ready(None) => {
                        let bytes = read.freeze();
                        let copy = Body::new(Full::new(bytes.clone()));
                        return (Body::new(Full::new(bytes)), Some(copy));
                    }
                    Poll::Pending => None,
                    Poll::Ready(Some(Ok(frame))) => match frame.into_data() {
                        Ok(data) if read.len() + data.len() <= MAX_BUFFERED => {
                            read.extend_from_slice(&data);
                            continue;
                        }
                        Ok(data) => Some(Ok(Frame::data(data))),
                        Err(frame) => Some(Ok(frame)),
                    },
                    Poll::Ready(Some(Err(status))) => Some(Err(status)),
                };
                let resumed = Resume {
                    read: (!read.is_empty()).then(|| read.freeze()),
                    next,
                    rest: body,
                };
                return (Body::new(resumed), None);
            }
        }
    }

    /// A body that was partly read: what was read, the frame (or error) that stopped
    /// the reading, then the rest.
    struct Resume {
        read: Option<Bytes>,
        next: Option<Result<Frame<Bytes>, Status>>,
        rest: Body,
    }

    impl http_body::Body for Resume {
        type Data = Bytes;
        type Error = Status;

        fn poll_frame(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
            if let Some(read) = self.read.take() {
                return Poll::Ready(Some(Ok(Frame::data(read))));
            }
            if let Some(next) = self.next.take() {
                return Poll::Ready(Some(next));
            }
            Pin::new(&mut self.rest).poll_frame(cx)
        }

        fn is_end_stream(&self) -> bool {
            self.read.is_none() && self.next.is_none() && self.rest.is_end_stream()
        }

        fn size_hint(&self) -> SizeHint {
            let mut hint = self.rest.size_hint();
            let pending = match &self.next {
                Some(Ok(frame)) => frame.data_ref().map_or(0, |d| d.len() as u64),
                _ => 0,
            };
            let buffered = self.read.as_ref().map_or(0, |b| b.len() as u64) + pending;
            // Raise the upper bound first: `SizeHint` asserts lower <= upper.
            if let Some(upper) = hint.upper() {
                hint.set_upper(upper.saturating_add(buffered));
            }
            hint.set_lower(hint.lower().saturating_add(buffered));
            hint
        }
    }

    #[cfg(test)]
    mod tests {
        use super::*;
        use http_body_util::{BodyExt, StreamBody};

        async fn bytes_of(body: Body) -> Bytes {
            body.collect().await.unwrap().to_bytes()
        }

        #[tokio::test]
        async fn a_ready_body_is_read_and_replayed() {
            let body = Body::new(Full::new(Bytes::from_static(b"\0\0\0\0\x03abc")));
            let (send, copy) = GrpcBodies.prepare(body);
            assert_eq!(bytes_of(send).await, &b"\0\0\0\0\x03abc"[..]);
            assert_eq!(bytes_of(copy.unwrap()).await, &b"\0\0\0\0\x03abc"[..]);
        }

        #[tokio::test]
        async fn a_body_too_large_to_buffer_is_sent_whole_with_its_size() {
            let big = Bytes::from(vec![7u8; MAX_BUFFERED + 1]);
            let (send, copy) = GrpcBodies.prepare(Body::new(Full::new(big.clone())));
            assert!(copy.is_none());
            assert_eq!(send.size_hint().exact(), Some(big.len() as u64));
            assert_eq!(bytes_of(send).await, big);
        }

        #[tokio::test]
        async fn a_stream_that_waits_is_sent_whole_and_not_replayed() {
            let (tx, rx) = tokio::sync::mpsc::channel::<Result<Frame<Bytes>, Status>>(4);
            tx.send(Ok(Frame::data(Bytes::from_static(b"first "))))
                .await
                .unwrap();
            let stream = tokio_stream::wrappers::ReceiverStream::new(rx);
            let (send, copy) = GrpcBodies.prepare(Body::new(StreamBody::new(stream)));
            assert!(copy.is_none());
            tx.send(Ok(Frame::data(Bytes::from_static(b"second"))))
                .await
                .unwrap();
            drop(tx);
            assert_eq!(bytes_of(send).await, &b"first second"[..]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use http_body_util::{Empty, Full};

    #[test]
    fn empty_bodies_replays_only_known_empty_bodies() {
        assert!(EmptyBodies.prepare(Empty::<Bytes>::new()).1.is_some());
        assert!(EmptyBodies.prepare(Full::<Bytes>::default()).1.is_some());
        assert!(EmptyBodies
            .prepare(Full::new(Bytes::from_static(b"{}")))
            .1
            .is_none());
    }

    #[test]
    fn clone_bodies_copies_the_bytes() {
        let body = Full::new(Bytes::from_static(b"payload"));
        let copy = CloneBodies.prepare(body).1.unwrap();
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
        assert!(EmptyBodies.prepare(Streaming).1.is_none());
    }

    #[test]
    fn a_closure_decides_for_itself() {
        let always = |_: &Streaming| Some(Streaming);
        assert!(always.prepare(Streaming).1.is_some());
        let never = |_: &Streaming| -> Option<Streaming> { None };
        assert!(never.prepare(Streaming).1.is_none());
    }
}
