//! The harness: times every [`Path`] phase with one clock, per image and repetition, and
//! derives the cycles the paper reports (deployment = pull + run, development = push + pull +
//! run).
//!
//! Between phases (untimed) it calls `sync(2)`, so one phase's dirty pages are not written
//! back on the next phase's clock. That favours the traditional path (its unpack writes are
//! not charged to it), which keeps speedups conservative.

use std::time::Instant;

use serde::{Deserialize, Serialize};

use crate::corpus::BuiltImage;
use crate::error::Result;
use crate::path::{Path, Step};
use crate::sys;

/// Which phases can run on this host.
#[derive(Debug, Clone, Copy)]
pub struct Plan {
    /// Repetitions per image (the table shows the median).
    pub reps: usize,
    /// Run containers (needs root, overlayfs, chroot); push + pull always run.
    pub run: bool,
}

/// One timed phase.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Phase {
    /// Wall-clock seconds around the call.
    pub secs: f64,
    /// What the path reported.
    pub step: Step,
}

/// One (prepare →) push → pull → run → stop sequence.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Rep {
    /// Untimed set-up before push (not part of any cycle), if the path has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prepare: Option<Phase>,
    /// Push.
    pub push: Option<Phase>,
    /// Pull.
    pub pull: Option<Phase>,
    /// Run until ready.
    pub run: Option<Phase>,
    /// Stop (not part of any cycle).
    pub stop: Option<Phase>,
    /// Seconds spent in `clean` (untimed in every cycle).
    pub clean_secs: Option<f64>,
    /// First failure, if any.
    pub error: Option<String>,
}

impl Rep {
    /// pull + run.
    pub fn deploy(&self) -> Option<f64> {
        Some(self.pull.as_ref()?.secs + self.run.as_ref()?.secs)
    }
    /// push + pull + run.
    pub fn dev(&self) -> Option<f64> {
        Some(self.push.as_ref()?.secs + self.deploy()?)
    }
}

/// Medians over repetitions (per image) or over images (per path).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Summary {
    /// Push seconds.
    pub push: Option<f64>,
    /// Pull seconds.
    pub pull: Option<f64>,
    /// Run seconds (until ready).
    pub run: Option<f64>,
    /// Deployment cycle (pull + run) seconds.
    pub deploy: Option<f64>,
    /// Development cycle (push + pull + run) seconds.
    pub dev: Option<f64>,
    /// Bytes sent to the registry by push.
    pub net_push_bytes: Option<f64>,
    /// Bytes fetched from the registry by pull and run (what a deployment moves).
    pub net_pull_bytes: Option<f64>,
    /// Image bytes read/fetched by the container before it was ready.
    pub read_bytes: Option<f64>,
    /// Layer blob bytes uploaded by push.
    #[serde(default)]
    pub layer_push_bytes: Option<f64>,
    /// Layer blob bytes downloaded by pull.
    #[serde(default)]
    pub layer_pull_bytes: Option<f64>,
    /// Image bytes fetched from storage during run, until ready.
    #[serde(default)]
    pub fetched_bytes: Option<f64>,
    /// The image's size in storage (volume size).
    #[serde(default)]
    pub image_bytes: Option<f64>,
    /// The image's used bytes in storage.
    #[serde(default)]
    pub image_used_bytes: Option<f64>,
    /// `fetched_bytes / image_bytes`.
    #[serde(default)]
    pub fetched_of_image: Option<f64>,
    /// `fetched_bytes / image_used_bytes`.
    #[serde(default)]
    pub fetched_of_used: Option<f64>,
}

/// One image under one path.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ImageResult {
    /// Image name.
    pub image: String,
    /// Every repetition.
    pub reps: Vec<Rep>,
    /// Medians over `reps` (only complete phases count).
    pub median: Summary,
}

/// Everything one path measured.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PathResults {
    /// `baseline`, `slacker`, ...
    pub path: String,
    /// Per image.
    pub images: Vec<ImageResult>,
    /// Medians over images of the per-image medians.
    pub median: Summary,
}

/// The median of the values present (mean of the middle two for even counts).
pub fn median(v: impl IntoIterator<Item = Option<f64>>) -> Option<f64> {
    let mut v: Vec<f64> = v.into_iter().flatten().collect();
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    Some(if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    })
}

fn summarize<'a, T: 'a>(items: &'a [T], f: impl Fn(&'a T) -> Summary) -> Summary {
    let s: Vec<Summary> = items.iter().map(f).collect();
    Summary {
        push: median(s.iter().map(|x| x.push)),
        pull: median(s.iter().map(|x| x.pull)),
        run: median(s.iter().map(|x| x.run)),
        deploy: median(s.iter().map(|x| x.deploy)),
        dev: median(s.iter().map(|x| x.dev)),
        net_push_bytes: median(s.iter().map(|x| x.net_push_bytes)),
        net_pull_bytes: median(s.iter().map(|x| x.net_pull_bytes)),
        read_bytes: median(s.iter().map(|x| x.read_bytes)),
        layer_push_bytes: median(s.iter().map(|x| x.layer_push_bytes)),
        layer_pull_bytes: median(s.iter().map(|x| x.layer_pull_bytes)),
        fetched_bytes: median(s.iter().map(|x| x.fetched_bytes)),
        image_bytes: median(s.iter().map(|x| x.image_bytes)),
        image_used_bytes: median(s.iter().map(|x| x.image_used_bytes)),
        fetched_of_image: median(s.iter().map(|x| x.fetched_of_image)),
        fetched_of_used: median(s.iter().map(|x| x.fetched_of_used)),
    }
}

