//! Output: Markdown tables (stdout and `results.md`), `results.json`, and a hand-written SVG
//! bar chart on a log scale (`results.svg`).

use std::fmt::Write as _;

use serde::{Deserialize, Serialize};

use crate::bench::{PathResults, Summary};
use crate::corpus::BuildRecord;
use crate::dedup::DedupReport;

/// The path every other one is compared against.
pub const BASELINE: &str = "baseline";
/// Slacker's kernel path (loop device on the clone's local file).
pub const SLACKER: &str = "slacker";
/// Slacker's lazy worker data path (LazyVolume + FUSE + loop).
pub const SLACKER_LAZY: &str = "slacker-lazy";

/// The paper's median speedups (HelloBench, Slacker vs Docker + AUFS): deployment, development.
pub const PAPER_SPEEDUP: (f64, f64) = (5.3, 20.0);
/// Our goals (DESIGN.md §6): deployment, development.
pub const GOAL_SPEEDUP: (f64, f64) = (10.0, 40.0);

/// Everything a run produced.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Results {
    /// Crate name and version.
    pub tool: String,
    /// When the run started (UTC).
    pub date: String,
    /// The command line.
    pub command: String,
    /// Kernel, CPUs, memory.
    pub host: Host,
    /// `reduced` or `full`.
    pub corpus: String,
    /// Seconds this run spent building (or checking) the corpus.
    pub corpus_secs_this_run: f64,
    /// How the base tree was built, if debootstrap was used.
    pub base: Option<BuildRecord>,
    /// Build records of the measured images.
    pub images: Vec<BuildRecord>,
    /// How images are layered for the traditional path.
    pub layering: String,
    /// Method notes.
    pub notes: Vec<String>,
    /// Phases skipped and why (missing tools, not root).
    pub skipped: Vec<String>,
    /// Repetitions per image.
    pub reps: usize,
    /// One entry per measured path; the first is the baseline.
    pub paths: Vec<PathResults>,
    /// Speedups of every other path over the baseline of the same run.
    #[serde(default)]
    pub speedups: Vec<PathSpeedups>,
    /// Figure 7.
    pub dedup: Option<DedupReport>,
    /// The registry's emulated link (every path reaches the registry through it).
    #[serde(default)]
    pub fair_link: Option<crate::fairlink::FairLinkReport>,
    /// Issue 14's goals, computed from this run.
    #[serde(default)]
    pub goals: Option<crate::goals::Goals>,
}

/// Baseline seconds / path seconds, per phase and cycle (> 1: the path is faster).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Ratios {
    /// Push.
    pub push: Option<f64>,
    /// Pull.
    pub pull: Option<f64>,
    /// Run (until ready).
    pub run: Option<f64>,
    /// Deployment cycle (pull + run).
    pub deploy: Option<f64>,
    /// Development cycle (push + pull + run).
    pub dev: Option<f64>,
}

impl Ratios {
    fn of(base: &Summary, other: &Summary) -> Self {
        let r = |b: Option<f64>, o: Option<f64>| match (b, o) {
            (Some(b), Some(o)) if o > 0.0 => Some(b / o),
            _ => None,
        };
        Self {
            push: r(base.push, other.push),
            pull: r(base.pull, other.pull),
            run: r(base.run, other.run),
            deploy: r(base.deploy, other.deploy),
            dev: r(base.dev, other.dev),
        }
    }
}

/// One image's speedups.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ImageRatios {
    /// Image name.
    pub image: String,
    /// Baseline median / path median for this image.
    #[serde(flatten)]
    pub ratios: Ratios,
}

/// A path's speedups over the baseline measured in the same run.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PathSpeedups {
    /// The path.
    pub path: String,
    /// Per image (per-image medians divided).
    pub images: Vec<ImageRatios>,
    /// Median over images of the per-image speedups.
    pub median_of_images: Ratios,
    /// The baseline's median over images divided by the path's.
    pub of_medians: Ratios,
}

/// Where the numbers come from.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Host {
    /// `uname -r`.
    pub kernel: String,
    /// Online CPUs.
    pub cpus: usize,
    /// `MemTotal` in bytes.
    pub mem_bytes: u64,
    /// 1-minute load average when the run started (other builds share the CPUs).
    #[serde(default)]
    pub load_avg_1m: Option<f64>,
}

