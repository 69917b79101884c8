//! The combined benchmark table: the harnesses' `"summary"` rows (shape in
//! tests/src/bench.rs) rendered as one aligned table, failure rows for
//! harnesses that gave none, and the machine the figures came from.

use std::fmt::Write as _;

use serde_json::{json, Value};

/// What the figures depend on: cores, CPU, kernel, and how busy the machine
/// was (other builds share it).
pub struct Machine {
    pub nproc: usize,
    pub cpu: String,
    pub kernel: String,
    pub memory: String,
    pub loadavg: String,
}

impl Machine {
    pub fn probe() -> Self {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let cpu = cpuinfo
            .lines()
            .find_map(|l| {
                l.strip_prefix("model name")?
                    .split_once(':')
                    .map(|(_, v)| v.trim().to_owned())
            })
            .unwrap_or_else(|| "(unknown CPU)".to_owned());
        let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
        let memory = meminfo
            .lines()
            .find_map(|l| {
                l.strip_prefix("MemTotal:")?
                    .trim()
                    .strip_suffix(" kB")?
                    .parse::<u64>()
                    .ok()
            })
            .map(|kb| format!("{:.0} GiB", kb as f64 / (1024.0 * 1024.0)))
            .unwrap_or_default();
        Self {
            nproc: std::thread::available_parallelism().map_or(0, |n| n.get()),
            cpu,
            kernel: std::fs::read_to_string("/proc/sys/kernel/osrelease")
                .unwrap_or_default()
                .trim()
                .to_owned(),
            memory,
            loadavg: loadavg(),
        }
    }

    pub fn to_json(&self) -> Value {
        json!({
            "nproc": self.nproc,
            "cpu": self.cpu,
            "kernel": self.kernel,
            "memory": self.memory,
            "loadavg_at_start": self.loadavg,
        })
    }
}

/// The 1, 5 and 15 minute load averages, as /proc/loadavg gives them.
/// The host's CPU time so far, in clock ticks: (stolen by the hypervisor,
/// all), from /proc/stat's `cpu` line.
pub fn cpu_ticks() -> Option<(u64, u64)> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let fields: Vec<u64> = stat.lines().next()?.split_whitespace().skip(1).filter_map(|f| f.parse().ok()).collect();
    // user nice system idle iowait irq softirq steal (guest time is part of user).
    let total = fields.iter().take(8).sum();
    Some((*fields.get(7)?, total))
}

/// The share of CPU time the hypervisor took between two [`cpu_ticks`]
/// readings, in percent: on a VM, the time the benchmark did not get.
pub fn steal_pct(before: Option<(u64, u64)>, after: Option<(u64, u64)>) -> Option<f64> {
    let ((s0, t0), (s1, t1)) = (before?, after?);
    (t1 > t0).then(|| (s1.saturating_sub(s0)) as f64 * 100.0 / (t1 - t0) as f64)
}

pub fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .split_whitespace()
        .take(3)
        .collect::<Vec<_>>()
        .join(" ")
}

/// The row that stands for a harness that failed or gave no figures.
pub fn failure_row(name: &str, why: &str) -> Value {
    json!({
        "id": "FAIL",
        "what": name,
        "setup": "failed (see the note)",
        "median": null,
        "unit": "",
        "spread": null,
        "target": "",
        "pass": false,
        "note": why,
        "env": "",
        "failed": true,
    })
}

/// A number in a width that suits its size; `%` figures carry a sign.
fn num(x: f64, unit: &str) -> String {
    if !x.is_finite() {
        return "-".to_owned();
    }
    if unit == "count" {
        return format!("{x:.0}");
    }
    let digits = match x.abs() {
        a if a >= 1000.0 => 0,
        a if a >= 100.0 => 0,
        a if a >= 10.0 => 1,
        _ => 2,
    };
    if unit == "%" || (unit == "ns" && x < 0.0) {
        format!("{x:+.digits$}")
    } else if x.abs() >= 10_000.0 {
        thousands(x.round() as i64)
    } else {
        format!("{x:.digits$}")
    }
}

fn thousands(v: i64) -> String {
    let s = v.unsigned_abs().to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(' ');
        }
        out.push(c);
    }
    if v < 0 {
        format!("-{out}")
    } else {
        out
    }
}

fn spread(v: &Value, unit: &str) -> String {
    match v {
        Value::Array(a) if a.len() == 2 => format!(
            "{}..{}",
            num(a[0].as_f64().unwrap_or(f64::NAN), unit),
            num(a[1].as_f64().unwrap_or(f64::NAN), unit)
        ),
        Value::Object(m) => {
            // Tail figures in order (JSON objects here keep none).
            const ORDER: [&str; 7] = ["min", "median", "p50", "p90", "p99", "peak", "max"];
            let rank = |k: &str| ORDER.iter().position(|o| *o == k).unwrap_or(ORDER.len());
            let mut keys: Vec<&String> = m.keys().collect();
            keys.sort_by_key(|k| rank(k));
            keys.iter()
                .map(|k| format!("{k} {}", num(m[*k].as_f64().unwrap_or(f64::NAN), unit)))
                .collect::<Vec<_>>()
                .join(", ")
        }
        _ => String::new(),
    }
}

