//! Concurrent requests into an axum app that calls Eshopbox through one shared
//! authenticated client: one token request for all of them.

#[allow(dead_code)]
#[path = "../examples/axum.rs"]
mod example;

use bytes::Bytes;
use eshopbox_auth::mock::MockEshopbox;
use eshopbox_auth::EshopboxAuthLayer;
use http::StatusCode;
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_requests_into_axum_share_one_token() {
    let eshopbox = MockEshopbox::start().await.unwrap();
    let auth = EshopboxAuthLayer::builder(eshopbox.credentials())
        .token_url(&eshopbox.token_url())
        .build()
        .unwrap();
    let state = example::AppState {
        eshopbox: example::eshopbox_client(auth),
        base_url: eshopbox.url(""),
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, example::app(state)).await });

    let client = Client::builder(TokioExecutor::new()).build_http::<Empty<Bytes>>();
    let url: http::Uri = format!("http://{addr}/inventory").parse().unwrap();
    let tasks: Vec<_> = (0..200)
        .map(|_| {
            let client = client.clone();
            let url = url.clone();
            tokio::spawn(async move {
                let res = client.get(url).await.unwrap();
                let status = res.status();
                let body = res.into_body().collect().await.unwrap().to_bytes();
                (status, body)
            })
        })
        .collect();
    for task in tasks {
        let (status, body) = task.await.unwrap();
        assert_eq!(status, StatusCode::OK, "{body:?}");
        let json: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(json["total"], 2);
    }
    assert_eq!(eshopbox.token_calls(), 1);
    assert_eq!(eshopbox.api_calls(), 200);
}
