//! The layering of `ARCHITECTURE.md`, checked: the token core (`src/token/`) and the
//! token store (`src/store/`) never name an outer module. A plain text scan of the
//! code lines (comments and doc comments are skipped) for `crate::<module>`.

use std::fs;
use std::path::Path;

/// What the core may name: itself and the leaves (the error type, the boxed future,
/// the counters, the credentials), or the error type through its re-export.
const TOKEN_MAY_USE: &[&str] = &[
    "token",
    "error",
    "boxed",
    "stats",
    "credentials",
    "Error",
    "ErrorKind",
];

/// What the store may name: itself, the error type and the boxed future.
const STORE_MAY_USE: &[&str] = &["store", "error", "boxed", "Error", "ErrorKind"];

/// Every `crate::<name>` on a code line of the `.rs` files under `dir`, with where; in
/// `dir/mod.rs`, whose `super` is the crate root, every `super::<name>` too.
fn crate_paths(dir: &Path) -> Vec<(String, usize, String)> {
    let mut found = Vec::new();
    let root_module = dir.join("mod.rs");
    let mut dirs = vec![dir.to_path_buf()];
    while let Some(dir) = dirs.pop() {
        for entry in fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                dirs.push(path);
                continue;
            }
            if path.extension().is_none_or(|e| e != "rs") {
                continue;
            }
            let text = fs::read_to_string(&path).unwrap();
            for (n, line) in text.lines().enumerate() {
                let code = line.trim_start();
                if code.starts_with("//") {
                    continue;
                }
                // Cut a trailing comment, but not a `://` inside a string.
                let code = code.split(" //").next().unwrap_or("");
                let prefixes: &[&str] = if path == root_module {
                    &["crate::", "super::"]
                } else {
                    &["crate::"]
                };
                for prefix in prefixes {
                    for (at, _) in code.match_indices(prefix) {
                        let name: String = code[at + prefix.len()..]
                            .chars()
                            .take_while(|c| c.is_alphanumeric() || *c == '_')
                            .collect();
                        found.push((path.display().to_string(), n + 1, name));
                    }
                }
            }
        }
    }
    found
}

fn outer_imports(dir: &str, allowed: &[&str]) -> Vec<String> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join(dir);
    let paths = crate_paths(&root);
    assert!(!paths.is_empty(), "no crate paths found under {dir}");
    paths
        .into_iter()
        .filter(|(_, _, name)| !allowed.contains(&name.as_str()))
        .map(|(file, line, name)| format!("{file}:{line}: crate::{name}"))
        .collect()
}

#[test]
fn the_token_core_imports_no_outer_module() {
    let outer = outer_imports("src/token", TOKEN_MAY_USE);
    assert!(
        outer.is_empty(),
        "the token core names outer modules:\n{}",
        outer.join("\n")
    );
}

#[test]
fn the_token_store_imports_only_the_error_type_and_the_boxed_future() {
    let outer = outer_imports("src/store", STORE_MAY_USE);
    assert!(
        outer.is_empty(),
        "the store names outer modules:\n{}",
        outer.join("\n")
    );
}

#[test]
fn the_scan_sees_an_outer_import() {
    // The check itself bites: a line like the ones it guards against is found.
    let dir = std::env::temp_dir().join(format!("eshopbox-arch-{}", std::process::id()));
    fs::create_dir_all(&dir).unwrap();
    fs::write(
        dir.join("bad.rs"),
        "// use crate::layer::X; (a comment)\nuse crate::handle::TokenHandle;\n\
         let url = \"https://x\"; use crate::service::S; // crate::future\n",
    )
    .unwrap();
    // In the scanned folder's `mod.rs`, `super` is the crate root.
    fs::write(dir.join("mod.rs"), "use super::builder::X;\n").unwrap();
    let found = crate_paths(&dir);
    fs::remove_dir_all(&dir).unwrap();
    let mut names: Vec<_> = found.iter().map(|(_, _, name)| name.as_str()).collect();
    names.sort_unstable();
    assert_eq!(names, ["builder", "handle", "service"]);
}
