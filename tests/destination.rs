//! The destination guard through the service: the token goes only to trusted hosts,
//! refused requests never reach the inner service nor cause a token call, redirects
//! are handled on both sides of the layer, and the token endpoint's own redirects
//! carry nothing.

mod support;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use eshopbox_auth::source::{source_fn, FetchedToken};
use eshopbox_auth::{ErrorKind, EshopboxAuthLayer};
use http::{Request, Response, StatusCode};
use http_body_util::Empty;
use support::{assert_no_secret, credentials, full_report, EchoApi, Reply, TokenServer};
use tower::{BoxError, Layer, Service, ServiceBuilder, ServiceExt};
use tower_http::follow_redirect::FollowRedirectLayer;

/// Bound on anything that could hang: generous, so that only a hang (not a loaded
/// machine) reaches it.
const LIMIT: Duration = support::WAIT_LIMIT;

fn get(uri: &str) -> Request<Empty<Bytes>> {
    Request::get(uri).body(Empty::new()).unwrap()
}

async fn send<S>(svc: &mut S, uri: &str) -> Result<Response<String>, BoxError>
where
    S: Service<Request<Empty<Bytes>>, Response = Response<String>, Error = BoxError>,
{
    tokio::time::timeout(LIMIT, svc.ready().await?.call(get(uri)))
        .await
        .expect("the request hangs")
}

fn kind_of(err: &BoxError) -> Option<ErrorKind> {
    err.downcast_ref::<eshopbox_auth::Error>()
        .map(eshopbox_auth::Error::kind)
}

#[tokio::test]
async fn trusted_uris_carry_the_token_and_others_are_refused_before_they_leave() {
    let endpoint = TokenServer::counting(3600).await;
    let api = EchoApi::refusing("");
    let layer = EshopboxAuthLayer::builder(credentials())
        .token_url(&endpoint.url())
        .workspace("acme")
        .build()
        .unwrap();
    let mut svc = layer.layer(api.clone());

    // Refused first, before any token exists: no token call is needed to refuse.
    for uri in [
        "https://attacker.example.net/steal",
        "http://acme.myeshopbox.com/api/v2/inventoryListing",
        "https://evilmyeshopbox.com/",
        "https://myeshopbox.com.attacker.net/",
        "https://eshopbox.com.attacker.net/",
        "https://acme.myeshopbox.co/",
        "https://acme.myeshopbox.com@attacker.net/",
        "http://10.0.0.1/",
    ] {
        let err = send(&mut svc, uri).await.unwrap_err();
        assert_eq!(
            kind_of(&err),
            Some(ErrorKind::UntrustedDestination),
            "{uri}: {err}"
        );
    }
    assert_eq!(
        api.calls(),
        0,
        "a refused request reached the inner service"
    );
    assert_eq!(endpoint.posts(), 0, "refusing needed a token call");
    assert_eq!(layer.handle().stats().refused, 8);

    for uri in [
        "https://acme.myeshopbox.com/api/v2/inventoryListing",
        "https://ACME.MYESHOPBOX.COM/upper",
        "https://acme.myeshopbox.com:443/explicit-port",
        "https://wms.eshopbox.com/api/v1/orders",
        "https://attacker.net@acme.myeshopbox.com/",
        "http://127.0.0.1:9/loopback",
        "http://localhost/loopback",
        "http://[::1]:8080/ipv6-loopback",
        "/path-only",
    ] {
        let res = send(&mut svc, uri).await.unwrap();
        assert_eq!(res.body(), "Bearer tok-1", "{uri}");
    }
    assert_eq!(api.calls(), 9);
    assert_eq!(endpoint.posts(), 1);

    // With a token cached, a refusal still names only the scheme and host.
    let err = send(&mut svc, "https://user:pw@attacker.example.net:8443/x?q=1")
        .await
        .unwrap_err();
    let report = full_report(&err);
    assert!(report.contains("https://attacker.example.net"), "{report}");
    assert!(
        !report.contains("pw@") && !report.contains("q=1"),
        "{report}"
    );
    assert_no_secret(&report, &["tok-1"]);
    assert_eq!(api.calls(), 9);
    assert_eq!(layer.handle().stats().refused, 9);
}

/// A request as the API saw it: URI and `Authorization`.
type Hop = (String, Option<String>);

/// Records each request's URI and `Authorization`; answers a request for
/// `/start` with a redirect to `location`, any other with 200.
#[derive(Clone)]
struct Redirecting {
    location: &'static str,
    seen: Arc<Mutex<Vec<Hop>>>,
}

impl Redirecting {
    fn new(location: &'static str) -> Self {
        Redirecting {
            location,
            seen: Arc::default(),
        }
    }

