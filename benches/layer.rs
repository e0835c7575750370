//! Cost of the layer on the request path, warm token, no-op inner service:
//!
//! 1. the bare inner service;
//! 2. tower-http's `AddAuthorization::bearer` (a static header: the floor);
//! 3. a bearer layer caching the token in `RwLock` with an expiry check — the usual
//!    approach of Rust token managers;
//! 4. `EshopboxAuth`, 401 retry off;
//! 5. `EshopboxAuth`, 401 retry on (keeps a copy of each GET for a resend).
//!
//! Single-threaded, then 2 OS threads hammering one shared layer, then 4 and 8 tasks
//! on a 2-worker multi-thread runtime (each task cloning the one service).
//! `INTERLEAVED=1` (with `PROCESSES=<n>` fresh processes for the single-threaded
//! rounds) and `INSTRUCTIONS=<variant>` select the interleaved-ratio and
//! instruction-count modes (see `main` and the benches/README.md).

#[path = "../tests/support/mod.rs"]
mod support;

use support::Noop;

use std::future::Future;
use std::pin::pin;
use std::sync::{Arc, RwLock};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use bytes::Bytes;
use criterion::{criterion_group, BenchmarkId, Criterion};
use eshopbox_auth::EshopboxAuthLayer;
use http::header::{ACCEPT, AUTHORIZATION};
use http::{HeaderValue, Request, Uri};
use http_body_util::Empty;
use tower::{Layer, Service, ServiceExt};
use tower_http::auth::AddAuthorizationLayer;

type Req = Request<Empty<Bytes>>;

/// The usual approach: the token behind a `RwLock`, its expiry checked per request.
#[derive(Clone)]
struct RwLockBearer<S> {
    inner: S,
    token: Arc<RwLock<(HeaderValue, Instant)>>,
}

impl<S: Service<Req>> Service<Req> for RwLockBearer<S> {
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;
    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }
    fn call(&mut self, mut req: Req) -> S::Future {
        let header = {
            let token = self.token.read().unwrap();
            assert!(Instant::now() < token.1, "the bench token never expires");
            token.0.clone()
        };
        req.headers_mut().insert(AUTHORIZATION, header);
        self.inner.call(req)
    }
}

fn request(uri: &Uri) -> Req {
    let mut req = Request::new(Empty::new());
    *req.uri_mut() = uri.clone();
    req.headers_mut()
        .insert(ACCEPT, HeaderValue::from_static("application/json"));
    req
}

/// The URI every variant sends to: a workspace API on an Eshopbox host, or with
/// `PATH_ONLY=1` the same path without scheme and host (as a tonic `Channel`'s
/// requests are), which the destination check passes at once. The difference
/// between the two, per variant, is what the check costs.
fn bench_uri() -> Uri {
    if path_only() {
        Uri::from_static("/api/v2/inventoryListing")
    } else {
        Uri::from_static("https://acme.myeshopbox.com/api/v2/inventoryListing")
    }
}

/// Whether `PATH_ONLY=1` is set.
fn path_only() -> bool {
    std::env::var("PATH_ONLY").is_ok_and(|value| value == "1")
}

/// poll_ready, call, and poll the response future once (every variant answers at once).
fn one<S>(svc: &mut S, uri: &Uri)
where
    S: Service<Req>,
    S::Error: std::fmt::Debug,
{
    let mut cx = Context::from_waker(Waker::noop());
    match svc.poll_ready(&mut cx) {
        Poll::Ready(r) => r.unwrap(),
        Poll::Pending => panic!("not ready"),
    }
    let fut = pin!(svc.call(request(uri)));
    match fut.poll(&mut cx) {
        Poll::Ready(r) => {
            std::hint::black_box(r.unwrap());
        }
        Poll::Pending => panic!("no answer at once"),
    }
}

/// One boxed clone-able service per variant, all sharing their state across clones.
#[derive(Clone)]
enum Variant {
    Bare(Noop),
    Static(tower_http::auth::AddAuthorization<Noop>),
    RwLock(RwLockBearer<Noop>),
    RetryOff(eshopbox_auth::EshopboxAuth<Noop>),
    RetryOn(eshopbox_auth::EshopboxAuth<Noop>),
}

impl Variant {
    fn name(&self) -> &'static str {
        match self {
            Variant::Bare(_) => "1_bare",
            Variant::Static(_) => "2_static_add_authorization",
            Variant::RwLock(_) => "3_rwlock_bearer",
            Variant::RetryOff(_) => "4_eshopbox_retry_off",
            Variant::RetryOn(_) => "5_eshopbox_retry_on",
        }
    }

    fn run(&mut self, uri: &Uri) {
        match self {
            Variant::Bare(s) => one(s, uri),
            Variant::Static(s) => one(s, uri),
            Variant::RwLock(s) => one(s, uri),
            Variant::RetryOff(s) => one(s, uri),
            Variant::RetryOn(s) => one(s, uri),
        }
    }
}