impl Host {
    /// This machine.
    pub fn this() -> Self {
        let kernel = rustix::system::uname()
            .release()
            .to_string_lossy()
            .into_owned();
        let cpus = std::thread::available_parallelism().map_or(1, usize::from);
        let mem_bytes = std::fs::read_to_string("/proc/meminfo")
            .ok()
            .and_then(|m| {
                m.lines()
                    .find(|l| l.starts_with("MemTotal:"))
                    .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
            })
            .map_or(0, |kib| kib * 1024);
        let load_avg_1m = std::fs::read_to_string("/proc/loadavg")
            .ok()
            .and_then(|l| l.split_whitespace().next()?.parse().ok());
        Self {
            kernel,
            cpus,
            mem_bytes,
            load_avg_1m,
        }
    }
}

/// `123.4 MB` (decimal units, like the paper).
pub fn fmt_bytes(b: u64) -> String {
    let b = b as f64;
    match b {
        _ if b >= 1e9 => format!("{:.2} GB", b / 1e9),
        _ if b >= 1e6 => format!("{:.1} MB", b / 1e6),
        _ if b >= 1e3 => format!("{:.1} kB", b / 1e3),
        _ => format!("{b} B"),
    }
}

/// Seconds with a precision that suits the magnitude.
pub fn fmt_secs(s: f64) -> String {
    match s {
        _ if s >= 100.0 => format!("{s:.0} s"),
        _ if s >= 10.0 => format!("{s:.1} s"),
        _ if s >= 1.0 => format!("{s:.2} s"),
        _ if s >= 0.001 => format!("{:.0} ms", s * 1e3),
        _ => format!("{:.0} µs", s * 1e6),
    }
}

fn opt_secs(s: Option<f64>) -> String {
    s.map_or_else(|| "—".into(), fmt_secs)
}

fn opt_bytes(b: Option<f64>) -> String {
    b.map_or_else(|| "—".into(), |b| fmt_bytes(b as u64))
}

fn opt_ratio(r: Option<f64>) -> String {
    r.map_or_else(|| "—".into(), |r| format!("{r:.1}×"))
}

fn ratio(base: Option<f64>, other: Option<f64>) -> String {
    match (base, other) {
        (Some(b), Some(o)) if o > 0.0 => format!("{:.1}×", b / o),
        _ => "—".into(),
    }
}

impl Results {
    fn path(&self, name: &str) -> Option<&PathResults> {
        self.paths.iter().find(|p| p.path == name)
    }

    /// Speedups of every non-baseline path over the baseline (empty without a baseline).
    pub fn compute_speedups(&self) -> Vec<PathSpeedups> {
        let Some(base) = self.path(BASELINE) else {
            return Vec::new();
        };
        self.paths
            .iter()
            .filter(|p| p.path != BASELINE)
            .map(|p| {
                let images: Vec<ImageRatios> = base
                    .images
                    .iter()
                    .filter_map(|b| {
                        let o = p.images.iter().find(|i| i.image == b.image)?;
                        Some(ImageRatios {
                            image: b.image.clone(),
                            ratios: Ratios::of(&b.median, &o.median),
                        })
                    })
                    .collect();
                let med = |f: fn(&Ratios) -> Option<f64>| {
                    crate::bench::median(images.iter().map(|i| f(&i.ratios)))
                };
                PathSpeedups {
                    path: p.path.clone(),
                    median_of_images: Ratios {
                        push: med(|r| r.push),
                        pull: med(|r| r.pull),
                        run: med(|r| r.run),
                        deploy: med(|r| r.deploy),
                        dev: med(|r| r.dev),
                    },
                    of_medians: Ratios::of(&base.median, &p.median),
                    images,
                }
            })
            .collect()
    }

