//! The layer against a real token endpoint on 127.0.0.1: wire format, single flight,
//! 401 resend, error kinds and redaction.

mod support;

use eshopbox_auth::{Error, ErrorKind, EshopboxAuthLayer, RequestFormat};
use http::{Response, StatusCode};

use support::{assert_no_secret, credentials, full_report, get, EchoApi, Reply, TokenServer};
use tower::{BoxError, Layer, Service, ServiceBuilder, ServiceExt};

/// A layer with default settings on the loopback endpoint.
fn layer_for(server: &TokenServer) -> EshopboxAuthLayer {
    EshopboxAuthLayer::builder(credentials())
        .token_url(&server.url())
        .build()
        .unwrap()
}

async fn one_request(server: &TokenServer) -> Result<Response<String>, BoxError> {
    let mut svc = ServiceBuilder::new()
        .layer(layer_for(server))
        .service(EchoApi::refusing(""));
    svc.ready().await?.call(get()).await
}

#[tokio::test]
async fn token_request_is_a_json_post_of_the_refresh_grant() {
    let server = TokenServer::counting(86400).await;
    let res = one_request(&server).await.unwrap();
    assert_eq!(res.body(), "Bearer tok-1");

    let seen = server.seen();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].method, http::Method::POST);
    assert_eq!(seen[0].path, "/api/v1/generateToken");
    assert_eq!(seen[0].content_type.as_deref(), Some("application/json"));
    let body: serde_json::Value = serde_json::from_slice(&seen[0].body).unwrap();
    assert_eq!(
        body,
        serde_json::json!({
            "client_id": support::CLIENT_ID,
            "client_secret": support::CLIENT_SECRET,
            "grant_type": "refresh_token",
            "refresh_token": support::REFRESH_TOKEN,
        })
    );
}

#[tokio::test]
async fn form_encoding_sends_the_same_fields() {
    let server = TokenServer::counting(86400).await;
    let layer = EshopboxAuthLayer::builder(credentials())
        .token_url(&server.url())
        .request_format(RequestFormat::Form)
        .build()
        .unwrap();
    let mut svc = layer.layer(EchoApi::refusing(""));
    svc.ready().await.unwrap().call(get()).await.unwrap();

    let seen = &server.seen()[0];
    assert_eq!(
        seen.content_type.as_deref(),
        Some("application/x-www-form-urlencoded")
    );
    let mut fields: Vec<(String, String)> = serde_urlencoded::from_bytes(&seen.body).unwrap();
    fields.sort();
    assert_eq!(
        fields,
        [
            ("client_id".into(), support::CLIENT_ID.into()),
            ("client_secret".into(), support::CLIENT_SECRET.into()),
            ("grant_type".into(), "refresh_token".into()),
            ("refresh_token".into(), support::REFRESH_TOKEN.into()),
        ]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_concurrent_cold_requests_make_one_post() {
    let server = TokenServer::counting(86400).await;
    let layer = layer_for(&server);
    let api = EchoApi::refusing("");
    let svc = layer.layer(api.clone());

    let tasks: Vec<_> = (0..1000)
        .map(|_| {
            let mut svc = svc.clone();
            tokio::spawn(async move { svc.ready().await?.call(get()).await })
        })
        .collect();
    for task in tasks {
        assert_eq!(task.await.unwrap().unwrap().body(), "Bearer tok-1");
    }
    assert_eq!(server.posts(), 1);
    assert_eq!(api.calls(), 1000);
}

#[tokio::test]
async fn a_401_fetches_a_new_token_and_resends() {
    let server = TokenServer::counting(86400).await;
    let layer = layer_for(&server);
    let api = EchoApi::refusing("Bearer tok-1");
    let mut svc = layer.layer(api.clone());
    let res = svc.ready().await.unwrap().call(get()).await.unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    assert_eq!(res.body(), "Bearer tok-2");
    assert_eq!(server.posts(), 2);
    assert_eq!(api.calls(), 2);
}

#[tokio::test]
async fn a_rotated_refresh_token_is_used_from_then_on() {
    let server = TokenServer::start(|n| {
        Reply::json(
            200,
            &format!(r#"{{"access_token":"tok-{n}","expires_in":86400,"refresh_token":"rt-{n}"}}"#),
        )
    })
    .await;
    let layer = layer_for(&server);
    // tok-1 is refused, so a second token request is made.
    let mut svc = layer.layer(EchoApi::refusing("Bearer tok-1"));
    svc.ready().await.unwrap().call(get()).await.unwrap();
    let sent: Vec<String> = server
        .seen()
        .iter()
        .map(|s| {
            let v: serde_json::Value = serde_json::from_slice(&s.body).unwrap();
            v["refresh_token"].as_str().unwrap().to_owned()
        })
        .collect();
    assert_eq!(sent, [support::REFRESH_TOKEN, "rt-1"]);
}

#[tokio::test]
async fn an_unreachable_endpoint_is_unavailable() {
    // A port nothing listens on (and nothing else can take while the test runs).
    let (_reserved, addr) = support::refusing_address();
    // The refused connections are retried until the (short) token timeout.
    let timeout = std::time::Duration::from_secs(2);
    let layer = EshopboxAuthLayer::builder(credentials())
        .token_url(&format!("http://{addr}/api/v1/generateToken"))
        .token_timeout(timeout)
        .build()
        .unwrap();
    let started = tokio::time::Instant::now();
    let mut svc = layer.layer(EchoApi::refusing(""));
    let err = svc.ready().await.unwrap().call(get()).await.unwrap_err();
    // Retried until the next back-off would have ended past the deadline. (How many
    // attempts fit depends on how fast the machine is.)
    let attempts = layer.handle().stats().token_requests as usize;
    assert!(attempts >= 2, "{attempts} token requests");
    assert!(
        started.elapsed() + support::longest_backoff(attempts) >= timeout,
        "gave up after {:?} and {attempts} token requests",
        started.elapsed()
    );
    let eshopbox = err.downcast_ref::<Error>().unwrap();
    assert_eq!(eshopbox.kind(), ErrorKind::Unavailable);
    assert!(eshopbox.is_transient());
    let shown = full_report(&err);
    assert!(shown.contains("could not connect"), "{shown}");
    assert_no_secret(&shown, &[]);
}

#[tokio::test]
async fn debug_output_never_shows_a_secret() {
    let server = TokenServer::start(|_| Reply::token("tok-secret-access", 86400)).await;
    let creds = credentials();
    let builder = EshopboxAuthLayer::builder(creds.clone()).token_url(&server.url());
    let builder_shown = format!("{builder:?}");
    let layer = builder.build().unwrap();
    let mut svc = layer.layer(EchoApi::refusing(""));
    let res = svc.ready().await.unwrap().call(get()).await.unwrap();
    assert_eq!(res.body(), "Bearer tok-secret-access");

    let shown = format!("{creds:?} {builder_shown} {layer:?} {svc:?} {:#?}", svc);
    assert!(shown.contains(support::CLIENT_ID), "{shown}");
    assert!(
        shown.contains("generation: 1"),
        "the token state is shown: {shown}"
    );
    assert_no_secret(&shown, &["tok-secret-access"]);
}
