//! Compile-time checks of the public API's shape: auto traits, and the body and
//! client types the layer must accept.

use std::future::Future;

use bytes::Bytes;
use eshopbox_auth::{CloneBodies, EshopboxAuth, EshopboxAuthLayer};
use http::Request;
use http_body_util::combinators::{BoxBody, UnsyncBoxBody};
use http_body_util::{Empty, Full};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use tower::{BoxError, Layer, Service};

fn is_send_sync_static<T: Send + Sync + 'static>() {}
fn is_clone<T: Clone>() {}
fn is_debug<T: std::fmt::Debug>() {}

/// `svc` is a `Service<Request<B>>` whose future is `Send`.
fn sends<S, B>(svc: S) -> S
where
    S: Service<Request<B>, Error = BoxError>,
    S::Future: Send + 'static,
{
    svc
}

fn future_is_send<F: Future + Send>(_: &F) {}

#[test]
fn layer_is_clone_send_sync_static() {
    is_send_sync_static::<EshopboxAuthLayer>();
    is_send_sync_static::<EshopboxAuthLayer<CloneBodies>>();
    is_clone::<EshopboxAuthLayer>();
    is_debug::<EshopboxAuthLayer>();
    is_send_sync_static::<eshopbox_auth::Error>();
}

#[test]
fn service_is_clone_and_debug_when_the_inner_is() {
    type HyperClient = Client<HttpConnector, Full<Bytes>>;
    is_clone::<EshopboxAuth<HyperClient>>();
    is_debug::<EshopboxAuth<HyperClient>>();
    is_send_sync_static::<EshopboxAuth<HyperClient>>();
}

#[tokio::test]
async fn accepts_the_usual_body_types() {
    let layer = EshopboxAuthLayer::builder(eshopbox_auth::Credentials::new("id", "s", "rt"))
        .token_url("http://127.0.0.1:9/t")
        .build()
        .unwrap();
    let clone_layer = EshopboxAuthLayer::builder(eshopbox_auth::Credentials::new("id", "s", "rt"))
        .token_url("http://127.0.0.1:9/t")
        .replay_cloneable_bodies()
        .build()
        .unwrap();

    let executor = hyper_util::rt::TokioExecutor::new();
    let full: Client<HttpConnector, Full<Bytes>> = Client::builder(executor.clone()).build_http();
    let empty: Client<HttpConnector, Empty<Bytes>> = Client::builder(executor.clone()).build_http();
    let boxed: Client<HttpConnector, BoxBody<Bytes, BoxError>> =
        Client::builder(executor.clone()).build_http();
    let unsync: Client<HttpConnector, UnsyncBoxBody<Bytes, BoxError>> =
        Client::builder(executor).build_http();

    let mut a = sends::<_, Full<Bytes>>(layer.layer(full.clone()));
    let _b = sends::<_, Empty<Bytes>>(layer.layer(empty));
    let _c = sends::<_, BoxBody<Bytes, BoxError>>(layer.layer(boxed));
    let _d = sends::<_, UnsyncBoxBody<Bytes, BoxError>>(layer.layer(unsync));
    let _e = sends::<_, Full<Bytes>>(clone_layer.layer(full));

    // The response future of a real client is Send (not polled: nothing listens).
    let fut = a.call(
        Request::get("http://127.0.0.1:9/")
            .body(Full::default())
            .unwrap(),
    );
    future_is_send(&fut);
}
