//! `agentguard doctor` tells the truth about this kernel: what it reports
//! matches what the real programs can do here (on the host: BPF-LSM listed
//! but not loadable; in the VMs: loadable).
use std::process::Command;

use agentguard_tests::{agentguard_bin, kernel::Loaded};
use serde_json::Value;

fn class<'a>(report: &'a Value, name: &str) -> &'a Value {
    report["classes"]
        .as_array()
        .and_then(|c| c.iter().find(|c| c["class"] == name))
        .unwrap_or_else(|| panic!("doctor reports no class {name:?}: {report:#}"))
}

#[test]
fn doctor_matches_what_this_kernel_can_load() {
    let out = Command::new(agentguard_bin()).args(["doctor", "--json"]).output().expect("run doctor");
    let report: Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("doctor --json is not JSON ({e}): {}", String::from_utf8_lossy(&out.stdout)));
    assert!(out.status.success(), "the daemon can run on every kernel we test: {report:#}");
    assert_eq!(report["daemon_can_run"], true);

    let network = class(&report, "network veto");
    assert_eq!(network["available"], true, "{network}");
    assert_eq!(network["veto"], true);
    let killswitch = class(&report, "killswitch");
    assert_eq!(killswitch["available"], true, "{killswitch}");
    let tagging = class(&report, "process tagging");
    assert_eq!(tagging["available"], true, "{tagging}");

    // The file veto is what the real object can attach here, nothing else.
    let loaded = Loaded::attach_all();
    let file = class(&report, "file veto");
    let lsm_check = report["checks"]
        .as_array()
        .and_then(|c| c.iter().find(|c| c["name"] == "lsm_loadable"))
        .expect("lsm_loadable check");
    if loaded.file_veto() {
        assert_eq!(file["veto"], true, "BPF-LSM loads here, doctor must say the file veto is available: {file}");
        assert_eq!(lsm_check["ok"], true);
    } else {
        assert_eq!(file["veto"], false, "BPF-LSM does not load here, doctor must not claim a veto: {file}");
        assert!(
            file["mechanism"].as_str().is_some_and(|m| m.contains("fallback")),
            "doctor names the fallback: {file}"
        );
        assert!(file["remediation"].is_string(), "and says what to do: {file}");
    }
    let listed = report["checks"]
        .as_array()
        .and_then(|c| c.iter().find(|c| c["name"] == "lsm_listed"))
        .expect("lsm_listed check");
    let lsm_file = std::fs::read_to_string("/sys/kernel/security/lsm").unwrap_or_default();
    assert_eq!(listed["ok"], lsm_file.split(',').any(|l| l.trim() == "bpf"), "{listed}");
}

/// A reader that goes away (`agentguard doctor | head -1`) ends a command
/// quietly, as SIGPIPE ends any Unix tool: no panic, no backtrace.
#[test]
fn a_closed_pipe_ends_a_command_quietly() {
    use std::os::unix::process::ExitStatusExt;
    let (reader, writer) = std::io::pipe().expect("pipe");
    drop(reader);
    let out = Command::new(agentguard_bin())
        .arg("doctor")
        .stdout(writer)
        .stderr(std::process::Stdio::piped())
        .output()
        .expect("run doctor");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains("panicked"), "doctor panicked on a closed pipe: {stderr}");
    assert_eq!(out.status.signal(), Some(libc::SIGPIPE), "ended by SIGPIPE, as `cat` would be: {:?} {stderr}", out.status);
}
