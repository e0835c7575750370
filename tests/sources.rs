//! Other token sources get the same machinery: generic OAuth 2 grants and closures.

mod support;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use eshopbox_auth::source::{source_fn, FetchedToken, OAuth2Source};
use eshopbox_auth::{Error, ErrorKind, EshopboxAuthLayer};
use support::{get, EchoApi, Reply, TokenServer};
use tower::{Layer, ServiceExt};

/// An endpoint that answers `tok-n` with a new refresh token `rt-n` each time, and
/// an OAuth 2 refresh-grant source on it that starts from `rt-0`.
async fn rotating_refresh_grant() -> (TokenServer, OAuth2Source) {
    let server = TokenServer::start(|n| {
        Reply::json(
            200,
            &format!(r#"{{"access_token":"tok-{n}","expires_in":3600,"refresh_token":"rt-{n}"}}"#),
        )
    })
    .await;
    let source = OAuth2Source::refresh_token(&server.url(), "id", "secret", "rt-0")
        .build()
        .unwrap();
    (server, source)
}

fn form(body: &[u8]) -> BTreeMap<String, String> {
    serde_urlencoded::from_bytes(body).unwrap()
}

#[tokio::test]
async fn client_credentials_with_basic_auth_and_scope() {
    let server = TokenServer::counting(3600).await;
    let source = OAuth2Source::client_credentials(&server.url(), "svc-id", "svc-secret")
        .scope("orders:read")
        .basic_auth(true)
        .build()
        .unwrap();
    let layer = EshopboxAuthLayer::with_source(source).build().unwrap();
    let res = layer
        .layer(EchoApi::refusing(""))
        .oneshot(get())
        .await
        .unwrap();
    assert_eq!(res.body(), "Bearer tok-1");

    let seen = &server.seen()[0];
    assert_eq!(
        seen.content_type.as_deref(),
        Some("application/x-www-form-urlencoded")
    );
    let fields = form(&seen.body);
    assert_eq!(fields["grant_type"], "client_credentials");
    assert_eq!(fields["scope"], "orders:read");
    assert!(
        !fields.contains_key("client_secret"),
        "secret not in the body"
    );
    // base64("svc-id:svc-secret")
    assert_eq!(
        seen.authorization.as_deref(),
        Some("Basic c3ZjLWlkOnN2Yy1zZWNyZXQ=")
    );
}

#[tokio::test]
async fn refresh_token_grant_in_the_body_uses_a_rotated_token() {
    let (server, source) = rotating_refresh_grant().await;
    let layer = EshopboxAuthLayer::with_source(source).build().unwrap();
    // tok-1 is refused: a second grant is made, with the rotated refresh token.
    let res = layer
        .layer(EchoApi::refusing("Bearer tok-1"))
        .oneshot(get())
        .await
        .unwrap();
    assert_eq!(res.body(), "Bearer tok-2");
    let sent: Vec<_> = server.seen().iter().map(|s| form(&s.body)).collect();
    assert_eq!(sent[0]["grant_type"], "refresh_token");
    assert_eq!(sent[0]["client_secret"], "secret");
    assert_eq!(sent[0]["refresh_token"], "rt-0");
    assert_eq!(sent[1]["refresh_token"], "rt-1");
}

#[tokio::test]
async fn a_closure_source_gets_single_flight_and_401_handling() {
    let calls = Arc::new(AtomicUsize::new(0));
    let counter = calls.clone();
    let layer = EshopboxAuthLayer::with_source(source_fn(move || {
        let n = counter.fetch_add(1, Ordering::SeqCst) + 1;
        async move {
            tokio::task::yield_now().await;
            Ok(FetchedToken::new(format!("fn-{n}")).expires_in(Duration::from_secs(60)))
        }
    }))
    .build()
    .unwrap();
    let svc = layer.layer(EchoApi::refusing("Bearer fn-1"));
    let tasks: Vec<_> = (0..100)
        .map(|_| tokio::spawn(svc.clone().oneshot(get())))
        .collect();
    for task in tasks {
        assert_eq!(task.await.unwrap().unwrap().body(), "Bearer fn-2");
    }
    assert_eq!(
        calls.load(Ordering::SeqCst),
        2,
        "one to start, one after the 401s"
    );
}

#[tokio::test]
async fn a_rejecting_closure_source_is_not_hammered() {
    let calls = Arc::new(AtomicUsize::new(0));
    let counter = calls.clone();
    let layer = EshopboxAuthLayer::with_source(source_fn(move || {
        counter.fetch_add(1, Ordering::SeqCst);
        async { Err::<FetchedToken, _>(rejected()) }
    }))
    .build()
    .unwrap();
    let svc = layer.layer(EchoApi::refusing(""));
    for _ in 0..20 {
        let err = svc.clone().oneshot(get()).await.unwrap_err();
        assert_eq!(
            err.downcast_ref::<Error>().unwrap().kind(),
            ErrorKind::Rejected
        );
    }
    assert_eq!(
        calls.load(Ordering::SeqCst),
        1,
        "the rejection is remembered"
    );
}

fn rejected() -> Error {
    Error::rejected("the identity provider refused the credentials")
}

#[test]
fn oauth2_builder_refuses_bad_input() {
    let err = OAuth2Source::client_credentials("http://example.com/token", "id", "secret")
        .build()
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Config);
    let err = OAuth2Source::refresh_token("https://idp.example/token", "id", "secret", " ")
        .build()
        .unwrap_err();
    assert!(err.to_string().contains("refresh_token is empty"));
}

#[tokio::test]
async fn a_rotated_refresh_token_reported_by_a_source_reaches_the_hook() {
    let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
    let hook_seen = seen.clone();
    let layer = EshopboxAuthLayer::with_source(source_fn(|| async {
        Ok(FetchedToken::new("t").rotated_refresh_token("rt-next"))
    }))
    .on_refresh_token_rotated(move |rt| {
        use eshopbox_auth::secrecy::ExposeSecret;
        hook_seen
            .lock()
            .unwrap()
            .push(rt.expose_secret().to_owned());
    })
    .build()
    .unwrap();
    layer
        .layer(EchoApi::refusing(""))
        .oneshot(get())
        .await
        .unwrap();
    assert_eq!(*seen.lock().unwrap(), ["rt-next"]);
}

#[tokio::test]
async fn an_oauth2_rotation_reaches_the_layer_hook_too() {
    let (_server, source) = rotating_refresh_grant().await;
    let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
    let hook_seen = seen.clone();
    let layer = EshopboxAuthLayer::with_source(source)
        .on_refresh_token_rotated(move |rt| {
            use eshopbox_auth::secrecy::ExposeSecret;
            hook_seen
                .lock()
                .unwrap()
                .push(rt.expose_secret().to_owned());
        })
        .build()
        .unwrap();
    layer
        .layer(EchoApi::refusing(""))
        .oneshot(get())
        .await
        .unwrap();
    assert_eq!(*seen.lock().unwrap(), ["rt-1"]);
}
