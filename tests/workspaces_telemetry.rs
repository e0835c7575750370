//! Per-workspace telemetry: the workspace name is a field of the lookup's and the
//! refresh's spans; the `metrics` counters carry no per-workspace label.

#![cfg(feature = "workspaces")]

mod support;

use std::collections::HashMap;

use bytes::Bytes;
use eshopbox_auth::mock::MockEshopbox;
use eshopbox_auth::{Credentials, EshopboxAuthLayer, Workspace};
use http::{Request, Response};
use http_body_util::Empty;
use metrics_util::debugging::DebuggingRecorder;
use tower::{service_fn, BoxError, Layer, ServiceExt};

#[tokio::test(flavor = "current_thread")]
async fn spans_name_the_workspace_and_metrics_carry_no_workspace_label() {
    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    recorder
        .install()
        .expect("the only recorder of this test binary");
    let (captured, _guard) = support::telemetry::capture(tracing::Level::DEBUG);

    let eshopbox = MockEshopbox::start().await.unwrap();
    let apps: HashMap<String, Credentials> = ["acme", "globex"]
        .into_iter()
        .map(|name| (name.to_owned(), eshopbox.add_workspace(name)))
        .collect();
    let layer = EshopboxAuthLayer::per_workspace(move |workspace: Workspace| {
        let found = apps.get(workspace.name()).cloned();
        async move { Ok::<_, BoxError>(found) }
    })
    .token_url(&eshopbox.token_url())
    .build()
    .unwrap();
    let service = layer.layer(service_fn(|_: Request<Empty<Bytes>>| async {
        Ok::<_, BoxError>(Response::new(()))
    }));
    for name in ["acme", "globex", "acme", "unknown"] {
        let mut request = Request::get("https://api.myeshopbox.com/x")
            .body(Empty::new())
            .unwrap();
        request.extensions_mut().insert(Workspace::new(name));
        let _ = service.clone().oneshot(request).await;
    }
    // A request naming no workspace counts as unknown too.
    let request = Request::get("https://api.myeshopbox.com/x")
        .body(Empty::new())
        .unwrap();
    let _ = service.clone().oneshot(request).await;

    let logs = captured.text();
    for name in ["acme", "globex"] {
        let refresh = logs
            .lines()
            .find(|line| {
                line.contains("token refresh finished")
                    && line.contains(&format!("eshopbox_auth_workspace{{workspace={name}}}"))
            })
            .unwrap_or_else(|| panic!("no refresh of {name} in a span naming it:\n{logs}"));
        assert!(
            refresh.contains("outcome=\"ok\"") || refresh.contains("outcome=ok"),
            "{refresh}"
        );
    }

    let counters = support::telemetry::counters(&snapshotter);
    assert!(
        counters.keys().all(|key| !key.contains("workspace=")),
        "{counters:?}"
    );
    assert_eq!(counters["eshopbox_auth_token_requests_total[]"], 2);
    assert_eq!(counters["eshopbox_auth_workspaces_resolved_total[]"], 2);
    assert_eq!(counters["eshopbox_auth_workspaces_unknown_total[]"], 2);
    // Per workspace, from its handle.
    let acme = layer.handle(&Workspace::new("acme")).unwrap().stats();
    assert_eq!(acme.token_requests, 1);
}
