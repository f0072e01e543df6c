//! Issue 14's goals, computed from one run's results (so one run shows them all):
//!
//! | goal | computed as (per image, then the median over images) |
//! |---|---|
//! | deployment ≥ 25× the tar+gzip baseline | baseline deploy / slacker-lazy deploy (ratio of the paths' medians: the median image) |
//! | startup bytes ≤ 1.15× a read-ahead-free run | fetched by slacker-lazy-trace / fetched by slacker-lazy-nora |
//! | lazy run ≤ 1.3× its floor | slacker-lazy run / (slacker run + slacker-lazy fetched / link bandwidth) |
//! | verification ≤ 5% of the lazy run | "of which verify" part / slacker-lazy run |
//! | pull ≤ 5 ms | slacker-lazy pull (median) |
//!
//! Each goal is also given for `slacker-lazy-trace` where it applies. The fair link's
//! achieved throughput (the baseline's layer bytes / its download seconds, against the
//! link's bandwidth) is reported next to them, since every figure leans on that link.

use std::fmt::Write as _;

use serde::{Deserialize, Serialize};

use crate::bench::{ImageResult, PathResults, median};
use crate::fairlink::FairLinkReport;

const BASELINE: &str = "baseline";
const KERNEL: &str = "slacker";
const LAZY: &str = "slacker-lazy";
const TRACE: &str = "slacker-lazy-trace";
const NORA: &str = "slacker-lazy-nora";
/// The run part holding the Merkle verification seconds.
const VERIFY_PART: &str = "of which verify";

/// One goal as measured.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Goal {
    /// What is measured.
    pub goal: String,
    /// The path measured.
    pub path: String,
    /// The measured value (`None`: a path it needs was not measured).
    pub value: Option<f64>,
    /// The goal's bound.
    pub target: f64,
    /// `true`: the value must be at most `target`; `false`: at least.
    pub at_most: bool,
    /// Unit for display: `x` (ratio), `%`, `ms`.
    pub unit: String,
    /// How the value is computed.
    pub how: String,
}

impl Goal {
    /// Whether the goal is met (`None`: not measured).
    pub fn met(&self) -> Option<bool> {
        self.value.map(|v| {
            if self.at_most {
                v <= self.target
            } else {
                v >= self.target
            }
        })
    }

    fn fmt(&self, v: f64) -> String {
        match self.unit.as_str() {
            "%" => format!("{:.1}%", v * 100.0),
            "ms" => format!("{:.1} ms", v * 1e3),
            _ => format!("{v:.2}×"),
        }
    }

    /// How far from the goal, as a sentence fragment (`None`: met or not measured).
    pub fn miss(&self) -> Option<String> {
        let v = self.value?;
        if self.met()? {
            return None;
        }
        Some(format!(
            "missed by {:.0}% ({} against {})",
            if self.at_most {
                (v / self.target - 1.0) * 100.0
            } else {
                (1.0 - v / self.target) * 100.0
            },
            self.fmt(v),
            self.fmt(self.target)
        ))
    }
}

/// Per image: the inputs of the goals.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ImageGoals {
    /// Image name.
    pub image: String,
    /// Baseline deploy / slacker-lazy deploy.
    pub deploy_speedup: Option<f64>,
    /// Fetched by slacker-lazy-trace / by slacker-lazy-nora.
    pub trace_bytes_ratio: Option<f64>,
    /// Fetched by slacker-lazy / by slacker-lazy-nora.
    pub lazy_bytes_ratio: Option<f64>,
    /// slacker-lazy run / its floor.
    pub floor_ratio: Option<f64>,
    /// The floor: slacker run + fetched / bandwidth, seconds.
    pub floor_secs: Option<f64>,
    /// Verification seconds / slacker-lazy run seconds.
    pub verify_share: Option<f64>,
    /// Baseline layer bytes / download seconds, bytes per second.
    pub download_bytes_per_sec: Option<f64>,
}

/// The goals of one run.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Goals {
    /// One row per goal and path.
    pub goals: Vec<Goal>,
    /// The per-image inputs.
    pub images: Vec<ImageGoals>,
    /// The baseline downloads' achieved throughput (median over images), bytes per second.
    pub achieved_download_bytes_per_sec: Option<f64>,
}

fn find<'a>(paths: &'a [PathResults], name: &str) -> Option<&'a PathResults> {
    paths.iter().find(|p| p.path == name)
}