/// The runtime the layers get their tokens on. A multi-thread one by default, whose
/// timers keep each token's phase (one load per request); with
/// `CURRENT_THREAD_TOKENS=1`, `rt`, a current-thread runtime, whose tokens are
/// checked against the clock on every request instead.
fn token_runtime(rt: &tokio::runtime::Runtime) -> &tokio::runtime::Runtime {
    static TOKENS: std::sync::OnceLock<tokio::runtime::Runtime> = std::sync::OnceLock::new();
    if std::env::var_os("CURRENT_THREAD_TOKENS").is_some() {
        return rt;
    }
    TOKENS.get_or_init(|| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap()
    })
}

fn variants(rt: &tokio::runtime::Runtime) -> Vec<Variant> {
    let rt = token_runtime(rt);
    let server = rt.block_on(support::TokenServer::counting(86400));
    let warm = |retry: bool| {
        let layer = EshopboxAuthLayer::builder(support::credentials())
            .token_url(&server.url())
            .retry_on_unauthorized(retry)
            .build()
            .unwrap();
        let svc = layer.layer(Noop);
        rt.block_on(svc.clone().oneshot(request(&Uri::from_static("/warm"))))
            .unwrap();
        svc
    };
    vec![
        Variant::Bare(Noop),
        Variant::Static(AddAuthorizationLayer::bearer("tok-1").layer(Noop)),
        Variant::RwLock(RwLockBearer {
            inner: Noop,
            token: Arc::new(RwLock::new((
                HeaderValue::from_static("Bearer tok-1"),
                Instant::now() + Duration::from_secs(86400),
            ))),
        }),
        Variant::RetryOff(warm(false)),
        Variant::RetryOn(warm(true)),
    ]
}

fn bench(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let uri = bench_uri();
    let variants = variants(&rt);
    // Path-only runs keep their own criterion baselines.
    let group_name = |name: &str| {
        if path_only() {
            format!("{name}_path_only")
        } else {
            name.to_owned()
        }
    };

    let mut group = c.benchmark_group(group_name("single_thread"));
    for v in &variants {
        let mut svc = v.clone();
        group.bench_function(v.name(), |b| b.iter(|| svc.run(&uri)));
    }
    group.finish();

    let mut group = c.benchmark_group(group_name("two_threads_shared"));
    for v in &variants {
        group.bench_function(v.name(), |b| {
            b.iter_custom(|iters| {
                let start = Instant::now();
                std::thread::scope(|scope| {
                    for _ in 0..2 {
                        let mut svc = v.clone();
                        let uri = &uri;
                        scope.spawn(move || {
                            for _ in 0..iters {
                                svc.run(uri);
                            }
                        });
                    }
                });
                // Time per request, two at a time.
                start.elapsed() / 2
            })
        });
    }
    group.finish();

    let mut group = c.benchmark_group(group_name("tasks_on_2_workers"));
    for tasks in [4u32, 8] {
        for v in &variants {
            group.bench_with_input(BenchmarkId::new(v.name(), tasks), &tasks, |b, &tasks| {
                b.iter_custom(|iters| {
                    rt.block_on(async {
                        let start = Instant::now();
                        let handles: Vec<_> = (0..tasks)
                            .map(|_| {
                                let mut svc = v.clone();
                                let uri = uri.clone();
                                let n = iters.div_ceil(u64::from(tasks));
                                tokio::spawn(async move {
                                    for _ in 0..n {
                                        svc.run(&uri);
                                    }
                                })
                            })
                            .collect();
                        for h in handles {
                            h.await.unwrap();
                        }
                        start.elapsed() / 2
                    })
                })
            });
        }
    }
    group.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2));
    targets = bench
}
/// `cargo bench --bench layer` runs criterion. With `INSTRUCTIONS=<variant name>`, the
/// binary instead sends `REQUESTS` (default 100 000) single-threaded requests through that variant, for an
/// instruction count under `valgrind --tool=callgrind` (see benches/README.md).
fn main() {
    if let Ok(name) = std::env::var("INSTRUCTIONS") {
        count(&name);
    } else if std::env::var_os("INTERLEAVED").is_some() {
        interleaved();
    } else {
        benches();
        Criterion::default().configure_from_args().final_summary();
    }
}

