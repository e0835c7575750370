//! With the `metrics` feature, the counters reach the `metrics` facade.

mod support;

use bytes::Bytes;
use eshopbox_auth::mock::MockEshopbox;
use eshopbox_auth::EshopboxAuthLayer;
use http::StatusCode;
use http_body_util::Full;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use metrics_util::debugging::DebuggingRecorder;
use tower::{ServiceBuilder, ServiceExt};

#[tokio::test(flavor = "current_thread")]
async fn counters_are_reported_to_the_metrics_facade() {
    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    recorder
        .install()
        .expect("the only recorder of this test binary");

    let eshopbox = MockEshopbox::start().await.unwrap();
    eshopbox.fail_next_token_calls(1, StatusCode::BAD_GATEWAY);
    let layer = EshopboxAuthLayer::builder(eshopbox.credentials())
        .token_url(&eshopbox.token_url())
        .build()
        .unwrap();
    let handle = layer.handle();
    let http = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
    let svc = ServiceBuilder::new().layer(layer).service(http);
    let get = || {
        http::Request::get(eshopbox.url("/api/v2/inventoryListing"))
            .body(Full::default())
            .unwrap()
    };
    svc.clone().oneshot(get()).await.unwrap();
    eshopbox.revoke_tokens();
    svc.clone().oneshot(get()).await.unwrap();
    // A request to a foreign host is refused before it leaves.
    let foreign = http::Request::get("https://attacker.example.net/")
        .body(Full::default())
        .unwrap();
    svc.clone().oneshot(foreign).await.unwrap_err();

    let counters = support::telemetry::counters(&snapshotter);
    let stats = handle.stats();
    assert_eq!(stats.token_requests, 3);
    assert_eq!(counters["eshopbox_auth_token_requests_total[]"], 3);
    assert_eq!(
        counters["eshopbox_auth_token_failures_total[\"kind=unavailable\"]"],
        1
    );
    assert_eq!(counters["eshopbox_auth_invalidations_total[]"], 1);
    assert_eq!(counters["eshopbox_auth_resends_total[]"], 1);
    assert_eq!(counters["eshopbox_auth_waited_total[]"], 2);
    assert_eq!(stats.refused, 1);
    assert_eq!(counters["eshopbox_auth_refused_total[]"], 1);
}
