//! The minimum Rust version in `Cargo.toml` (and the README) holds for the dependency
//! versions in `Cargo.lock`: no dependency the library builds with on this platform,
//! whatever its features, asks for a newer Rust. Read from `cargo metadata`, offline.

use std::collections::{HashMap, HashSet};
use std::process::Command;

use serde_json::Value;

/// `1.89` or `1.89.0` as a comparable pair.
fn version(text: &str) -> (u32, u32) {
    let mut parts = text.split('.').map(|part| part.parse::<u32>().unwrap());
    (parts.next().unwrap(), parts.next().unwrap_or(0))
}

/// The host's target triple (`rustc -vV`).
fn host() -> String {
    let rustc = std::env::var("RUSTC").unwrap_or_else(|_| "rustc".into());
    let output = Command::new(rustc).arg("-vV").output().unwrap();
    String::from_utf8(output.stdout)
        .unwrap()
        .lines()
        .find_map(|line| line.strip_prefix("host: "))
        .unwrap()
        .to_owned()
}

#[test]
fn no_dependency_needs_a_newer_rust_than_the_stated_minimum() {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    // This platform's packages only: the build downloaded those, and no others are
    // needed offline.
    let output = Command::new(cargo)
        .args([
            "metadata",
            "--format-version",
            "1",
            "--all-features",
            "--locked",
            "--offline",
            "--filter-platform",
            &host(),
        ])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let metadata: Value = serde_json::from_slice(&output.stdout).unwrap();
    let packages: HashMap<&str, &Value> = metadata["packages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| (p["id"].as_str().unwrap(), p))
        .collect();
    let nodes: HashMap<&str, &Value> = metadata["resolve"]["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| (n["id"].as_str().unwrap(), n))
        .collect();
    let root = metadata["resolve"]["root"].as_str().unwrap();
    let stated = version(packages[root]["rust_version"].as_str().unwrap());

    // Everything the library builds with: dependencies that are not only for
    // development, followed down.
    let mut seen = HashSet::new();
    let mut stack = vec![root];
    while let Some(id) = stack.pop() {
        if !seen.insert(id) {
            continue;
        }
        for dep in nodes[id]["deps"].as_array().unwrap() {
            let dev_only = dep["dep_kinds"]
                .as_array()
                .unwrap()
                .iter()
                .all(|kind| kind["kind"].as_str() == Some("dev"));
            if !dev_only {
                stack.push(dep["pkg"].as_str().unwrap());
            }
        }
    }
    let newer: Vec<String> = seen
        .iter()
        .filter(|id| **id != root)
        .filter_map(|id| {
            let package = packages[id];
            let needs = package["rust_version"].as_str()?;
            (version(needs) > stated)
                .then(|| format!("{} {} needs {needs}", package["name"], package["version"]))
        })
        .collect();
    assert!(
        newer.is_empty(),
        "rust-version {stated:?} is too old: {newer:?}"
    );

    // The README states the same version.
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
    let declared = packages[root]["rust_version"].as_str().unwrap();
    let stated_in_readme = readme
        .split("Minimum Rust version: ")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .map(|word| word.trim_end_matches(['.', ',']));
    assert_eq!(stated_in_readme, Some(declared), "the README's minimum");
}
