//! The per-workspace layer's costs, counted by the allocator: a warm request
//! allocates no more than through the single-account layer, and a warm idle
//! workspace costs at most 4 KiB.

#![cfg(feature = "workspaces")]

mod support;

use support::Noop;

use std::future::Future;

use bytes::Bytes;
use eshopbox_auth::{EshopboxAuthLayer, Workspace};
use http::header::ACCEPT;
use http::{HeaderValue, Request};
use http_body_util::Empty;
use tower::{BoxError, Layer, ServiceExt};

#[path = "support/alloc.rs"]
mod alloc;

#[global_allocator]
static GLOBAL: alloc::Counting = alloc::Counting;

type Req = Request<Empty<Bytes>>;

/// A request for `workspace`, with an Accept header as real requests carry.
fn request(workspace: &Workspace) -> Req {
    let mut req = Request::get("https://acme.myeshopbox.com/api/v2/inventoryListing")
        .body(Empty::new())
        .unwrap();
    req.headers_mut()
        .insert(ACCEPT, HeaderValue::from_static("application/json"));
    req.extensions_mut().insert(workspace.clone());
    req
}

/// Allocations made by building one request for `workspace` and sending it through
/// `svc`, which answers at once.
fn allocations_of<S>(svc: &mut S, workspace: &Workspace) -> usize
where
    S: tower::Service<Req>,
    S::Error: std::fmt::Debug,
{
    alloc::allocations_of(svc, || request(workspace))
}

/// A token endpoint on a runtime of its own thread, so that what it allocates is
/// not counted here.
fn token_server() -> String {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let server = support::TokenServer::counting(86400).await;
            tx.send(server.url()).unwrap();
            std::future::pending::<()>().await;
        });
    });
    rx.recv().unwrap()
}

fn resolver(
    workspace: Workspace,
) -> impl Future<Output = Result<Option<eshopbox_auth::Credentials>, BoxError>> + Send {
    let _ = workspace;
    std::future::ready(Ok(Some(support::credentials())))
}

#[test]
fn a_warm_request_allocates_no_more_than_through_the_single_account_layer() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let url = token_server();
    let _entered = rt.enter();
    let single = EshopboxAuthLayer::builder(support::credentials())
        .token_url(&url)
        .retry_on_unauthorized(false)
        .build()
        .unwrap();
    let many = EshopboxAuthLayer::per_workspace(resolver)
        .token_url(&url)
        .retry_on_unauthorized(false)
        .build()
        .unwrap();
    let mut single = single.layer(Noop);
    let mut many = many.layer(Noop);
    let workspaces: Vec<Workspace> = (0..100)
        .map(|i| Workspace::new(format!("shop-{i}")))
        .collect();
    rt.block_on(single.clone().oneshot(request(&workspaces[0])))
        .unwrap();
    for workspace in &workspaces {
        rt.block_on(many.clone().oneshot(request(workspace)))
            .unwrap();
        // The first clone of a token's header turns its buffer into a shared one.
        allocations_of(&mut many, workspace);
    }
    allocations_of(&mut single, &workspaces[0]);

    // The cache runs its housekeeping on the threads that read it, now and then
    // (moka has no thread of its own): that allocates on a few requests. Every other
    // request allocates exactly what it does through the single-account layer.
    let mut more = 0;
    let mut extra = 0;
    for workspace in workspaces.iter().cycle().take(1000) {
        let base = allocations_of(&mut single, workspace);
        assert!(base > 0, "the counter counts");
        let layered = allocations_of(&mut many, workspace);
        assert!(layered >= base, "{workspace:?}: {layered} < {base}");
        if layered > base {
            more += 1;
            extra += layered - base;
        }
    }
    eprintln!("requests allocating more: {more} of 1000, {extra} allocations in all");
    assert!(more <= 20, "{more} of 1000 requests allocated more");
}

#[test]
fn a_warm_idle_workspace_costs_at_most_four_kib() {
    idle_cost(true);
}

/// With retry off, the front map's node also holds a snapshot of the token (taken by
/// the second request).
#[test]
fn with_retry_off_a_warm_idle_workspace_costs_at_most_four_kib() {
    idle_cost(false);
}

fn idle_cost(retry: bool) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let url = token_server();
    let _entered = rt.enter();
    let layer = EshopboxAuthLayer::per_workspace(resolver)
        .token_url(&url)
        .retry_on_unauthorized(retry)
        .build()
        .unwrap();
    let service = layer.layer(Noop);
    let warm = |from: usize, to: usize| {
        for i in from..to {
            let workspace = Workspace::new(format!("shop-{i}"));
            for _ in 0..if retry { 1 } else { 2 } {
                rt.block_on(service.clone().oneshot(request(&workspace)))
                    .unwrap();
            }
        }
        layer.workspaces();
    };
    // The first few open the connection and fill the cache's fixed structures.
    warm(0, 16);
    let before = alloc::live();
    const N: usize = 2000;
    warm(16, 16 + N);
    let per_workspace = (alloc::live() - before) / N as isize;
    eprintln!("bytes per warm idle workspace (retry {retry}): {per_workspace}");
    assert_eq!(layer.workspaces(), 16 + N as u64);
    assert!(per_workspace <= 4096, "{per_workspace} bytes per workspace");
}
