//! Turning one test binary's run into counted outcomes: parse libtest's
//! human output (`test <name> ... ok|FAILED|ignored`, the `failures:` list and
//! the `test result:` line), merge the skip file the tests wrote
//! (`{"test": ..., "reason": ...}` per line), and account for binaries that
//! crash. Used for host and VM runs alike.
//!
//! Output of child processes (the daemon) may land between `test x ... ` and
//! its result; such a test stays pending until a line that is exactly a result,
//! or is settled by the `failures:` list and the `test result:` line.

use std::collections::BTreeMap;

use crate::report::{Outcome, Status};

/// How a test binary ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Exit {
    Code(i32),
    Signal(i32),
    /// It never finished (its VM died or timed out); says why.
    Unfinished(String),
}

impl Exit {
    fn success(&self) -> bool {
        *self == Exit::Code(0)
    }

    fn describe(&self) -> String {
        match self {
            Exit::Code(c) => format!("exited with code {c}"),
            Exit::Signal(s) => format!("was killed by signal {s}"),
            Exit::Unfinished(why) => format!("did not finish ({why})"),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Raw {
    Ok,
    Failed,
    Ignored(Option<String>),
}

#[derive(Debug, Default)]
struct Parsed {
    /// Tests in the order they started, with their result if one was seen.
    tests: Vec<(String, Option<Raw>)>,
    /// Names in the final `failures:` list.
    failures: Vec<String>,
    /// Whether the `test result:` line was seen.
    summary: bool,
}

/// The outcomes of one run of test binary `binary`.
pub fn outcomes(binary: &str, output: &str, exit: &Exit, skip_file: &str) -> Vec<Outcome> {
    let parsed = parse(output);
    let (skips, skip_errors) = parse_skip_file(skip_file);
    let mut out = Vec::new();
    let mut in_progress = None;

    for (name, raw) in &parsed.tests {
        let listed_failed = parsed.failures.contains(name);
        let status = match raw {
            Some(Raw::Failed) => Status::Failed,
            Some(Raw::Ignored(_)) => Status::Skipped,
            _ if listed_failed => Status::Failed,
            Some(Raw::Ok) => Status::Passed,
            // Result line lost among other output: the summary settles it.
            None if parsed.summary || exit.success() => Status::Passed,
            None => {
                in_progress = Some(name.clone());
                continue;
            }
        };
        out.push(settle(binary, name, status, raw, skips.get(name)));
    }
    for name in &parsed.failures {
        if !parsed.tests.iter().any(|(n, _)| n == name) {
            out.push(Outcome::new(binary, name, Status::Failed, None));
        }
    }
    for (name, reason) in &skips {
        if !parsed.tests.iter().any(|(n, _)| n == name) && !parsed.failures.contains(name) {
            let note = format!("{reason} (test line not seen in the output)");
            out.push(Outcome::new(binary, name, Status::Skipped, Some(note)));
        }
    }
    for err in skip_errors {
        out.push(Outcome::binary_failure(
            binary,
            format!("unreadable skip file line: {err}"),
        ));
    }
    // A binary that failed without saying why, or died before libtest's
    // summary (even after some FAILED tests), is one more failure of its own.
    let crashed = !parsed.summary;
    if !exit.success() && (crashed || !out.iter().any(|o| o.status == Status::Failed)) {
        let mut note = match crashed {
            true => format!("{} before libtest's summary", exit.describe()),
            false => format!("{} without a FAILED test", exit.describe()),
        };
        if let Some(t) = in_progress {
            note.push_str(&format!("; it was running {t}"));
        }
        out.push(Outcome::binary_failure(binary, note));
    }
    out
}

fn settle(
    binary: &str,
    name: &str,
    status: Status,
    raw: &Option<Raw>,
    skip: Option<&String>,
) -> Outcome {
    match (status, skip) {
        (Status::Passed, Some(reason)) => {
            Outcome::new(binary, name, Status::Skipped, Some(reason.clone()))
        }
        (Status::Failed, Some(reason)) => Outcome::new(
            binary,
            name,
            Status::Failed,
            Some(format!("failed after recording a skip ({reason})")),
        ),
        (Status::Skipped, _) => {
            let reason = match raw {
                Some(Raw::Ignored(Some(r))) => format!("ignored: {r}"),
                _ => "ignored".to_owned(),
            };
            Outcome::new(binary, name, Status::Skipped, Some(reason))
        }
        (status, _) => Outcome::new(binary, name, status, None),
    }
}

/// Skip records by test name (the first reason wins), and lines that are not
/// valid records.
pub fn parse_skip_file(text: &str) -> (BTreeMap<String, String>, Vec<String>) {
    let mut skips = BTreeMap::new();
    let mut errors = Vec::new();
    for line in text.lines().map(str::trim).filter(|l| !l.is_empty()) {
        let record: Option<(String, String)> = serde_json::from_str::<serde_json::Value>(line)
            .ok()
            .and_then(|v| {
                let test = v["test"].as_str()?.to_owned();
                let reason = v["reason"].as_str().unwrap_or("no reason given").to_owned();
                Some((test, reason))
            });
        match record {
            Some((test, reason)) => {
                skips.entry(test).or_insert(reason);
            }
            None => errors.push(line.to_owned()),
        }
    }
    (skips, errors)
}

fn parse(output: &str) -> Parsed {
    let lines: Vec<String> = output.lines().map(clean).collect();
    let mut p = Parsed::default();
    let mut pending: Option<usize> = None;
    for (i, line) in lines.iter().enumerate() {
        if line.starts_with("test result: ") {
            p.summary = true;
            p.failures = failure_list(&lines[..i]);
            pending = None;
            continue;
        }
        if let Some((name, rest)) = test_line(line) {
            let raw = result(rest.trim());
            pending = if raw.is_none() {
                Some(p.tests.len())
            } else {
                None
            };
            p.tests.push((name, raw));
            continue;
        }
        if let Some(idx) = pending {
            if let Some(raw) = result(line.trim()) {
                p.tests[idx].1 = Some(raw);
                pending = None;
            }
        }
    }
    p
}

/// `test <name> ... <rest>` → (name without ` - should panic`, rest).
fn test_line(line: &str) -> Option<(String, &str)> {
    let rest = line.strip_prefix("test ")?;
    let (name, result) = match rest.split_once(" ... ") {
        Some(split) => split,
        None => (rest.strip_suffix(" ...")?, ""),
    };
    let name = name.split(" - should panic").next().unwrap_or(name).trim();
    if name.is_empty() || result.trim_start().starts_with("bench:") {
        return None;
    }
    Some((name.to_owned(), result))
}

/// A libtest result word, exactly.
fn result(text: &str) -> Option<Raw> {
    match text {
        "ok" => Some(Raw::Ok),
        "FAILED" => Some(Raw::Failed),
        "ignored" => Some(Raw::Ignored(None)),
        _ => text
            .strip_prefix("ignored, ")
            .map(|r| Raw::Ignored(Some(r.trim().to_owned()))),
    }
}

/// The names listed under the `failures:` heading right before `test result:`.
fn failure_list(before_summary: &[String]) -> Vec<String> {
    let mut names = Vec::new();
    for line in before_summary.iter().rev() {
        if line.trim().is_empty() && names.is_empty() {
            continue;
        }
        if line == "failures:" {
            names.reverse();
            return names;
        }
        match line.strip_prefix("    ") {
            Some(name) if !name.trim().is_empty() => names.push(name.trim().to_owned()),
            _ => return Vec::new(),
        }
    }
    Vec::new()
}

/// Drop `\r` and ANSI escape sequences.
fn clean(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut chars = line.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\r' => {}
            '\u{1b}' => {
                if chars.peek() == Some(&'[') {
                    chars.next();
                    for c in chars.by_ref() {
                        if c.is_ascii_alphabetic() {
                            break;
                        }
                    }
                }
            }
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn statuses(o: &[Outcome]) -> Vec<(String, Status, Option<String>)> {
        o.iter()
            .map(|o| (o.name(), o.status, o.note.clone()))
            .collect()
    }

    const PASSING: &str = "\nrunning 3 tests\ntest a::one ... ok\ntest a::two ... ignored\n\
        test b::three ... ignored, needs root\n\ntest result: ok. 1 passed; 0 failed; 2 ignored; \
        0 measured; 0 filtered out; finished in 0.00s\n\n";

    #[test]
    fn counts_ok_and_ignored() {
        let o = outcomes("bin", PASSING, &Exit::Code(0), "");
        assert_eq!(
            statuses(&o),
            vec![
                ("bin::a::one".into(), Status::Passed, None),
                (
                    "bin::a::two".into(),
                    Status::Skipped,
                    Some("ignored".into())
                ),
                (
                    "bin::b::three".into(),
                    Status::Skipped,
                    Some("ignored: needs root".into())
                ),
            ]
        );
    }

    #[test]
    fn skip_file_turns_a_pass_into_a_skip() {
        let skips = "{\"test\":\"a::one\",\"reason\":\"no BPF-LSM\"}\n";
        let o = outcomes("bin", PASSING, &Exit::Code(0), skips);
        assert_eq!(o[0].status, Status::Skipped);
        assert_eq!(o[0].note.as_deref(), Some("no BPF-LSM"));
    }

    #[test]
    fn failures_and_interleaved_daemon_output() {
        let out = "running 4 tests\r\n\
            test x::first ... \x1b[32mok\x1b[0m\n\
            test x::second ... daemon: listening\n\
            daemon: more\n\
            ok\n\
            test x::third ... daemon: no newline after this then FAILED\n\
            test x::fourth ... FAILED\n\
            \nfailures:\n\n---- x::fourth stdout ----\n    indented captured output\n\
            \nfailures:\n    x::fourth\n    x::third\n\n\
            test result: FAILED. 2 passed; 2 failed; 0 ignored\n";
        let o = outcomes("bin", out, &Exit::Code(101), "");
        assert_eq!(
            statuses(&o),
            vec![
                ("bin::x::first".into(), Status::Passed, None),
                ("bin::x::second".into(), Status::Passed, None),
                ("bin::x::third".into(), Status::Failed, None),
                ("bin::x::fourth".into(), Status::Failed, None),
            ]
        );
    }

    #[test]
    fn pending_result_settled_by_summary() {
        let out =
            "test y::glued ... \ndaemon line without newlineok\n\ntest result: ok. 1 passed\n";
        let o = outcomes("bin", out, &Exit::Code(0), "");
        assert_eq!(
            statuses(&o),
            vec![("bin::y::glued".into(), Status::Passed, None)]
        );
    }

    #[test]
    fn crash_counts_as_one_failure_named_after_the_binary() {
        let out = "running 2 tests\ntest z::fine ... ok\ntest z::boom ... ";
        let o = outcomes("net", out, &Exit::Signal(11), "");
        assert_eq!(
            statuses(&o),
            vec![
                ("net::z::fine".into(), Status::Passed, None),
                (
                    "net".into(),
                    Status::Failed,
                    Some(
                        "was killed by signal 11 before libtest's summary; it was running z::boom"
                            .into()
                    )
                ),
            ]
        );
    }

    #[test]
    fn crash_after_a_failed_test_is_counted_too() {
        let out = "running 2 tests\ntest a ... FAILED\ntest b ... ";
        let o = outcomes("bin", out, &Exit::Code(134), "");
        assert_eq!(o.len(), 2);
        assert_eq!(o[0].name(), "bin::a");
        assert_eq!(o[1].name(), "bin");
        assert_eq!(
            o[1].note.as_deref(),
            Some("exited with code 134 before libtest's summary; it was running b")
        );
    }

    #[test]
    fn unfinished_binary_in_a_dead_vm() {
        let o = outcomes(
            "files",
            "running 1 test\n",
            &Exit::Unfinished("VM timed out".into()),
            "",
        );
        assert_eq!(o.len(), 1);
        assert_eq!(o[0].name(), "files");
        assert_eq!(o[0].status, Status::Failed);
    }

    #[test]
    fn nonzero_exit_with_failed_test_is_not_double_counted() {
        let out =
            "test a ... FAILED\n\nfailures:\n    a\n\ntest result: FAILED. 0 passed; 1 failed\n";
        let o = outcomes("bin", out, &Exit::Code(101), "");
        assert_eq!(statuses(&o), vec![("bin::a".into(), Status::Failed, None)]);
    }

    #[test]
    fn skip_then_failure_is_a_failure() {
        let out =
            "test a ... FAILED\n\nfailures:\n    a\n\ntest result: FAILED. 0 passed; 1 failed\n";
        let o = outcomes(
            "bin",
            out,
            &Exit::Code(101),
            "{\"test\":\"a\",\"reason\":\"r\"}",
        );
        assert_eq!(o.len(), 1);
        assert_eq!(o[0].status, Status::Failed);
    }

    #[test]
    fn should_panic_suffix_is_dropped() {
        let out = "test p::panics - should panic ... ok\n\ntest result: ok. 1 passed\n";
        let o = outcomes(
            "bin",
            out,
            &Exit::Code(0),
            "{\"test\":\"p::panics\",\"reason\":\"r\"}",
        );
        assert_eq!(
            statuses(&o),
            vec![("bin::p::panics".into(), Status::Skipped, Some("r".into()))]
        );
    }

    #[test]
    fn bad_skip_lines_fail_and_unseen_skips_still_count() {
        let (skips, errors) = parse_skip_file("{\"test\":\"t\",\"reason\":\"r\"}\nnot json\n\n");
        assert_eq!(skips.get("t").map(String::as_str), Some("r"));
        assert_eq!(errors, vec!["not json".to_owned()]);
        let o = outcomes(
            "bin",
            "",
            &Exit::Code(0),
            "{\"test\":\"t\",\"reason\":\"r\"}\nbad\n",
        );
        assert_eq!(o.len(), 2);
        assert_eq!(o[0].status, Status::Skipped);
        assert_eq!(o[1].status, Status::Failed);
    }
}