    /// All tables as Markdown.
    pub fn markdown(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(
            s,
            "HelloBench-style run, {} ({} corpus, {} rep(s)/image; kernel {}, {} CPUs{}).\n",
            self.date,
            self.corpus,
            self.reps,
            self.host.kernel,
            self.host.cpus,
            self.host
                .load_avg_1m
                .map_or(String::new(), |l| format!(", load average {l:.1} at start"))
        );
        s += &self.corpus_table();
        for p in &self.paths {
            s += &path_table(p);
            s += &parts_table(p);
            if p.path != BASELINE {
                s += &self.bytes_table(p);
            }
        }
        let others: Vec<&str> = self
            .paths
            .iter()
            .map(|p| p.path.as_str())
            .filter(|p| *p != BASELINE)
            .collect();
        if others.is_empty() {
            s += &self.comparison_table(SLACKER);
        }
        for o in &others {
            s += &self.comparison_table(o);
        }
        s += &self.goals_table();
        if let Some(g) = &self.goals {
            s += &g.markdown(self.fair_link.as_ref());
        }
        s += &crate::containerd::pair_markdown(self);
        if let Some(d) = &self.dedup {
            s += &dedup_table(d);
        }
        if !self.skipped.is_empty() {
            s += "\nSkipped:\n";
            for k in &self.skipped {
                let _ = writeln!(s, "- {k}");
            }
        }
        s
    }

    fn corpus_table(&self) -> String {
        let mut s = String::from(
            "### Corpus\n\n| image | packages | files | size (file contents) | built in |\n|---|---|---:|---:|---:|\n",
        );
        if let Some(b) = &self.base {
            let _ = writeln!(
                s,
                "| *(base: debootstrap minbase {})* | — | {} | {} | {:.1} s |",
                b.source.as_ref().map_or("", |x| x.suite.as_str()),
                b.stats.files,
                fmt_bytes(b.stats.file_bytes),
                b.build_secs
            );
        }
        for r in &self.images {
            let _ = writeln!(
                s,
                "| {} | {} | {} | {} | {:.1} s |",
                r.name,
                if r.packages.is_empty() {
                    "—".into()
                } else {
                    r.packages.join(" ")
                },
                r.stats.files,
                fmt_bytes(r.stats.file_bytes),
                r.build_secs
            );
        }
        s + "\n"
    }

    fn comparison_table(&self, name: &str) -> String {
        let base = self.path(BASELINE);
        let other = self.path(name);
        let mut s = format!(
            "### {BASELINE} vs {name}{}\n\n| image | deploy {BASELINE} | deploy {name} | deploy speedup | dev {BASELINE} | dev {name} | dev speedup | push speedup | pull speedup | run speedup |\n|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n",
            if other.is_none() {
                " (not measured in this run)"
            } else {
                ""
            }
        );
        let Some(base) = base else { return s + "\n" };
        let row = |s: &mut String, name: &str, b: &Summary, o: Option<&Summary>| {
            let o = o.cloned().unwrap_or_default();
            let _ = writeln!(
                s,
                "| {name} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
                opt_secs(b.deploy),
                opt_secs(o.deploy),
                ratio(b.deploy, o.deploy),
                opt_secs(b.dev),
                opt_secs(o.dev),
                ratio(b.dev, o.dev),
                ratio(b.push, o.push),
                ratio(b.pull, o.pull),
                ratio(b.run, o.run),
            );
        };
        for img in &base.images {
            let o = other
                .and_then(|o| o.images.iter().find(|i| i.image == img.image))
                .map(|i| &i.median);
            row(&mut s, &img.image, &img.median, o);
        }
        row(&mut s, "**median**", &base.median, other.map(|o| &o.median));
        if let Some(sp) = self.speedups.iter().find(|p| p.path == name) {
            let m = &sp.median_of_images;
            let _ = writeln!(
                s,
                "| *median of per-image speedups* | | | {} | | | {} | {} | {} | {} |",
                opt_ratio(m.deploy),
                opt_ratio(m.dev),
                opt_ratio(m.push),
                opt_ratio(m.pull),
                opt_ratio(m.run)
            );
        }
        s + &format!(
            "\nSpeedup = {BASELINE} time / {name} time, both measured in this run; the **median** row divides the medians.\n\n"
        )
    }