fn image<'a>(p: Option<&'a PathResults>, name: &str) -> Option<&'a ImageResult> {
    p?.images.iter().find(|i| i.image == name)
}

/// The median over repetitions of a run part's seconds.
fn part(
    i: &ImageResult,
    phase: fn(&crate::bench::Rep) -> Option<&crate::bench::Phase>,
    prefix: &str,
) -> Option<f64> {
    median(i.reps.iter().map(|r| {
        phase(r)?
            .step
            .parts
            .iter()
            .find(|(n, _)| n.starts_with(prefix))
            .map(|(_, s)| *s)
    }))
}

fn div(a: Option<f64>, b: Option<f64>) -> Option<f64> {
    match (a, b) {
        (Some(a), Some(b)) if b > 0.0 => Some(a / b),
        _ => None,
    }
}

/// Compute the goals from a run's paths and its link.
pub fn compute(paths: &[PathResults], link: Option<&FairLinkReport>) -> Goals {
    let (base, kernel, lazy, trace, nora) = (
        find(paths, BASELINE),
        find(paths, KERNEL),
        find(paths, LAZY),
        find(paths, TRACE),
        find(paths, NORA),
    );
    let bandwidth = link
        .and_then(|l| l.bandwidth_bytes_per_sec)
        .map(|b| b as f64);
    let names: Vec<&str> = paths
        .iter()
        .flat_map(|p| p.images.iter().map(|i| i.image.as_str()))
        .fold(Vec::new(), |mut v, n| {
            if !v.contains(&n) {
                v.push(n);
            }
            v
        });
    let floor_of = |p: Option<&PathResults>, n: &str| -> (Option<f64>, Option<f64>) {
        let i = image(p, n);
        let k = image(kernel, n).and_then(|k| k.median.run);
        let fetched = i.and_then(|i| i.median.fetched_bytes);
        let floor = match (k, fetched) {
            (Some(k), Some(f)) => Some(k + bandwidth.map_or(0.0, |b| f / b)),
            _ => None,
        };
        (floor, div(i.and_then(|i| i.median.run), floor))
    };
    let mut images = Vec::new();
    for n in &names {
        let b = image(base, n);
        let l = image(lazy, n);
        let nora_fetched = image(nora, n).and_then(|i| i.median.fetched_bytes);
        let (floor_secs, floor_ratio) = floor_of(lazy, n);
        images.push(ImageGoals {
            image: (*n).to_owned(),
            deploy_speedup: div(
                b.and_then(|b| b.median.deploy),
                l.and_then(|l| l.median.deploy),
            ),
            trace_bytes_ratio: div(
                image(trace, n).and_then(|i| i.median.fetched_bytes),
                nora_fetched,
            ),
            lazy_bytes_ratio: div(l.and_then(|i| i.median.fetched_bytes), nora_fetched),
            floor_ratio,
            floor_secs,
            verify_share: div(
                l.and_then(|l| part(l, |r| r.run.as_ref(), VERIFY_PART)),
                l.and_then(|l| l.median.run),
            ),
            download_bytes_per_sec: b.and_then(|b| {
                div(
                    median(
                        b.reps
                            .iter()
                            .map(|r| r.pull.as_ref()?.step.layer_bytes.map(|x| x as f64)),
                    ),
                    part(b, |r| r.pull.as_ref(), "download"),
                )
            }),
        });
    }
    let med = |f: fn(&ImageGoals) -> Option<f64>| median(images.iter().map(f));
    let mut goals = Vec::new();
    let mut goal = |goal: &str, path: &str, value, target, at_most, unit: &str, how: &str| {
        goals.push(Goal {
            goal: goal.into(),
            path: path.into(),
            value,
            target,
            at_most,
            unit: unit.into(),
            how: how.into(),
        });
    };
    for (p, name) in [(lazy, LAZY), (trace, TRACE)] {
        goal(
            "deployment speedup over tar+gzip (median image)",
            name,
            div(
                base.and_then(|b| b.median.deploy),
                p.and_then(|p| p.median.deploy),
            ),
            25.0,
            false,
            "x",
            "baseline deploy / path deploy, ratio of the paths' medians over images",
        );
    }
    goal(
        "bytes fetched at startup / a read-ahead-free run",
        TRACE,
        med(|i| i.trace_bytes_ratio),
        1.15,
        true,
        "x",
        "fetched by slacker-lazy-trace / fetched by slacker-lazy-nora (read-ahead off), median of per-image ratios",
    );
    goal(
        "bytes fetched at startup / a read-ahead-free run",
        LAZY,
        med(|i| i.lazy_bytes_ratio),
        1.15,
        true,
        "x",
        "fetched by slacker-lazy (blind read-ahead, no trace) / fetched by slacker-lazy-nora",
    );
    goal(
        "lazy run / its floor",
        LAZY,
        med(|i| i.floor_ratio),
        1.3,
        true,
        "x",
        "run / (slacker's kernel-path run + fetched bytes / link bandwidth), median of per-image ratios",
    );
    let trace_floor = median(names.iter().map(|n| floor_of(trace, n).1));
    goal(
        "lazy run / its floor",
        TRACE,
        trace_floor,
        1.3,
        true,
        "x",
        "as above, with slacker-lazy-trace's run and fetched bytes",
    );
    goal(
        "verification / lazy run",
        LAZY,
        med(|i| i.verify_share),
        0.05,
        true,
        "%",
        "Merkle hashing seconds (all threads) / run seconds, median of per-image shares",
    );
    for (p, name) in [(lazy, LAZY), (trace, TRACE)] {
        goal(
            "pull",
            name,
            p.and_then(|p| p.median.pull),
            0.005,
            true,
            "ms",
            "median pull over images: a new client's manifest GET (no `GET /v2/` probe; config and reference layer embedded) through the fair link, then apply_diff's durable writes; trace path: the trace fetched alongside (referrers API and fallback tag at once; the index embeds the trace manifest, which embeds the trace)",
        );
    }
    Goals {
        achieved_download_bytes_per_sec: med(|i| i.download_bytes_per_sec),
        goals,
        images,
    }
}

