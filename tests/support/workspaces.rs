//! Replicas of a per-workspace layer sharing each workspace's token through a store.

use std::collections::HashMap;
use std::convert::Infallible;
use std::time::Duration;

use bytes::Bytes;
use eshopbox_auth::mock::MockEshopbox;
use eshopbox_auth::store::TokenStore;
use eshopbox_auth::{Credentials, EshopboxAuthLayer, Workspace};
use http::{Request, Response};
use http_body_util::Empty;
use tower::{service_fn, BoxError, Layer, ServiceExt};

use super::within;

/// `replicas` layers, each with a store of its own from `store`, serve `workspaces`
/// workspaces with 10 concurrent cold requests each per replica: one token call per
/// workspace in all, and every replica sends that workspace's one token.
pub async fn one_token_call_per_workspace<T: TokenStore>(
    store: impl Fn() -> T,
    replicas: usize,
    workspaces: usize,
) {
    let eshopbox = MockEshopbox::start().await.unwrap();
    let names: Vec<String> = (0..workspaces).map(|i| format!("shop-{i}")).collect();
    let mut apps: HashMap<String, Credentials> = HashMap::new();
    for name in &names {
        apps.insert(name.clone(), eshopbox.add_workspace(name));
        // Slow token answers: every replica's first requests arrive during the call.
        eshopbox.set_workspace_token_delay(name, Duration::from_millis(300));
    }
    let layers: Vec<_> = (0..replicas)
        .map(|_| {
            let apps = apps.clone();
            EshopboxAuthLayer::per_workspace(move |workspace: Workspace| {
                let found = apps.get(workspace.name()).cloned();
                async move { Ok::<_, BoxError>(found) }
            })
            .token_url(&eshopbox.token_url())
            .token_store(store())
            .token_timeout(Duration::from_secs(10))
            .lock_lease(Duration::from_secs(1))
            .build()
            .unwrap()
        })
        .collect();
    let echo = service_fn(|req: Request<Empty<Bytes>>| {
        let auth = req.headers()["authorization"].to_str().unwrap().to_owned();
        let proxy_host = req.headers()["proxyhost"].to_str().unwrap().to_owned();
        async move { Ok::<_, Infallible>(Response::new((proxy_host, auth))) }
    });
    let mut requests = tokio::task::JoinSet::new();
    for layer in &layers {
        let service = layer.layer(echo);
        for name in &names {
            for _ in 0..10 {
                let mut request = Request::get("https://api.myeshopbox.com/api/v1/orders")
                    .body(Empty::new())
                    .unwrap();
                request
                    .extensions_mut()
                    .insert(Workspace::new(name.as_str()));
                requests.spawn(service.clone().oneshot(request));
            }
        }
    }
    let mut tokens: HashMap<String, String> = HashMap::new();
    while let Some(done) = within(requests.join_next()).await {
        let (proxy_host, auth) = done.unwrap().unwrap().into_body();
        let token = tokens.entry(proxy_host).or_insert_with(|| auth.clone());
        assert_eq!(*token, auth, "one token per workspace across the replicas");
    }
    assert_eq!(tokens.len(), workspaces);
    for name in &names {
        assert_eq!(eshopbox.workspace_token_calls(name), 1, "{name}");
    }
    assert_eq!(eshopbox.token_calls(), workspaces as u64);
}