    /// Deployment and development speedups against the paper's and our goals.
    fn goals_table(&self) -> String {
        if self.speedups.is_empty() {
            return String::new();
        }
        let mut s = String::from(
            "### Cycles against the goals\n\n| path | deployment speedup (of medians / median per image) | development speedup (of medians / median per image) | paper | our goal | goal met |\n|---|---:|---:|---:|---:|---|\n",
        );
        for p in &self.speedups {
            let met = |v: Option<f64>, goal: f64| v.is_some_and(|v| v >= goal);
            let (d, v) = (p.of_medians.deploy, p.of_medians.dev);
            let _ = writeln!(
                s,
                "| {} | {} / {} | {} / {} | {}× / {}× | {}× / {}× | deployment {}, development {} |",
                p.path,
                opt_ratio(d),
                opt_ratio(p.median_of_images.deploy),
                opt_ratio(v),
                opt_ratio(p.median_of_images.dev),
                PAPER_SPEEDUP.0,
                PAPER_SPEEDUP.1,
                GOAL_SPEEDUP.0,
                GOAL_SPEEDUP.1,
                if met(d, GOAL_SPEEDUP.0) { "yes" } else { "no" },
                if met(v, GOAL_SPEEDUP.1) { "yes" } else { "no" },
            );
        }
        s + "\nGoal met = the ratio of medians reaches it. Paper: HelloBench's 57 images, Slacker vs Docker + AUFS, median deployment 5.3× and development 20× faster.\n\n"
    }

    /// Bytes moved and fetched by a slacker path, against the image's size.
    fn bytes_table(&self, p: &PathResults) -> String {
        let mut s = format!(
            "#### {}: bytes (per image: median of repetitions)\n\n| image | push: all (layers) | pull: all (layers) | fetched at startup | read by container | image size (volume) | used (allocated) | file contents | fetched / size | fetched / used | fetched / file contents |\n|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n",
            p.path
        );
        let pct = |v: Option<f64>| v.map_or_else(|| "—".into(), |v| format!("{:.1}%", v * 100.0));
        let files = |name: &str| {
            self.images
                .iter()
                .find(|r| r.name == name || r.name == format!("{name}-busybox"))
                .map(|r| r.stats.file_bytes as f64)
        };
        let row = |s: &mut String, name: &str, m: &Summary, pull: Option<f64>, f: Option<f64>| {
            let of_files = match (m.fetched_bytes, f) {
                (Some(x), Some(f)) if f > 0.0 => Some(x / f),
                _ => None,
            };
            let _ = writeln!(
                s,
                "| {name} | {} ({}) | {} ({}) | {} | {} | {} | {} | {} | {} | {} | {} |",
                opt_bytes(m.net_push_bytes),
                opt_bytes(m.layer_push_bytes),
                opt_bytes(pull),
                opt_bytes(m.layer_pull_bytes),
                opt_bytes(m.fetched_bytes),
                opt_bytes(m.read_bytes),
                opt_bytes(m.image_bytes),
                opt_bytes(m.image_used_bytes),
                opt_bytes(f),
                pct(m.fetched_of_image),
                pct(m.fetched_of_used),
                pct(of_files),
            );
        };
        let mut fr = Vec::new();
        for i in &p.images {
            let f = files(&i.image);
            if let (Some(x), Some(f)) = (i.median.fetched_bytes, f) {
                fr.push(Some(x / f));
            }
            let pull = crate::bench::median(
                i.reps
                    .iter()
                    .map(|r| r.pull.as_ref().map(|p| p.step.network_bytes as f64)),
            );
            row(&mut s, &i.image, &i.median, pull, f);
        }
        let _ = writeln!(
            s,
            "| **median** | {} ({}) | — ({}) | {} | {} | {} | {} | | {} | {} | {} |",
            opt_bytes(p.median.net_push_bytes),
            opt_bytes(p.median.layer_push_bytes),
            opt_bytes(p.median.layer_pull_bytes),
            opt_bytes(p.median.fetched_bytes),
            opt_bytes(p.median.read_bytes),
            opt_bytes(p.median.image_bytes),
            opt_bytes(p.median.image_used_bytes),
            pct(p.median.fetched_of_image),
            pct(p.median.fetched_of_used),
            pct(crate::bench::median(fr)),
        );
        s + "\nPush/pull: bytes to/from the registry (blobs + config + manifests), layer blobs in parentheses. Fetched at startup: image bytes read from storage until the container was ready (slacker: the loop device's reads of the clone; slacker-lazy and slacker-nfs: bytes the data path fetched from the backend). Image size: the volume's logical size; used: bytes allocated to it; file contents: the tree's regular-file bytes. Fractions are medians of per-image fractions.\n\n"
    }

    /// The JSON written to `results.json`.
    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).expect("results serialize")
    }
}

