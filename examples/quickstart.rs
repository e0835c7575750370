//! Quickstart: the layer on a hyper-util client.
//!
//! ```sh
//! cargo run --example quickstart
//! ```
//!
//! With no credentials in the environment, it starts a mock Eshopbox on 127.0.0.1 and
//! sends 4 000 requests, 200 at a time, across several 2-second token lifetimes and
//! one forced revocation, then prints what happened: requests ok and failed, token
//! requests, 401s resent, latency percentiles.
//!
//! With `ESHOPBOX_CLIENT_ID`, `ESHOPBOX_CLIENT_SECRET`, `ESHOPBOX_REFRESH_TOKEN` and
//! `ESHOPBOX_WORKSPACE` set, it instead makes one read-only call to your workspace
//! (`GET https://<workspace>.myeshopbox.com/api/v2/inventoryListing`) through the
//! reqwest adapter.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use eshopbox_auth::mock::MockEshopbox;
use eshopbox_auth::{Credentials, EshopboxAuthLayer};
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use indicatif::{ProgressBar, ProgressStyle};
use tower::{BoxError, ServiceBuilder, ServiceExt};

const REQUESTS: usize = 4_000;
const CONCURRENCY: usize = 200;

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    let env = |name: &str| std::env::var(name).ok().filter(|v| !v.is_empty());
    match (
        env("ESHOPBOX_CLIENT_ID"),
        env("ESHOPBOX_CLIENT_SECRET"),
        env("ESHOPBOX_REFRESH_TOKEN"),
        env("ESHOPBOX_WORKSPACE"),
    ) {
        (Some(id), Some(secret), Some(refresh), Some(workspace)) => {
            real(Credentials::new(id, secret, refresh), &workspace).await
        }
        _ => demo().await,
    }
}

/// One harmless read against real Eshopbox.
async fn real(credentials: Credentials, workspace: &str) -> Result<(), BoxError> {
    let auth = EshopboxAuthLayer::new(credentials)?;
    let client =
        ServiceBuilder::new()
            .layer(auth)
            .service(eshopbox_auth::reqwest::ReqwestService::new(
                reqwest::Client::new(),
            ));
    let url = format!("https://{workspace}.myeshopbox.com/api/v2/inventoryListing");
    let request = Request::get(&url).body(reqwest::Body::default())?;
    let response = client.oneshot(request).await?;
    println!("GET {url} -> {}", response.status());
    Ok(())
}

/// 4 000 requests against a mock Eshopbox; fails if any of them failed.
pub async fn demo() -> Result<(), BoxError> {
    let eshopbox = MockEshopbox::start().await?;
    eshopbox.set_token_lifetime(Duration::from_secs(2));
    println!("mock Eshopbox on {}", eshopbox.addr());

    let auth = EshopboxAuthLayer::builder(eshopbox.credentials())
        .token_url(&eshopbox.token_url())
        .build()?;
    let http = Client::builder(TokioExecutor::new()).build_http::<Empty<Bytes>>();
    let client = ServiceBuilder::new().layer(auth).service(http);

    let bar = ProgressBar::new(REQUESTS as u64);
    bar.set_style(ProgressStyle::with_template(
        "{bar:40} {pos}/{len} requests  {elapsed_precise}  {msg}",
    )?);
    let url = eshopbox.url("/api/v2/inventoryListing");
    let ok = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let mut latencies = Vec::with_capacity(REQUESTS);
    let mut failures = Vec::new();

    // Waves of CONCURRENCY requests, 250 ms apart: 5 s in all, so tokens expire and
    // are refreshed a few times. Halfway, every token is revoked.
    let mut tick = tokio::time::interval(Duration::from_millis(250));
    for wave in 0..REQUESTS / CONCURRENCY {
        tick.tick().await;
        if wave == REQUESTS / CONCURRENCY / 2 {
            eshopbox.revoke_tokens();
            bar.set_message("tokens revoked");
        }
        let tasks: Vec<_> = (0..CONCURRENCY)
            .map(|_| {
                let client = client.clone();
                let request = Request::get(&url).body(Empty::new());
                let ok = ok.clone();
                tokio::spawn(async move {
                    let start = Instant::now();
                    let response = client.oneshot(request?).await?;
                    let status = response.status();
                    response.into_body().collect().await?;
                    if status == StatusCode::OK {
                        ok.fetch_add(1, Ordering::Relaxed);
                    }
                    Ok::<_, BoxError>((status, start.elapsed()))
                })
            })
            .collect();
        for task in tasks {
            match task.await? {
                Ok((StatusCode::OK, latency)) => latencies.push(latency),
                Ok((status, _)) => failures.push(format!("HTTP {status}")),
                Err(e) => failures.push(e.to_string()),
            }
            bar.inc(1);
        }
    }
    bar.finish_with_message("done");

    latencies.sort();
    let pct = |p: f64| latencies[((latencies.len() - 1) as f64 * p) as usize];
    println!();
    println!("requests ok      {}", ok.load(Ordering::Relaxed));
    println!("requests failed  {}", failures.len());
    for failure in failures.iter().take(5) {
        println!("  {failure}");
    }
    println!("token requests   {}", eshopbox.token_calls());
    println!("401s resent      {}", eshopbox.unauthorized());
    println!(
        "latency          p50 {:?}  p90 {:?}  p99 {:?}  max {:?}",
        pct(0.5),
        pct(0.9),
        pct(0.99),
        pct(1.0)
    );
    println!("wall time        {:?}", started.elapsed());
    if !failures.is_empty() {
        return Err(format!("{} of {REQUESTS} requests failed", failures.len()).into());
    }
    Ok(())
}
