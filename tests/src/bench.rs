//! The one shape of results every `ag-bench*` harness writes, so that
//! `cargo xtask bench` can put all of them in one table.
//!
//! A harness's JSON document keeps its own detailed rows and adds
//! `"summary"`: one [`Row`] per benchmark figure, already judged against its
//! target from ../shared/DESIGN.md:
//!
//! ```json
//! {"id": "B6", "what": "freeze to frozen 1", "setup": "100 processes",
//!  "median": 0.61, "unit": "ms", "spread": {"p90": 0.8, "max": 1.2},
//!  "target": "<= 5 ms", "pass": true, "note": "31 runs"}
//! ```
//!
//! `spread` is `[min, max]` over rounds, or named tail figures (`p90`,
//! `p99`, `max`); `pass` is `null` where a figure has no target of its own
//! (context rows such as a measured floor). A missed target is a result, not
//! a failure: the harness still exits 0.
//!
//! Every harness takes the same arguments, parsed by [`Args`]:
//!
//!     ag-bench-NAME [--quick] [--json FILE] [ID...]
//!
//! where the IDs (`b2u`, `b6`, ...) select benchmarks. A harness none of
//! whose benchmarks is selected writes `{"bench": NAME, "selected": false,
//! "summary": []}` and exits 0, so the caller can tell "not asked" from
//! "crashed".
use std::{io::Write as _, path::PathBuf};

use serde_json::{json, Value};

/// Command-line arguments common to every harness.
#[derive(Debug, Clone, Default)]
pub struct Args {
    /// A smoke run: fewer rounds and iterations.
    pub quick: bool,
    /// Where to write the JSON document.
    pub json: Option<PathBuf>,
    /// Lower-case selectors (benchmark ids, or a harness's own names).
    pub selected: Vec<String>,
}

impl Args {
    /// Parse `std::env::args()` (without the program name).
    pub fn from_env() -> Self {
        Self::parse(&std::env::args().skip(1).collect::<Vec<_>>())
    }

    pub fn parse(args: &[String]) -> Self {
        let mut a = Self::default();
        let mut it = args.iter();
        while let Some(arg) = it.next() {
            match arg.as_str() {
                "--quick" => a.quick = true,
                "--json" => a.json = it.next().map(PathBuf::from),
                s if s.starts_with("--") => {}
                s => a.selected.push(s.to_lowercase()),
            }
        }
        a
    }

    /// Whether `id` (or another selector of this harness) was asked for:
    /// true when nothing was selected at all.
    pub fn wants(&self, id: &str) -> bool {
        self.selected.is_empty() || self.selected.iter().any(|s| s.eq_ignore_ascii_case(id))
    }

    /// Whether any of `ids` was asked for.
    pub fn wants_any(&self, ids: &[&str]) -> bool {
        ids.iter().any(|id| self.wants(id))
    }

    /// Unless one of `ids` is selected: say so, write the "not selected"
    /// document, and exit 0.
    pub fn exit_unless_any(&self, bench: &str, ids: &[&str]) {
        if self.wants_any(ids) {
            return;
        }
        eprintln!("{bench}: nothing selected (it runs {})", ids.join(", "));
        self.write(json!({ "bench": bench, "selected": false }), &[]);
        std::process::exit(0);
    }

    /// Write `doc` with its `"summary"` rows to `--json FILE`, if given, and
    /// print the summary rows.
    pub fn write(&self, mut doc: Value, summary: &[Row]) {
        doc["quick"] = json!(self.quick);
        doc["summary"] = Value::Array(summary.iter().map(Row::to_json).collect());
        if !summary.is_empty() {
            println!("\nsummary:");
            for r in summary {
                println!("  {}", r.line());
            }
        }
        let Some(path) = &self.json else { return };
        let text = serde_json::to_string_pretty(&doc).expect("benchmark document serialises");
        let mut f = std::fs::File::create(path).unwrap_or_else(|e| panic!("cannot write {}: {e}", path.display()));
        writeln!(f, "{text}").unwrap_or_else(|e| panic!("cannot write {}: {e}", path.display()));
    }
}