impl Goals {
    /// The "goals" section of the report.
    pub fn markdown(&self, link: Option<&FairLinkReport>) -> String {
        if self.goals.iter().all(|g| g.value.is_none()) {
            return String::new();
        }
        let mut s = String::from(
            "### Issue 14 goals, this run\n\n| goal | path | measured | goal | met |\n|---|---|---:|---:|---|\n",
        );
        for g in &self.goals {
            let _ = writeln!(
                s,
                "| {} | {} | {} | {} {} | {} |",
                g.goal,
                g.path,
                g.value.map_or_else(|| "—".into(), |v| g.fmt(v)),
                if g.at_most { "≤" } else { "≥" },
                g.fmt(g.target),
                match (g.met(), g.miss()) {
                    (None, _) => "not measured".into(),
                    (Some(true), _) => "yes".into(),
                    (Some(false), Some(m)) => format!("no: {m}"),
                    (Some(false), None) => "no".into(),
                }
            );
        }
        s += "\nHow: ";
        let mut seen = Vec::new();
        for g in &self.goals {
            if !seen.contains(&g.goal) {
                let _ = write!(s, "*{}*: {}. ", g.goal, g.how);
                seen.push(g.goal.clone());
            }
        }
        s += "\n\n| image | deploy speedup (lazy) | fetched trace / nora | fetched lazy / nora | lazy run / floor | floor | verify / lazy run | baseline download |\n|---|---:|---:|---:|---:|---:|---:|---:|\n";
        let x = |v: Option<f64>| v.map_or_else(|| "—".into(), |v| format!("{v:.2}×"));
        let rate = |v: Option<f64>| {
            v.map_or_else(|| "—".into(), |v| format!("{:.0} Mbit/s", v * 8.0 / 1e6))
        };
        for i in &self.images {
            let _ = writeln!(
                s,
                "| {} | {} | {} | {} | {} | {} | {} | {} |",
                i.image,
                x(i.deploy_speedup),
                x(i.trace_bytes_ratio),
                x(i.lazy_bytes_ratio),
                x(i.floor_ratio),
                i.floor_secs
                    .map_or_else(|| "—".into(), crate::report::fmt_secs),
                i.verify_share
                    .map_or_else(|| "—".into(), |v| format!("{:.1}%", v * 100.0)),
                rate(i.download_bytes_per_sec),
            );
        }
        let _ = writeln!(
            s,
            "\nFair link: {}; the baseline's downloads achieved {} (median of layer bytes / download seconds; includes request latency and the client's digest check).{}\n",
            link.map_or_else(
                || "not recorded".into(),
                |l| format!(
                    "{} µs per request, {}",
                    l.latency_us,
                    l.bandwidth_bytes_per_sec.map_or_else(
                        || "unlimited bandwidth".into(),
                        |b| format!("{} Mbit/s", b * 8 / 1_000_000)
                    )
                )
            ),
            rate(self.achieved_download_bytes_per_sec),
            link.map_or_else(String::new, |l| format!(
                " It carried {} up and {} down over {} connections in this run.",
                crate::report::fmt_bytes(l.stats.up_bytes),
                crate::report::fmt_bytes(l.stats.down_bytes),
                l.stats.connections
            )),
        );
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bench::{Phase, Rep, Summary};
    use crate::path::Step;

    fn path(
        name: &str,
        pull: f64,
        run: f64,
        fetched: f64,
        parts: Vec<(String, f64)>,
    ) -> PathResults {
        let rep = Rep {
            pull: Some(Phase {
                secs: pull,
                step: Step {
                    layer_bytes: Some(1_000_000),
                    parts: vec![("download".into(), 0.01)],
                    ..Step::default()
                },
            }),
            run: Some(Phase {
                secs: run,
                step: Step {
                    parts,
                    ..Step::default()
                },
            }),
            ..Rep::default()
        };
        let m = Summary {
            pull: Some(pull),
            run: Some(run),
            deploy: Some(pull + run),
            fetched_bytes: Some(fetched),
            ..Summary::default()
        };
        PathResults {
            path: name.into(),
            images: vec![ImageResult {
                image: "shell".into(),
                reps: vec![rep],
                median: m.clone(),
            }],
            median: m,
        }
    }

    #[test]
    fn goals_divide_the_right_paths() {
        let paths = vec![
            path(BASELINE, 2.0, 0.5, 0.0, vec![]),
            path(KERNEL, 0.01, 0.04, 1e6, vec![]),
            path(
                LAZY,
                0.004,
                0.096,
                12e6,
                vec![("of which verify (hash, all threads)".into(), 0.0048)],
            ),
            path(TRACE, 0.006, 0.08, 11e6, vec![]),
            path(NORA, 0.004, 0.2, 10e6, vec![]),
        ];
        let link = FairLinkReport {
            latency_us: 200,
            bandwidth_bytes_per_sec: Some(125_000_000),
            stats: Default::default(),
        };
        let g = compute(&paths, Some(&link));
        let get = |goal: &str, p: &str| {
            g.goals
                .iter()
                .find(|x| x.goal.starts_with(goal) && x.path == p)
                .unwrap()
                .clone()
        };
        let d = get("deployment", LAZY);
        assert!((d.value.unwrap() - 25.0).abs() < 1e-9); // 2.5 / 0.1
        assert_eq!(d.met(), Some(true));
        let b = get("bytes", TRACE);
        assert!((b.value.unwrap() - 1.1).abs() < 1e-9);
        assert_eq!(b.met(), Some(true));
        let b = get("bytes", LAZY);
        assert!((b.value.unwrap() - 1.2).abs() < 1e-9);
        assert_eq!(b.met(), Some(false));
        assert!(b.miss().unwrap().starts_with("missed by 4%"));
        // floor = 0.04 + 12e6 / 125e6 = 0.136; 0.096 / 0.136
        let f = get("lazy run", LAZY);
        assert!((f.value.unwrap() - 0.096 / 0.136).abs() < 1e-9);
        let v = get("verification", LAZY);
        assert!((v.value.unwrap() - 0.05).abs() < 1e-9);
        assert_eq!(get("pull", LAZY).met(), Some(true));
        assert_eq!(get("pull", TRACE).met(), Some(false));
        assert!((g.achieved_download_bytes_per_sec.unwrap() - 1e8).abs() < 1e-3);
        let md = g.markdown(Some(&link));
        assert!(md.contains("| pull | slacker-lazy-trace | 6.0 ms | ≤ 5.0 ms | no: missed by 20%"));
        // Without the reference path, the bytes goal is reported as not measured.
        let g = compute(&paths[..4], Some(&link));
        assert_eq!(
            g.goals
                .iter()
                .find(|x| x.goal.starts_with("bytes"))
                .unwrap()
                .met(),
            None
        );
    }
}