    fn seen(&self) -> Vec<Hop> {
        self.seen.lock().unwrap().clone()
    }
}

impl Service<Request<Empty<Bytes>>> for Redirecting {
    type Response = Response<String>;
    type Error = BoxError;
    type Future = std::future::Ready<Result<Response<String>, BoxError>>;

    fn poll_ready(
        &mut self,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<Empty<Bytes>>) -> Self::Future {
        let authorization = req
            .headers()
            .get("authorization")
            .map(|v| v.to_str().unwrap().to_owned());
        self.seen
            .lock()
            .unwrap()
            .push((req.uri().to_string(), authorization));
        let res = if req.uri().path() == "/start" {
            Response::builder()
                .status(StatusCode::FOUND)
                .header("location", self.location)
                .body(String::new())
        } else {
            Response::builder().body("landed".to_owned())
        };
        std::future::ready(Ok(res.unwrap()))
    }
}

#[tokio::test]
async fn a_redirect_to_a_foreign_host_never_carries_the_token() {
    let endpoint = TokenServer::counting(3600).await;
    let auth = EshopboxAuthLayer::builder(credentials())
        .token_url(&endpoint.url())
        .build()
        .unwrap();
    let layer = || auth.clone();
    let foreign = "https://attacker.example.net/steal";

    // Layer outside FollowRedirect (recommended): the token is put on once, and
    // tower-http's credential filter strips it from the cross-origin hop.
    let api = Redirecting::new(foreign);
    let mut outside = ServiceBuilder::new()
        .layer(layer())
        .layer(FollowRedirectLayer::new())
        .service(api.clone());
    let res = send(&mut outside, "https://acme.myeshopbox.com/start")
        .await
        .unwrap();
    assert_eq!(res.body(), "landed");
    let seen = api.seen();
    assert_eq!(seen.len(), 2);
    assert_eq!(seen[0].1.as_deref(), Some("Bearer tok-1"));
    assert_eq!(seen[1].0, foreign);
    assert_eq!(seen[1].1, None, "the redirected hop carried the token");

    // Layer inside FollowRedirect: each hop goes through the layer, and the guard
    // refuses the foreign one before it leaves.
    let api = Redirecting::new(foreign);
    let mut inside = ServiceBuilder::new()
        .layer(FollowRedirectLayer::new())
        .layer(layer())
        .service(api.clone());
    let err = send(&mut inside, "https://acme.myeshopbox.com/start")
        .await
        .unwrap_err();
    assert_eq!(
        kind_of(&err),
        Some(ErrorKind::UntrustedDestination),
        "{err}"
    );
    assert!(
        err.to_string().contains("https://attacker.example.net"),
        "{err}"
    );
    let seen = api.seen();
    assert_eq!(seen.len(), 1, "the foreign hop was sent: {seen:?}");

    // Redirects between trusted hosts still work with the layer inside.
    let api = Redirecting::new("https://wms.eshopbox.com/api/next");
    let mut inside = ServiceBuilder::new()
        .layer(FollowRedirectLayer::new())
        .layer(layer())
        .service(api.clone());
    let res = send(&mut inside, "https://acme.myeshopbox.com/start")
        .await
        .unwrap();
    assert_eq!(res.body(), "landed");
    assert_eq!(api.seen()[1].1.as_deref(), Some("Bearer tok-1"));
}

#[tokio::test]
async fn the_resend_after_a_401_goes_to_the_same_trusted_uri() {
    let endpoint = TokenServer::counting(3600).await;
    let refusing = EchoApi::refusing("Bearer tok-1");
    let layer = EshopboxAuthLayer::builder(credentials())
        .token_url(&endpoint.url())
        .build()
        .unwrap();
    let mut svc = layer.layer(refusing.clone());
    let res = send(
        &mut svc,
        "https://acme.myeshopbox.com/api/v2/inventoryListing",
    )
    .await
    .unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    assert_eq!(res.body(), "Bearer tok-2");
    assert_eq!(refusing.calls(), 2);
}

