//! One layer for many workspaces (`EshopboxAuthLayer::per_workspace`): each request
//! gets its own workspace's token and `ProxyHost`, every single-account guarantee
//! holds per workspace, the resolver is single-flight, and the map is bounded.

#![cfg(feature = "workspaces")]

mod support;

use std::collections::HashMap;
use std::convert::Infallible;
use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use eshopbox_auth::mock::MockEshopbox;
use eshopbox_auth::secrecy::ExposeSecret;
use eshopbox_auth::{
    Credentials, Error, ErrorKind, EshopboxAuthLayer, Workspace, WorkspaceAuthBuilder,
};
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use tower::{service_fn, BoxError, Layer, Service, ServiceExt};

use support::{full_report, within, Reply, TokenServer};

type Req = Request<Empty<Bytes>>;

/// What the test resolver returns.
type Lookup = std::pin::Pin<Box<dyn Future<Output = Result<Option<Credentials>, BoxError>> + Send>>;

/// A resolver over a fixed table, counting its calls per workspace.
#[derive(Clone, Default)]
struct Directory {
    known: Arc<Mutex<HashMap<String, Credentials>>>,
    calls: Arc<Mutex<HashMap<String, usize>>>,
    failing: Arc<Mutex<bool>>,
}

impl Directory {
    fn add(&self, workspace: &str, credentials: Credentials) {
        self.known
            .lock()
            .unwrap()
            .insert(workspace.to_owned(), credentials);
    }

    fn calls(&self, workspace: &str) -> usize {
        self.calls
            .lock()
            .unwrap()
            .get(workspace)
            .copied()
            .unwrap_or(0)
    }

    fn total_calls(&self) -> usize {
        self.calls.lock().unwrap().values().sum()
    }

    fn fail(&self, failing: bool) {
        *self.failing.lock().unwrap() = failing;
    }

    fn resolver(&self) -> impl Fn(Workspace) -> Lookup + Send + Sync + 'static {
        let directory = self.clone();
        move |workspace: Workspace| {
            let directory = directory.clone();
            Box::pin(async move {
                *directory
                    .calls
                    .lock()
                    .unwrap()
                    .entry(workspace.name().to_owned())
                    .or_default() += 1;
                // Give concurrent first requests time to pile up on the lookup.
                tokio::task::yield_now().await;
                if *directory.failing.lock().unwrap() {
                    return Err("database unreachable".into());
                }
                Ok(directory
                    .known
                    .lock()
                    .unwrap()
                    .get(workspace.name())
                    .cloned())
            })
        }
    }

    fn layer(&self) -> WorkspaceAuthBuilder {
        EshopboxAuthLayer::per_workspace(self.resolver())
    }
}

/// A request for `workspace` to `url`.
fn request_for(url: &str, workspace: &str) -> Req {
    let mut request = Request::get(url).body(Empty::new()).unwrap();
    request.extensions_mut().insert(Workspace::new(workspace));
    request
}

/// An inner service answering `<Authorization>|<ProxyHost>`, counting its calls.
fn echo(
    calls: Arc<AtomicUsize>,
) -> impl Service<Req, Response = Response<String>, Error = Infallible, Future = impl Send> + Clone + Send
{
    service_fn(move |req: Req| {
        calls.fetch_add(1, Ordering::SeqCst);
        let header = |name: &str| {
            req.headers()
                .get(name)
                .map(|v| v.to_str().unwrap().to_owned())
                .unwrap_or_default()
        };
        let body = format!("{}|{}", header("authorization"), header("proxyhost"));
        async move { Ok::<_, Infallible>(Response::new(body)) }
    })
}

fn kind(error: &BoxError) -> Option<ErrorKind> {
    error.downcast_ref::<Error>().map(Error::kind)
}

#[tokio::test]
async fn each_request_carries_its_own_workspaces_token_and_proxy_host() {
    let eshopbox = MockEshopbox::start().await.unwrap();
    let directory = Directory::default();
    let names = ["acme", "globex", "initech"];
    for name in names {
        directory.add(name, eshopbox.add_workspace(name));
    }
    let layer = directory
        .layer()
        .token_url(&eshopbox.token_url())
        .build()
        .unwrap();
    let client = Client::builder(TokioExecutor::new()).build_http::<Empty<Bytes>>();
    let client = layer.layer(client);

    // Interleaved, and concurrently: the mock answers 403 to a token sent with
    // another workspace's ProxyHost, 401 to an unknown token.
    let mut requests = Vec::new();
    for round in 0..5 {
        for name in names {
            let request = request_for(&eshopbox.url(&format!("/api/v1/orders/{round}")), name);
            let client = client.clone();
            requests.push(async move {
                let response = client.oneshot(request).await.unwrap();
                let status = response.status();
                let body = response.into_body().collect().await.unwrap().to_bytes();
                let body: serde_json::Value = serde_json::from_slice(&body).unwrap();
                (name, status, body["proxy_host"].as_str().map(str::to_owned))
            });
        }
    }
    for (name, status, proxy_host) in within(futures_join_all(requests)).await {
        assert_eq!(status, StatusCode::OK, "{name}");
        assert_eq!(proxy_host.as_deref(), Some(name));
    }
    assert_eq!(eshopbox.mismatches(), 0);
    assert_eq!(eshopbox.unauthorized(), 0);
    for name in names {
        assert_eq!(eshopbox.workspace_token_calls(name), 1, "{name}");
        assert_eq!(directory.calls(name), 1, "{name}");
    }
    // The tokens are the workspaces' own.
    let tokens: Vec<_> = names
        .iter()
        .map(|name| {
            let handle = layer.handle(&Workspace::new(*name)).expect("kept");
            handle
                .token()
                .expect("valid")
                .secret()
                .expose_secret()
                .to_owned()
        })
        .collect();
    assert_ne!(tokens[0], tokens[1]);
    assert_ne!(tokens[1], tokens[2]);
    assert_eq!(layer.workspaces(), 3);
}