/// `INTERLEAVED=1`: wall-clock ratios that survive a noisy machine. Criterion times
/// one variant after another, so a slow spell of the machine lands on one variant;
/// here every round times a batch of each variant back to back and the ratios are
/// taken within a round. Prints the median time per request of each variant and the
/// median of the per-round ratios.
///
/// Single-threaded times depend on the process's memory layout (where the shared
/// libraries and the stack land, random per process; see benches/README.md), by up
/// to ±10 % per variant and in different directions. So the single-threaded rounds
/// run in `PROCESSES` (default 16) fresh processes of this binary, each at four stack
/// offsets, and the summary is taken over processes. Two threads sharing each
/// variant's layer, and 8 tasks on a 2-worker runtime, run in this process.
fn interleaved() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let uri = bench_uri();
    let variants = variants(&rt);
    if std::env::var_os("INTERLEAVED_CHILD").is_some() {
        // The single-threaded rounds of one process, over all four offsets: one line
        // of per-variant medians (ns), then the three ratios.
        let by_offset = single_thread(&variants, 100, 2_000, &uri);
        let all = (0..variants.len())
            .map(|v| by_offset.iter().flat_map(|t| t[v].clone()).collect())
            .collect();
        let (medians, ratios) = summary(all);
        let line: Vec<String> = medians.iter().chain(&ratios).map(f64::to_string).collect();
        println!("process {}", line.join(" "));
        return;
    }
    single_thread_processes(&variants);
    println!("two threads, one layer");
    report(&variants, rounds(&variants, 100, 20_000, 2, &uri));
    println!("8 tasks on 2 worker threads, each cloning one service");
    report(&variants, contended(&variants, 100, 40_000, &uri));
}

/// Runs the single-threaded rounds in `PROCESSES` fresh processes of this binary and
/// prints each process's medians, then the median and range over processes.
fn single_thread_processes(variants: &[Variant]) {
    let processes: usize = match std::env::var("PROCESSES") {
        Err(_) => 16,
        Ok(n) => match n.parse() {
            Ok(n) if n > 0 => n,
            _ => panic!("PROCESSES={n:?}: expected a number of processes, at least 1"),
        },
    };
    let exe = std::env::current_exe().expect("the bench binary's path");
    let mut rows: Vec<Vec<f64>> = Vec::with_capacity(processes);
    println!(
        "single thread, {processes} processes (ns per request, median over rounds and offsets)"
    );
    for process in 1..=processes {
        // The child's errors go straight to this terminal.
        let output = std::process::Command::new(&exe)
            .env("INTERLEAVED_CHILD", "1")
            .stderr(std::process::Stdio::inherit())
            .output()
            .expect("run the bench binary again");
        assert!(
            output.status.success(),
            "process {process} failed: {}",
            output.status
        );
        let stdout = String::from_utf8_lossy(&output.stdout);
        let row: Vec<f64> = stdout
            .lines()
            .find_map(|line| line.strip_prefix("process "))
            .unwrap_or_else(|| panic!("process {process} printed no result: {stdout}"))
            .split(' ')
            .map(|x| x.parse().unwrap())
            .collect();
        let (times, ratios) = row.split_at(variants.len());
        let times: Vec<String> = times.iter().map(|t| format!("{t:6.1}")).collect();
        println!(
            "  process {process:2}: {}   (4)/(2) {:.3}  (5)/(2) {:.3}  (4)/(3) {:.3}",
            times.join(" "),
            ratios[0],
            ratios[1],
            ratios[2]
        );
        rows.push(row);
    }
    println!("single thread, over {processes} processes: median (min – max)");
    let column = |i: usize| -> Vec<f64> { rows.iter().map(|row| row[i]).collect() };
    for (i, v) in variants.iter().enumerate() {
        let (median, min, max) = spread(column(i));
        println!(
            "{:28} {median:7.1} ns/request ({min:.1} – {max:.1})",
            v.name()
        );
    }
    for (i, name) in ["(4)/(2)", "(5)/(2)", "(4)/(3)"].iter().enumerate() {
        let (median, min, max) = spread(column(variants.len() + i));
        println!("{name} = {median:.3} ({min:.3} – {max:.3})");
    }
}

/// Median, minimum and maximum.
fn spread(mut xs: Vec<f64>) -> (f64, f64, f64) {
    xs.sort_by(f64::total_cmp);
    (xs[xs.len() / 2], xs[0], xs[xs.len() - 1])
}