#[tokio::test]
async fn allow_host_and_allow_insecure_http() {
    let endpoint = TokenServer::counting(3600).await;
    let api = EchoApi::refusing("");
    let layer = EshopboxAuthLayer::builder(credentials())
        .token_url(&endpoint.url())
        .allow_host("gateway.internal.example")
        .allow_host("*.partner.example")
        .build()
        .unwrap();
    let mut svc = layer.layer(api.clone());
    for uri in [
        "https://gateway.internal.example/api",
        "https://api.partner.example/api",
    ] {
        assert_eq!(send(&mut svc, uri).await.unwrap().body(), "Bearer tok-1");
    }
    for uri in [
        "https://partner.example/api", // the wildcard is for subdomains only
        "http://gateway.internal.example/api",
        "http://acme.myeshopbox.com/api",
    ] {
        let err = send(&mut svc, uri).await.unwrap_err();
        assert_eq!(
            kind_of(&err),
            Some(ErrorKind::UntrustedDestination),
            "{uri}"
        );
    }
    assert_eq!(api.calls(), 2);

    let layer = EshopboxAuthLayer::builder(credentials())
        .token_url(&endpoint.url())
        .allow_host("gateway.internal.example")
        .allow_insecure_http(true)
        .build()
        .unwrap();
    let mut svc = layer.layer(api.clone());
    for uri in [
        "http://gateway.internal.example/api",
        "http://acme.myeshopbox.com/api",
    ] {
        assert_eq!(send(&mut svc, uri).await.unwrap().body(), "Bearer tok-2");
    }
    let err = send(&mut svc, "http://attacker.example.net/")
        .await
        .unwrap_err();
    assert_eq!(kind_of(&err), Some(ErrorKind::UntrustedDestination));

    for bad in [
        "",
        "*",
        "*.com",
        "https://gateway.example",
        "gateway.example/api",
        "a b",
    ] {
        let err = EshopboxAuthLayer::builder(credentials())
            .allow_host(bad)
            .build()
            .unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Config, "{bad:?}");
        assert!(err.to_string().contains("allow_host"), "{bad:?}: {err}");
    }
}

#[tokio::test]
async fn custom_sources_get_the_same_guard() {
    let fetched = Arc::new(AtomicUsize::new(0));
    let counter = fetched.clone();
    let layer = EshopboxAuthLayer::with_source(source_fn(move || {
        counter.fetch_add(1, Ordering::SeqCst);
        async { Ok(FetchedToken::new("custom-token")) }
    }))
    .build()
    .unwrap();
    let api = EchoApi::refusing("");
    let mut svc = layer.layer(api.clone());
    let err = send(&mut svc, "https://attacker.example.net/")
        .await
        .unwrap_err();
    assert_eq!(kind_of(&err), Some(ErrorKind::UntrustedDestination));
    assert_eq!((api.calls(), fetched.load(Ordering::SeqCst)), (0, 0));
    let res = send(&mut svc, "https://acme.myeshopbox.com/")
        .await
        .unwrap();
    assert_eq!(res.body(), "Bearer custom-token");
}

/// A token endpoint answering `status` with a `Location` to a second loopback server.
async fn redirecting_endpoint(status: u16) -> (TokenServer, TokenServer) {
    let elsewhere = TokenServer::counting(3600).await;
    let location = elsewhere.url();
    let endpoint = TokenServer::start(move |_| {
        Reply::json(status, "{}").with_header("location", location.clone())
    })
    .await;
    (endpoint, elsewhere)
}

#[tokio::test]
async fn the_default_token_client_follows_no_redirect() {
    for status in [307, 308] {
        let (endpoint, elsewhere) = redirecting_endpoint(status).await;
        let layer = EshopboxAuthLayer::builder(credentials())
            .token_url(&endpoint.url())
            .build()
            .unwrap();
        let err = tokio::time::timeout(LIMIT, layer.handle().refresh())
            .await
            .expect("the refresh hangs")
            .unwrap_err();
        assert_eq!(
            elsewhere.posts(),
            0,
            "{status}: the grant was sent elsewhere"
        );
        assert_eq!(endpoint.posts(), 1);
        assert_eq!(err.kind(), ErrorKind::InvalidResponse, "{status}: {err}");
        assert_eq!(err.status().map(|s| s.as_u16()), Some(status));
        assert!(err.to_string().contains("redirect"), "{err}");
        assert_no_secret(&format!("{err} {err:?}"), &[]);
    }
}

#[tokio::test]
async fn a_token_client_that_follows_redirects_has_its_answer_refused() {
    // The documented risk: a user-supplied client that follows redirects sends the
    // grant to the redirect's target. The layer cannot prevent that, but it does not
    // use the answer, and says why.
    let (endpoint, elsewhere) = redirecting_endpoint(307).await;
    let layer = EshopboxAuthLayer::builder(credentials())
        .token_url(&endpoint.url())
        .http_client(reqwest::Client::new())
        .build()
        .unwrap();
    let err = tokio::time::timeout(LIMIT, layer.handle().refresh())
        .await
        .expect("the refresh hangs")
        .unwrap_err();
    assert_eq!(elsewhere.posts(), 1);
    assert_eq!(err.kind(), ErrorKind::InvalidResponse, "{err}");
    assert!(err.to_string().contains("Policy::none()"), "{err}");
    assert!(layer.handle().token().is_none());
}