/// Polls every future to completion (the futures crate is not a dependency).
async fn futures_join_all<F: Future + Send + 'static>(futures: Vec<F>) -> Vec<F::Output>
where
    F::Output: Send + 'static,
{
    let handles: Vec<_> = futures.into_iter().map(tokio::spawn).collect();
    let mut outputs = Vec::with_capacity(handles.len());
    for handle in handles {
        outputs.push(handle.await.unwrap());
    }
    outputs
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cold_bursts_make_one_lookup_and_one_token_call_per_workspace() {
    let eshopbox = MockEshopbox::start().await.unwrap();
    let directory = Directory::default();
    let names: Vec<String> = (0..50).map(|i| format!("shop-{i}")).collect();
    for name in &names {
        directory.add(name, eshopbox.add_workspace(name));
    }
    // Slow token answers, so that all requests arrive while the first call runs.
    for name in &names {
        eshopbox.set_workspace_token_delay(name, Duration::from_millis(200));
    }
    let layer = directory
        .layer()
        .token_url(&eshopbox.token_url())
        .build()
        .unwrap();
    let calls = Arc::new(AtomicUsize::new(0));
    let service = layer.layer(echo(calls.clone()));
    let mut requests = Vec::new();
    for name in &names {
        for _ in 0..100 {
            let request = request_for("https://api.myeshopbox.com/api/v1/orders", name);
            let service = service.clone();
            let name = name.clone();
            requests.push(async move {
                let response = service.oneshot(request).await.unwrap();
                (name, response.into_body())
            });
        }
    }
    let answers = within(futures_join_all(requests)).await;
    let mut tokens: HashMap<String, String> = HashMap::new();
    for (name, body) in answers {
        let (auth, proxy_host) = body.split_once('|').unwrap();
        assert_eq!(proxy_host, name);
        assert!(auth.starts_with("Bearer mock-access-"));
        // One token per workspace, and no other workspace's.
        let seen = tokens.entry(name).or_insert_with(|| auth.to_owned());
        assert_eq!(seen, auth);
    }
    let distinct: std::collections::HashSet<_> = tokens.values().collect();
    assert_eq!(distinct.len(), 50);
    for name in &names {
        assert_eq!(directory.calls(name), 1, "{name}");
        assert_eq!(eshopbox.workspace_token_calls(name), 1, "{name}");
    }
    assert_eq!(eshopbox.token_calls(), 50);
    assert_eq!(calls.load(Ordering::SeqCst), 5000);
}

#[tokio::test]
async fn requests_without_a_known_workspace_fail_before_the_inner_service() {
    let eshopbox = MockEshopbox::start().await.unwrap();
    let directory = Directory::default();
    directory.add("acme", eshopbox.add_workspace("acme"));
    let layer = directory
        .layer()
        .token_url(&eshopbox.token_url())
        .build()
        .unwrap();
    let calls = Arc::new(AtomicUsize::new(0));
    let service = layer.layer(echo(calls.clone()));
    let url = "https://api.myeshopbox.com/api/v1/orders";

    // No extension.
    let bare = Request::get(url).body(Empty::new()).unwrap();
    let err = service.clone().oneshot(bare).await.unwrap_err();
    assert_eq!(kind(&err), Some(ErrorKind::UnknownWorkspace));
    // Names that cannot be a header value: the resolver is not even asked.
    // Nor for a name longer than a DNS name may be; its error message shows only
    // the start of it.
    let long = "x".repeat(100_000);
    for bad in ["", "two words", "line\nbreak", "tab\there", &long] {
        let err = service
            .clone()
            .oneshot(request_for(url, bad))
            .await
            .unwrap_err();
        assert_eq!(kind(&err), Some(ErrorKind::UnknownWorkspace), "{bad:?}");
        assert!(err.to_string().len() < 400, "{err}");
    }
    // 253 bytes is still a name.
    let longest = "x".repeat(253);
    let err = service
        .clone()
        .oneshot(request_for(url, &longest))
        .await
        .unwrap_err();
    assert!(
        err.to_string().contains("the resolver does not know it"),
        "{err}"
    );
    assert_eq!(directory.total_calls(), 1);
    // The resolver does not know it.
    let err = service
        .clone()
        .oneshot(request_for(url, "hooli"))
        .await
        .unwrap_err();
    assert_eq!(kind(&err), Some(ErrorKind::UnknownWorkspace));
    assert!(err.to_string().contains("hooli"));
    assert_eq!(calls.load(Ordering::SeqCst), 0);
    assert_eq!(eshopbox.token_calls(), 0);
    assert_eq!(layer.workspaces(), 0, "an unknown workspace is not kept");
    // Asked again next time: an unknown answer is not remembered.
    let err = service
        .clone()
        .oneshot(request_for(url, "hooli"))
        .await
        .unwrap_err();
    assert_eq!(kind(&err), Some(ErrorKind::UnknownWorkspace));
    assert_eq!(directory.calls("hooli"), 2);
}

#[tokio::test]
async fn a_failed_lookup_is_unavailable_with_its_source_and_not_remembered() {
    let eshopbox = MockEshopbox::start().await.unwrap();
    let directory = Directory::default();
    directory.add("acme", eshopbox.add_workspace("acme"));
    let layer = directory
        .layer()
        .token_url(&eshopbox.token_url())
        .build()
        .unwrap();
    let calls = Arc::new(AtomicUsize::new(0));
    let service = layer.layer(echo(calls.clone()));
    let url = "https://api.myeshopbox.com/api/v1/orders";

    directory.fail(true);
    let err = service
        .clone()
        .oneshot(request_for(url, "acme"))
        .await
        .unwrap_err();
    assert_eq!(kind(&err), Some(ErrorKind::Unavailable));
    let source = std::error::Error::source(err.downcast_ref::<Error>().unwrap())
        .expect("the resolver's error is attached");
    assert_eq!(source.to_string(), "database unreachable");
    assert_eq!(calls.load(Ordering::SeqCst), 0);

    directory.fail(false);
    let response = service
        .clone()
        .oneshot(request_for(url, "acme"))
        .await
        .unwrap();
    assert!(response.body().ends_with("|acme"));
    assert_eq!(directory.calls("acme"), 2);
    assert_eq!(eshopbox.workspace_token_calls("acme"), 1);
}

/// A resolver answering `credentials`, whose first lookup runs `first` before it
/// answers; and the count of its lookups.
fn resolver_with_first<F>(
    credentials: Credentials,
    first: impl Fn() -> F + Send + Sync + 'static,
) -> (
    impl Fn(Workspace) -> Lookup + Send + Sync + 'static,
    Arc<AtomicUsize>,
)
where
    F: Future<Output = ()> + Send + 'static,
{
    let lookups = Arc::new(AtomicUsize::new(0));
    let counted = lookups.clone();
    let resolver = move |_: Workspace| -> Lookup {
        let before = (counted.fetch_add(1, Ordering::SeqCst) == 0).then(&first);
        let credentials = credentials.clone();
        Box::pin(async move {
            if let Some(before) = before {
                before.await;
            }
            Ok(Some(credentials))
        })
    };
    (resolver, lookups)
}

#[tokio::test]
async fn a_lookup_that_hangs_fails_at_the_token_timeout_and_is_not_remembered() {
    let eshopbox = MockEshopbox::start().await.unwrap();
    let (resolver, lookups) =
        resolver_with_first(eshopbox.add_workspace("acme"), std::future::pending::<()>);
    let layer = EshopboxAuthLayer::per_workspace(resolver)
        .token_url(&eshopbox.token_url())
        .token_timeout(Duration::from_secs(1))
        .build()
        .unwrap();
    let service = layer.layer(echo(Arc::default()));
    let url = "https://api.myeshopbox.com/api/v1/orders";
    let start = tokio::time::Instant::now();
    let err = within(service.clone().oneshot(request_for(url, "acme")))
        .await
        .unwrap_err();
    assert_eq!(kind(&err), Some(ErrorKind::Unavailable));
    assert!(
        full_report(&err).contains("token timeout of 1s"),
        "{}",
        full_report(&err)
    );
    assert!(start.elapsed() >= Duration::from_secs(1));
    // The next request asks the (now healthy) resolver again.
    let response = service
        .clone()
        .oneshot(request_for(url, "acme"))
        .await
        .unwrap();
    assert!(response.body().ends_with("|acme"));
    assert_eq!(lookups.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn unusable_credentials_from_the_resolver_fail_with_a_config_error_naming_the_workspace() {
    let directory = Directory::default();
    directory.add(
        "acme",
        eshopbox_auth::Credentials::new(support::CLIENT_ID, "", support::REFRESH_TOKEN),
    );
    let layer = directory.layer().build().unwrap();
    let service = layer.layer(echo(Arc::default()));
    let url = "https://api.myeshopbox.com/x";
    for _ in 0..2 {
        let err = within(service.clone().oneshot(request_for(url, "acme")))
            .await
            .unwrap_err();
        assert_eq!(kind(&err), Some(ErrorKind::Config));
        let report = full_report(&err);
        assert!(report.contains("workspace acme"), "{report}");
        assert!(report.contains("client_secret is empty"), "{report}");
    }
    // Not remembered: each request asked the resolver.
    assert_eq!(directory.calls("acme"), 2);
    assert_eq!(layer.workspaces(), 0);
}

#[test]
fn outside_a_tokio_runtime_a_request_fails_with_a_config_error() {
    let directory = Directory::default();
    directory.add("acme", support::credentials());
    let layer = directory.layer().build().unwrap();
    let mut service = layer.layer(echo(Arc::default()));
    let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
    assert!(service.poll_ready(&mut cx).is_ready());
    let mut future =
        std::pin::pin!(service.call(request_for("https://api.myeshopbox.com/x", "acme")));
    match future.as_mut().poll(&mut cx) {
        std::task::Poll::Ready(Err(err)) => {
            assert_eq!(kind(&err), Some(ErrorKind::Config), "{}", full_report(&err));
            assert!(full_report(&err).contains("no tokio runtime"));
        }
        std::task::Poll::Ready(Ok(_)) => panic!("served without a runtime"),
        std::task::Poll::Pending => panic!("waits for a lookup no runtime runs"),
    }
    assert_eq!(directory.calls("acme"), 0);
    assert_eq!(layer.workspaces(), 0);
}

#[tokio::test]
async fn a_resolver_that_panics_fails_the_lookup_and_leaves_nothing_behind() {
    let eshopbox = MockEshopbox::start().await.unwrap();
    let (resolver, lookups) = resolver_with_first(eshopbox.add_workspace("acme"), || async {
        panic!("the resolver's bug");
    });
    let layer = EshopboxAuthLayer::per_workspace(resolver)
        .token_url(&eshopbox.token_url())
        .build()
        .unwrap();
    let service = layer.layer(echo(Arc::default()));
    let url = "https://api.myeshopbox.com/api/v1/orders";
    let err = within(service.clone().oneshot(request_for(url, "acme")))
        .await
        .unwrap_err();
    assert_eq!(kind(&err), Some(ErrorKind::Unavailable));
    assert!(
        full_report(&err).contains("credentials lookup for workspace acme panicked"),
        "{}",
        full_report(&err)
    );
    // Not remembered: the map keeps nothing, and the next request asks again.
    assert_eq!(layer.workspaces(), 0);
    let response = within(service.clone().oneshot(request_for(url, "acme")))
        .await
        .unwrap();
    assert!(response.body().ends_with("|acme"));
    assert_eq!(lookups.load(Ordering::SeqCst), 2);
    assert_eq!(layer.workspaces(), 1);
    assert_eq!(eshopbox.token_calls(), 1);
}

#[tokio::test]
async fn the_destination_guard_applies_to_every_workspace() {
    let eshopbox = MockEshopbox::start().await.unwrap();
    let directory = Directory::default();
    directory.add("acme", eshopbox.add_workspace("acme"));
    let layer = directory
        .layer()
        .token_url(&eshopbox.token_url())
        .build()
        .unwrap();
    let calls = Arc::new(AtomicUsize::new(0));
    let service = layer.layer(echo(calls.clone()));

    // Cold: refused before any lookup or token call.
    let err = service
        .clone()
        .oneshot(request_for("https://attacker.example/steal", "acme"))
        .await
        .unwrap_err();
    assert_eq!(kind(&err), Some(ErrorKind::UntrustedDestination));
    assert_eq!(directory.total_calls(), 0);
    assert_eq!(eshopbox.token_calls(), 0);
    // Warm: still refused.
    service
        .clone()
        .oneshot(request_for("https://api.myeshopbox.com/x", "acme"))
        .await
        .unwrap();
    let err = service
        .clone()
        .oneshot(request_for("http://api.myeshopbox.com/x", "acme"))
        .await
        .unwrap_err();
    assert_eq!(kind(&err), Some(ErrorKind::UntrustedDestination));
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    assert_eq!(layer.refused(), 2);
}

#[tokio::test]
async fn a_401_invalidates_only_that_workspaces_token_and_resends_once() {
    let eshopbox = MockEshopbox::start().await.unwrap();
    let directory = Directory::default();
    for name in ["acme", "globex"] {
        directory.add(name, eshopbox.add_workspace(name));
    }
    let layer = directory
        .layer()
        .token_url(&eshopbox.token_url())
        .build()
        .unwrap();
    let client = Client::builder(TokioExecutor::new()).build_http::<Empty<Bytes>>();
    let client = layer.layer(client);
    let send = |name: &'static str| {
        let request = request_for(&eshopbox.url("/api/v1/orders"), name);
        client.clone().oneshot(request)
    };
    for name in ["acme", "globex"] {
        assert_eq!(send(name).await.unwrap().status(), StatusCode::OK);
    }
    eshopbox.revoke_tokens();

    // acme's request is refused once, acme gets a new token, the request is resent.
    assert_eq!(send("acme").await.unwrap().status(), StatusCode::OK);
    assert_eq!(eshopbox.unauthorized(), 1);
    assert_eq!(eshopbox.workspace_token_calls("acme"), 2);
    // globex's token was not touched: it still holds its first (revoked) one.
    assert_eq!(eshopbox.workspace_token_calls("globex"), 1);
    let globex = layer.handle(&Workspace::new("globex")).unwrap();
    assert_eq!(globex.stats().invalidations, 0);
    assert_eq!(send("globex").await.unwrap().status(), StatusCode::OK);
    assert_eq!(eshopbox.workspace_token_calls("globex"), 2);
    assert_eq!(globex.stats().invalidations, 1);
    assert_eq!(globex.stats().resends, 1);
    assert_eq!(eshopbox.mismatches(), 0);
}

#[tokio::test]
async fn a_slow_or_rejected_workspace_neither_delays_nor_fails_another() {
    let eshopbox = MockEshopbox::start().await.unwrap();
    let directory = Directory::default();
    for name in ["slow", "fast"] {
        directory.add(name, eshopbox.add_workspace(name));
    }
    directory.add(
        "rejected",
        Credentials::new("mock-client-slow", "wrong", "wrong"),
    );
    eshopbox.set_workspace_token_delay("slow", Duration::from_secs(3600));
    let layer = directory
        .layer()
        .token_url(&eshopbox.token_url())
        .token_timeout(Duration::from_secs(3600))
        .attempt_timeout(Duration::from_secs(3600))
        .build()
        .unwrap();
    let calls = Arc::new(AtomicUsize::new(0));
    let service = layer.layer(echo(calls.clone()));
    let url = "https://api.myeshopbox.com/api/v1/orders";

    let slow = tokio::spawn(service.clone().oneshot(request_for(url, "slow")));
    // The slow workspace's token call has started (and hangs).
    within(async {
        while eshopbox.workspace_token_calls("slow") == 0 {
            tokio::task::yield_now().await;
        }
    })
    .await;
    let fast = within(service.clone().oneshot(request_for(url, "fast")))
        .await
        .unwrap();
    assert!(fast.body().ends_with("|fast"));
    let err = within(service.clone().oneshot(request_for(url, "rejected")))
        .await
        .unwrap_err();
    assert_eq!(kind(&err), Some(ErrorKind::Rejected));
    // The rejection is remembered for that workspace only (failure cooldown): no
    // new token call, and the fast workspace is still served.
    let before = eshopbox.token_calls();
    let err = within(service.clone().oneshot(request_for(url, "rejected")))
        .await
        .unwrap_err();
    assert_eq!(kind(&err), Some(ErrorKind::Rejected));
    assert_eq!(eshopbox.token_calls(), before);
    within(service.clone().oneshot(request_for(url, "fast")))
        .await
        .unwrap();
    assert!(!slow.is_finished(), "the slow workspace is still waiting");
    slow.abort();
}

#[tokio::test]
async fn forget_drops_a_workspace_and_its_next_request_resolves_again() {
    let eshopbox = MockEshopbox::start().await.unwrap();
    let directory = Directory::default();
    for name in ["acme", "globex"] {
        directory.add(name, eshopbox.add_workspace(name));
    }
    let layer = directory
        .layer()
        .token_url(&eshopbox.token_url())
        .build()
        .unwrap();
    let service = layer.layer(echo(Arc::default()));
    let url = "https://api.myeshopbox.com/api/v1/orders";
    for name in ["acme", "globex"] {
        service
            .clone()
            .oneshot(request_for(url, name))
            .await
            .unwrap();
    }
    assert_eq!(layer.workspaces(), 2);
    let acme = Workspace::new("acme");
    let handle = layer.handle(&acme).unwrap();
    let mut changes = handle.subscribe();
    assert!(changes.borrow_and_update().is_some());

    assert!(layer.forget(&acme));
    assert!(!layer.forget(&acme), "already gone");
    assert!(layer.handle(&acme).is_none());
    assert!(handle.token().is_none(), "its token was dropped at once");
    assert_eq!(layer.workspaces(), 1);
    assert!(layer.handle(&Workspace::new("globex")).is_some());

    service
        .clone()
        .oneshot(request_for(url, "acme"))
        .await
        .unwrap();
    assert_eq!(directory.calls("acme"), 2);
    assert_eq!(eshopbox.workspace_token_calls("acme"), 2);
    assert_eq!(directory.calls("globex"), 1);
}

// Multi-thread runtimes: there each token has a phase timer (a task), which must end
// with its workspace.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_map_is_bounded_and_every_workspace_is_served_anyway() {
    bounded_map(true).await;
}

/// With retry off, warm requests are sent from the front map's snapshot of the
/// token: an evicted workspace's snapshot (its token, and so the token's phase
/// timer) must end with the workspace too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_retry_off_the_map_is_bounded_and_evicted_workspaces_snapshots_end() {
    bounded_map(false).await;
}

