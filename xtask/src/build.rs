//! `cargo xtask build`: build the workspace (debug) and its test executables,
//! and learn where cargo put each test executable from its JSON messages.
//! Never cleans: artifacts are reused between runs.

use std::{
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use anyhow::{bail, Context as _, Result};
use serde_json::Value;

use crate::cmd;

/// The package whose `tests/*.rs` are the integration tests.
pub const INTEGRATION_PACKAGE: &str = "agentguard-tests";

/// The eBPF crate only builds for bpfel-unknown-none (aya-build builds it from
/// agentguard-userspace's build script); it also has a bin named `agentguard`
/// that would collide with the daemon's in target/debug.
const EXCLUDED: &str = "agentguard-ebpf";

/// A test executable cargo built.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TestExe {
    pub package: String,
    pub target: String,
    /// Cargo target kind: lib, bin, test, example, bench.
    pub kind: String,
    pub path: PathBuf,
    /// Where the package's Cargo.toml is; tests run there, as under `cargo test`.
    pub manifest_dir: PathBuf,
}

impl TestExe {
    pub fn is_integration(&self) -> bool {
        self.package == INTEGRATION_PACKAGE && self.kind == "test"
    }

    /// Name in reports: the target name for integration tests, else the package
    /// (lib unit tests) or `package/kind:target`.
    pub fn label(&self) -> String {
        if self.is_integration() {
            self.target.clone()
        } else if self.kind == "lib" {
            self.package.clone()
        } else {
            format!("{}/{}:{}", self.package, self.kind, self.target)
        }
    }
}

/// A program cargo built (not a test harness), e.g. `agentguard`, `ag-testbin`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Program {
    pub package: String,
    pub name: String,
    pub path: PathBuf,
}

pub struct Built {
    pub tests: Vec<TestExe>,
    /// Every bin target of the workspace except xtask's.
    pub programs: Vec<Program>,
}

/// `cargo build` of the workspace, then `cargo test --no-run`.
pub fn run(root: &Path) -> Result<Built> {
    let programs = programs_only(root)?;
    let test = cargo_json(
        root,
        &["test", "--workspace", "--exclude", EXCLUDED, "--no-run"],
    )
    .context("building the test executables failed")?;
    let tests = test_executables(&test).context("cannot read cargo test's JSON messages")?;
    Ok(Built { tests, programs })
}

/// Only `cargo build` (all `cargo xtask run` needs).
pub fn programs_only(root: &Path) -> Result<Vec<Program>> {
    let build = cargo_json(root, &["build", "--workspace", "--exclude", EXCLUDED])
        .context("building the workspace failed")?;
    programs(&build).context("cannot read cargo build's JSON messages")
}

/// Run cargo with JSON messages on stdout (returned) and rendered
/// diagnostics and progress on stderr (shown).
fn cargo_json(root: &Path, args: &[&str]) -> Result<String> {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut c = Command::new(cargo);
    c.current_dir(root)
        .args(args)
        .arg("--message-format=json-render-diagnostics")
        .stdin(Stdio::null())
        .stderr(Stdio::inherit());
    let out = c
        .output()
        .with_context(|| format!("cannot start `{}`", cmd::describe(&c)))?;
    if !out.status.success() {
        bail!(
            "`{}` failed ({}); see the errors above",
            cmd::describe(&c),
            out.status
        );
    }
    String::from_utf8(out.stdout)
        .with_context(|| format!("`{}` printed non-UTF-8", cmd::describe(&c)))
}

