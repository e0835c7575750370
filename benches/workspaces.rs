//! The per-workspace layer (feature `workspaces`):
//!
//! 1. warm requests: `EshopboxAuth` (one account, 401 retry off) against the
//!    per-workspace layer (retry off) with 1 000 warm workspaces taken round-robin;
//!    interleaved rounds, median of the per-round ratios (see benches/README.md);
//! 2. a cold scenario: 10 000 workspaces, 5 concurrent first requests each, against
//!    the mock Eshopbox on 127.0.0.1: token calls, lookups, total time and the peak
//!    of the bytes held.
//!
//! `cargo bench --bench workspaces --features workspaces,test-util`;
//! `WORKSPACES=<n>` changes the scenario's size; `INSTRUCTIONS=<variant>` selects the
//! instruction-count mode (see `main` and benches/README.md).

#[path = "../tests/support/mod.rs"]
mod support;

use support::Noop;

use std::alloc::{GlobalAlloc, Layout, System};
use std::future::Future;
use std::pin::pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use std::time::Instant;

use bytes::Bytes;
use eshopbox_auth::mock::MockEshopbox;
use eshopbox_auth::{Credentials, EshopboxAuthLayer, Workspace};
use http::header::ACCEPT;
use http::{HeaderValue, Request, Uri};
use http_body_util::Empty;
use tower::{BoxError, Layer, Service, ServiceExt};

/// The bytes held by the process, and their peak.
struct Peak;

static HELD: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

fn held(delta: isize) {
    let now = if delta >= 0 {
        HELD.fetch_add(delta as usize, Ordering::Relaxed) + delta as usize
    } else {
        HELD.fetch_sub(delta.unsigned_abs(), Ordering::Relaxed) - delta.unsigned_abs()
    };
    PEAK.fetch_max(now, Ordering::Relaxed);
}

// SAFETY: forwards to the system allocator; only counts bytes.
#[allow(unsafe_code)]
unsafe impl GlobalAlloc for Peak {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        held(layout.size() as isize);
        System.alloc(layout)
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        held(-(layout.size() as isize));
        System.dealloc(ptr, layout)
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        held(new_size as isize - layout.size() as isize);
        System.realloc(ptr, layout, new_size)
    }
}

#[global_allocator]
static GLOBAL: Peak = Peak;

type Req = Request<Empty<Bytes>>;

fn request(uri: &Uri, workspace: &Workspace) -> Req {
    let mut req = Request::new(Empty::new());
    *req.uri_mut() = uri.clone();
    req.headers_mut()
        .insert(ACCEPT, HeaderValue::from_static("application/json"));
    req.extensions_mut().insert(workspace.clone());
    req
}

fn one<S>(svc: &mut S, req: Req)
where
    S: Service<Req>,
    S::Error: std::fmt::Debug,
{
    let mut cx = Context::from_waker(Waker::noop());
    match svc.poll_ready(&mut cx) {
        Poll::Ready(r) => r.unwrap(),
        Poll::Pending => panic!("not ready"),
    }
    match pin!(svc.call(req)).poll(&mut cx) {
        Poll::Ready(r) => drop(std::hint::black_box(r.unwrap())),
        Poll::Pending => panic!("the request did not complete at once"),
    }
}

/// `cargo bench --bench workspaces --features workspaces,test-util` runs both parts.
/// With `INSTRUCTIONS=<variant>` (`single`, `single_proxy_host` or `per_workspace`)
/// the binary instead sets up the warm part and sends `REQUESTS` (default 100 000)
/// requests through that variant, round-robin over the 1 000 workspaces, for an
/// instruction count under `valgrind --tool=callgrind` (see benches/README.md).
fn main() {
    if let Ok(name) = std::env::var("INSTRUCTIONS") {
        count(&name);
        return;
    }
    warm();
    let n = std::env::var("WORKSPACES")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(10_000);
    cold(n);
}

type Layered<L> = <L as Layer<Noop>>::Service;

/// The warm part's services, each with its token (and, per workspace, the 1 000
/// workspaces) fetched.
struct Warm {
    rt: tokio::runtime::Runtime,
    _server: support::TokenServer,
    single: Layered<eshopbox_auth::EshopboxAuthLayer>,
    single_proxy_host: Layered<eshopbox_auth::EshopboxAuthLayer>,
    many: Layered<eshopbox_auth::WorkspaceAuthLayer>,
    uri: Uri,
    workspaces: Vec<Workspace>,
}

fn set_up() -> Warm {
    // A multi-thread runtime, whose timers keep each token's phase: on a
    // current-thread one, tokens are checked against the clock on every request.
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let server = rt.block_on(support::TokenServer::counting(86400));
    let url = server.url();
    let _entered = rt.enter();
    let single = EshopboxAuthLayer::builder(support::credentials())
        .token_url(&url)
        .retry_on_unauthorized(false)
        .build()
        .unwrap();
    // The same single-account layer with `ProxyHost` set, as for workspace calls: the
    // per-workspace layer always sets it.
    let single_proxy_host = EshopboxAuthLayer::builder(support::credentials())
        .token_url(&url)
        .retry_on_unauthorized(false)
        .workspace("shop-0")
        .build()
        .unwrap();
    let many = EshopboxAuthLayer::per_workspace(|_| async {
        Ok::<_, BoxError>(Some(support::credentials()))
    })
    .token_url(&url)
    .retry_on_unauthorized(false)
    .build()
    .unwrap();
    let single = single.layer(Noop);
    let single_proxy_host = single_proxy_host.layer(Noop);
    let many = many.layer(Noop);
    let uri = Uri::from_static("https://acme.myeshopbox.com/api/v2/inventoryListing");
    let workspaces: Vec<Workspace> = (0..1_000)
        .map(|i| Workspace::new(format!("shop-{i}")))
        .collect();
    rt.block_on(single.clone().oneshot(request(&uri, &workspaces[0])))
        .unwrap();
    rt.block_on(
        single_proxy_host
            .clone()
            .oneshot(request(&uri, &workspaces[0])),
    )
    .unwrap();
    for workspace in &workspaces {
        rt.block_on(many.clone().oneshot(request(&uri, workspace)))
            .unwrap();
    }
    drop(_entered);
    Warm {
        rt,
        _server: server,
        single,
        single_proxy_host,
        many,
        uri,
        workspaces,
    }
}

