//! The layer's token on a `reqwest_middleware` client, next to `reqwest-retry`
//! (feature `reqwest-middleware`).
//!
//! ```sh
//! cargo run --example reqwest_middleware
//! ```
//!
//! It runs against a mock Eshopbox on 127.0.0.1.

use std::time::Duration;

use eshopbox_auth::mock::MockEshopbox;
use eshopbox_auth::EshopboxAuthLayer;
use reqwest_middleware::{ClientBuilder, ClientWithMiddleware};
use reqwest_retry::policies::ExponentialBackoff;
use reqwest_retry::RetryTransientMiddleware;

/// A client that retries transient failures (5xx, 408, 429, connection errors) and
/// authenticates every attempt with the layer's token.
pub fn eshopbox_client(layer: &EshopboxAuthLayer) -> ClientWithMiddleware {
    let retry = ExponentialBackoff::builder()
        .retry_bounds(Duration::from_millis(100), Duration::from_secs(5))
        .build_with_max_retries(3);
    // The retry middleware goes first, so that each attempt gets the current token.
    ClientBuilder::new(reqwest::Client::new())
        .with(RetryTransientMiddleware::new_with_policy(retry))
        .with(layer.middleware())
        .build()
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let eshopbox = MockEshopbox::start().await?;
    let layer = EshopboxAuthLayer::builder(eshopbox.credentials())
        .token_url(&eshopbox.token_url())
        .build()?;
    let client = eshopbox_client(&layer);

    let response = client
        .get(eshopbox.url("/api/v2/inventoryListing"))
        .send()
        .await?;
    println!("GET inventoryListing -> {}", response.text().await?);

    eshopbox.revoke_tokens();
    let response = client
        .post(eshopbox.url("/api/v1/orders"))
        .body(r#"{"orderId":"A-1"}"#)
        .send()
        .await?;
    println!(
        "POST orders (after a revocation, resent once) -> {}",
        response.text().await?
    );

    match client
        .get("https://attacker.example.net/steal")
        .send()
        .await
    {
        Err(reqwest_middleware::Error::Middleware(e)) => println!("foreign host -> {e}"),
        other => println!("foreign host -> unexpected: {other:?}"),
    }
    println!("token requests: {}", eshopbox.token_calls());
    Ok(())
}