fn path_table(p: &PathResults) -> String {
    let mut s = format!(
        "### {} (per image: median of repetitions; last row: median over images)\n\n| image | push | pull | run | deploy (pull+run) | dev (push+pull+run) | net: push | net: pull+run | read by container |\n|---|---:|---:|---:|---:|---:|---:|---:|---:|\n",
        p.path
    );
    let row = |s: &mut String, name: &str, m: &Summary| {
        let _ = writeln!(
            s,
            "| {name} | {} | {} | {} | {} | {} | {} | {} | {} |",
            opt_secs(m.push),
            opt_secs(m.pull),
            opt_secs(m.run),
            opt_secs(m.deploy),
            opt_secs(m.dev),
            opt_bytes(m.net_push_bytes),
            opt_bytes(m.net_pull_bytes),
            opt_bytes(m.read_bytes),
        );
    };
    let mut failures = Vec::new();
    for i in &p.images {
        match i.reps.iter().find_map(|r| r.error.as_deref()) {
            Some(e) => {
                failures.push(format!("- {} failed: {}", i.image, e.replace('\n', " ")));
                row(&mut s, &format!("{} (failed)", i.image), &i.median);
            }
            None => row(&mut s, &i.image, &i.median),
        }
    }
    row(&mut s, "**median**", &p.median);
    s += "\n";
    if !failures.is_empty() {
        s += &failures.join("\n");
        s += "\n\n";
    }
    s
}

