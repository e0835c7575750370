//! The layer on reqwest, through `ReqwestService` (feature `reqwest`).
//!
//! ```sh
//! cargo run --example reqwest
//! ```
//!
//! It runs against a mock Eshopbox on 127.0.0.1.

use eshopbox_auth::mock::MockEshopbox;
use eshopbox_auth::reqwest::{BufferedBodies, ReqwestService};
use eshopbox_auth::EshopboxAuthLayer;
use tower::{BoxError, ServiceBuilder, ServiceExt};

#[tokio::main]
pub async fn main() -> Result<(), BoxError> {
    let eshopbox = MockEshopbox::start().await?;
    let auth = EshopboxAuthLayer::builder(eshopbox.credentials())
        .token_url(&eshopbox.token_url())
        // Resend in-memory POST bodies after a 401 too.
        .replay_bodies(BufferedBodies)
        .build()?;
    let client = ServiceBuilder::new()
        .layer(auth)
        .service(ReqwestService::new(reqwest::Client::new()));

    let request = http::Request::get(eshopbox.url("/api/v2/inventoryListing"))
        .body(reqwest::Body::default())?;
    let response = reqwest::Response::from(client.clone().oneshot(request).await?);
    println!("GET inventoryListing -> {}", response.text().await?);

    eshopbox.revoke_tokens();
    let request = http::Request::post(eshopbox.url("/api/v1/orders"))
        .body(reqwest::Body::from(r#"{"orderId":"A-1"}"#))?;
    let response = reqwest::Response::from(client.oneshot(request).await?);
    if !response.status().is_success() {
        return Err(format!("the POST after a revocation got {}", response.status()).into());
    }
    println!(
        "POST orders (after a revocation) -> {}",
        response.text().await?
    );
    println!("token requests: {}", eshopbox.token_calls());
    Ok(())
}
