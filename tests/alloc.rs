//! With 401 retry off and a warm token, a request through the layer allocates nothing
//! beyond what the same request through the bare inner service allocates.

mod support;

use support::Noop;

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::future::Future;
use std::pin::pin;
use std::task::{Context, Poll, Waker};

use bytes::Bytes;
use eshopbox_auth::EshopboxAuthLayer;
use http::header::ACCEPT;
use http::{HeaderValue, Request};
use http_body_util::Empty;
use tower::{Layer, Service, ServiceExt};

/// Counts the allocations made by the current thread.
struct Counting;

thread_local! {
    static ALLOCATIONS: Cell<usize> = const { Cell::new(0) };
}

// SAFETY: forwards to the system allocator; only counts.
#[allow(unsafe_code)]
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let _ = ALLOCATIONS.try_with(|n| n.set(n.get() + 1));
        System.alloc(layout)
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        System.dealloc(ptr, layout)
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let _ = ALLOCATIONS.try_with(|n| n.set(n.get() + 1));
        System.realloc(ptr, layout, new_size)
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

type Req = Request<Empty<Bytes>>;

/// Allocations made by building one request (with an Accept header, as real requests
/// carry headers) and sending it through `svc`, which answers at once.
fn allocations_of<S>(svc: &mut S) -> usize
where
    S: Service<Req>,
    S::Error: std::fmt::Debug,
{
    let before = ALLOCATIONS.with(Cell::get);
    {
        let mut req = Request::get("https://acme.myeshopbox.com/api/v2/inventoryListing")
            .body(Empty::new())
            .unwrap();
        req.headers_mut()
            .insert(ACCEPT, HeaderValue::from_static("application/json"));
        let mut cx = Context::from_waker(Waker::noop());
        assert!(svc.poll_ready(&mut cx).is_ready());
        let fut = pin!(svc.call(req));
        match fut.poll(&mut cx) {
            Poll::Ready(res) => drop(res.unwrap()),
            Poll::Pending => panic!("the request did not complete at once"),
        }
    }
    ALLOCATIONS.with(Cell::get) - before
}

#[test]
fn warm_request_with_retry_off_allocates_no_more_than_the_bare_service() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let server = rt.block_on(support::TokenServer::counting(86400));
    let layer = EshopboxAuthLayer::builder(support::credentials())
        .token_url(&server.url())
        .retry_on_unauthorized(false)
        .build()
        .unwrap();
    let mut layered = layer.layer(Noop);
    let warm: Req = Request::get("/warm").body(Empty::new()).unwrap();
    rt.block_on(layered.clone().oneshot(warm)).unwrap();
    // The first request makes this service's own copy of the token's header.
    allocations_of(&mut layered);

    let mut bare = Noop;
    for _ in 0..10 {
        let base = allocations_of(&mut bare);
        assert!(base > 0, "the counter counts");
        assert_eq!(allocations_of(&mut layered), base);
    }
    assert_eq!(server.posts(), 1);
}