/// Rows in benchmark order (B0, B1, B1f, B2, B2u, ... B9), each harness's
/// order kept within an id; failure rows last.
pub fn sort(rows: &mut [Value]) {
    let key = |r: &Value| {
        let id = r["id"].as_str().unwrap_or("");
        let digits: String = id
            .chars()
            .skip(1)
            .take_while(char::is_ascii_digit)
            .collect();
        let n = if id.starts_with('B') {
            digits.parse().unwrap_or(u32::MAX)
        } else {
            u32::MAX
        };
        (n, id.len())
    };
    rows.sort_by_key(key);
}

/// The table, one line per row, then the machine.
pub fn render(rows: &[Value], machine: &Machine) -> String {
    let head = [
        "id", "what", "setup", "env", "median", "spread", "target", "result",
    ];
    let cells: Vec<[String; 8]> = rows
        .iter()
        .map(|r| {
            let s = |k: &str| r[k].as_str().unwrap_or("").to_owned();
            let unit = s("unit");
            let median = match r["median"].as_f64() {
                Some(m) => format!("{} {unit}", num(m, &unit)),
                None => "-".to_owned(),
            };
            let result = match (r["pass"].as_bool(), r["failed"] == true) {
                (_, true) => "FAILED",
                (Some(true), _) => "pass",
                (Some(false), _) => "MISS",
                (None, _) => "-",
            };
            [
                s("id"),
                s("what"),
                s("setup"),
                s("env"),
                median,
                spread(&r["spread"], &unit),
                s("target"),
                result.to_owned(),
            ]
        })
        .collect();
    let mut width = head.map(str::len);
    for c in &cells {
        for (w, v) in width.iter_mut().zip(c) {
            *w = (*w).max(v.chars().count());
        }
    }
    let line = |c: &[String]| {
        let mut l = String::new();
        for (i, (v, w)) in c.iter().zip(width).enumerate() {
            // Figures right-aligned, words left-aligned.
            if i == 4 {
                let _ = write!(l, "{v:>w$}  ");
            } else {
                let _ = write!(l, "{v:<w$}  ");
            }
        }
        l.trim_end().to_owned() + "\n"
    };
    let mut out = line(&head.map(str::to_owned));
    out += &line(&width.map(|w| "-".repeat(w)));
    for c in &cells {
        out += &line(c);
    }
    let _ = writeln!(
        out,
        "\nmachine: {} cores, {}, {}, kernel {}; load average at start {}",
        machine.nproc, machine.cpu, machine.memory, machine.kernel, machine.loadavg
    );
    let notes: Vec<String> = rows
        .iter()
        .filter(|r| r["note"].as_str().is_some_and(|n| !n.is_empty()))
        .map(|r| {
            format!(
                "  {} {} / {}: {}",
                r["id"].as_str().unwrap_or(""),
                r["what"].as_str().unwrap_or(""),
                r["setup"].as_str().unwrap_or(""),
                r["note"].as_str().unwrap_or("")
            )
        })
        .collect();
    if !notes.is_empty() {
        out += "notes:\n";
        out += &notes.join("\n");
        out += "\n";
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_rows_and_failures() {
        let rows = [
            json!({"id": "B6", "what": "freeze", "setup": "100 processes", "median": 0.61, "unit": "ms",
                   "spread": {"p90": 0.8, "max": 1.2}, "target": "<= 5 ms", "pass": true, "note": "", "env": "host"}),
            json!({"id": "B2u", "what": "UDP connect", "setup": "tagged", "median": 130.4, "unit": "ns",
                   "spread": [90.0, 160.0], "target": "<= 100 ns above the floor", "pass": false, "note": "x", "env": "host"}),
            failure_row("ag-bench-events", "exited with signal 9"),
        ];
        let m = Machine {
            nproc: 2,
            cpu: "cpu".into(),
            kernel: "6.18".into(),
            memory: "24 GiB".into(),
            loadavg: "0.5".into(),
        };
        let t = render(&rows, &m);
        assert!(t.contains("0.61 ms"), "{t}");
        assert!(t.contains("p90 0.80, max 1.20"), "{t}");
        assert!(t.contains("90.0..160"), "{t}");
        assert!(
            t.contains("MISS") && t.contains("FAILED") && t.contains("pass"),
            "{t}"
        );
        assert!(t.contains("2 cores"), "{t}");
    }

    #[test]
    fn numbers() {
        assert_eq!(num(512_345.0, "events/s"), "512 345");
        assert_eq!(num(0.456, "%"), "+0.46");
        assert_eq!(num(-12.3, "ns"), "-12.3");
        assert_eq!(num(f64::NAN, "ms"), "-");
        assert_eq!(num(3.0, "count"), "3");
    }

    #[test]
    fn sorted_by_benchmark() {
        let mut rows: Vec<Value> = ["FAIL", "B6", "B2u", "B0", "B2", "B1f", "B1", "B0"]
            .iter()
            .enumerate()
            .map(|(i, id)| json!({"id": id, "what": i}))
            .collect();
        sort(&mut rows);
        let ids: Vec<_> = rows
            .iter()
            .map(|r| format!("{}{}", r["id"].as_str().unwrap_or(""), r["what"]))
            .collect();
        assert_eq!(
            ids,
            ["B03", "B07", "B16", "B1f5", "B24", "B2u2", "B61", "FAIL0"]
        );
    }
}
