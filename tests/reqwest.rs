//! The layer on reqwest through `ReqwestService`, against the mock Eshopbox.

use eshopbox_auth::mock::MockEshopbox;
use eshopbox_auth::reqwest::{BufferedBodies, ReqwestService};
use eshopbox_auth::EshopboxAuthLayer;
use http::{Request, StatusCode};
use tower::{ServiceBuilder, ServiceExt};

#[tokio::test]
async fn get_and_a_replayed_post_through_reqwest() {
    let eshopbox = MockEshopbox::start().await.unwrap();
    let auth = EshopboxAuthLayer::builder(eshopbox.credentials())
        .token_url(&eshopbox.token_url())
        .replay_bodies(BufferedBodies)
        .build()
        .unwrap();
    let svc = ServiceBuilder::new()
        .layer(auth)
        .service(ReqwestService::new(reqwest::Client::new()));

    let get = Request::get(eshopbox.url("/api/v2/inventoryListing"))
        .body(reqwest::Body::default())
        .unwrap();
    let res = svc.clone().oneshot(get).await.unwrap();
    assert_eq!(res.status(), StatusCode::OK);

    eshopbox.revoke_tokens();
    let payload = r#"{"orderId":"A-1"}"#;
    let post = Request::post(eshopbox.url("/api/v1/orders"))
        .body(reqwest::Body::from(payload))
        .unwrap();
    let res = svc.clone().oneshot(post).await.unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    let body = reqwest::Response::from(res).text().await.unwrap();
    let echoed: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(echoed["received"], payload.len());
    assert_eq!(eshopbox.token_calls(), 2);
    assert_eq!(eshopbox.unauthorized(), 1);
}

#[tokio::test]
async fn an_empty_get_is_resent_with_the_default_policy() {
    let eshopbox = MockEshopbox::start().await.unwrap();
    let auth = EshopboxAuthLayer::builder(eshopbox.credentials())
        .token_url(&eshopbox.token_url())
        .build()
        .unwrap();
    let svc = ServiceBuilder::new()
        .layer(auth)
        .service(ReqwestService::default());
    let get = || {
        Request::get(eshopbox.url("/api/v2/inventoryListing"))
            .body(reqwest::Body::default())
            .unwrap()
    };
    svc.clone().oneshot(get()).await.unwrap();
    eshopbox.revoke_tokens();
    let res = svc.clone().oneshot(get()).await.unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    assert_eq!(eshopbox.token_calls(), 2);
}