async fn bounded_map(retry: bool) {
    let server = TokenServer::counting(86400).await;
    let directory = Directory::default();
    let names: Vec<String> = (0..200).map(|i| format!("shop-{i}")).collect();
    for name in &names {
        directory.add(name, support::credentials());
    }
    let layer = directory
        .layer()
        .token_url(&server.url())
        .max_workspaces(10)
        .background_refresh(true)
        .retry_on_unauthorized(retry)
        .build()
        .unwrap();
    let service = layer.layer(echo(Arc::default()));
    let tasks = || {
        tokio::runtime::Handle::current()
            .metrics()
            .num_alive_tasks()
    };
    let before = tasks();
    for name in &names {
        // With retry off the second request puts a snapshot of the token in the
        // front map and the third is sent from it.
        for _ in 0..if retry { 1 } else { 3 } {
            let response = service
                .clone()
                .oneshot(request_for("https://api.myeshopbox.com/x", name))
                .await
                .unwrap();
            assert!(response.body().ends_with(&format!("|{name}")));
        }
    }
    assert!(layer.workspaces() <= 10, "{} kept", layer.workspaces());
    assert!(layer.evictions() >= 190);
    assert_eq!(directory.total_calls(), 200);
    // A dropped workspace's timers and background refresher end with it: what is
    // left is the kept workspaces' (a phase timer and a refresher each) and the
    // token server's open connections (a handful), far from the 400 that 200
    // workspaces would leave.
    within(async {
        // Each look at the map also runs its pending housekeeping.
        while layer.workspaces() > 0 && tasks() > before + 2 * 10 + 16 {
            tokio::task::yield_now().await;
        }
    })
    .await;
}

