//! The runnable examples of `examples/`, run: each fails if a request through the
//! layer did not succeed. (`axum.rs` and `tonic.rs` have tests of their own.)

#[allow(dead_code)]
#[path = "../examples/hyper_util.rs"]
mod hyper_util_example;

#[allow(dead_code)]
#[path = "../examples/reqwest.rs"]
mod reqwest_example;

#[allow(dead_code)]
#[path = "../examples/quickstart.rs"]
mod quickstart_example;

#[allow(dead_code)]
#[path = "../examples/workspaces.rs"]
mod workspaces_example;

#[test]
fn the_hyper_util_example_runs() {
    hyper_util_example::main().unwrap();
}

#[test]
fn the_reqwest_example_runs() {
    reqwest_example::main().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_quickstart_demo_runs() {
    // The demo against the mock, whatever ESHOPBOX_* the environment holds.
    quickstart_example::demo().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_workspaces_job_syncs_every_merchant_with_its_own_token() {
    let report = workspaces_example::run().await.unwrap();
    assert_eq!(report.synced.len(), 3);
    assert!(report.synced.values().all(|&n| n == 4), "{report:?}");
    assert_eq!(report.token_calls, 3, "one token per workspace");
    assert_eq!(report.mismatches, 0);
}