/// Sub-phase breakdown: every part name the path reported, in first-seen order.
fn parts_table(p: &PathResults) -> String {
    let mut names: Vec<(String, &'static str)> = Vec::new();
    let phases = |r: &crate::bench::Rep| {
        [
            ("push", r.push.clone()),
            ("pull", r.pull.clone()),
            ("run", r.run.clone()),
            ("stop", r.stop.clone()),
        ]
    };
    for i in &p.images {
        for r in &i.reps {
            for (ph, x) in phases(r) {
                for (k, _) in x.map(|x| x.step.parts).unwrap_or_default() {
                    if !names.iter().any(|(n, q)| n == &k && *q == ph) {
                        names.push((k, ph));
                    }
                }
            }
        }
    }
    if names.is_empty() {
        return String::new();
    }
    names.push(("stop (not in any cycle)".into(), "stop*"));
    let mut s = format!(
        "#### {}: where the time goes (median seconds)\n\n| image |",
        p.path
    );
    for (n, ph) in &names {
        if *ph == "stop*" {
            let _ = write!(s, " {n} |");
        } else {
            let _ = write!(s, " {ph}: {n} |");
        }
    }
    s += "\n|---|";
    s += &"---:|".repeat(names.len());
    s += "\n";
    for i in &p.images {
        let _ = write!(s, "| {} |", i.image);
        for (n, ph) in &names {
            let v = crate::bench::median(i.reps.iter().map(|r| {
                if *ph == "stop*" {
                    return r.stop.as_ref().map(|x| x.secs);
                }
                phases(r)
                    .into_iter()
                    .find(|(q, _)| q == ph)
                    .and_then(|(_, x)| x)
                    .and_then(|x| x.step.parts.iter().find(|(k, _)| k == n).map(|(_, v)| *v))
            }));
            let _ = write!(s, " {} |", opt_secs(v));
        }
        s += "\n";
    }
    s + "\n"
}

fn dedup_table(d: &DedupReport) -> String {
    let mut s = String::from(
        "### Compression vs deduplication (Figure 7)\n\n| image | raw (file contents) | gzip -6 layer | gzip ratio | file dedup | 4 KiB block dedup | 4 KiB block dedup, padded tails |\n|---|---:|---:|---:|---:|---:|---:|\n",
    );
    for r in d.images.iter().chain(std::iter::once(&d.all)) {
        let name = if r.name == "all" {
            "**all images (global)**".to_string()
        } else {
            r.name.clone()
        };
        let _ = writeln!(
            s,
            "| {name} | {} | {} | {:.2}× | {:.2}× | {:.2}× | {:.2}× |",
            fmt_bytes(r.raw_bytes),
            fmt_bytes(r.gz_bytes),
            r.gzip_ratio,
            r.file_dedup_ratio,
            r.block_dedup_ratio,
            r.block_dedup_ratio_padded
        );
    }
    let local = |f: fn(&crate::dedup::DedupRow) -> f64| {
        crate::bench::median(d.images.iter().map(|r| Some(f(r))))
    };
    let _ = writeln!(
        s,
        "| *median of per-image (local)* | | | {:.2}× | {:.2}× | {:.2}× | {:.2}× |",
        local(|r| r.gzip_ratio).unwrap_or(0.0),
        local(|r| r.file_dedup_ratio).unwrap_or(0.0),
        local(|r| r.block_dedup_ratio).unwrap_or(0.0),
        local(|r| r.block_dedup_ratio_padded).unwrap_or(0.0),
    );
    s + "\nRatios are raw / stored. gzip compresses each image alone, so its global ratio is Σraw/Σgz; dedup shares identical files or blocks across images. Partial last blocks: `block` hashes and counts a tail at its own length; `padded` zero-pads it to 4 KiB and stores every unique block at 4 KiB (ratio = 4 KiB × blocks / unique).\n\n"
}

// ---------------------------------------------------------------------------------------------
// SVG

const PHASE_COLORS: [(&str, &str); 3] =
    [("push", "#4e79a7"), ("pull", "#f28e2b"), ("run", "#59a14f")];

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// A grouped bar chart of push / pull / run seconds per image (and the median), one bar per
/// phase and path, on a log-scale y axis. The second path is drawn hatched, the third
/// dotted; the footer gives the median deployment and development speedups.
pub fn svg(r: &Results) -> String {
    let paths: Vec<&PathResults> = r.paths.iter().collect();
    let mut groups: Vec<(String, Vec<&Summary>)> = Vec::new();
    if let Some(first) = paths.first() {
        for img in &first.images {
            let per_path = paths
                .iter()
                .map(|p| {
                    p.images
                        .iter()
                        .find(|i| i.image == img.image)
                        .map_or(&EMPTY, |i| &i.median)
                })
                .collect();
            groups.push((img.image.clone(), per_path));
        }
        groups.push(("median".into(), paths.iter().map(|p| &p.median).collect()));
    }
    let get = |s: &Summary, ph: &str| match ph {
        "push" => s.push,
        "pull" => s.pull,
        _ => s.run,
    };
    let vals: Vec<f64> = groups
        .iter()
        .flat_map(|(_, ss)| {
            ss.iter()
                .flat_map(|s| PHASE_COLORS.iter().filter_map(|(ph, _)| get(s, ph)))
        })
        .filter(|v| *v > 0.0)
        .collect();
    let lo = vals.iter().copied().fold(f64::INFINITY, f64::min).max(1e-4);
    let hi = vals.iter().copied().fold(0.0, f64::max).max(lo * 10.0);
    // The bottom decade sits at least 2x below the smallest bar, so short bars stay visible.
    let (d0, d1) = ((lo / 2.0).log10().floor() as i32, hi.log10().ceil() as i32);

    let bar_w = 16.0;
    let bars = (PHASE_COLORS.len() * paths.len().max(1)) as f64;
    // One legend row per path above the plot; two footer lines below it.
    let (ml, mr, mt, mb) = (70.0, 20.0, 54.0 + 16.0 * paths.len().max(1) as f64, 76.0);
    let plot_h = 320.0;
    let ngroups = groups.len().max(1) as f64;
    // At least 760 px wide so the title and legend fit; groups spread out to fill it.
    let group_w = (bars * bar_w + 28.0).max((760.0 - ml - mr) / ngroups);
    let width = ml + mr + group_w * ngroups;
    let height = mt + plot_h + mb;
    let y = |v: f64| mt + plot_h * (1.0 - (v.log10() - f64::from(d0)) / f64::from(d1 - d0));

    let mut s = String::new();
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{width:.0}" height="{height:.0}" viewBox="0 0 {width:.0} {height:.0}" font-family="Helvetica, Arial, sans-serif" font-size="12">"#
    );
    s += r#"<defs><pattern id="hatch" width="5" height="5" patternUnits="userSpaceOnUse" patternTransform="rotate(45)"><rect width="5" height="5" fill="white" fill-opacity="0.35"/><line x1="0" y1="0" x2="0" y2="5" stroke="white" stroke-width="2"/></pattern><pattern id="dots" width="5" height="5" patternUnits="userSpaceOnUse"><rect width="5" height="5" fill="white" fill-opacity="0.2"/><circle cx="2.5" cy="2.5" r="1.3" fill="white"/></pattern></defs>"#;
    s += "\n<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n";
    let title = format!(
        "HelloBench-style push / pull / run, {} corpus ({}; {} CPUs) — log scale",
        r.corpus,
        r.date.get(..10).unwrap_or(&r.date),
        r.host.cpus
    );
    let _ = writeln!(
        s,
        r#"<text x="{ml}" y="22" font-size="15" font-weight="bold">{}</text>"#,
        esc(&title)
    );
    // Legend: one row per path.
    for (pi, p) in paths.iter().enumerate() {
        let mut lx = ml;
        let ly = 36.0 + 16.0 * pi as f64;
        for (ph, c) in PHASE_COLORS {
            let _ = write!(
                s,
                r#"<rect x="{lx}" y="{ly}" width="12" height="12" fill="{c}"/>"#
            );
            if let Some(pat) = pattern(pi) {
                let _ = write!(
                    s,
                    r#"<rect x="{lx}" y="{ly}" width="12" height="12" fill="{pat}"/>"#
                );
            }
            let _ = writeln!(
                s,
                r#"<text x="{}" y="{}">{} {ph}</text>"#,
                lx + 16.0,
                ly + 10.0,
                esc(&p.path)
            );
            lx += 28.0 + 7.0 * (p.path.len() + ph.len()) as f64;
        }
    }
    // Axes and decade gridlines.
    for d in d0..=d1 {
        let v = 10f64.powi(d);
        let yy = y(v);
        let label = match d {
            ..=-4 => format!("{} µs", 10f64.powi(d + 6)),
            -3..=-1 => format!("{} ms", 10f64.powi(d + 3)),
            _ => format!("{v} s"),
        };
        let _ = writeln!(
            s,
            r##"<line x1="{ml}" x2="{:.0}" y1="{yy:.1}" y2="{yy:.1}" stroke="#ddd"/><text x="{:.0}" y="{:.1}" text-anchor="end">{label}</text>"##,
            width - mr,
            ml - 6.0,
            yy + 4.0
        );
    }
    let _ = writeln!(
        s,
        r##"<line x1="{ml}" x2="{ml}" y1="{mt}" y2="{:.0}" stroke="#333"/><line x1="{ml}" x2="{:.0}" y1="{:.0}" y2="{:.0}" stroke="#333"/>"##,
        mt + plot_h,
        width - mr,
        mt + plot_h,
        mt + plot_h
    );
    let _ = writeln!(
        s,
        r#"<text transform="translate(16 {:.0}) rotate(-90)" text-anchor="middle">seconds (log)</text>"#,
        mt + plot_h / 2.0
    );
    // Bars.
    for (gi, (gname, per_path)) in groups.iter().enumerate() {
        let gx = ml + group_w * gi as f64 + (group_w - bars * bar_w) / 2.0;
        let mut bx = gx;
        for (pi, summ) in per_path.iter().enumerate() {
            for (ph, c) in PHASE_COLORS {
                if let Some(v) = get(summ, ph).filter(|v| *v > 0.0) {
                    let top = y(v.max(10f64.powi(d0)));
                    let h = mt + plot_h - top;
                    let _ = write!(
                        s,
                        r#"<rect x="{bx:.1}" y="{top:.1}" width="{:.1}" height="{h:.1}" fill="{c}"><title>{} {} {ph}: {}</title></rect>"#,
                        bar_w - 2.0,
                        esc(&paths[pi].path),
                        esc(gname),
                        fmt_secs(v)
                    );
                    if let Some(pat) = pattern(pi) {
                        let _ = write!(
                            s,
                            r#"<rect x="{bx:.1}" y="{top:.1}" width="{:.1}" height="{h:.1}" fill="{pat}"/>"#,
                            bar_w - 2.0
                        );
                    }
                    let _ = writeln!(
                        s,
                        r#"<text transform="translate({:.1} {:.1}) rotate(-90)" font-size="9">{}</text>"#,
                        bx + bar_w / 2.0 + 2.0,
                        top - 3.0,
                        fmt_secs(v).replace(' ', "")
                    );
                }
                bx += bar_w;
            }
        }
        let weight = if gname == "median" { "bold" } else { "normal" };
        let _ = writeln!(
            s,
            r#"<text x="{:.1}" y="{:.0}" text-anchor="middle" font-weight="{weight}">{}</text>"#,
            gx + bars * bar_w / 2.0,
            mt + plot_h + 18.0,
            esc(gname)
        );
    }
    let note = if r.paths.iter().any(|p| p.path != BASELINE) {
        "slacker paths measured in the same run as the baseline.".to_string()
    } else {
        "no slacker path measured in this run.".to_string()
    };
    let speedups: Vec<String> = r
        .speedups
        .iter()
        .map(|p| {
            format!(
                "{}: deployment {}, development {}",
                p.path,
                opt_ratio(p.of_medians.deploy),
                opt_ratio(p.of_medians.dev)
            )
        })
        .collect();
    let _ = writeln!(
        s,
        r##"<text x="{ml}" y="{:.0}" font-size="11" fill="#555">{}</text>"##,
        height - 30.0,
        esc(&format!(
            "run = until the readiness check passes; each bar: median of {} rep(s); {note}",
            r.reps
        ))
    );
    if !speedups.is_empty() {
        let _ = writeln!(
            s,
            r##"<text x="{ml}" y="{:.0}" font-size="11" fill="#333">{}</text>"##,
            height - 14.0,
            esc(&format!(
                "median speedups over the baseline (ratio of medians): {} (paper: {}×, {}×; goal: {}×, {}×)",
                speedups.join("; "),
                PAPER_SPEEDUP.0,
                PAPER_SPEEDUP.1,
                GOAL_SPEEDUP.0,
                GOAL_SPEEDUP.1
            ))
        );
    }
    s += "</svg>\n";
    s
}

