//! A small sales-channel job: syncs stock to several merchants' Eshopbox workspaces
//! through one per-workspace layer (feature `workspaces`).
//!
//! ```sh
//! cargo run --example workspaces --features workspaces,test-util
//! ```
//!
//! Each merchant installed the integrator's app in its own workspace, so each has its
//! own client id, client secret and refresh token, kept in the integrator's database
//! (here, a map). The job sends each workspace's stock updates concurrently; the layer
//! looks each workspace's credentials up once, keeps one token per workspace and sets
//! `ProxyHost`. A rotated refresh token is written back to the database with its
//! workspace. It runs against a mock Eshopbox on 127.0.0.1, which serves one app per
//! workspace and refuses a token sent with another workspace's `ProxyHost`.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use eshopbox_auth::mock::MockEshopbox;
use eshopbox_auth::secrecy::ExposeSecret;
use eshopbox_auth::{Credentials, EshopboxAuthLayer, Workspace};
use http::{Request, StatusCode};
use http_body_util::Full;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use tower::{BoxError, ServiceBuilder, ServiceExt};

/// A merchant's row in the integrator's database.
#[derive(Clone)]
struct Installation {
    client_id: String,
    client_secret: String,
    refresh_token: String,
}

/// The integrator's database of installed merchants, by workspace.
type Database = Arc<Mutex<HashMap<String, Installation>>>;

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    let report = run().await?;
    println!("{report}");
    Ok(())
}

/// What the job did.
#[derive(Debug, Default)]
pub struct Report {
    /// Stock updates accepted, per workspace.
    pub synced: HashMap<String, usize>,
    /// Token requests the mock received.
    pub token_calls: u64,
    /// Requests the mock refused for a `ProxyHost` that was not the token's workspace.
    pub mismatches: u64,
}

impl std::fmt::Display for Report {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut workspaces: Vec<_> = self.synced.iter().collect();
        workspaces.sort();
        for (workspace, n) in workspaces {
            writeln!(f, "{workspace}: {n} SKUs synced")?;
        }
        write!(
            f,
            "{} token requests, {} ProxyHost mismatches",
            self.token_calls, self.mismatches
        )
    }
}

/// Runs the job against a mock Eshopbox; fails if any update was not accepted.
pub async fn run() -> Result<Report, BoxError> {
    let eshopbox = MockEshopbox::start().await?;
    let merchants = ["acme", "globex", "initech"];
    let database: Database = Arc::default();
    for merchant in merchants {
        // The app the merchant installed (on the mock: credentials named after the
        // workspace).
        eshopbox.add_workspace(merchant);
        database.lock().unwrap().insert(
            merchant.to_owned(),
            Installation {
                client_id: format!("mock-client-{merchant}"),
                client_secret: format!("mock-secret-{merchant}"),
                refresh_token: format!("mock-refresh-{merchant}"),
            },
        );
    }

    let lookup = database.clone();
    let persist = database.clone();
    let auth = EshopboxAuthLayer::per_workspace(move |workspace: Workspace| {
        // A real integrator queries its database here.
        let found =
            lookup.lock().unwrap().get(workspace.name()).map(|row| {
                Credentials::new(&*row.client_id, &*row.client_secret, &*row.refresh_token)
            });
        async move { Ok::<_, BoxError>(found) }
    })
    .token_url(&eshopbox.token_url())
    .on_refresh_token_rotated(move |workspace, refresh_token| {
        // Keep the merchant's new refresh token (hand it to a task for slow storage).
        if let Some(row) = persist.lock().unwrap().get_mut(workspace.name()) {
            row.refresh_token = refresh_token.expose_secret().to_owned();
        }
    })
    .replay_cloneable_bodies()
    .build()?;

    let http = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
    let client = ServiceBuilder::new().layer(auth.clone()).service(http);

    let mut jobs = tokio::task::JoinSet::new();
    for merchant in merchants {
        for sku in 1..=4 {
            let client = client.clone();
            let url = eshopbox.url("/api/v1/inventory/update");
            jobs.spawn(async move {
                let body = format!(
                    r#"{{"sku":"{merchant}-SKU-{sku}","available":{}}}"#,
                    sku * 3
                );
                let mut request = Request::post(url)
                    .header("content-type", "application/json")
                    .body(Full::new(Bytes::from(body)))?;
                request.extensions_mut().insert(Workspace::new(merchant));
                let response = client.oneshot(request).await?;
                if response.status() != StatusCode::OK {
                    return Err(format!("{merchant}: {}", response.status()).into());
                }
                Ok::<_, BoxError>(merchant)
            });
        }
    }
    let mut report = Report::default();
    while let Some(done) = jobs.join_next().await {
        let merchant = done??;
        *report.synced.entry(merchant.to_owned()).or_default() += 1;
    }
    report.token_calls = eshopbox.token_calls();
    report.mismatches = eshopbox.mismatches();
    assert_eq!(auth.workspaces(), merchants.len() as u64);
    Ok(report)
}
