//! An axum backend whose handler calls Eshopbox through one shared authenticated
//! client kept in axum state: one token for the whole app, refreshed in one place.
//!
//! ```sh
//! cargo run --example axum
//! # then: curl http://127.0.0.1:3000/inventory
//! ```
//!
//! It runs against a mock Eshopbox on 127.0.0.1.

use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use axum::{Json, Router};
use bytes::Bytes;
use eshopbox_auth::mock::MockEshopbox;
use eshopbox_auth::{EshopboxAuth, EshopboxAuthLayer};
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use tower::{Layer, ServiceExt};

/// The authenticated Eshopbox client every handler shares.
pub type EshopboxClient = EshopboxAuth<Client<HttpConnector, Empty<Bytes>>>;

#[derive(Clone)]
pub struct AppState {
    pub eshopbox: EshopboxClient,
    /// e.g. `https://acme.myeshopbox.com`
    pub base_url: String,
}

/// Builds the authenticated client once, at start-up.
pub fn eshopbox_client(auth: EshopboxAuthLayer) -> EshopboxClient {
    let http = Client::builder(TokioExecutor::new()).build_http();
    auth.layer(http)
}

pub fn app(state: AppState) -> Router {
    Router::new()
        .route("/inventory", get(inventory))
        .with_state(state)
}

/// Proxies Eshopbox's inventory listing.
async fn inventory(
    State(state): State<AppState>,
) -> Result<Json<serde_json::Value>, (StatusCode, String)> {
    let url = format!("{}/api/v2/inventoryListing", state.base_url);
    let request = http::Request::get(url)
        .body(Empty::new())
        .map_err(|e| (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
    let response = state
        .eshopbox
        .clone()
        .oneshot(request)
        .await
        .map_err(|e| (StatusCode::BAD_GATEWAY, e.to_string()))?;
    if !response.status().is_success() {
        return Err((
            StatusCode::BAD_GATEWAY,
            format!("eshopbox answered {}", response.status()),
        ));
    }
    let body = response
        .into_body()
        .collect()
        .await
        .map_err(|e| (StatusCode::BAD_GATEWAY, e.to_string()))?
        .to_bytes();
    let json =
        serde_json::from_slice(&body).map_err(|e| (StatusCode::BAD_GATEWAY, e.to_string()))?;
    Ok(Json(json))
}

#[tokio::main]
async fn main() -> Result<(), tower::BoxError> {
    let eshopbox = MockEshopbox::start().await?;
    let auth = EshopboxAuthLayer::builder(eshopbox.credentials())
        .token_url(&eshopbox.token_url())
        .build()?;
    let state = AppState {
        eshopbox: eshopbox_client(auth),
        base_url: eshopbox.url(""),
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:3000").await?;
    println!("listening on http://{}/inventory", listener.local_addr()?);
    axum::serve(listener, app(state)).await?;
    Ok(())
}
