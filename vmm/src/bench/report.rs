//! The bench's results: the stdout table, the JSON document and the
//! machine description.

use crate::stats::LatencyHistogram;
use serde_json::{json, Value};
use std::fmt::Write;

/// One path's numbers (all `None` when it failed or recorded nothing).
#[derive(Debug, Clone)]
pub struct PathResult {
    pub name: &'static str,
    pub floor: Option<&'static str>,
    pub median_ns: Option<u64>,
    pub p99_ns: Option<u64>,
    pub mean_ns: Option<f64>,
    pub floor_median_ns: Option<u64>,
    pub ratio: Option<f64>,
    pub per_second: Option<f64>,
    /// p1, p25, p50, p75, p99 (for the plot).
    pub spread: Option<[u64; 5]>,
    pub count: u64,
    pub error: Option<String>,
    pub notes: Option<String>,
    /// The same-image floor this path is also compared with, its median
    /// and the ratio to it.
    pub same_image: Option<&'static str>,
    pub same_image_median_ns: Option<u64>,
    pub same_image_ratio: Option<f64>,
}

impl PathResult {
    pub fn from_side(
        name: &'static str,
        floor: Option<&'static str>,
        hist: &LatencyHistogram,
        error: Option<String>,
    ) -> Self {
        let count = hist.count();
        // A failed path reports no numbers, even if some runs succeeded:
        // they would describe a different mix of runs than its floor.
        let ok = error.is_none() && count > 0;
        let q = |x: f64| ok.then(|| hist.quantile(x));
        let mean_ns = ok.then(|| {
            let sum: f64 = hist
                .buckets()
                .iter()
                .map(|(v, c)| *v as f64 * *c as f64)
                .sum();
            sum / count as f64
        });
        let spread = ok.then(|| [0.01, 0.25, 0.5, 0.75, 0.99].map(|x| hist.quantile(x)));
        let error = match (&error, count) {
            (None, 0) => Some("no exits recorded".to_string()),
            _ => error,
        };
        PathResult {
            name,
            floor,
            median_ns: q(0.5),
            p99_ns: q(0.99),
            mean_ns,
            floor_median_ns: None,
            ratio: None,
            per_second: None,
            spread,
            count,
            error,
            notes: None,
            same_image: None,
            same_image_median_ns: None,
            same_image_ratio: None,
        }
    }

    /// Sets the same-image floor's name and median, and the ratio to it.
    pub fn set_same_image(&mut self, name: &'static str, median: Option<u64>) {
        self.same_image = Some(name);
        self.same_image_median_ns = median;
        self.same_image_ratio = match (self.median_ns, median) {
            (Some(m), Some(f)) if f > 0 => Some(m as f64 / f as f64),
            _ => None,
        };
    }

    /// Sets the floor's median and the ratio of this path's median to it.
    pub fn set_floor(&mut self, floor_median: Option<u64>) {
        self.floor_median_ns = floor_median;
        self.ratio = match (self.median_ns, floor_median) {
            (Some(m), Some(f)) if f > 0 => Some(m as f64 / f as f64),
            _ => None,
        };
    }

    fn json(&self) -> Value {
        let mut v = json!({
            "name": self.name,
            "floor": self.floor,
            "median_ns": self.median_ns,
            "p99_ns": self.p99_ns,
            "floor_median_ns": self.floor_median_ns,
            "ratio": self.ratio.map(|r| (r * 1000.0).round() / 1000.0),
        });
        if let Some(m) = v.as_object_mut() {
            if let Some(p) = self.per_second {
                m.insert("per_second".into(), json!(p.round()));
            }
            if let Some(e) = &self.error {
                m.insert("error".into(), json!(e));
            }
            if let Some(n) = &self.notes {
                m.insert("notes".into(), json!(n));
            }
            if let Some(f) = self.same_image {
                m.insert("same_image_floor".into(), json!(f));
                m.insert(
                    "same_image_median_ns".into(),
                    json!(self.same_image_median_ns),
                );
                m.insert(
                    "same_image_ratio".into(),
                    json!(self.same_image_ratio.map(|r| (r * 1000.0).round() / 1000.0)),
                );
            }
        }
        v
    }
}

