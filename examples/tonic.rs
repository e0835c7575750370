//! A tonic `Channel` wrapped by the layer: every gRPC call carries
//! `authorization: Bearer …` metadata, and UNAUTHENTICATED (`grpc-status: 16`)
//! invalidates the token, thanks to the gRPC-aware classifier.
//!
//! ```sh
//! cargo run --example tonic
//! ```
//!
//! It runs a tiny gRPC echo service and a mock Eshopbox on 127.0.0.1.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use eshopbox_auth::classify::GrpcUnauthenticated;
use eshopbox_auth::mock::MockEshopbox;
use eshopbox_auth::EshopboxAuthLayer;
use http::uri::PathAndQuery;
use tonic::server::{NamedService, UnaryService};
use tonic::Status;
use tonic_prost::ProstCodec;
use tower::{BoxError, Service, ServiceBuilder};

#[derive(Clone, PartialEq, prost::Message)]
pub struct Ping {
    #[prost(string, tag = "1")]
    pub text: String,
}

/// A tiny gRPC service: `Ping` echoes the text and the authorization metadata it
/// received; it refuses tokens listed in `refused` with UNAUTHENTICATED.
#[derive(Clone, Default)]
pub struct Echo {
    pub refused: Arc<Mutex<Vec<String>>>,
}

impl NamedService for Echo {
    const NAME: &'static str = "eshopbox.test.Echo";
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

impl Service<http::Request<tonic::body::Body>> for Echo {
    type Response = http::Response<tonic::body::Body>;
    type Error = std::convert::Infallible;
    type Future = BoxFuture<Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<tonic::body::Body>) -> Self::Future {
        let handler = PingHandler(self.refused.clone());
        Box::pin(async move {
            let mut grpc = tonic::server::Grpc::new(ProstCodec::<Ping, Ping>::default());
            Ok(grpc.unary(handler, req).await)
        })
    }
}

struct PingHandler(Arc<Mutex<Vec<String>>>);

impl UnaryService<Ping> for PingHandler {
    type Response = Ping;
    type Future = BoxFuture<Result<tonic::Response<Ping>, Status>>;

    fn call(&mut self, request: tonic::Request<Ping>) -> Self::Future {
        let auth = request
            .metadata()
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_owned();
        let refused = self.0.lock().unwrap().contains(&auth);
        let text = request.into_inner().text;
        Box::pin(async move {
            if !auth.starts_with("Bearer mock-access-") {
                return Err(Status::unauthenticated("no bearer token"));
            }
            if refused {
                return Err(Status::unauthenticated("token expired"));
            }
            Ok(tonic::Response::new(Ping {
                text: format!("{text} / {auth}"),
            }))
        })
    }
}

pub async fn ping<S>(channel: &mut tonic::client::Grpc<S>, text: &str) -> Result<String, Status>
where
    S: tonic::client::GrpcService<tonic::body::Body>,
    S::Error: Into<BoxError>,
    S::ResponseBody: http_body::Body<Data = bytes::Bytes> + Send + 'static,
    <S::ResponseBody as http_body::Body>::Error: Into<BoxError> + Send,
{
    channel
        .ready()
        .await
        .map_err(|e| Status::unknown(e.into().to_string()))?;
    let path = PathAndQuery::from_static("/eshopbox.test.Echo/Ping");
    let request = tonic::Request::new(Ping { text: text.into() });
    let response = channel
        .unary(request, path, ProstCodec::<Ping, Ping>::default())
        .await?;
    Ok(response.into_inner().text)
}

/// Serves [`Echo`] on a free loopback port.
pub async fn start_echo(echo: Echo) -> std::io::Result<std::net::SocketAddr> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(echo)
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    Ok(addr)
}

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    let eshopbox = MockEshopbox::start().await?;
    let addr = start_echo(Echo::default()).await?;

    let channel = tonic::transport::Channel::from_shared(format!("http://{addr}"))?
        .connect()
        .await?;
    let auth = EshopboxAuthLayer::builder(eshopbox.credentials())
        .token_url(&eshopbox.token_url())
        .unauthorized_when(GrpcUnauthenticated)
        // Resend a unary call once after UNAUTHENTICATED.
        .replay_bodies(eshopbox_auth::GrpcBodies)
        .build()?;
    let mut client = tonic::client::Grpc::new(ServiceBuilder::new().layer(auth).service(channel));
    for text in ["hello", "world"] {
        println!("{}", ping(&mut client, text).await?);
    }
    println!("token requests: {}", eshopbox.token_calls());
    Ok(())
}
