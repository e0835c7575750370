//! With 401 retry off and a warm token, a request through the layer allocates nothing
//! beyond what the same request through the bare inner service allocates.

mod support;

use support::Noop;

use bytes::Bytes;
use eshopbox_auth::EshopboxAuthLayer;
use http::header::ACCEPT;
use http::{HeaderValue, Request};
use http_body_util::Empty;
use tower::{Layer, ServiceExt};

#[path = "support/alloc.rs"]
mod alloc;

#[global_allocator]
static GLOBAL: alloc::Counting = alloc::Counting;

type Req = Request<Empty<Bytes>>;

/// A request with an Accept header, as real requests carry headers.
fn request() -> Req {
    let mut req = Request::get("https://acme.myeshopbox.com/api/v2/inventoryListing")
        .body(Empty::new())
        .unwrap();
    req.headers_mut()
        .insert(ACCEPT, HeaderValue::from_static("application/json"));
    req
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
    alloc::allocations_of(&mut layered, request);

    let mut bare = Noop;
    for _ in 0..10 {
        let base = alloc::allocations_of(&mut bare, request);
        assert!(base > 0, "the counter counts");
        assert_eq!(alloc::allocations_of(&mut layered, request), base);
    }
    assert_eq!(server.posts(), 1);
}
