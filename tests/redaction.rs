//! No secret reaches logs: everything emitted at TRACE while the layer fetches,
//! rotates, retries and fails is captured and searched.

mod support;

use std::sync::{Arc, Mutex};

use bytes::Bytes;
use eshopbox_auth::{ErrorKind, EshopboxAuthLayer};
use http::{Request, Response};
use http_body_util::Empty;
use support::telemetry::capture;
use support::{assert_no_secret, credentials, EchoApi, Reply, TokenServer};
use tower::{service_fn, ServiceBuilder, ServiceExt};

#[tokio::test(flavor = "current_thread")]
async fn trace_output_carries_no_secret() {
    let (captured, _guard) = capture(tracing::Level::TRACE);

    // 1: a token that the API refuses, with a rotated refresh token;
    // 2: a transient failure; 3: the working token; 4: the refresh token is revoked.
    let server = TokenServer::start(|n| match n {
        1 => Reply::json(
            200,
            r#"{"access_token":"acc-secret-one","expires_in":86400,"token_type":"Bearer","refresh_token":"rt-rotated-secret"}"#,
        ),
        2 => Reply::raw(500, "text/plain", "oops"),
        3 => Reply::token("acc-secret-two", 86400),
        _ => Reply::json(400, r#"{"error":"invalid_grant"}"#),
    })
    .await;
    let rotated = Arc::new(Mutex::new(String::new()));
    let seen = rotated.clone();
    let layer = EshopboxAuthLayer::builder(credentials())
        .token_url(&server.url())
        .on_refresh_token_rotated(move |rt| {
            use eshopbox_auth::secrecy::ExposeSecret;
            *seen.lock().unwrap() = rt.expose_secret().to_owned();
        })
        .build()
        .unwrap();
    let api = EchoApi::refusing("Bearer acc-secret-one");
    let svc = ServiceBuilder::new().layer(layer.clone()).service(api);
    let res = svc.clone().oneshot(support::get()).await.unwrap();
    assert_eq!(res.body(), "Bearer acc-secret-two");
    assert_eq!(*rotated.lock().unwrap(), "rt-rotated-secret");
    assert_eq!(server.posts(), 3);

    // A second layer on the same endpoint gets invalid_grant.
    let failing = EshopboxAuthLayer::builder(credentials())
        .token_url(&server.url())
        .build()
        .unwrap();
    let api = service_fn(|_: Request<Empty<Bytes>>| async {
        Ok::<_, std::convert::Infallible>(Response::new(String::new()))
    });
    let err = ServiceBuilder::new()
        .layer(failing)
        .service(api)
        .oneshot(support::get())
        .await
        .unwrap_err();
    let err = err.downcast_ref::<eshopbox_auth::Error>().unwrap();
    assert_eq!(err.kind(), ErrorKind::Rejected);
    tracing::error!(error = %err, "logged by the application");

    let text = captured.text();
    // The layer did log what happened ...
    for event in [
        "requesting an access token",
        "rotated the refresh token",
        "invalidated",
        "retrying",
        "token refresh failed",
        "invalid_grant",
        "reason=Cold",
        "reason=Invalidated",
        "token refresh finished",
        "duration_ms",
    ] {
        assert!(text.contains(event), "no {event:?} in the log:\n{text}");
    }
    // ... and nothing secret.
    assert_no_secret(
        &text,
        &["acc-secret-one", "acc-secret-two", "rt-rotated-secret"],
    );
}

#[tokio::test(flavor = "current_thread")]
async fn token_store_paths_log_no_secret() {
    use eshopbox_auth::store::{InProcessStore, RedisStore, TokenStore};

    let (captured, _guard) = capture(tracing::Level::TRACE);

    // Two layers share an in-process store against an endpoint that rotates the
    // refresh token; a third has a Redis store on a port where nothing listens.
    let endpoint = support::rotating_endpoint(86400).await;
    let store = InProcessStore::new();
    let layer = |store| {
        EshopboxAuthLayer::builder(credentials())
            .token_url(&endpoint.url())
            .token_store(store)
    };
    let first = layer(store.clone()).build().unwrap();
    let second = layer(store.clone()).build().unwrap();
    let (_reserved, closed) = support::refusing_address();
    let down = RedisStore::new(&format!("redis://{closed}/")).unwrap();
    let third = EshopboxAuthLayer::builder(credentials())
        .token_url(&endpoint.url())
        .token_store(down.clone())
        .build()
        .unwrap();
    let call = |layer: &EshopboxAuthLayer| {
        ServiceBuilder::new()
            .layer(layer.clone())
            .service(EchoApi::default())
            .oneshot(support::get())
    };

    assert_eq!(call(&first).await.unwrap().body(), "Bearer tok-1");
    assert_eq!(call(&second).await.unwrap().body(), "Bearer tok-1");
    first.handle().invalidate();
    second.handle().invalidate();
    assert_eq!(call(&second).await.unwrap().body(), "Bearer tok-2");
    // The third layer sends the refresh token the store never gave it: refused, but
    // logged and reported without the token.
    let refused = call(&third).await.unwrap_err();
    let kind = refused
        .downcast_ref::<eshopbox_auth::Error>()
        .map(|e| e.kind());
    assert_eq!(kind, Some(eshopbox_auth::ErrorKind::Rejected), "{refused}");
    assert_eq!(third.handle().stats().store_failures, 1);
    let report = support::full_report(&refused);
    assert!(report.contains("invalid_grant"), "{report}");

    let text = captured.text();
    for event in [
        "using the access token from the token store",
        "token store unavailable",
    ] {
        assert!(text.contains(event), "no {event:?} in the log:\n{text}");
    }
    let shared = store.load().await.unwrap().unwrap();
    let debug = format!("{shared:?} {store:?} {down:?} {first:?}");
    let all = format!("{text}\n{debug}\n{report}");
    assert_no_secret(&all, &["tok-1", "tok-2", "rt-1", "rt-2"]);
}

// An error answer whose OAuth `error` code is a secret the request sent (or part of
// one) loses the code: it would end up in the error's `Display`.
#[tokio::test]
async fn an_error_code_echoing_a_secret_is_dropped() {
    for echoed in [
        support::REFRESH_TOKEN,
        support::CLIENT_SECRET,
        "long-lived-refresh",
    ] {
        let body = format!(r#"{{"error":"{echoed}"}}"#);
        let server = TokenServer::start(move |_| Reply::json(400, &body)).await;
        let layer = EshopboxAuthLayer::builder(credentials())
            .token_url(&server.url())
            .build()
            .unwrap();
        let error = layer.handle().get().await.unwrap_err();
        assert_eq!(error.kind(), ErrorKind::Rejected);
        assert_eq!(error.oauth_error(), None, "{echoed}");
        assert!(
            !format!("{error} {error:?}").contains(echoed),
            "{echoed}: {error}"
        );
    }
}