fn rep_summary(r: &Rep) -> Summary {
    let b = |p: &Option<Phase>| p.as_ref().map(|p| p.step.network_bytes as f64);
    let f = |p: &Option<Phase>, g: fn(&Step) -> Option<u64>| {
        p.as_ref().and_then(|p| g(&p.step)).map(|v| v as f64)
    };
    let fetched = f(&r.run, |s| s.fetched_bytes);
    let image = f(&r.run, |s| s.image_bytes);
    let used = f(&r.run, |s| s.image_used_bytes);
    let frac = |d: Option<f64>| match (fetched, d) {
        (Some(x), Some(d)) if d > 0.0 => Some(x / d),
        _ => None,
    };
    Summary {
        layer_push_bytes: f(&r.push, |s| s.layer_bytes),
        layer_pull_bytes: f(&r.pull, |s| s.layer_bytes),
        fetched_bytes: fetched,
        image_bytes: image,
        image_used_bytes: used,
        fetched_of_image: frac(image),
        fetched_of_used: frac(used),
        push: r.push.as_ref().map(|p| p.secs),
        pull: r.pull.as_ref().map(|p| p.secs),
        run: r.run.as_ref().map(|p| p.secs),
        deploy: r.deploy(),
        dev: r.dev(),
        net_push_bytes: b(&r.push),
        net_pull_bytes: b(&r.pull).map(|p| p + b(&r.run).unwrap_or(0.0)),
        read_bytes: r
            .run
            .as_ref()
            .and_then(|p| p.step.read_bytes)
            .map(|b| b as f64),
    }
}

fn describe(name: &str, p: &Phase) -> String {
    let parts: Vec<String> = p
        .step
        .parts
        .iter()
        .map(|(k, v)| format!("{k} {v:.2}"))
        .collect();
    let mut s = format!("{name} {:.3} s", p.secs);
    if !parts.is_empty() {
        s += &format!(" ({})", parts.join(", "));
    }
    if p.step.network_bytes > 0 {
        s += &format!(
            ", {} over the network",
            crate::report::fmt_bytes(p.step.network_bytes)
        );
    }
    if let Some(f) = p.step.fetched_bytes {
        s += &format!(" (of which {} fetched lazily)", crate::report::fmt_bytes(f));
    }
    if let Some(r) = p.step.read_bytes {
        s += &format!(", {} read by the container", crate::report::fmt_bytes(r));
    }
    s
}

async fn timed<F: Future<Output = Result<Step>>>(f: F) -> Result<Phase> {
    let t = Instant::now();
    let step = f.await?;
    Ok(Phase {
        secs: t.elapsed().as_secs_f64(),
        step,
    })
}

/// Measure `images` under `path`.
pub async fn measure(path: &mut dyn Path, images: &[BuiltImage], plan: Plan) -> PathResults {
    let name = path.name().to_owned();
    let mut results = Vec::new();
    for img in images {
        let mut reps = Vec::new();
        for i in 0..plan.reps.max(1) {
            let tag = format!("{name} {} [{}/{}]", img.spec.name, i + 1, plan.reps.max(1));
            let mut rep = Rep::default();
            let r: Result<()> = async {
                let p = timed(path.prepare(img)).await?;
                if p.secs >= 0.01 {
                    crate::progress!("{tag}: {} (untimed)", describe("prepare", &p));
                }
                rep.prepare = Some(p);
                sys::sync_all();
                let p = timed(path.push(img)).await?;
                crate::progress!("{tag}: {}", describe("push", &p));
                rep.push = Some(p);
                sys::sync_all();
                let p = timed(path.pull(img)).await?;
                crate::progress!("{tag}: {}", describe("pull", &p));
                rep.pull = Some(p);
                if plan.run {
                    sys::sync_all();
                    let p = timed(path.run(img)).await?;
                    crate::progress!("{tag}: {}", describe("run", &p));
                    rep.run = Some(p);
                    let p = timed(path.stop(img)).await?;
                    rep.stop = Some(p);
                }
                Ok(())
            }
            .await;
            if let Err(e) = r {
                crate::progress!("{tag}: FAILED: {e}");
                rep.error = Some(e.to_string());
                if let Err(e) = path.stop(img).await {
                    crate::progress!("{tag}: stop after failure: {e}");
                }
            }
            let t = Instant::now();
            if let Err(e) = path.clean(img).await {
                crate::progress!("{tag}: clean: {e}");
                rep.error.get_or_insert(format!("clean: {e}"));
            }
            rep.clean_secs = Some(t.elapsed().as_secs_f64());
            crate::progress!("{tag}: clean (untimed) {:.2} s", t.elapsed().as_secs_f64());
            let failed = rep.error.is_some();
            reps.push(rep);
            if failed {
                break;
            }
        }
        let median = summarize(&reps, rep_summary);
        if let (Some(d), Some(v)) = (median.deploy, median.dev) {
            crate::progress!(
                "{name} {}: deployment cycle {d:.2} s, development cycle {v:.2} s",
                img.spec.name
            );
        }
        results.push(ImageResult {
            image: img.spec.name.clone(),
            reps,
            median,
        });
    }
    let median = summarize(&results, |r| r.median.clone());
    PathResults {
        path: name,
        images: results,
        median,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn medians() {
        assert_eq!(median([Some(3.0), None, Some(1.0), Some(2.0)]), Some(2.0));
        assert_eq!(median([Some(4.0), Some(1.0)]), Some(2.5));
        assert_eq!(median([None]), None);
    }
}