/// The fill pattern drawn over path `i`'s bars (the first path is plain).
fn pattern(i: usize) -> Option<&'static str> {
    match i {
        0 => None,
        1 => Some("url(#hatch)"),
        _ => Some("url(#dots)"),
    }
}

static EMPTY: Summary = Summary {
    push: None,
    pull: None,
    run: None,
    deploy: None,
    dev: None,
    net_push_bytes: None,
    net_pull_bytes: None,
    read_bytes: None,
    layer_push_bytes: None,
    layer_pull_bytes: None,
    fetched_bytes: None,
    image_bytes: None,
    image_used_bytes: None,
    fetched_of_image: None,
    fetched_of_used: None,
};

#[cfg(test)]
mod tests {
    use super::*;

    fn path(name: &str, deploy: f64, dev: f64) -> PathResults {
        let m = Summary {
            push: Some(dev - deploy),
            pull: Some(deploy / 2.0),
            run: Some(deploy / 2.0),
            deploy: Some(deploy),
            dev: Some(dev),
            ..Summary::default()
        };
        PathResults {
            path: name.into(),
            images: vec![crate::bench::ImageResult {
                image: "shell".into(),
                reps: Vec::new(),
                median: m.clone(),
            }],
            median: m,
        }
    }

    #[test]
    fn speedups_divide_baseline_by_path() {
        let r = Results {
            tool: String::new(),
            date: String::new(),
            command: String::new(),
            host: Host::this(),
            corpus: "reduced".into(),
            corpus_secs_this_run: 0.0,
            base: None,
            images: Vec::new(),
            layering: String::new(),
            notes: Vec::new(),
            skipped: Vec::new(),
            reps: 1,
            paths: vec![path(BASELINE, 8.0, 20.0), path(SLACKER, 0.5, 1.0)],
            speedups: Vec::new(),
            dedup: None,
            fair_link: None,
            goals: None,
        };
        let s = r.compute_speedups();
        assert_eq!(s.len(), 1);
        assert_eq!(s[0].path, SLACKER);
        assert_eq!(s[0].of_medians.deploy, Some(16.0));
        assert_eq!(s[0].of_medians.dev, Some(20.0));
        assert_eq!(s[0].median_of_images.push, Some(24.0));
        let r = Results { speedups: s, ..r };
        let md = r.markdown();
        assert!(
            md.contains("| slacker | 16.0× / 16.0× | 20.0× / 20.0×"),
            "{md}"
        );
        assert!(svg(&r).contains("slacker: deployment 16.0×, development 20.0×"));
    }

    #[test]
    fn formats() {
        assert_eq!(fmt_bytes(166_000_000), "166.0 MB");
        assert_eq!(fmt_secs(61.0), "61.0 s");
        assert_eq!(fmt_secs(0.0123), "12 ms");
        assert_eq!(ratio(Some(10.0), Some(2.0)), "5.0×");
        assert_eq!(ratio(Some(10.0), None), "—");
    }
}
