//! The layer on hyper-util's legacy `Client` with `Full<Bytes>` bodies: a GET, then a
//! POST that is answered 401 (the token was revoked) and resent once with a new token
//! thanks to the opt-in clone policy.
//!
//! ```sh
//! cargo run --example hyper_util
//! ```
//!
//! It runs against a mock Eshopbox on 127.0.0.1.

use bytes::Bytes;
use eshopbox_auth::mock::MockEshopbox;
use eshopbox_auth::EshopboxAuthLayer;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use tower::{BoxError, ServiceBuilder, ServiceExt};

#[tokio::main]
pub async fn main() -> Result<(), BoxError> {
    let eshopbox = MockEshopbox::start().await?;
    let auth = EshopboxAuthLayer::builder(eshopbox.credentials())
        .token_url(&eshopbox.token_url())
        .replay_cloneable_bodies()
        .build()?;
    let http = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
    let client = ServiceBuilder::new().layer(auth).service(http);

    let get = http::Request::get(eshopbox.url("/api/v2/inventoryListing")).body(Full::default())?;
    let response = client.clone().oneshot(get).await?;
    let body = response.into_body().collect().await?.to_bytes();
    println!("GET inventoryListing -> {}", String::from_utf8_lossy(&body));

    eshopbox.revoke_tokens();
    let post = http::Request::post(eshopbox.url("/api/v1/orders"))
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from_static(br#"{"orderId":"A-1"}"#)))?;
    let response = client.oneshot(post).await?;
    let status = response.status();
    let body = response.into_body().collect().await?.to_bytes();
    println!(
        "POST orders after a revocation -> {status} {}",
        String::from_utf8_lossy(&body)
    );
    if status != http::StatusCode::OK {
        return Err(format!("the POST resent after a revocation got {status}").into());
    }
    println!(
        "token requests: {}, 401s: {}",
        eshopbox.token_calls(),
        eshopbox.unauthorized()
    );
    Ok(())
}
