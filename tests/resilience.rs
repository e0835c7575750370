//! A token endpoint that fails, lies or hangs: every kind of answer maps to a success
//! or a typed error, with a bounded number of token requests, and never a panic.

mod support;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use eshopbox_auth::{Error, ErrorKind, EshopboxAuthLayer};
use http::Response;
use support::{
    assert_no_secret, credentials, full_report, get, Action, EchoApi, Reply, TokenServer,
};
use tower::{BoxError, ServiceBuilder, ServiceExt};

/// What one scripted answer must turn into.
struct Case {
    name: &'static str,
    reply: Reply,
    /// `Ok` with the header the API must see, or the error kind and a phrase the
    /// error's text must contain.
    expect: Result<&'static str, (ErrorKind, &'static str)>,
    /// Token requests made for one API request.
    posts: std::ops::RangeInclusive<usize>,
    /// For a failure retried until the deadline: the longest wait after the n-th
    /// request. The refresh gives up only when the next wait would end past its
    /// deadline, so it ends no earlier than the deadline less that wait, however
    /// slow the machine (which fits fewer requests in the time).
    until_deadline: Option<fn(usize) -> Duration>,
}

fn cases() -> Vec<Case> {
    let token = |expires_in: &str| {
        Reply::json(
            200,
            &format!(
                r#"{{"access_token":"tok-ok","token_type":"Bearer","expires_in":{expires_in}}}"#
            ),
        )
    };
    vec![
        Case {
            name: "OK",
            reply: Reply::token("tok-ok", 86400),
            expect: Ok("Bearer tok-ok"),
            posts: 1..=1,
            until_deadline: None,
        },
        Case {
            name: "400 invalid_grant",
            reply: Reply::json(
                400,
                r#"{"error":"invalid_grant","error_description":"Unknown or invalid refresh token."}"#,
            ),
            expect: Err((ErrorKind::Rejected, "(HTTP 400, invalid_grant)")),
            posts: 1..=1,
            until_deadline: None,
        },
        Case {
            name: "401 invalid_client",
            reply: Reply::json(401, r#"{"error":"invalid_client"}"#),
            expect: Err((ErrorKind::Rejected, "(HTTP 401, invalid_client)")),
            posts: 1..=1,
            until_deadline: None,
        },
        Case {
            name: "403 unauthorized_client",
            reply: Reply::json(403, r#"{"error":"unauthorized_client"}"#),
            expect: Err((ErrorKind::Rejected, "(HTTP 403, unauthorized_client)")),
            posts: 1..=1,
            until_deadline: None,
        },
        Case {
            name: "404 with an HTML body",
            reply: Reply::raw(404, "text/html", "<html>not found</html>"),
            expect: Err((ErrorKind::Rejected, "(HTTP 404)")),
            posts: 1..=1,
            until_deadline: None,
        },
        Case {
            name: "500",
            reply: Reply::raw(500, "text/plain", "internal error"),
            expect: Err((ErrorKind::Unavailable, "(HTTP 500)")),
            posts: UNTIL_DEADLINE,
            until_deadline: Some(support::longest_backoff),
        },
        Case {
            name: "503 with Retry-After: 1",
            reply: Reply::raw(503, "text/plain", "maintenance").with_header("retry-after", "1"),
            expect: Err((ErrorKind::Unavailable, "(HTTP 503)")),
            // Each wait is the Retry-After or the back-off, whichever is longer, until
            // the 10 s deadline: at 0, 1, 2, 3 s, then with back-offs of up to 1.6,
            // 3.2 and 5 s (a slow machine fits fewer).
            posts: 2..=10,
            until_deadline: Some(|n| support::longest_backoff(n).max(Duration::from_secs(1))),
        },
        Case {
            name: "429",
            reply: Reply::json(429, r#"{"message":"Too many requests"}"#),
            expect: Err((ErrorKind::Unavailable, "(HTTP 429)")),
            posts: UNTIL_DEADLINE,
            until_deadline: Some(support::longest_backoff),
        },
        Case {
            name: "HTML 200",
            reply: Reply::raw(200, "text/html", "<html><body>proxy login</body></html>"),
            expect: Err((ErrorKind::InvalidResponse, "not JSON")),
            posts: 1..=1,
            until_deadline: None,
        },
        Case {
            name: "truncated JSON",
            reply: Reply::json(200, r#"{"access_token":"tok-secret-1","expires_in":86"#),
            expect: Err((ErrorKind::InvalidResponse, "truncated JSON")),
            posts: 1..=1,
            until_deadline: None,
        },
        Case {
            name: "missing access_token",
            reply: Reply::json(200, r#"{"expires_in":86400,"token_type":"Bearer"}"#),
            expect: Err((ErrorKind::InvalidResponse, "without access_token")),
            posts: 1..=1,
            until_deadline: None,
        },
        Case {
            name: "token_type mac",
            reply: Reply::json(200, r#"{"access_token":"tok-secret-1","token_type":"mac"}"#),
            expect: Err((ErrorKind::InvalidResponse, "expected Bearer")),
            posts: 1..=1,
            until_deadline: None,
        },
        Case {
            name: "CR/LF in the token",
            reply: Reply::json(
                200,
                r#"{"access_token":"tok-secret-1\r\nX-Injected: yes","token_type":"Bearer"}"#,
            ),
            expect: Err((ErrorKind::InvalidResponse, "control characters")),
            posts: 1..=1,
            until_deadline: None,
        },
        Case {
            name: "expires_in 0",
            reply: token("0"),
            expect: Ok("Bearer tok-ok"),
            posts: 1..=1,
            until_deadline: None,
        },
        Case {
            name: "expires_in -1",
            reply: token("-1"),
            expect: Ok("Bearer tok-ok"),
            posts: 1..=1,
            until_deadline: None,
        },
        Case {
            name: "expires_in 10^12",
            reply: token("1000000000000"),
            expect: Ok("Bearer tok-ok"),
            posts: 1..=1,
            until_deadline: None,
        },
        Case {
            name: "5 MB body",
            reply: Reply::raw(200, "application/json", vec![b' '; 5 << 20]),
            expect: Err((ErrorKind::InvalidResponse, "more than 65536 bytes")),
            posts: 1..=1,
            until_deadline: None,
        },
        Case {
            // A big error page (a proxy's, say) is still a 503: retried.
            name: "503 with a 100 kB body",
            reply: Reply::raw(503, "text/html", vec![b'x'; 100 << 10]),
            expect: Err((ErrorKind::Unavailable, "(HTTP 503)")),
            posts: UNTIL_DEADLINE,
            until_deadline: Some(support::longest_backoff),
        },
        Case {
            name: "400 with a 100 kB body",
            reply: Reply::raw(400, "text/html", vec![b'x'; 100 << 10]),
            expect: Err((ErrorKind::Rejected, "(HTTP 400)")),
            posts: 1..=1,
            until_deadline: None,
        },
        Case {
            name: "hang",
            reply: Reply::hang(),
            expect: Err((ErrorKind::Unavailable, "token timeout of 2s")),
            posts: 1..=1,
            until_deadline: None,
        },
        Case {
            name: "closed connection",
            reply: Reply::close(),
            expect: Err((ErrorKind::Unavailable, "sending the token request failed")),
            posts: UNTIL_DEADLINE,
            until_deadline: Some(support::longest_backoff),
        },
    ]
}

/// The token timeout of these tests: 10 s.
const TIMEOUT: Duration = Duration::from_secs(10);

/// Token requests a transient failure gets within [`TIMEOUT`]: retried after
/// back-offs of 0.1–0.2, 0.2–0.4, 0.4–0.8, 0.8–1.6, 1.6–3.2, then 2.5–5 s while the
/// next attempt would start before the deadline — 6 with the longest draws, 8 with
/// the shortest, on an idle machine; fewer on a slow one, whose requests and timers
/// take longer (then [`Case::until_deadline`] shows it tried until the deadline).
const UNTIL_DEADLINE: std::ops::RangeInclusive<usize> = 2..=8;

async fn one_request(url: &str) -> Result<Response<String>, BoxError> {
    one_request_within(url, TIMEOUT).await
}

async fn one_request_within(url: &str, timeout: Duration) -> Result<Response<String>, BoxError> {
    let layer = EshopboxAuthLayer::builder(credentials())
        .token_url(url)
        .token_timeout(timeout)
        .build()?;
    let api = EchoApi::default();
    let svc = ServiceBuilder::new().layer(layer).service(api);
    svc.oneshot(get()).await
}

#[tokio::test]
async fn every_kind_of_answer_maps_to_a_result_or_a_typed_error() {
    let mut runs = Vec::new();
    for case in cases() {
        let reply = case.reply.clone();
        // Only the hanging endpoint is waited out: with a short timeout.
        let timeout = match reply.action {
            Action::Hang => Duration::from_secs(2),
            _ => TIMEOUT,
        };
        let server = TokenServer::start(move |_| reply.clone()).await;
        runs.push(tokio::spawn(async move {
            let started = tokio::time::Instant::now();
            let result = one_request_within(&server.url(), timeout).await;
            (case, server.posts(), result, started.elapsed())
        }));
    }
    for run in runs {
        let (case, posts, result, took) = run.await.expect("no panic");
        let name = case.name;
        match (case.expect, result) {
            (Ok(header), Ok(res)) => assert_eq!(res.body(), header, "{name}"),
            (Err((kind, says)), Err(err)) => {
                let eshopbox = err
                    .downcast_ref::<Error>()
                    .unwrap_or_else(|| panic!("{name}: not an eshopbox_auth::Error: {err}"));
                assert_eq!(eshopbox.kind(), kind, "{name}: {eshopbox}");
                let shown = full_report(&err);
                assert!(shown.contains(says), "{name}: {shown}");
                assert_no_secret(&shown, &["tok-secret-1"]);
            }
            (expected, got) => panic!("{name}: expected {expected:?}, got {got:?}"),
        }
        assert!(
            case.posts.contains(&posts),
            "{name}: {posts} token requests"
        );
        if let Some(longest_wait) = case.until_deadline {
            assert!(
                took + longest_wait(posts) >= TIMEOUT,
                "{name}: gave up after {took:?} and {posts} token requests"
            );
        }
    }
}

/// The gap between the first two token requests `server` received.
fn gap(server: &TokenServer) -> Duration {
    let seen = server.seen();
    seen[1].at - seen[0].at
}

#[tokio::test]
async fn retry_after_as_an_http_date_is_honoured() {
    // An HTTP-date has whole seconds: 6 s ahead is more than 5 s ahead of `made`.
    let made = std::time::Instant::now();
    let date = httpdate::fmt_http_date(std::time::SystemTime::now() + Duration::from_secs(6));
    let server = TokenServer::start(move |n| match n {
        1 => Reply::raw(429, "text/plain", "slow down").with_header("retry-after", date.clone()),
        _ => Reply::token("tok-after-wait", 86400),
    })
    .await;
    let res = one_request(&server.url()).await.unwrap();
    assert_eq!(res.body(), "Bearer tok-after-wait");
    assert_eq!(server.posts(), 2);
    // The second call waited for the date, however late the first answer came (the
    // back-off alone would have been 100–200 ms).
    let waited = server.seen()[1].at - made;
    assert!(waited >= Duration::from_secs(5), "{waited:?}");
}

#[tokio::test]
async fn retry_after_applies_to_429_and_503_only() {
    // 503 with Retry-After: 3 waits 3 s.
    let server = TokenServer::start(|n| match n {
        1 => Reply::raw(503, "text/plain", "down").with_header("retry-after", "3"),
        _ => Reply::token("tok-503", 86400),
    })
    .await;
    let res = one_request(&server.url()).await.unwrap();
    assert_eq!(res.body(), "Bearer tok-503");
    assert!(gap(&server) >= Duration::from_secs(3), "{:?}", gap(&server));

    // 500 with Retry-After: 3600 is retried after the usual back-off (100–200 ms):
    // waiting the hour (capped at a minute) would end past the 10 s token timeout,
    // and the request would fail.
    let server = TokenServer::start(|n| match n {
        1 => Reply::raw(500, "text/plain", "oops").with_header("retry-after", "3600"),
        _ => Reply::token("tok-500", 86400),
    })
    .await;
    let res = one_request(&server.url()).await.unwrap();
    assert_eq!(res.body(), "Bearer tok-500");
    assert_eq!(server.posts(), 2);
}

#[tokio::test]
async fn retry_after_counts_on_an_error_page_too_long_to_read() {
    let server = TokenServer::start(|n| match n {
        1 => Reply::raw(503, "text/html", vec![b'x'; 100 << 10]).with_header("retry-after", "3"),
        _ => Reply::token("tok-after-page", 86400),
    })
    .await;
    let res = one_request(&server.url()).await.unwrap();
    assert_eq!(res.body(), "Bearer tok-after-page");
    assert!(gap(&server) >= Duration::from_secs(3), "{:?}", gap(&server));
}

#[tokio::test]
async fn an_endpoint_that_comes_back_serves_the_next_request() {
    let up = Arc::new(AtomicUsize::new(0));
    let flag = up.clone();
    let server = TokenServer::start(move |n| {
        if flag.load(Ordering::SeqCst) == 0 {
            Reply::raw(502, "text/plain", "bad gateway")
        } else {
            Reply::token(&format!("tok-{n}"), 86400)
        }
    })
    .await;
    // A 2 s budget: shorter than the outage, so requests fail while it lasts.
    let layer = EshopboxAuthLayer::builder(credentials())
        .token_url(&server.url())
        .token_timeout(Duration::from_secs(2))
        .build()
        .unwrap();
    let api = EchoApi::default();
    let svc = ServiceBuilder::new().layer(layer).service(api);

    let mut first = None;
    for _ in 0..3 {
        let started = tokio::time::Instant::now();
        let err = svc.clone().oneshot(get()).await.unwrap_err();
        assert_eq!(
            err.downcast_ref::<Error>().unwrap().kind(),
            ErrorKind::Unavailable
        );
        first.get_or_insert((started.elapsed(), server.posts()));
    }
    // The first refresh tried until its 2 s deadline (4 or 5 attempts on an idle
    // machine, fewer on a slow one: it gave up only when the next back-off would have
    // ended past the deadline); the next ones went on with its back-off, so no two
    // calls came closer than it allows: 0.1, 0.2, 0.4, 0.8, 1.6, then 2.5 s at least.
    let (took, posts) = first.unwrap();
    assert!(posts >= 2, "{posts} token requests");
    assert!(
        took + support::longest_backoff(posts) >= Duration::from_secs(2),
        "the first refresh gave up after {took:?} and {posts} token requests"
    );
    let failed_posts = server.posts();
    assert!((posts..=3 * 5).contains(&failed_posts), "{failed_posts}");
    assert_eq!(server.max_in_flight(), 1, "one token request at a time");
    let seen = server.seen();
    for (i, pair) in seen.windows(2).enumerate() {
        let least =
            (Duration::from_millis(100) * 2u32.pow(i as u32)).min(Duration::from_millis(2500));
        let gap = pair[1].at - pair[0].at;
        assert!(
            gap >= least,
            "call {} came {gap:?} after the one before",
            i + 2
        );
    }

    up.store(1, Ordering::SeqCst);
    // Requests made while the back-off still runs past their 2 s wait fail; the first
    // one after it gets the token.
    let res = support::within(async {
        loop {
            if let Ok(res) = svc.clone().oneshot(get()).await {
                return res;
            }
        }
    })
    .await;
    assert_eq!(*res.body(), format!("Bearer tok-{}", failed_posts + 1));
}