/// How widely a figure varied.
#[derive(Debug, Clone, PartialEq)]
pub enum Spread {
    /// Min and max over rounds.
    Range(f64, f64),
    /// Named tail figures, e.g. `[("p99", 4.1), ("max", 12.0)]`.
    Tail(Vec<(&'static str, f64)>),
    None,
}

impl Spread {
    fn to_json(&self) -> Value {
        match self {
            Self::Range(lo, hi) => json!([lo, hi]),
            Self::Tail(v) => Value::Object(v.iter().map(|(k, x)| ((*k).to_owned(), json!(x))).collect()),
            Self::None => Value::Null,
        }
    }
}

/// One benchmark figure, judged against its target.
#[derive(Debug, Clone, PartialEq)]
pub struct Row {
    /// `B0` ... `B9`, `B1f`, `B2u`.
    pub id: &'static str,
    pub what: String,
    pub setup: String,
    pub median: f64,
    /// `ns`, `us`, `ms`, `%`, `events/s`, `MiB`, `count`.
    pub unit: &'static str,
    pub spread: Spread,
    /// As DESIGN.md states it, in the unit of `median` where possible.
    pub target: String,
    /// `None`: no target of its own (context).
    pub pass: Option<bool>,
    /// Absolute figures behind a ratio, sample sizes, caveats.
    pub note: String,
}

impl Row {
    pub fn new(id: &'static str, what: impl Into<String>, setup: impl Into<String>) -> Self {
        Self {
            id,
            what: what.into(),
            setup: setup.into(),
            median: f64::NAN,
            unit: "",
            spread: Spread::None,
            target: String::new(),
            pass: None,
            note: String::new(),
        }
    }

    pub fn figure(mut self, median: f64, unit: &'static str, spread: Spread) -> Self {
        self.median = median;
        self.unit = unit;
        self.spread = spread;
        self
    }

    pub fn target(mut self, target: impl Into<String>, pass: Option<bool>) -> Self {
        self.target = target.into();
        self.pass = pass;
        self
    }

    pub fn note(mut self, note: impl Into<String>) -> Self {
        self.note = note.into();
        self
    }

    pub fn to_json(&self) -> Value {
        let Self { id, what, setup, median, unit, spread, target, pass, note } = self;
        json!({
            "id": id,
            "what": what,
            "setup": setup,
            "median": if median.is_finite() { json!(median) } else { Value::Null },
            "unit": unit,
            "spread": spread.to_json(),
            "target": target,
            "pass": pass,
            "note": note,
        })
    }

    /// One line for a harness's own output.
    pub fn line(&self) -> String {
        let verdict = match self.pass {
            Some(true) => "pass",
            Some(false) => "MISS",
            None => "-",
        };
        let spread = match &self.spread {
            Spread::Range(lo, hi) => format!(" [{lo:.2}..{hi:.2}]"),
            Spread::Tail(v) => v.iter().map(|(k, x)| format!(" {k} {x:.2}")).collect(),
            Spread::None => String::new(),
        };
        format!(
            "{:<4} {} / {}: {:.2} {}{spread} (target {}) {verdict}{}",
            self.id,
            self.what,
            self.setup,
            self.median,
            self.unit,
            if self.target.is_empty() { "-" } else { &self.target },
            if self.note.is_empty() { String::new() } else { format!("; {}", self.note) },
        )
    }
}

/// The median of `v` (NaN when empty).
pub fn median(v: &[f64]) -> f64 {
    let mut s: Vec<f64> = v.to_vec();
    s.sort_by(f64::total_cmp);
    match s.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => s[n / 2],
        n => (s[n / 2 - 1] + s[n / 2]) / 2.0,
    }
}

/// Min and max of `v`.
pub fn range(v: &[f64]) -> Spread {
    let (lo, hi) = v.iter().fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), x| (lo.min(*x), hi.max(*x)));
    if v.is_empty() { Spread::None } else { Spread::Range(lo, hi) }
}

/// Per-round paired figures of a setup against a reference measured in the
/// same round (alternating runs): `f(setup, reference)` for each round.
/// Pairing cancels the machine's slow drift, which a ratio of two medians
/// taken over the whole run does not.
pub fn paired(setup: &[f64], reference: &[f64], f: impl Fn(f64, f64) -> f64) -> Vec<f64> {
    setup.iter().zip(reference).map(|(s, r)| f(*s, *r)).collect()
}

/// Percent added: `(s / r - 1) * 100`.
pub fn pct_added(s: f64, r: f64) -> f64 {
    (s / r - 1.0) * 100.0
}

/// Whether the daemon observes file actions through syscall tracepoints
/// while an agent is live (its BPF-LSM file programs do not attach here):
/// B1f rather than B1, and the fallback's floor under B2u.
pub fn file_fallback() -> bool {
    static FALLBACK: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *FALLBACK.get_or_init(|| !crate::kernel::Loaded::attach_always().file_veto())
}

/// The fallback's floor: load the empty syscall-tracepoint program and
/// attach it at every tracepoint the file fallback attaches while an agent
/// is live (enter and exit; the attach points, not one stand-in, make the
/// mechanism's cost: an exit tracepoint puts the kernel's syscall-exit path
/// on its slow path too). Detached when `ebpf` drops.
pub fn attach_fallback_floor(ebpf: &mut aya::Ebpf) {
    use agentguard::loader::{Lifetime, ProbeKind, PROBES};
    let p: &mut aya::programs::TracePoint = ebpf
        .program_mut(agentguard_common::programs::FLOOR_SYSCALL)
        .expect("floor program")
        .try_into()
        .expect("tracepoint");
    p.load().expect("load floor");
    for spec in PROBES.iter().filter(|s| s.lifetime == Lifetime::FallbackWhileAgentLive) {
        if let ProbeKind::TracePoint { category, name } = spec.kind {
            p.attach(category, name).unwrap_or_else(|e| panic!("attach the floor at {category}/{name}: {e}"));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn args_take_quick_json_and_ids() {
        let a = Args::parse(&["--quick", "B2u", "--json", "out.json", "b3"].map(String::from));
        assert!(a.quick);
        assert_eq!(a.json, Some(PathBuf::from("out.json")));
        assert_eq!(a.selected, ["b2u", "b3"]);
        assert!(a.wants("B3") && !a.wants("b6"));
        assert!(Args::parse(&[]).wants("b6"));
    }

    #[test]
    fn row_json_has_every_field() {
        let r = Row::new("B6", "freeze", "100 processes")
            .figure(0.6, "ms", Spread::Tail(vec![("p90", 0.8)]))
            .target("<= 5 ms", Some(true));
        let v = r.to_json();
        assert_eq!(v["spread"]["p90"], 0.8);
        assert_eq!(v["pass"], true);
        assert_eq!(Row::new("B1", "x", "y").to_json()["median"], Value::Null);
    }

    #[test]
    fn medians_and_pairs() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), 2.5);
        assert_eq!(paired(&[110.0, 99.0], &[100.0, 100.0], pct_added).iter().map(|x| x.round()).collect::<Vec<_>>(), [10.0, -1.0]);
        assert_eq!(range(&[2.0, -1.0, 5.0]), Spread::Range(-1.0, 5.0));
    }
}