#[tokio::test]
async fn an_idle_workspace_is_dropped_and_resolved_again() {
    let server = TokenServer::counting(86400).await;
    let directory = Directory::default();
    directory.add("acme", support::credentials());
    let layer = directory
        .layer()
        .token_url(&server.url())
        .idle_timeout(Duration::from_millis(50))
        .build()
        .unwrap();
    let service = layer.layer(echo(Arc::default()));
    let url = "https://api.myeshopbox.com/x";
    service
        .clone()
        .oneshot(request_for(url, "acme"))
        .await
        .unwrap();
    // Resolved once. (Whether it is still in the map depends on how fast this line
    // follows the request: 50 ms idle and it is dropped.)
    assert_eq!(directory.calls("acme"), 1);
    // The cache's clock is real time: poll until it has dropped the idle workspace.
    // Without any request or look at the map (`evictions` only reads a counter): the
    // layer's janitor runs the cache's housekeeping.
    within(async {
        while layer.evictions() == 0 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    assert_eq!(layer.workspaces(), 0);
    service
        .clone()
        .oneshot(request_for(url, "acme"))
        .await
        .unwrap();
    assert_eq!(directory.calls("acme"), 2);
    assert_eq!(server.posts(), 2);
}

#[tokio::test]
async fn rotated_refresh_tokens_are_reported_with_their_workspace() {
    // Answers each client with a new refresh token naming that client.
    let server = TokenServer::start_seeing(|n, seen| {
        let body: serde_json::Value = serde_json::from_slice(&seen.body).unwrap();
        let client = body["client_id"].as_str().unwrap().to_owned();
        Reply::json(
            200,
            &format!(
                r#"{{"access_token":"tok-{n}","refresh_token":"rotated-for-{client}","expires_in":86400,"token_type":"Bearer"}}"#
            ),
        )
    })
    .await;
    let directory = Directory::default();
    for name in ["acme", "globex"] {
        directory.add(
            name,
            Credentials::new(format!("client-{name}"), "secret", "rt"),
        );
    }
    let reported = Arc::new(Mutex::new(Vec::new()));
    let sink = reported.clone();
    let layer = directory
        .layer()
        .token_url(&server.url())
        .on_refresh_token_rotated(move |workspace, token| {
            sink.lock().unwrap().push((
                workspace.name().to_owned(),
                token.expose_secret().to_owned(),
            ));
        })
        .build()
        .unwrap();
    let service = layer.layer(echo(Arc::default()));
    for name in ["acme", "globex"] {
        service
            .clone()
            .oneshot(request_for("https://api.myeshopbox.com/x", name))
            .await
            .unwrap();
    }
    let mut reported = reported.lock().unwrap().clone();
    reported.sort();
    assert_eq!(
        reported,
        [
            ("acme".to_owned(), "rotated-for-client-acme".to_owned()),
            ("globex".to_owned(), "rotated-for-client-globex".to_owned()),
        ]
    );
}

#[tokio::test]
async fn debug_output_shows_no_secret() {
    let eshopbox = MockEshopbox::start().await.unwrap();
    let directory = Directory::default();
    let credentials = eshopbox.add_workspace("acme");
    directory.add("acme", credentials);
    let layer = directory
        .layer()
        .token_url(&eshopbox.token_url())
        .build()
        .unwrap();
    let service = layer.layer(echo(Arc::default()));
    let response = service
        .clone()
        .oneshot(request_for("https://api.myeshopbox.com/x", "acme"))
        .await
        .unwrap();
    let token = response
        .body()
        .split_once('|')
        .unwrap()
        .0
        .trim_start_matches("Bearer ")
        .to_owned();
    let shown = format!("{layer:?} {:?}", layer.handle(&Workspace::new("acme")));
    assert!(!shown.contains(&token), "{shown}");
    assert!(!shown.contains("mock-secret-"), "{shown}");
    assert!(!shown.contains("mock-refresh-"), "{shown}");
    let builder = format!("{:?}", directory.layer());
    assert!(!builder.contains("secret-"), "{builder}");
}

#[test]
fn bad_map_bounds_are_refused() {
    let directory = Directory::default();
    let err = directory.layer().max_workspaces(0).build().unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Config);
    assert!(err.to_string().contains("max_workspaces"));
    let err = directory
        .layer()
        .idle_timeout(Duration::ZERO)
        .build()
        .unwrap_err();
    assert!(err.to_string().contains("idle_timeout"));
    // "Never" as `Duration::MAX` used to panic inside the cache's builder.
    let err = directory
        .layer()
        .idle_timeout(Duration::MAX)
        .build()
        .unwrap_err();
    assert!(err.to_string().contains("at most a year"), "{err}");
    let err = directory
        .layer()
        .token_url("http://example.com/t")
        .build()
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Config);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_sharing_an_in_process_store_make_one_token_call_per_workspace() {
    let store = eshopbox_auth::store::InProcessStore::new();
    support::workspaces::one_token_call_per_workspace(|| store.clone(), 3, 5).await;
}

#[test]
fn a_store_that_cannot_keep_workspaces_apart_is_refused() {
    /// A store that keeps one token for everyone (the trait's default).
    struct Single(eshopbox_auth::store::InProcessStore);
    impl eshopbox_auth::store::TokenStore for Single {
        fn load(
            &self,
        ) -> eshopbox_auth::source::BoxFuture<
            '_,
            Result<Option<eshopbox_auth::store::SharedToken>, Error>,
        > {
            self.0.load()
        }
        fn save<'a>(
            &'a self,
            token: &'a eshopbox_auth::store::SharedToken,
        ) -> eshopbox_auth::source::BoxFuture<'a, Result<(), Error>> {
            self.0.save(token)
        }
        fn remove(&self, id: u64) -> eshopbox_auth::source::BoxFuture<'_, Result<bool, Error>> {
            self.0.remove(id)
        }
        fn try_lock<'a>(
            &'a self,
            owner: &'a str,
            lease: Duration,
        ) -> eshopbox_auth::source::BoxFuture<'a, Result<bool, Error>> {
            self.0.try_lock(owner, lease)
        }
        fn unlock<'a>(
            &'a self,
            owner: &'a str,
        ) -> eshopbox_auth::source::BoxFuture<'a, Result<(), Error>> {
            self.0.unlock(owner)
        }
        fn load_refresh_token(
            &self,
        ) -> eshopbox_auth::source::BoxFuture<
            '_,
            Result<Option<eshopbox_auth::store::SharedRefreshToken>, Error>,
        > {
            self.0.load_refresh_token()
        }
        fn save_refresh_token<'a>(
            &'a self,
            refresh_token: &'a eshopbox_auth::store::SharedRefreshToken,
            replaces: Option<u64>,
        ) -> eshopbox_auth::source::BoxFuture<'a, Result<bool, Error>> {
            self.0.save_refresh_token(refresh_token, replaces)
        }
    }
    let err = Directory::default()
        .layer()
        .token_store(Single(eshopbox_auth::store::InProcessStore::new()))
        .build()
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Config);
    assert!(err.to_string().contains("workspaces apart"), "{err}");
}