/// Like [`rounds`], with each batch split over 8 tasks on a 2-worker multi-thread
/// runtime; each task clones the variant's one service and sends its share. Time per
/// request is the wall time of the batch over its requests.
fn contended(variants: &[Variant], rounds: usize, batch: u32, uri: &Uri) -> Vec<Vec<f64>> {
    const TASKS: u32 = 8;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .build()
        .unwrap();
    let mut times: Vec<Vec<f64>> = vec![Vec::with_capacity(rounds); variants.len()];
    for round in 0..rounds {
        for k in 0..variants.len() {
            let i = (round + k) % variants.len();
            let start = Instant::now();
            rt.block_on(async {
                let tasks: Vec<_> = (0..TASKS)
                    .map(|_| {
                        let mut svc = variants[i].clone();
                        let uri = uri.clone();
                        tokio::spawn(async move {
                            for _ in 0..batch / TASKS {
                                svc.run(&uri);
                            }
                        })
                    })
                    .collect();
                for task in tasks {
                    task.await.unwrap();
                }
            });
            times[i].push(start.elapsed().as_nanos() as f64 / f64::from(batch));
        }
    }
    times
}

/// Single-threaded rounds, each run from stack frames moved down by 0, 16, 32 and 48
/// bytes: per offset, per variant, the time per request of each round.
fn single_thread(variants: &[Variant], rounds: usize, batch: u32, uri: &Uri) -> Vec<Vec<Vec<f64>>> {
    #[inline(never)]
    fn moved<const N: usize>(f: &mut dyn FnMut() -> Vec<f64>) -> Vec<f64> {
        let pad = std::hint::black_box([0u8; N]);
        let times = f();
        std::hint::black_box(pad);
        times
    }
    let mut times = vec![vec![Vec::with_capacity(rounds); variants.len()]; 4];
    for round in 0..rounds {
        for (pad, by_variant) in times.iter_mut().enumerate() {
            let mut one_round = || one_round(variants, round, batch, uri);
            let round_times = match pad {
                0 => moved::<0>(&mut one_round),
                1 => moved::<16>(&mut one_round),
                2 => moved::<32>(&mut one_round),
                _ => moved::<48>(&mut one_round),
            };
            for (all, time) in by_variant.iter_mut().zip(round_times) {
                all.push(time);
            }
        }
    }
    times
}

/// One single-threaded round: a batch of each variant, in an order rotated by round.
#[inline(never)]
fn one_round(variants: &[Variant], round: usize, batch: u32, uri: &Uri) -> Vec<f64> {
    let mut times = vec![0.0; variants.len()];
    for k in 0..variants.len() {
        let i = (round + k) % variants.len();
        let start = Instant::now();
        let mut svc = variants[i].clone();
        for _ in 0..batch {
            svc.run(uri);
        }
        times[i] = start.elapsed().as_nanos() as f64 / f64::from(batch);
    }
    times
}

/// Per variant, the time per request of each round: `batch` requests on each of
/// `threads` threads (each with its own clone of the variant's service).
fn rounds(
    variants: &[Variant],
    rounds: usize,
    batch: u32,
    threads: u32,
    uri: &Uri,
) -> Vec<Vec<f64>> {
    let mut times: Vec<Vec<f64>> = vec![Vec::with_capacity(rounds); variants.len()];
    for round in 0..rounds {
        // Rotate the order, so no variant always runs first.
        for k in 0..variants.len() {
            let i = (round + k) % variants.len();
            let start = Instant::now();
            std::thread::scope(|scope| {
                for _ in 0..threads {
                    let mut svc = variants[i].clone();
                    scope.spawn(move || {
                        for _ in 0..batch {
                            svc.run(uri);
                        }
                    });
                }
            });
            let requests = f64::from(batch) * f64::from(threads);
            times[i].push(start.elapsed().as_nanos() as f64 / requests);
        }
    }
    times
}

/// Per variant, the median time per request; then the medians of the per-round
/// ratios (4)/(2), (5)/(2) and (4)/(3).
fn summary(times: Vec<Vec<f64>>) -> (Vec<f64>, Vec<f64>) {
    let median = |xs: Vec<f64>| spread(xs).0;
    let medians = times.iter().map(|t| median(t.clone())).collect();
    let ratio =
        |a: usize, b: usize| median(times[a].iter().zip(&times[b]).map(|(x, y)| x / y).collect());
    (medians, vec![ratio(3, 1), ratio(4, 1), ratio(3, 2)])
}

fn report(variants: &[Variant], times: Vec<Vec<f64>>) {
    let (medians, ratios) = summary(times);
    for (v, median) in variants.iter().zip(medians) {
        println!("{:28} median {median:7.1} ns/request", v.name());
    }
    println!("(4)/(2) = {:.3}", ratios[0]);
    println!("(5)/(2) = {:.3}", ratios[1]);
    println!("(4)/(3) = {:.3}", ratios[2]);
}

fn count(name: &str) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let uri = bench_uri();
    let mut svc = variants(&rt)
        .into_iter()
        .find(|v| v.name() == name)
        .unwrap_or_else(|| panic!("no variant {name}"));
    let n: u64 = std::env::var("REQUESTS")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(100_000);
    for _ in 0..n {
        svc.run(&uri);
    }
}
