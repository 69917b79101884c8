//! Test outcomes and the final report: per-environment blocks, the list of
//! skips, and the last line `N passed, N failed, N skipped`.

use std::fmt::Write as _;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    Passed,
    Failed,
    Skipped,
}

/// One counted result.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    /// The test binary's label (e.g. `files`, `agentguard-common`).
    pub binary: String,
    /// The libtest test name; empty when the outcome is about the binary itself
    /// (it crashed, could not run, or its VM died).
    pub test: String,
    pub status: Status,
    /// Skip reason, or what went wrong for a failure that is not a plain FAILED.
    pub note: Option<String>,
}

impl Outcome {
    pub fn new(binary: &str, test: &str, status: Status, note: Option<String>) -> Self {
        Outcome {
            binary: binary.to_owned(),
            test: test.to_owned(),
            status,
            note,
        }
    }

    /// A failure of the binary as a whole.
    pub fn binary_failure(binary: &str, note: String) -> Self {
        Outcome::new(binary, "", Status::Failed, Some(note))
    }

    pub fn name(&self) -> String {
        if self.test.is_empty() {
            self.binary.clone()
        } else {
            format!("{}::{}", self.binary, self.test)
        }
    }
}

/// Everything counted in one environment (`host`, `vm-6.12`, ...).
#[derive(Debug, Clone)]
pub struct EnvResults {
    pub env: String,
    pub outcomes: Vec<Outcome>,
    /// Facts worth a line in the report (kernel, LSMs, where the log is).
    pub notes: Vec<String>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counts {
    pub passed: usize,
    pub failed: usize,
    pub skipped: usize,
}

impl Counts {
    pub fn of<'a>(outcomes: impl IntoIterator<Item = &'a Outcome>) -> Counts {
        let mut c = Counts::default();
        for o in outcomes {
            match o.status {
                Status::Passed => c.passed += 1,
                Status::Failed => c.failed += 1,
                Status::Skipped => c.skipped += 1,
            }
        }
        c
    }
}

/// The report's last line, exactly.
pub fn summary_line(c: Counts) -> String {
    format!(
        "{} passed, {} failed, {} skipped",
        c.passed, c.failed, c.skipped
    )
}

/// The whole report; its last line is [`summary_line`] of the totals.
pub fn render(envs: &[EnvResults]) -> String {
    let mut s = String::new();
    for e in envs {
        let c = Counts::of(&e.outcomes);
        let _ = writeln!(s, "== {} ==", e.env);
        let _ = writeln!(
            s,
            "   {} passed, {} failed, {} skipped",
            c.passed, c.failed, c.skipped
        );
        for n in &e.notes {
            let _ = writeln!(s, "   note: {n}");
        }
        for o in e.outcomes.iter().filter(|o| o.status == Status::Failed) {
            match &o.note {
                Some(note) => {
                    let _ = writeln!(s, "   FAILED {}: {}", o.name(), one_line(note));
                }
                None => {
                    let _ = writeln!(s, "   FAILED {}", o.name());
                }
            }
        }
    }
    for e in envs {
        for o in e.outcomes.iter().filter(|o| o.status == Status::Skipped) {
            let reason = one_line(o.note.as_deref().unwrap_or("no reason given"));
            let _ = writeln!(s, "SKIP [{}] {}: {reason}", e.env, o.name());
        }
    }
    let total = Counts::of(envs.iter().flat_map(|e| &e.outcomes));
    s.push_str(&summary_line(total));
    s.push('\n');
    s
}

/// The first line of a reason (at most 300 characters), saying how much was cut;
/// the full text is in the test's output or the console log.
fn one_line(text: &str) -> String {
    const MAX: usize = 300;
    let text = text.trim();
    let first = text.lines().next().unwrap_or_default();
    let mut out: String = first.chars().take(MAX).collect();
    let more_lines = text.lines().count().saturating_sub(1);
    if out.len() < first.len() || more_lines > 0 {
        out.push_str(&format!(
            " [… {more_lines} more lines, cut; full text in the test output]"
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn report_ends_with_the_totals_line() {
        let envs = vec![
            EnvResults {
                env: "host".into(),
                outcomes: vec![
                    Outcome::new("common", "a", Status::Passed, None),
                    Outcome::new("files", "b", Status::Skipped, Some("no BPF-LSM".into())),
                ],
                notes: vec![],
            },
            EnvResults {
                env: "vm-6.1".into(),
                outcomes: vec![
                    Outcome::new("files", "b", Status::Failed, None),
                    Outcome::binary_failure("net", "exited with code 101".into()),
                ],
                notes: vec!["LSMs bpf".into()],
            },
        ];
        let r = render(&envs);
        let lines: Vec<&str> = r.lines().collect();
        assert_eq!(lines.last(), Some(&"1 passed, 2 failed, 1 skipped"));
        assert!(lines.contains(&"SKIP [host] files::b: no BPF-LSM"));
        assert!(lines.contains(&"   FAILED files::b"));
        assert!(lines.contains(&"   FAILED net: exited with code 101"));
        assert!(lines.contains(&"== vm-6.1 =="));
        assert!(lines.contains(&"   note: LSMs bpf"));
    }

    #[test]
    fn long_reasons_are_cut_to_one_line() {
        assert_eq!(one_line("short"), "short");
        assert_eq!(
            one_line("first\nsecond\nthird"),
            "first [… 2 more lines, cut; full text in the test output]"
        );
        assert!(one_line(&"x".repeat(400)).starts_with(&"x".repeat(300)));
        assert!(!one_line(&"x".repeat(400)).contains(&"x".repeat(301)));
    }

    #[test]
    fn empty_report_is_all_zero() {
        assert_eq!(render(&[]), "0 passed, 0 failed, 0 skipped\n");
    }
}
