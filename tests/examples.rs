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