/// `INSTRUCTIONS=<variant>`: `REQUESTS` warm requests through one variant.
fn count(name: &str) {
    let mut warm = set_up();
    let _entered = warm.rt.enter();
    let n: usize = std::env::var("REQUESTS")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(100_000);
    let (uri, workspaces) = (&warm.uri, &warm.workspaces);
    for i in 0..n {
        let w = &workspaces[i % workspaces.len()];
        match name {
            "single" => one(&mut warm.single, request(uri, w)),
            "single_proxy_host" => one(&mut warm.single_proxy_host, request(uri, w)),
            "per_workspace" => one(&mut warm.many, request(uri, w)),
            _ => panic!("no variant {name}"),
        }
    }
}

fn warm() {
    let mut warm = set_up();
    let _entered = warm.rt.enter();
    let (uri, workspaces) = (&warm.uri, &warm.workspaces);
    let (rounds, batch) = (300, 2_000);
    // Per round, the time of each variant (single, single with ProxyHost, per
    // workspace), run in a rotating order.
    let mut times: [Vec<f64>; 3] = Default::default();
    let mut ratios: [Vec<f64>; 2] = Default::default();
    let mut next = 0;
    for round in 0..rounds {
        let mut round_times = [0.0; 3];
        for k in 0..3 {
            let variant = (round + k) % 3;
            let start = Instant::now();
            for _ in 0..batch {
                let w = &workspaces[next % workspaces.len()];
                match variant {
                    0 => one(&mut warm.single, request(uri, w)),
                    1 => one(&mut warm.single_proxy_host, request(uri, w)),
                    _ => one(&mut warm.many, request(uri, w)),
                }
                next += 1;
            }
            round_times[variant] = start.elapsed().as_nanos() as f64 / f64::from(batch);
        }
        for (all, time) in times.iter_mut().zip(round_times) {
            all.push(time);
        }
        ratios[0].push(round_times[2] / round_times[0]);
        ratios[1].push(round_times[2] / round_times[1]);
    }
    let median = |mut xs: Vec<f64>| {
        xs.sort_by(f64::total_cmp);
        xs[xs.len() / 2]
    };
    let [single_times, proxy_host_times, many_times] = times;
    let [to_single, to_proxy_host] = ratios;
    println!("warm requests, 1 000 workspaces round-robin, retry off");
    println!(
        "  single account                 median {:7.1} ns/request",
        median(single_times)
    );
    println!(
        "  single account with ProxyHost  median {:7.1} ns/request",
        median(proxy_host_times)
    );
    println!(
        "  per workspace                  median {:7.1} ns/request",
        median(many_times)
    );
    println!("  per workspace / single = {:.3}", median(to_single));
    println!(
        "  per workspace / single with ProxyHost = {:.3}",
        median(to_proxy_host)
    );
}

fn cold(n: usize) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async move {
        let eshopbox = MockEshopbox::start().await.unwrap();
        let apps: Arc<Vec<Credentials>> = Arc::new(
            (0..n)
                .map(|i| eshopbox.add_workspace(&format!("shop-{i}")))
                .collect(),
        );
        let lookups = Arc::new(AtomicUsize::new(0));
        let counted = lookups.clone();
        let layer = EshopboxAuthLayer::per_workspace(move |workspace: Workspace| {
            counted.fetch_add(1, Ordering::Relaxed);
            let i: usize = workspace.name()["shop-".len()..].parse().unwrap();
            let found = apps.get(i).cloned();
            async move { Ok::<_, BoxError>(found) }
        })
        .token_url(&eshopbox.token_url())
        .build()
        .unwrap();
        let service = layer.layer(Noop);
        let uri = Uri::from_static("https://acme.myeshopbox.com/api/v1/orders");
        let base = HELD.load(Ordering::Relaxed);
        PEAK.store(base, Ordering::Relaxed);
        let start = Instant::now();
        let mut requests = tokio::task::JoinSet::new();
        for i in 0..n {
            let workspace = Workspace::new(format!("shop-{i}"));
            for _ in 0..5 {
                requests.spawn(service.clone().oneshot(request(&uri, &workspace)));
            }
        }
        while let Some(done) = requests.join_next().await {
            done.unwrap().unwrap();
        }
        let elapsed = start.elapsed();
        let peak = PEAK.load(Ordering::Relaxed) - base;
        let after = HELD.load(Ordering::Relaxed).saturating_sub(base);
        println!("cold: {n} workspaces x 5 concurrent first requests");
        println!(
            "  token calls {}, lookups {}, kept {}",
            eshopbox.token_calls(),
            lookups.load(Ordering::Relaxed),
            layer.workspaces()
        );
        println!(
            "  total {:.2} s, peak {:.1} MiB above the start, {:.1} MiB held after (mock included)",
            elapsed.as_secs_f64(),
            peak as f64 / (1024.0 * 1024.0),
            after as f64 / (1024.0 * 1024.0)
        );
    });
}