/// The non-test `bin` executables in `cargo build --message-format=json` output, xtask's excepted.
pub fn programs(json_lines: &str) -> Result<Vec<Program>> {
    let mut found = Vec::new();
    for msg in artifacts(json_lines)? {
        if msg["profile"]["test"] == true || msg["target"]["kind"][0] != "bin" {
            continue;
        }
        let Some(exe) = msg["executable"].as_str() else {
            continue;
        };
        let package_id = msg["package_id"].as_str().unwrap_or_default();
        let package = package_name(package_id)
            .with_context(|| format!("cannot read a package name from {package_id:?}"))?;
        if package == "xtask" {
            continue;
        }
        let name = msg["target"]["name"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        found.push(Program {
            package,
            name,
            path: PathBuf::from(exe),
        });
    }
    Ok(found)
}

/// The `compiler-artifact` messages.
fn artifacts(json_lines: &str) -> Result<Vec<Value>> {
    let mut out = Vec::new();
    for line in json_lines.lines().filter(|l| l.starts_with('{')) {
        let msg: Value = serde_json::from_str(line)
            .with_context(|| format!("cargo printed a line that is not JSON: {line}"))?;
        if msg["reason"] == "compiler-artifact" {
            out.push(msg);
        }
    }
    Ok(out)
}

/// The test executables in `cargo test --no-run --message-format=json` output:
/// `compiler-artifact` messages with `profile.test` and an `executable`.
pub fn test_executables(json_lines: &str) -> Result<Vec<TestExe>> {
    let mut found: Vec<TestExe> = Vec::new();
    for msg in artifacts(json_lines)? {
        if msg["profile"]["test"] != true {
            continue;
        }
        let Some(exe) = msg["executable"].as_str() else {
            continue;
        };
        let package_id = msg["package_id"].as_str().unwrap_or_default();
        let manifest = PathBuf::from(msg["manifest_path"].as_str().unwrap_or_default());
        let t = TestExe {
            package: package_name(package_id)
                .with_context(|| format!("cannot read a package name from {package_id:?}"))?,
            target: msg["target"]["name"]
                .as_str()
                .unwrap_or_default()
                .to_owned(),
            kind: msg["target"]["kind"][0]
                .as_str()
                .unwrap_or_default()
                .to_owned(),
            path: PathBuf::from(exe),
            manifest_dir: manifest.parent().map(Path::to_path_buf).unwrap_or_default(),
        };
        if !found.iter().any(|f| f.path == t.path) {
            found.push(t);
        }
    }
    Ok(found)
}

/// The package name in a cargo package id: the newer spec form
/// `path+file:///w/tests#agentguard-tests@0.1.0` (or `...#0.1.0` when the
/// directory has the package's name), or the older `name 0.1.0 (source)`.
pub fn package_name(id: &str) -> Option<String> {
    if let Some((url, fragment)) = id.rsplit_once('#') {
        let name = match fragment.split_once('@') {
            Some((name, _version)) => name,
            None => url.rsplit('/').next()?,
        };
        return (!name.is_empty()).then(|| name.to_owned());
    }
    id.split_whitespace().next().map(str::to_owned)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn package_names_from_ids() {
        assert_eq!(
            package_name("path+file:///work/main/tests#agentguard-tests@0.1.0").as_deref(),
            Some("agentguard-tests")
        );
        assert_eq!(
            package_name("path+file:///work/main/xtask#0.1.0").as_deref(),
            Some("xtask")
        );
        assert_eq!(
            package_name("xtask 0.1.0 (path+file:///work/main/xtask)").as_deref(),
            Some("xtask")
        );
    }

    #[test]
    fn test_executables_from_cargo_json() {
        let json = r#"{"reason":"compiler-artifact","package_id":"path+file:///w/tests#agentguard-tests@0.1.0","manifest_path":"/w/tests/Cargo.toml","target":{"kind":["test"],"name":"files"},"profile":{"test":true},"executable":"/w/target/debug/deps/files-1"}
{"reason":"compiler-artifact","package_id":"path+file:///w/xtask#0.1.0","manifest_path":"/w/xtask/Cargo.toml","target":{"kind":["bin"],"name":"xtask"},"profile":{"test":false},"executable":"/w/target/debug/xtask"}
{"reason":"compiler-artifact","package_id":"path+file:///w/xtask#0.1.0","manifest_path":"/w/xtask/Cargo.toml","target":{"kind":["bin"],"name":"xtask"},"profile":{"test":true},"executable":"/w/target/debug/deps/xtask-2"}
{"reason":"compiler-artifact","package_id":"registry+https://x#serde@1.0.0","manifest_path":"/r/Cargo.toml","target":{"kind":["lib"],"name":"serde"},"profile":{"test":false},"executable":null}
{"reason":"build-finished","success":true}"#;
        let t = test_executables(json).expect("parses");
        assert_eq!(t.len(), 2);
        assert!(t[0].is_integration());
        assert_eq!(t[0].label(), "files");
        assert_eq!(t[0].manifest_dir, PathBuf::from("/w/tests"));
        assert!(!t[1].is_integration());
        assert_eq!(t[1].label(), "xtask/bin:xtask");
    }

    #[test]
    fn programs_from_cargo_json() {
        let json = r#"{"reason":"compiler-artifact","package_id":"path+file:///w/tests#agentguard-tests@0.1.0","manifest_path":"/w/tests/Cargo.toml","target":{"kind":["bin"],"name":"ag-testbin"},"profile":{"test":false},"executable":"/w/target/debug/ag-testbin"}
{"reason":"compiler-artifact","package_id":"path+file:///w/xtask#0.1.0","manifest_path":"/w/xtask/Cargo.toml","target":{"kind":["bin"],"name":"xtask"},"profile":{"test":false},"executable":"/w/target/debug/xtask"}
{"reason":"compiler-artifact","package_id":"path+file:///w/agentguard-userspace#0.1.0","manifest_path":"/w/agentguard-userspace/Cargo.toml","target":{"kind":["lib"],"name":"agentguard"},"profile":{"test":false},"executable":null}"#;
        let p = programs(json).expect("parses");
        assert_eq!(
            p,
            vec![Program {
                package: "agentguard-tests".into(),
                name: "ag-testbin".into(),
                path: PathBuf::from("/w/target/debug/ag-testbin")
            }]
        );
    }
}