// Single-account guarantees, per workspace --------------------------------------
//
// The token calls go over loopback sockets, so these tests run on the real clock;
// to reach a token's soft window they pause it, move it on by the hour and resume it
// (the token cell measures lifetimes on tokio's clock; the map's idle clock is real
// time and does not move).

/// Moves tokio's clock on by `by` at once, lets the tasks the timers on the way woke
/// run (the token's phase timer among them), then lets the clock run in real time again.
async fn jump(by: Duration) {
    tokio::time::pause();
    tokio::time::advance(by).await;
    for _ in 0..4 {
        tokio::task::yield_now().await;
    }
    tokio::time::resume();
}

/// Waits (bounded) until `done` holds, letting the runtime's tasks and sockets run.
async fn until(mut done: impl FnMut() -> bool) {
    within(async {
        while !done() {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    })
    .await;
}

/// The response future's first poll must complete: the request did not wait.
fn served_at_once<F, T>(future: F) -> T
where
    F: Future<Output = Result<T, BoxError>>,
{
    let mut task = tokio_test::task::spawn(future);
    match task.poll() {
        std::task::Poll::Ready(result) => result.unwrap(),
        std::task::Poll::Pending => panic!("the request waited"),
    }
}

#[tokio::test]
async fn a_request_in_a_workspaces_soft_window_is_served_at_once_while_one_refresh_runs() {
    let server = TokenServer::counting(3600).await;
    let directory = Directory::default();
    directory.add("acme", support::credentials());
    let layer = directory
        .layer()
        .token_url(&server.url())
        .refresh_margin(Duration::from_secs(300))
        .build()
        .unwrap();
    let service = layer.layer(echo(Arc::default()));
    let url = "https://api.myeshopbox.com/x";
    let response = within(service.clone().oneshot(request_for(url, "acme")))
        .await
        .unwrap();
    assert_eq!(response.body(), "Bearer tok-1|acme");
    let handle = layer.handle(&Workspace::new("acme")).unwrap();

    // Into the soft window (margin 300 s, jitter ≤ 30 s).
    jump(Duration::from_secs(3600 - 200)).await;
    // Every request, including the one that noticed, completes on its first poll
    // with the old token; the refresh runs beside them.
    for _ in 0..20 {
        let response = served_at_once(service.clone().oneshot(request_for(url, "acme")));
        assert_eq!(response.body(), "Bearer tok-1|acme");
    }
    let mut changes = handle.subscribe();
    within(changes.wait_for(|info| info.is_some_and(|i| i.generation >= 2)))
        .await
        .unwrap();
    assert_eq!(server.posts(), 2, "exactly one refresh");
    let response = within(service.clone().oneshot(request_for(url, "acme")))
        .await
        .unwrap();
    assert_eq!(response.body(), "Bearer tok-2|acme");
    assert_eq!(directory.calls("acme"), 1);
}

#[tokio::test]
async fn a_failed_early_refresh_keeps_the_workspaces_valid_token_and_backs_off() {
    failed_early_refresh(true).await;
}

/// With retry off, warm requests are sent from the map's snapshot of the token: the
/// backed-off token (a copy the cell installs without announcing a change) and the
/// next one must reach them all the same.
#[tokio::test]
async fn with_retry_off_a_failed_early_refresh_keeps_the_workspaces_valid_token_and_backs_off() {
    failed_early_refresh(false).await;
}

async fn failed_early_refresh(retry: bool) {
    // tok-1, then a rejection, then tok-3.
    let server = TokenServer::start(|n| match n {
        2 => Reply::json(400, r#"{"error":"invalid_grant"}"#),
        n => Reply::token(&format!("tok-{n}"), 3600),
    })
    .await;
    let directory = Directory::default();
    directory.add("acme", support::credentials());
    directory.add("globex", support::credentials());
    let layer = directory
        .layer()
        .token_url(&server.url())
        .refresh_margin(Duration::from_secs(300))
        .retry_on_unauthorized(retry)
        .build()
        .unwrap();
    let service = layer.layer(echo(Arc::default()));
    let url = "https://api.myeshopbox.com/x";
    let send = |name: &'static str| within(service.clone().oneshot(request_for(url, name)));
    assert_eq!(send("acme").await.unwrap().body(), "Bearer tok-1|acme");
    let handle = layer.handle(&Workspace::new("acme")).unwrap();

    jump(Duration::from_secs(3600 - 200)).await;
    assert_eq!(send("acme").await.unwrap().body(), "Bearer tok-1|acme");
    until(|| handle.stats().failures_rejected == 1).await;
    assert_eq!(server.posts(), 2);
    // The failure left tok-1 in place, and the next attempt is not made at once.
    for _ in 0..10 {
        assert_eq!(send("acme").await.unwrap().body(), "Bearer tok-1|acme");
    }
    assert_eq!(server.posts(), 2);
    // Another workspace is not held back by acme's failure.
    assert_eq!(send("globex").await.unwrap().body(), "Bearer tok-3|globex");

    // After the back-off (half the remaining 200 s, capped at 30 s), acme tries again.
    jump(Duration::from_secs(31)).await;
    assert_eq!(send("acme").await.unwrap().body(), "Bearer tok-1|acme");
    let mut changes = handle.subscribe();
    within(changes.wait_for(|info| info.is_some_and(|i| i.generation >= 2)))
        .await
        .unwrap();
    assert_eq!(server.posts(), 4);
    assert_eq!(send("acme").await.unwrap().body(), "Bearer tok-4|acme");
}

/// With retry off, a warm request is sent from the map's snapshot of its workspace's
/// token; every change of that token (invalidation, forced refresh, the soft window's
/// refresh, `forget`) reaches the next request, and never another workspace's.
#[tokio::test]
async fn with_retry_off_every_change_of_a_workspaces_token_reaches_its_next_request() {
    let server = TokenServer::counting(3600).await;
    let directory = Directory::default();
    directory.add("acme", support::credentials());
    directory.add("globex", support::credentials());
    let layer = directory
        .layer()
        .token_url(&server.url())
        .refresh_margin(Duration::from_secs(300))
        .retry_on_unauthorized(false)
        .build()
        .unwrap();
    let service = layer.layer(echo(Arc::default()));
    let url = "https://api.myeshopbox.com/x";
    let send = |name: &'static str| within(service.clone().oneshot(request_for(url, name)));
    let at_once =
        |name: &'static str| served_at_once(service.clone().oneshot(request_for(url, name)));
    let acme = Workspace::new("acme");

    assert_eq!(send("acme").await.unwrap().body(), "Bearer tok-1|acme");
    assert_eq!(send("globex").await.unwrap().body(), "Bearer tok-2|globex");
    for _ in 0..3 {
        assert_eq!(at_once("acme").body(), "Bearer tok-1|acme");
        assert_eq!(at_once("globex").body(), "Bearer tok-2|globex");
    }

    // Invalidated (as after a 401): the next request waits for a new token.
    let handle = layer.handle(&acme).unwrap();
    assert!(handle.invalidate());
    assert_eq!(send("acme").await.unwrap().body(), "Bearer tok-3|acme");
    assert_eq!(at_once("acme").body(), "Bearer tok-3|acme");
    assert_eq!(at_once("globex").body(), "Bearer tok-2|globex");

    // A refresh forced through the handle.
    within(handle.refresh()).await.unwrap();
    assert_eq!(at_once("acme").body(), "Bearer tok-4|acme");
    assert_eq!(at_once("acme").body(), "Bearer tok-4|acme");

    // Into the soft window (margin 300 s, jitter ≤ 30 s) of both workspaces' tokens:
    // served at once with the old token, one refresh each, then the new tokens.
    jump(Duration::from_secs(3600 - 200)).await;
    assert_eq!(at_once("acme").body(), "Bearer tok-4|acme");
    let mut changes = handle.subscribe();
    within(changes.wait_for(|info| info.is_some_and(|i| i.generation >= 4)))
        .await
        .unwrap();
    assert_eq!(at_once("acme").body(), "Bearer tok-5|acme");
    assert_eq!(at_once("acme").body(), "Bearer tok-5|acme");
    assert_eq!(server.posts(), 5);

    // Forgotten: resolved again, with a token of its own.
    assert!(layer.forget(&acme));
    assert_eq!(send("acme").await.unwrap().body(), "Bearer tok-6|acme");
    assert_eq!(at_once("acme").body(), "Bearer tok-6|acme");
    assert_eq!(directory.calls("acme"), 2);
    assert_eq!(directory.calls("globex"), 1);
}

/// With retry off the front map's node holds a snapshot of the token: a forgotten
/// workspace's token (whose phase timer is a task that ends with it) is dropped at
/// once all the same, not when the map gets round to freeing removed nodes. (On a
/// multi-thread runtime: a current-thread one reads the clock, with no timer.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_retry_off_a_forgotten_workspaces_token_is_dropped_at_once() {
    let server = TokenServer::counting(86400).await;
    let directory = Directory::default();
    directory.add("acme", support::credentials());
    let layer = directory
        .layer()
        .token_url(&server.url())
        .retry_on_unauthorized(false)
        .build()
        .unwrap();
    let service = layer.layer(echo(Arc::default()));
    let url = "https://api.myeshopbox.com/x";
    // The second request puts the snapshot in the map, the third is sent from it.
    for _ in 0..3 {
        let response = within(service.clone().oneshot(request_for(url, "acme")))
            .await
            .unwrap();
        assert_eq!(response.body(), "Bearer tok-1|acme");
    }
    let tasks = || {
        tokio::runtime::Handle::current()
            .metrics()
            .num_alive_tasks()
    };
    let before = tasks();
    assert!(layer.forget(&Workspace::new("acme")));
    // Nothing but the token cell and the map's node held the token; its phase timer
    // ends as soon as it is dropped.
    within(async {
        while tasks() >= before {
            tokio::task::yield_now().await;
        }
    })
    .await;
}

#[tokio::test]
async fn dropping_the_requests_that_started_a_workspaces_lookup_and_token_call_aborts_neither() {
    // The token answer comes late, so the requests can be dropped while it is awaited.
    let server = TokenServer::start(|n| {
        Reply::token(&format!("tok-{n}"), 86400).after(Duration::from_millis(500))
    })
    .await;
    let gate = Arc::new(tokio::sync::Semaphore::new(0));
    let resolver_calls = Arc::new(AtomicUsize::new(0));
    let layer = {
        let gate = gate.clone();
        let resolver_calls = resolver_calls.clone();
        EshopboxAuthLayer::per_workspace(move |_workspace: Workspace| {
            let gate = gate.clone();
            resolver_calls.fetch_add(1, Ordering::SeqCst);
            async move {
                gate.acquire().await.unwrap().forget();
                Ok::<_, BoxError>(Some(support::credentials()))
            }
        })
        .token_url(&server.url())
        .build()
        .unwrap()
    };
    let service = layer.layer(echo(Arc::default()));
    let url = "https://api.myeshopbox.com/x";
    let spawn = || tokio::spawn(service.clone().oneshot(request_for(url, "acme")));

    // The first request starts the lookup, the others join it; all are dropped.
    let first = spawn();
    until(|| resolver_calls.load(Ordering::SeqCst) == 1).await;
    let others: Vec<_> = (0..9).map(|_| spawn()).collect();
    first.abort();
    assert!(first.await.unwrap_err().is_cancelled());
    for other in &others {
        other.abort();
    }
    for other in others {
        assert!(other.await.unwrap_err().is_cancelled());
    }
    // The lookup goes on without them and the workspace is kept.
    gate.add_permits(1);
    until(|| layer.handle(&Workspace::new("acme")).is_some()).await;

    // The request that starts the token call is dropped too, with those waiting on it.
    let first = spawn();
    until(|| server.posts() == 1).await;
    let others: Vec<_> = (0..9).map(|_| spawn()).collect();
    first.abort();
    for other in &others {
        other.abort();
    }
    let handle = layer.handle(&Workspace::new("acme")).unwrap();
    let mut changes = handle.subscribe();
    within(changes.wait_for(|info| info.is_some()))
        .await
        .unwrap();

    let response = within(spawn()).await.unwrap().unwrap();
    assert_eq!(response.body(), "Bearer tok-1|acme");
    assert_eq!(server.posts(), 1);
    assert_eq!(resolver_calls.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn concurrent_401s_for_one_workspace_cause_one_refresh() {
    const N: usize = 50;
    let server = TokenServer::counting(86400).await;
    let directory = Directory::default();
    directory.add("acme", support::credentials());
    let layer = directory.layer().token_url(&server.url()).build().unwrap();
    // Once armed, answers 401 to tok-1: the first half of the refused requests all
    // together (a barrier the test joins once all N were sent), the other half only
    // when the test lets them, after the new token is in. All carry tok-1.
    let armed = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let early = Arc::new(tokio::sync::Barrier::new(N / 2 + 1));
    let late = Arc::new(tokio::sync::Semaphore::new(0));
    let refused = Arc::new(AtomicUsize::new(0));
    let calls = Arc::new(AtomicUsize::new(0));
    let api = {
        let (armed, early, late) = (armed.clone(), early.clone(), late.clone());
        let (refused, calls) = (refused.clone(), calls.clone());
        service_fn(move |req: Req| {
            calls.fetch_add(1, Ordering::SeqCst);
            let auth = req.headers()["authorization"].to_str().unwrap().to_owned();
            let refuse = armed.load(Ordering::SeqCst) && auth == "Bearer tok-1";
            let nth = if refuse {
                refused.fetch_add(1, Ordering::SeqCst)
            } else {
                0
            };
            let (early, late) = (early.clone(), late.clone());
            async move {
                let mut response = Response::new(auth);
                if refuse {
                    if nth < N / 2 {
                        early.wait().await;
                    } else {
                        late.acquire().await.unwrap().forget();
                    }
                    *response.status_mut() = StatusCode::UNAUTHORIZED;
                }
                Ok::<_, Infallible>(response)
            }
        })
    };
    let service = layer.layer(api);
    let url = "https://api.myeshopbox.com/x";
    let response = within(service.clone().oneshot(request_for(url, "acme")))
        .await
        .unwrap();
    assert_eq!(response.body(), "Bearer tok-1");
    let handle = layer.handle(&Workspace::new("acme")).unwrap();
    armed.store(true, Ordering::SeqCst);

    let requests: Vec<_> = (0..N)
        .map(|_| tokio::spawn(service.clone().oneshot(request_for(url, "acme"))))
        .collect();
    until(|| refused.load(Ordering::SeqCst) == N).await;
    within(early.wait()).await;
    let mut changes = handle.subscribe();
    within(changes.wait_for(|info| info.is_some_and(|i| i.generation >= 2)))
        .await
        .unwrap();
    // The late 401s for tok-1 must not drop tok-2.
    late.add_permits(N);
    for request in requests {
        let response = within(request).await.unwrap().unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(response.body(), "Bearer tok-2");
    }
    assert_eq!(server.posts(), 2, "one refresh for {N} 401s");
    assert_eq!(calls.load(Ordering::SeqCst), 1 + 2 * N);
    let stats = handle.stats();
    assert_eq!(stats.invalidations, 1);
    assert_eq!(stats.resends, N as u64);
}

/// A workspace forgotten while its token call is under way: the call's token is
/// neither used nor written to the store, and the waiting request fails as the
/// request of an unknown workspace would.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_call_under_way_when_its_workspace_is_forgotten_leaves_nothing_behind() {
    use eshopbox_auth::store::{InProcessStore, TokenStore};

    let eshopbox = MockEshopbox::start().await.unwrap();
    let directory = Directory::default();
    directory.add("acme", eshopbox.add_workspace("acme"));
    eshopbox.set_workspace_token_delay("acme", Duration::from_millis(300));
    let store = InProcessStore::new();
    let layer = directory
        .layer()
        .token_url(&eshopbox.token_url())
        .token_store(store.clone())
        .build()
        .unwrap();
    let service = layer.layer(echo(Arc::default()));
    let request = tokio::spawn(
        service
            .clone()
            .oneshot(request_for("https://api.myeshopbox.com/x", "acme")),
    );
    until(|| eshopbox.workspace_token_calls("acme") == 1).await;
    let handle = layer.handle(&Workspace::new("acme")).unwrap();
    assert!(layer.forget(&Workspace::new("acme")));

    let err = within(request).await.unwrap().unwrap_err();
    assert_eq!(kind(&err), Some(ErrorKind::UnknownWorkspace), "{err}");
    assert!(
        handle.token().is_none(),
        "the forgotten cell installed a token"
    );
    let part = store.for_workspace("acme").unwrap();
    assert!(
        part.load().await.unwrap().is_none(),
        "the forgotten workspace's token was written to the store"
    );
    // The cell makes no token call any more, even through a handle kept on it.
    let err = handle.refresh().await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::UnknownWorkspace);
    assert_eq!(eshopbox.workspace_token_calls("acme"), 1);
}

/// A workspace forgotten while its credentials are being looked up: the lookup's
/// requests fail as for an unknown workspace, no token call is made, and nothing is
/// written to the store.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_workspace_forgotten_during_its_lookup_gets_no_token() {
    use eshopbox_auth::store::{InProcessStore, TokenStore};

    let eshopbox = MockEshopbox::start().await.unwrap();
    let asked = Arc::new(tokio::sync::Notify::new());
    let answer = Arc::new(tokio::sync::Semaphore::new(0));
    // The first lookup says it was asked, then waits for its answer.
    let (resolver, _) = resolver_with_first(eshopbox.add_workspace("acme"), {
        let (asked, answer) = (asked.clone(), answer.clone());
        move || {
            let (asked, answer) = (asked.clone(), answer.clone());
            async move {
                asked.notify_one();
                answer.acquire().await.unwrap().forget();
            }
        }
    });
    let store = InProcessStore::new();
    let layer = EshopboxAuthLayer::per_workspace(resolver)
        .token_url(&eshopbox.token_url())
        .token_store(store.clone())
        .build()
        .unwrap();
    let service = layer.layer(echo(Arc::default()));
    let request = tokio::spawn(
        service
            .clone()
            .oneshot(request_for("https://api.myeshopbox.com/x", "acme")),
    );
    within(asked.notified()).await;
    assert!(layer.forget(&Workspace::new("acme")));
    answer.add_permits(1);

    let err = within(request).await.unwrap().unwrap_err();
    assert_eq!(kind(&err), Some(ErrorKind::UnknownWorkspace), "{err}");
    assert!(
        full_report(&err).contains("forgotten"),
        "{}",
        full_report(&err)
    );
    assert_eq!(eshopbox.workspace_token_calls("acme"), 0);
    let part = store.for_workspace("acme").unwrap();
    assert!(part.load().await.unwrap().is_none());
    // The next request looks the workspace up again and is served.
    let response = within(
        service
            .clone()
            .oneshot(request_for("https://api.myeshopbox.com/x", "acme")),
    )
    .await
    .unwrap();
    assert!(response.body().ends_with("|acme"));
    assert_eq!(eshopbox.workspace_token_calls("acme"), 1);
}
