//! A tonic `Channel` wrapped by the layer: the token travels as `authorization`
//! metadata, and gRPC's UNAUTHENTICATED (`grpc-status: 16`, HTTP 200) invalidates it.

#[allow(dead_code)]
#[path = "../examples/tonic.rs"]
mod example;

use eshopbox_auth::classify::GrpcUnauthenticated;
use eshopbox_auth::mock::MockEshopbox;
use eshopbox_auth::{EshopboxAuthLayer, GrpcBodies};
use example::{ping, start_echo, Echo};
use tonic::Code;
use tower::ServiceBuilder;

/// A mock Eshopbox, and a channel to an echo service whose list of refused tokens
/// the test controls.
async fn setup() -> (
    MockEshopbox,
    std::sync::Arc<std::sync::Mutex<Vec<String>>>,
    tonic::transport::Channel,
) {
    let eshopbox = MockEshopbox::start().await.unwrap();
    let echo = Echo::default();
    let refused = echo.refused.clone();
    let addr = start_echo(echo).await.unwrap();
    let channel = tonic::transport::Channel::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    (eshopbox, refused, channel)
}

#[tokio::test]
async fn tonic_channel_carries_the_token_and_unauthenticated_invalidates_it() {
    let (eshopbox, refused, channel) = setup().await;
    let auth = EshopboxAuthLayer::builder(eshopbox.credentials())
        .token_url(&eshopbox.token_url())
        .unauthorized_when(GrpcUnauthenticated)
        .build()
        .unwrap();
    let mut client = tonic::client::Grpc::new(ServiceBuilder::new().layer(auth).service(channel));

    let answer = ping(&mut client, "hello").await.unwrap();
    assert!(
        answer.starts_with("hello / Bearer mock-access-1-"),
        "{answer}"
    );
    let first_token = answer.trim_start_matches("hello / ").to_owned();
    assert_eq!(eshopbox.token_calls(), 1);

    // The server now refuses that token with UNAUTHENTICATED (HTTP 200). Without a
    // replay policy the call is not resent: the caller sees the status once, and the
    // token is dropped, so the next call gets a new one.
    refused.lock().unwrap().push(first_token);
    let status = ping(&mut client, "again").await.unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated);
    let answer = ping(&mut client, "third").await.unwrap();
    assert!(
        answer.starts_with("third / Bearer mock-access-2-"),
        "{answer}"
    );
    assert_eq!(eshopbox.token_calls(), 2);
}

#[tokio::test]
async fn with_grpc_bodies_an_unauthenticated_unary_call_is_resent_once() {
    let (eshopbox, refused, channel) = setup().await;
    let auth = EshopboxAuthLayer::builder(eshopbox.credentials())
        .token_url(&eshopbox.token_url())
        .unauthorized_when(GrpcUnauthenticated)
        .replay_bodies(GrpcBodies)
        .build()
        .unwrap();
    let mut client = tonic::client::Grpc::new(ServiceBuilder::new().layer(auth).service(channel));

    let answer = ping(&mut client, "hello").await.unwrap();
    let token =
        |answer: &str, text: &str| answer.trim_start_matches(&format!("{text} / ")).to_owned();
    refused.lock().unwrap().push(token(&answer, "hello"));

    // Refused, invalidated, resent with a new token: the caller sees only success.
    let answer = ping(&mut client, "again").await.unwrap();
    assert!(
        answer.starts_with("again / Bearer mock-access-2-"),
        "{answer}"
    );
    assert_eq!(eshopbox.token_calls(), 2);
}
