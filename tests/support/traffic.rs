//! Steady request traffic through several replicas, for the tests that stop, fail
//! over or slow down a real token store under load.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use eshopbox_auth::store::TokenStore;
use eshopbox_auth::EshopboxAuthLayer;
use http::Request;
use http_body_util::Empty;
use tower::{Layer, ServiceExt};

use super::{EchoApi, TokenServer};

/// `n` replicas on the loopback token endpoint, refreshing 1 s before expiry.
pub fn endpoint_replicas<T: TokenStore>(
    n: usize,
    endpoint: &TokenServer,
    store: impl Fn() -> T,
) -> Vec<EshopboxAuthLayer> {
    (0..n)
        .map(|_| {
            EshopboxAuthLayer::builder(super::credentials())
                .token_url(&endpoint.url())
                .refresh_margin(Duration::from_secs(1))
                .token_store(store())
                .lock_lease(Duration::from_secs(1))
                .build()
                .unwrap()
        })
        .collect()
}

/// Requests from every replica, a few milliseconds apart, until `stop` is set;
/// each task returns how many succeeded and how many failed.
pub fn traffic(
    layers: &[EshopboxAuthLayer],
    stop: Arc<AtomicBool>,
) -> tokio::task::JoinSet<(usize, usize)> {
    let mut tasks = tokio::task::JoinSet::new();
    for layer in layers {
        for _ in 0..4 {
            let service = layer.layer(EchoApi::default());
            let stop = stop.clone();
            tasks.spawn(async move {
                let (mut ok, mut failed) = (0, 0);
                while !stop.load(Ordering::Relaxed) {
                    match service
                        .clone()
                        .oneshot(Request::new(Empty::<Bytes>::new()))
                        .await
                    {
                        Ok(_) => ok += 1,
                        Err(_) => failed += 1,
                    }
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                (ok, failed)
            });
        }
    }
    tasks
}

/// Succeeded and failed requests of all `traffic` tasks, once they have stopped.
pub async fn totals(mut tasks: tokio::task::JoinSet<(usize, usize)>) -> (usize, usize) {
    let (mut ok, mut failed) = (0, 0);
    while let Some(result) = tasks.join_next().await {
        let (o, f) = result.unwrap();
        ok += o;
        failed += f;
    }
    (ok, failed)
}

/// Waits until `condition` holds, looking every 20 ms, for at most
/// [`WAIT_LIMIT`](super::WAIT_LIMIT) by the clock.
pub async fn until(what: &str, condition: impl Fn() -> bool) {
    let looking = async {
        while !condition() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    if tokio::time::timeout(super::WAIT_LIMIT, looking)
        .await
        .is_err()
    {
        panic!("gave up waiting until {what} ({:?})", super::WAIT_LIMIT);
    }
}

/// The gaps between consecutive token calls the endpoint saw.
pub fn gaps(endpoint: &TokenServer) -> Vec<Duration> {
    let times: Vec<_> = endpoint.seen().iter().map(|seen| seen.at).collect();
    times.windows(2).map(|pair| pair[1] - pair[0]).collect()
}
