//! The layer on hyper-util's legacy `Client` against the mock Eshopbox.

use bytes::Bytes;
use eshopbox_auth::mock::MockEshopbox;
use eshopbox_auth::EshopboxAuthLayer;
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use tower::{ServiceBuilder, ServiceExt};

fn client() -> Client<HttpConnector, Full<Bytes>> {
    Client::builder(TokioExecutor::new()).build_http()
}

async fn body_text(res: http::Response<hyper::body::Incoming>) -> String {
    let bytes = res.into_body().collect().await.unwrap().to_bytes();
    String::from_utf8(bytes.to_vec()).unwrap()
}

#[tokio::test]
async fn get_and_post_through_hyper_util() {
    let eshopbox = MockEshopbox::start().await.unwrap();
    let auth = EshopboxAuthLayer::builder(eshopbox.credentials())
        .token_url(&eshopbox.token_url())
        .replay_cloneable_bodies()
        .build()
        .unwrap();
    let svc = ServiceBuilder::new().layer(auth).service(client());

    let get = Request::get(eshopbox.url("/api/v2/inventoryListing"))
        .body(Full::default())
        .unwrap();
    let res = svc.clone().oneshot(get).await.unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    assert!(body_text(res).await.contains("SKU-1"));

    // The token is revoked: the POST is answered 401, the layer fetches a new token
    // and resends the whole body.
    eshopbox.revoke_tokens();
    let payload = r#"{"orderId":"A-1","items":[{"sku":"SKU-1","quantity":2}]}"#;
    let post = Request::post(eshopbox.url("/api/v1/orders"))
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from_static(payload.as_bytes())))
        .unwrap();
    let res = svc.clone().oneshot(post).await.unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    let echoed: serde_json::Value = serde_json::from_str(&body_text(res).await).unwrap();
    assert_eq!(echoed["received"], payload.len());
    assert_eq!(echoed["method"], "POST");
    assert_eq!(eshopbox.token_calls(), 2);
    assert_eq!(eshopbox.unauthorized(), 1);
}

#[tokio::test]
async fn without_the_clone_policy_a_post_gets_the_401_back() {
    let eshopbox = MockEshopbox::start().await.unwrap();
    let auth = EshopboxAuthLayer::builder(eshopbox.credentials())
        .token_url(&eshopbox.token_url())
        .build()
        .unwrap();
    let svc = ServiceBuilder::new().layer(auth).service(client());
    let post = || {
        Request::post(eshopbox.url("/api/v1/orders"))
            .body(Full::new(Bytes::from_static(b"{}")))
            .unwrap()
    };
    assert_eq!(
        svc.clone().oneshot(post()).await.unwrap().status(),
        StatusCode::OK
    );
    eshopbox.revoke_tokens();
    let res = svc.clone().oneshot(post()).await.unwrap();
    assert_eq!(res.status(), StatusCode::UNAUTHORIZED);
    // The refused token was dropped: the caller's own retry succeeds.
    assert_eq!(
        svc.clone().oneshot(post()).await.unwrap().status(),
        StatusCode::OK
    );
    assert_eq!(eshopbox.token_calls(), 2);
}

#[tokio::test]
async fn a_failing_token_endpoint_is_retried_and_recovers() {
    let eshopbox = MockEshopbox::start().await.unwrap();
    eshopbox.fail_next_token_calls(2, StatusCode::SERVICE_UNAVAILABLE);
    let auth = EshopboxAuthLayer::builder(eshopbox.credentials())
        .token_url(&eshopbox.token_url())
        .request_format(eshopbox_auth::RequestFormat::Form)
        .build()
        .unwrap();
    let svc = ServiceBuilder::new().layer(auth).service(client());
    let get = Request::get(eshopbox.url("/api/v2/inventoryListing"))
        .body(Full::default())
        .unwrap();
    let res = svc.oneshot(get).await.unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    assert_eq!(eshopbox.token_calls(), 3);
}

#[tokio::test]
async fn wrong_credentials_are_rejected_by_the_mock() {
    let eshopbox = MockEshopbox::start().await.unwrap();
    let auth = EshopboxAuthLayer::builder(eshopbox_auth::Credentials::new(
        eshopbox_auth::mock::CLIENT_ID,
        eshopbox_auth::mock::CLIENT_SECRET,
        "spent-refresh-token",
    ))
    .token_url(&eshopbox.token_url())
    .build()
    .unwrap();
    let svc = ServiceBuilder::new().layer(auth).service(client());
    let get = Request::get(eshopbox.url("/api/v2/inventoryListing"))
        .body(Full::default())
        .unwrap();
    let err = svc.oneshot(get).await.unwrap_err();
    let err = err.downcast_ref::<eshopbox_auth::Error>().unwrap();
    assert_eq!(err.kind(), eshopbox_auth::ErrorKind::Rejected);
    assert_eq!(err.oauth_error(), Some("invalid_grant"));
}

#[tokio::test]
async fn the_workspace_goes_out_as_proxyhost() {
    let eshopbox = MockEshopbox::start().await.unwrap();
    let auth = EshopboxAuthLayer::builder(eshopbox.credentials())
        .token_url(&eshopbox.token_url())
        .workspace("acme")
        .build()
        .unwrap();
    let svc = ServiceBuilder::new().layer(auth).service(client());
    let post = Request::post(eshopbox.url("/api/v1/webhooks"))
        .body(Full::new(Bytes::from_static(b"{}")))
        .unwrap();
    let res = svc.oneshot(post).await.unwrap();
    let echoed: serde_json::Value = serde_json::from_str(&body_text(res).await).unwrap();
    assert_eq!(echoed["proxy_host"], "acme");
}

#[tokio::test]
async fn a_dropped_mock_closes_its_connections() {
    let eshopbox = MockEshopbox::start().await.unwrap();
    let client = client();
    let url = eshopbox.url("/api/v2/inventoryListing");
    let first = client
        .request(Request::get(&url).body(Full::default()).unwrap())
        .await
        .unwrap();
    body_text(first).await; // the connection goes back to the pool
    drop(eshopbox);
    // Let the aborted server task run its cancellation (which closes the connections).
    tokio::task::yield_now().await;
    let second = client
        .request(Request::get(&url).body(Full::default()).unwrap())
        .await;
    assert!(
        second.is_err(),
        "answered after drop: {:?}",
        second.map(|r| r.status())
    );
}