/// Everything one `vmm bench` measured.
#[derive(Debug, Clone)]
pub struct BenchReport {
    pub machine: String,
    pub iters: u32,
    pub runs: u32,
    pub paths: Vec<PathResult>,
}

impl BenchReport {
    /// `{"machine", "iters", "runs", "paths": [...]}`.
    pub fn json(&self) -> Value {
        json!({
            "machine": self.machine,
            "iters": self.iters,
            "runs": self.runs,
            "paths": self.paths.iter().map(PathResult::json).collect::<Vec<_>>(),
        })
    }

    /// The table printed on stdout.
    pub fn table(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(s, "machine: {}", self.machine);
        let _ = writeln!(
            s,
            "iters: {} per run, runs: {} (floor and VMM alternating)",
            self.iters, self.runs
        );
        let _ = writeln!(
            s,
            "{:<16} {:<16} {:>10} {:>10} {:>12} {:>7}  notes",
            "path", "floor", "median ns", "p99 ns", "floor med ns", "ratio"
        );
        let num = |v: Option<u64>| v.map_or("-".to_string(), |n| n.to_string());
        for p in &self.paths {
            let mut notes = String::new();
            if let Some(ps) = p.per_second {
                let _ = write!(notes, "{ps:.0} insn/s");
            }
            if let (Some(f), Some(r)) = (p.same_image, p.same_image_ratio) {
                let _ = write!(notes, "{r:.3} x {f}");
            }
            if let Some(e) = &p.error {
                let _ = write!(notes, "error: {e}");
            }
            let _ = writeln!(
                s,
                "{:<16} {:<16} {:>10} {:>10} {:>12} {:>7}  {notes}",
                p.name,
                p.floor.unwrap_or("-"),
                num(p.median_ns),
                num(p.p99_ns),
                num(p.floor_median_ns),
                p.ratio.map_or("-".to_string(), |r| format!("{r:.3}")),
            );
        }
        s
    }
}

/// CPU model, kernel release and whether /dev/kvm is PVM.
pub fn machine_description() -> String {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split_once(':'))
        .map_or("unknown CPU", |(_, m)| m.trim())
        .to_string();
    let hw_virt = cpuinfo
        .lines()
        .find(|l| l.starts_with("flags"))
        .is_some_and(|l| l.split_whitespace().any(|f| f == "vmx" || f == "svm"));
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "unknown kernel".into());
    let pvm = std::path::Path::new("/sys/module/kvm_pvm").exists();
    let kvm = match (pvm, hw_virt) {
        (true, _) => "KVM is PVM (kvm_pvm, no vmx/svm: CPL 0 guest code interpreted)",
        (false, false) => "no vmx/svm flag (KVM likely PVM or nested)",
        (false, true) => "hardware KVM",
    };
    format!("{model}; Linux {kernel}; {kvm}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_shape_with_and_without_numbers() {
        let mut h = LatencyHistogram::default();
        for ns in [100, 200, 300] {
            h.record(ns);
        }
        let floor = PathResult::from_side("floor-x", None, &h, None);
        let mut ok = PathResult::from_side("x", Some("floor-x"), &h, None);
        ok.set_floor(floor.median_ns);
        let bad = PathResult::from_side("y", Some("floor-x"), &h, Some("boom".into()));
        let rep = BenchReport {
            machine: "m".into(),
            iters: 3,
            runs: 1,
            paths: vec![floor, ok, bad],
        };
        let j = rep.json();
        let paths = j["paths"].as_array().unwrap();
        assert!(paths[0]["floor"].is_null() && paths[0]["ratio"].is_null());
        assert_eq!(paths[1]["median_ns"], 200);
        assert_eq!(paths[1]["ratio"], 1.0);
        assert!(paths[2]["median_ns"].is_null());
        assert_eq!(paths[2]["error"], "boom");
        assert!(rep.table().contains("error: boom"));
    }
}
