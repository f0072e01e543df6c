//! `slacker-hellobench`: build the corpus, measure push / pull / run per image, analyse
//! compression vs dedup, and write tables, JSON and an SVG chart.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use slacker_core::worker::LinkProfile;
use slacker_hellobench::baseline::Traditional;
use slacker_hellobench::bench::{self, Plan};
use slacker_hellobench::corpus::{self, BuiltImage, Store};
use slacker_hellobench::error::{Context, Error, Result};
use slacker_hellobench::fairlink::FairLink;
use slacker_hellobench::preflight::{self, Preflight};
use slacker_hellobench::registry::Registry;
use slacker_hellobench::report::{self, Host, Results};
use slacker_hellobench::slacker::{Mode, SlackerPath, Storage};
use slacker_hellobench::spec::{Corpus, ImageSpec, Spec};
use slacker_hellobench::storage::{self, BtrfsImage};
use slacker_hellobench::{containerd, dedup, nfs, progress, rbd, sys};

mod setup;

/// Every path, in measuring order.
const ALL_PATHS: [&str; 9] = [
    "baseline",
    "slacker",
    "slacker-lazy",
    "slacker-lazy-trace",
    "slacker-lazy-nora",
    "slacker-nfs",
    "slacker-rbd",
    containerd::OVERLAYFS,
    containerd::SLACKER,
];

/// The paths measured without `--paths`: `slacker-nfs` only when `SLACKER_NFS_ADDR` names
/// a server (it is opt-in: without one, `--paths ...,slacker-nfs` starts the knfsd VM).
fn default_paths() -> Vec<String> {
    ALL_PATHS
        .iter()
        .filter(|p| **p != "slacker-nfs" || nfs::configured().is_some())
        .filter(|p| **p != "slacker-rbd" || rbd::configured().is_some())
        .map(|p| (*p).to_owned())
        .collect()
}

const USAGE: &str = "\
usage: slacker-hellobench [COMMAND] [OPTIONS]

Measures the real corpus (Debian images built with debootstrap). Not root: re-runs itself
with sudo. Root: installs what it needs with apt-get (debootstrap, docker-registry,
btrfs-progs, e2fsprogs). A host that cannot build the real corpus fails with the fix;
--quick is the explicit smoke run on a busybox stand-in.

commands:
  bench    (default) build/reuse the corpus, measure push/pull/run of every path (baseline,
           slacker, slacker-lazy, slacker-lazy-trace, slacker-lazy-nora, and slacker-nfs when
           SLACKER_NFS_ADDR is set; the containerd pair containerd-overlayfs +
           containerd-slacker, ctr + runc on containerd's overlayfs vs slacker-snapshotter,
           when containerd is installed), dedup analysis, write results with the issue-14
           goals
  corpus   build/reuse the corpus only, and print build times and sizes
  dedup    compression vs dedup analysis (Figure 7) only
  check    say what this host can run and what is missing
  report   re-render results.md and results.svg from a results.json (--from FILE)

options:
  --quick                 smoke run, not the benchmark: the `shell` image as a busybox
                          stand-in, no dedup analysis (= --corpus reduced --busybox --no-dedup)
  --no-install            do not apt-get install missing packages (root)
  --no-sudo               do not re-run with sudo when not root (measure what a user can)
  --corpus reduced|full|heavy
                          which images (default: full; reduced = just `shell`, for CI;
                          heavy = only the heavy images, startup reads >= 50 MB, own tables)
  --only a,b              only these images (names from images.json)
  --out DIR               results directory (default: $SLACKER_CACHE/hellobench/results,
                          SLACKER_CACHE defaults to /var/cache/slacker)
  --reps N                repetitions per image, median reported (default: 1)
  --paths a,b             which paths to measure (default: baseline,slacker,slacker-lazy,
                          slacker-lazy-trace (fresh worker, startup trace prefetched),
                          slacker-lazy-nora (worker read-ahead off: the bytes reference), plus
                          slacker-nfs if SLACKER_NFS_ADDR=host:port is set; naming slacker-nfs
                          without it starts/reuses the knfsd VM, slacker-backend-nfs/server;
                          slacker-rbd likewise with SLACKER_RBD_MON (+ SLACKER_RBD_KEYRING) or
                          the Ceph test cluster of slacker-backend-rbd/cluster;
                          naming either containerd-overlayfs or containerd-slacker measures
                          both: they are one pair, run by one containerd)
  --link-latency-us N     emulated latency per request (default 200; 0 with --link-mbit 0 turns the
                          emulated link off): slacker-lazy(-trace)'s storage, and the registry for
                          every path (the fair link, src/fairlink.rs)
  --link-mbit N           emulated link bandwidth, same two places (default 1000; 0 = unlimited)
  --busybox               use (and build) the busybox stand-in for package-less images even
                          where debootstrap works; images with packages are skipped (CI)
  --images FILE           another images.json (default: the one built into the binary)
  --work DIR              scratch directory for registry, worker, containers
                          (default: /var/tmp/slacker-hellobench-<pid>; removed at the end)
  --rebuild               corpus: rebuild the selected images (and the base tree) from scratch
  --no-dedup              bench: skip the dedup analysis
  --from FILE             report: the results.json to render
";

#[derive(Debug, Clone)]
struct Args {
    command: String,
    corpus: Corpus,
    only: Option<Vec<String>>,
    out: PathBuf,
    reps: usize,
    images: Option<PathBuf>,
    work: Option<PathBuf>,
    rebuild: bool,
    dedup: bool,
    from: Option<PathBuf>,
    paths: Vec<String>,
    link_latency_us: u64,
    link_mbit: u64,
    busybox: bool,
    install: bool,
    sudo: bool,
}

impl Args {
    fn wants(&self, path: &str) -> bool {
        self.paths.iter().any(|p| p == path)
    }

    /// The emulated link of slacker-lazy (`None`: off).
    fn link(&self) -> Option<LinkProfile> {
        match (self.link_latency_us, self.link_mbit) {
            (0, 0) => None,
            (us, 0) => Some(LinkProfile::latency_only(Duration::from_micros(us))),
            (us, mbit) => Some(LinkProfile::new(
                Duration::from_micros(us),
                mbit * 1_000_000,
            )),
        }
    }
}

fn parse_args() -> Result<Args> {
    let mut a = Args {
        command: "bench".into(),
        corpus: Corpus::Full,
        only: None,
        out: corpus::cache_root().join("hellobench/results"),
        reps: 1,
        images: None,
        work: None,
        rebuild: false,
        dedup: true,
        from: None,
        paths: default_paths(),
        link_latency_us: 200,
        link_mbit: 1000,
        busybox: false,
        install: true,
        sudo: true,
    };
    let mut it = std::env::args().skip(1);
    let mut first = true;
    while let Some(arg) = it.next() {
        let mut val = |name: &str| {
            it.next()
                .ok_or_else(|| Error::msg(format!("{name} needs a value")))
        };
        match arg.as_str() {
            "bench" | "corpus" | "dedup" | "check" | "report" if first => a.command = arg,
            "--corpus" => {
                let v = val("--corpus")?;
                a.corpus = Corpus::parse(&v).ok_or_else(|| {
                    Error::msg(format!("--corpus {v}: use reduced, full or heavy"))
                })?;
            }
            "--only" => {
                a.only = Some(
                    val("--only")?
                        .split(',')
                        .filter(|s| !s.is_empty())
                        .map(str::to_owned)
                        .collect(),
                )
            }
            "--out" => a.out = val("--out")?.into(),
            "--reps" => {
                a.reps = val("--reps")?
                    .parse()
                    .map_err(|e| Error::msg(format!("--reps: {e}")))?
            }
            "--images" => a.images = Some(val("--images")?.into()),
            "--work" => a.work = Some(val("--work")?.into()),
            "--rebuild" => a.rebuild = true,
            "--no-dedup" => a.dedup = false,
            "--from" => a.from = Some(val("--from")?.into()),
            "--paths" => {
                let v = val("--paths")?;
                a.paths = v
                    .split(',')
                    .filter(|s| !s.is_empty())
                    .map(str::to_owned)
                    .collect();
                if let Some(bad) = a.paths.iter().find(|p| !ALL_PATHS.contains(&p.as_str())) {
                    slacker_hellobench::bail!(
                        "--paths: unknown path {bad:?} (known: {})",
                        ALL_PATHS.join(", ")
                    );
                }
            }
            "--link-latency-us" => {
                a.link_latency_us = val("--link-latency-us")?
                    .parse()
                    .map_err(|e| Error::msg(format!("--link-latency-us: {e}")))?
            }
            "--link-mbit" => {
                a.link_mbit = val("--link-mbit")?
                    .parse()
                    .map_err(|e| Error::msg(format!("--link-mbit: {e}")))?
            }
            "--busybox" => a.busybox = true,
            "--quick" => {
                a.corpus = Corpus::Reduced;
                a.busybox = true;
                a.dedup = false;
            }
            "--no-install" => a.install = false,
            "--no-sudo" => a.sudo = false,
            "-h" | "--help" => {
                print!("{USAGE}");
                std::process::exit(0);
            }
            other => slacker_hellobench::bail!("unknown argument {other:?}\n\n{USAGE}"),
        }
        first = false;
    }
    Ok(a)
}

fn main() -> ExitCode {
    slacker_hellobench::elapsed_secs();
    // The libraries report through tracing (e.g. a mount whose teardown failed): show
    // warnings and errors, and the layer store's recovery notes, on stderr.
    // SLACKER_TIMING=1: the per-step timings (debug events) of the snapshotter, the layer
    // store and the registry client too, and no other debug event (the gRPC stack's would
    // slow the measured path).
    {
        use tracing_subscriber::filter::{LevelFilter, Targets};
        use tracing_subscriber::layer::SubscriberExt;
        use tracing_subscriber::util::SubscriberInitExt;
        let timing = if std::env::var_os("SLACKER_TIMING").is_some() {
            LevelFilter::DEBUG
        } else {
            LevelFilter::INFO
        };
        tracing_subscriber::fmt()
            .with_writer(std::io::stderr)
            .with_max_level(LevelFilter::DEBUG)
            .with_target(false)
            .finish()
            .with(
                Targets::new()
                    .with_default(LevelFilter::INFO)
                    .with_target("slacker_snapshotter::timing", timing)
                    .with_target("slacker_core::timing", timing)
                    .with_target("slacker_oci::timing", timing),
            )
            .init();
    }
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("slacker-hellobench: {e}");
            return ExitCode::from(2);
        }
    };
    // The commands that build or measure the corpus: as a user, re-run through sudo;
    // as root, install what is missing first.
    if matches!(args.command.as_str(), "bench" | "corpus" | "dedup") {
        if args.sudo
            && let Some(code) = setup::elevate()
        {
            return code;
        }
        if args.install
            && let Err(e) = setup::install_packages(args.busybox)
        {
            eprintln!("slacker-hellobench: error: {e}");
            return ExitCode::FAILURE;
        }
    }
    let work = args.work.clone().unwrap_or_else(|| {
        PathBuf::from(format!(
            "/var/tmp/slacker-hellobench-{}",
            std::process::id()
        ))
    });
    let cache = Store::new(&corpus::cache_root());
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("slacker-hellobench: tokio runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let interrupted = Arc::new(tokio::sync::Notify::new());
    let result = rt.block_on({
        let args = &args;
        let interrupted = interrupted.clone();
        let work = work.clone();
        async move {
            tokio::spawn({
                let interrupted = interrupted.clone();
                async move {
                    if tokio::signal::ctrl_c().await.is_ok() {
                        progress!("interrupted: stopping children, then unmounting");
                        sys::kill_groups(); // before the work future (and its mount guards) is dropped
                        interrupted.notify_one();
                    }
                }
            });
            tokio::select! {
                r = run(args, &work) => r,
                () = interrupted.notified() => Err(Error::msg("interrupted")),
            }
        }
    });
    // Whatever happened: nothing of ours stays running or mounted. Innermost first: the
    // containers and their ext4 mounts, the loop devices on FUSE files and on the btrfs,
    // FUSE mounts, then the btrfs itself.
    sys::emergency_cleanup(&[work.as_path()]);
    storage::detach_loops_under(&work);
    sys::unmount_under(&work);
    storage::emergency_cleanup();
    rbd::stop_if_started();
    // Not the whole cache: other runs' btrfs filesystems live under cache/btrfs/<pid>
    // (this run's was torn down above); only the corpus builds' chroot mounts.
    let corpus_dirs = ["images", "base", "base.partial"].map(|d| cache.dir().join(d));
    let mut dirs = vec![work.as_path()];
    dirs.extend(corpus_dirs.iter().map(PathBuf::as_path));
    sys::emergency_cleanup(&dirs);
    if args.work.is_none() && work.exists() {
        progress!("removing scratch directory {}", work.display());
        if let Err(e) = sys::remove_tree(&work) {
            eprintln!("slacker-hellobench: leaving {}: {e}", work.display());
        }
    }
    rt.shutdown_timeout(Duration::from_secs(2));
    match result {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("slacker-hellobench: error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn print_missing(pf: &Preflight) {
    for m in &pf.missing {
        progress!("{m}");
    }
}

/// Build or reuse the corpus as far as this host allows. Returns the images and why others
/// were skipped.
fn corpus_for(
    args: &Args,
    pf: &Preflight,
    specs: &[ImageSpec],
    store: &Store,
) -> Result<(corpus::CorpusReport, Vec<String>)> {
    let mut skipped = Vec::new();
    // Only --busybox (--quick) measures busybox stand-ins; otherwise a cached stand-in does
    // not count as the image.
    let cached: Vec<_> = store
        .cached(specs)
        .into_iter()
        .map(|c| c.filter(|c| args.busybox || c.record.source.is_some()))
        .collect();
    let buildable: Vec<ImageSpec> = specs
        .iter()
        .zip(&cached)
        .filter(|(s, c)| {
            if args.busybox && !s.packages.is_empty() {
                skipped.push(format!(
                    "image {}: --busybox stands in only for package-less images",
                    s.name
                ));
                return false;
            }
            let ok = (pf.debootstrap && !args.busybox)
                || (c.is_some() && !args.rebuild)
                || (args.busybox && s.packages.is_empty() && pf.busybox);
            if !ok {
                skipped.push(format!(
                    "image {}: not in the cache and cannot be built here (needs root + debootstrap + chroot)",
                    s.name
                ));
            }
            ok
        })
        .map(|(s, _)| s.clone())
        .collect();
    if args.rebuild && pf.debootstrap && !args.busybox {
        for s in &buildable {
            let d = store.dir().join("images");
            sys::remove_tree(&d.join(&s.name))?;
            let _ = std::fs::remove_file(d.join(format!("{}.json", s.name)));
        }
        sys::remove_tree(&store.dir().join("base"))?;
        let _ = std::fs::remove_file(store.dir().join("base.json"));
    }
    let rep = store.ensure(&buildable, pf.debootstrap)?;
    Ok((rep, skipped))
}

async fn run(args: &Args, work: &std::path::Path) -> Result<bool> {
    let pf = preflight::check();
    if args.command == "check" {
        println!(
            "root: {}\nbuild Debian corpus: {}\nbuild busybox shell: {}\npush/pull (registry): {}\nrun containers (baseline): {}\nslacker push/pull (btrfs, e2fsprogs): {}\nslacker run (loop, ext4): {}\nslacker-lazy run (FUSE): {}\nslacker-nfs (opt-in) push/pull: {}, run: {}, server: {}",
            pf.root,
            pf.debootstrap,
            pf.busybox,
            pf.registry,
            pf.run,
            pf.slacker,
            pf.slacker_run,
            pf.slacker_lazy_run,
            pf.slacker_nfs,
            pf.slacker_nfs_run,
            nfs::configured().map_or_else(
                || format!(
                    "{} not set (to measure slacker-nfs: {})",
                    nfs::ENV_NFS_ADDR,
                    nfs::HOW
                ),
                |a| format!("{}={a}", nfs::ENV_NFS_ADDR)
            )
        );
        for m in &pf.missing {
            println!("{m}");
        }
        return Ok(pf.missing.is_empty());
    }
    if args.command == "report" {
        let from = args
            .from
            .as_ref()
            .ok_or_else(|| Error::msg("report needs --from results.json"))?;
        let r: Results = serde_json::from_slice(
            &std::fs::read(from).with_context(|| format!("reading {}", from.display()))?,
        )?;
        write_results(&r, &args.out, "results")?;
        return Ok(true);
    }
    print_missing(&pf);
    let spec = match &args.images {
        Some(p) => Spec::parse(
            &std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?,
        )?,
        None => Spec::builtin(),
    };
    let specs = spec.select(args.corpus, args.only.as_deref())?;
    let store = Store::new(&corpus::cache_root()).with_busybox(args.busybox);
    let (_, date) = sys::now_utc();
    let (cr, mut skipped) = tokio::task::spawn_blocking({
        let (pf, specs, store) = (pf.clone(), specs.clone(), store.clone());
        let args = args.clone();
        move || corpus_for(&args, &pf, &specs, &store)
    })
    .await??;
    for s in &skipped {
        progress!("skipped: {s}");
    }
    if !args.busybox {
        let mut reasons = skipped.clone();
        for i in cr.images.iter().filter(|i| i.record.source.is_none()) {
            reasons.push(format!(
                "image {}: only a busybox stand-in is available",
                i.spec.name
            ));
        }
        if !reasons.is_empty() {
            return Err(setup::corpus_unavailable(&reasons));
        }
    }
    progress!(
        "corpus: {} image(s) ready in {:.1} s this run",
        cr.images.len(),
        cr.secs_this_run
    );
    if args.command == "corpus" {
        println!(
            "| image | packages | files | size (file contents) | allocated | built in | this run |\n|---|---|---:|---:|---:|---:|---|"
        );
        if let Some(b) = &cr.base {
            println!(
                "| base (debootstrap) | — | {} | {} | {} | {:.1} s | |",
                b.stats.files,
                report::fmt_bytes(b.stats.file_bytes),
                report::fmt_bytes(b.stats.allocated_bytes),
                b.build_secs
            );
        }
        for i in &cr.images {
            println!(
                "| {} | {} | {} | {} | {} | {:.1} s | {} |",
                i.spec.name,
                i.spec.packages.join(" "),
                i.record.stats.files,
                report::fmt_bytes(i.record.stats.file_bytes),
                report::fmt_bytes(i.record.stats.allocated_bytes),
                i.record.build_secs,
                if i.cached { "cached" } else { "built" }
            );
        }
        println!(
            "\ncorpus time this run: {:.1} s; cache: {}",
            cr.secs_this_run,
            store.dir().display()
        );
        return Ok(skipped.is_empty());
    }
    let images: Vec<BuiltImage> = cr.images.clone();
    let timeout = Duration::from_secs(spec.timeout_secs);
    let mut results = Results {
        tool: format!("{} {}", env!("CARGO_PKG_NAME"), env!("CARGO_PKG_VERSION")),
        date,
        command: std::env::args().collect::<Vec<_>>().join(" "),
        host: Host::this(),
        corpus: format!("{:?}", args.corpus).to_lowercase(),
        corpus_secs_this_run: cr.secs_this_run,
        base: cr.base.clone(),
        images: images.iter().map(|i| i.record.clone()).collect(),
        layering: "traditional path: one flattened layer per image (the whole tree in one tar.gz), \
                   pushed to an empty repository tag and pulled onto an empty worker; slacker paths: \
                   one flattened ext4 volume per image, pushed as one snapshot-reference layer"
            .into(),
        notes: vec![
            "timings: wall clock around each phase; sync(2) between phases, untimed".into(),
            "push: tar + gzip -6 (flate2/miniz_oxide) in memory, sha256, monolithic upload (oci-client 0.18) to docker-registry on 127.0.0.1; the image tree is in the page cache".into(),
            "pull: fresh client; manifest + config + layer download (digest-verified), then gunzip + untar to the host filesystem (no fsync)".into(),
            "run: overlayfs lower = unpacked image (host ext4), upper/work on a tmpfs (a different filesystem, AUFS-like copy-up); /proc + bind /dev; chroot; readiness rule from images.json; stop (untimed in cycles) = stop server, unmount /dev, /proc, overlay".into(),
            "network: the registry (on the same 2 CPUs) behind the fair link (below): the storage link's latency and bandwidth; bytes = blobs + config + manifest, no HTTP headers".into(),
        ],
        skipped: Vec::new(),
        reps: args.reps.max(1),
        paths: Vec::new(),
        speedups: Vec::new(),
        dedup: None,
        fair_link: None,
        goals: None,
    };
    let mut ok = skipped.is_empty();
    let skipped_corpus = skipped.len(); // already reported
    let mut layer_stats = std::collections::HashMap::new();
    if args.command == "bench" && !images.is_empty() {
        if !pf.registry {
            skipped.push(
                "push/pull/run of every path: docker-registry missing (apt-get install -y docker-registry)"
                    .into(),
            );
        } else {
            std::fs::create_dir_all(work)
                .with_context(|| format!("creating {}", work.display()))?;
            let registry = tokio::task::spawn_blocking({
                let d = work.join("registry");
                move || Registry::start(&d)
            })
            .await??;
            // Every path reaches the registry through the emulated link (fairlink.rs).
            let fair = FairLink::start(registry.addr(), args.link())?;
            results.notes.push(fair.describe());
            let plan = |run: bool| Plan {
                reps: args.reps.max(1),
                run,
            };
            let all_ok = |pr: &bench::PathResults| {
                pr.images
                    .iter()
                    .all(|i| i.reps.iter().all(|r| r.error.is_none()))
            };
            if args.wants("baseline") {
                if !pf.run {
                    skipped.push("baseline run phase: needs root, chroot, overlayfs and tmpfs (see the missing lines above)".into());
                }
                let mut trad = Traditional::new(fair.addr(), work, timeout, pf.run)?;
                let pr = bench::measure(&mut trad, &images, plan(pf.run)).await;
                ok &= all_ok(&pr);
                layer_stats = trad.layer_stats().clone();
                results.paths.push(pr);
                drop(trad);
            }
            let slacker_modes: Vec<Mode> = [
                Mode::Kernel,
                Mode::Lazy,
                Mode::LazyTrace,
                Mode::LazyNoReadAhead,
            ]
            .into_iter()
            .filter(|m| args.wants(m.name()))
            .collect();
            if !slacker_modes.is_empty() && !pf.slacker {
                skipped.push("slacker paths: need a btrfs (root + btrfs-progs, or SLACKER_BTRFS_ROOT) and e2fsprogs (see the missing lines above)".into());
            } else if !slacker_modes.is_empty() {
                let size = btrfs_size(&images);
                let cache_dir = store.dir().to_path_buf();
                let btrfs =
                    tokio::task::spawn_blocking(move || BtrfsImage::create(&cache_dir, size))
                        .await??;
                let storage = Storage::open(&btrfs, fair.addr(), work).await?;
                for mode in slacker_modes {
                    let can_run = match mode {
                        Mode::Kernel => pf.slacker_run,
                        Mode::Lazy | Mode::LazyTrace | Mode::LazyNoReadAhead => pf.slacker_lazy_run,
                        Mode::Nfs | Mode::Rbd => pf.slacker_nfs_run,
                    };
                    if !can_run {
                        skipped.push(format!(
                            "{} run phase: needs root, losetup, ext4{} (see the missing lines above)",
                            mode.name(),
                            if mode != Mode::Kernel { " and /dev/fuse" } else { "" }
                        ));
                    }
                    let link =
                        if matches!(mode, Mode::Lazy | Mode::LazyTrace | Mode::LazyNoReadAhead) {
                            args.link()
                        } else {
                            None
                        };
                    let mut path =
                        SlackerPath::new(mode, storage.clone(), link, timeout, work).await?;
                    results.notes.push(path.describe());
                    let pr = bench::measure(&mut path, &images, plan(can_run)).await;
                    ok &= all_ok(&pr);
                    results.paths.push(pr);
                    drop(path);
                }
                drop(storage);
                tokio::task::spawn_blocking(move || drop(btrfs)).await?;
            }
            if args.wants("slacker-nfs") {
                let pr = run_nfs(
                    &pf,
                    fair.addr(),
                    &images,
                    timeout,
                    work,
                    plan,
                    &mut skipped,
                    &mut results,
                )
                .await?;
                match pr {
                    Some(pr) => {
                        ok &= all_ok(&pr);
                        results.paths.push(pr);
                    }
                    // A server was configured but cannot be used: a failure, not an opt-out.
                    None if nfs::configured().is_some() => ok = false,
                    None => {}
                }
            }
            if args.wants("slacker-rbd") {
                let pr = rbd::run(
                    &pf,
                    fair.addr(),
                    &images,
                    timeout,
                    work,
                    plan,
                    &mut skipped,
                    &mut results,
                )
                .await?;
                match pr {
                    Some(pr) => {
                        ok &= all_ok(&pr);
                        results.paths.push(pr);
                    }
                    None if rbd::configured().is_some() => ok = false,
                    None => {}
                }
            }
            if args.wants(containerd::OVERLAYFS) || args.wants(containerd::SLACKER) {
                let prs = containerd::run(
                    &pf,
                    fair.addr(),
                    &images,
                    timeout,
                    work,
                    plan,
                    &mut skipped,
                    &mut results,
                )
                .await?;
                for pr in prs {
                    ok &= all_ok(&pr);
                    results.paths.push(pr);
                }
            }
            results.fair_link = Some(fair.report());
            drop(fair);
            drop(registry);
        }
    }
    if args.dedup && (args.command == "dedup" || args.command == "bench") && !images.is_empty() {
        let imgs = images.clone();
        let d = tokio::task::spawn_blocking(move || dedup::analyze(&imgs, &layer_stats)).await??;
        results.dedup = Some(d);
    }
    for s in skipped.iter().skip(skipped_corpus) {
        progress!("skipped: {s}");
    }
    results.skipped = skipped;
    results.speedups = results.compute_speedups();
    results.goals = Some(slacker_hellobench::goals::compute(
        &results.paths,
        results.fair_link.as_ref(),
    ));
    let prefix = if args.command == "dedup" {
        "dedup"
    } else {
        "results"
    };
    write_results(&results, &args.out, prefix)?;
    Ok(ok)
}

/// The `slacker-nfs` path: find (or start) the server, import, measure, remove the imports.
/// `None` (with a line in `skipped`) when it cannot be measured here.
#[allow(clippy::too_many_arguments)]
async fn run_nfs(
    pf: &Preflight,
    registry: &str,
    images: &[BuiltImage],
    timeout: Duration,
    work: &std::path::Path,
    plan: impl Fn(bool) -> Plan,
    skipped: &mut Vec<String>,
    results: &mut Results,
) -> Result<Option<bench::PathResults>> {
    if !pf.slacker_nfs {
        skipped.push("slacker-nfs: needs e2fsprogs (images are imported as ext4; see the missing lines above)".into());
        return Ok(None);
    }
    let server = match tokio::task::spawn_blocking(nfs::find).await? {
        Ok(s) => s,
        Err(why) => {
            skipped.push(format!(
                "slacker-nfs: no NFS server ({why}); fix: {}",
                nfs::HOW
            ));
            return Ok(None);
        }
    };
    progress!("slacker-nfs: NFS server {}", server.how);
    if !pf.slacker_nfs_run {
        skipped.push("slacker-nfs run phase: needs root, losetup, ext4 and /dev/fuse (see the missing lines above)".into());
    }
    let storage = match Storage::open_nfs(&server.addr, registry, work).await {
        Ok(s) => s,
        Err(e) => {
            skipped.push(format!("slacker-nfs: {e}; fix: {}", nfs::HOW));
            return Ok(None);
        }
    };
    let mut path = SlackerPath::new(Mode::Nfs, storage.clone(), None, timeout, work).await?;
    results
        .notes
        .push(format!("{} (server: {})", path.describe(), server.how));
    let pr = bench::measure(&mut path, images, plan(pf.slacker_nfs_run)).await;
    drop(path);
    storage.remove_imports().await;
    Ok(Some(pr))
}

/// Size of the sparse btrfs image for `images`: room for every image imported as ext4
/// (the volumes are sparse; allocated about the image's size), three times over, and at
/// least 8 GiB.
fn btrfs_size(images: &[BuiltImage]) -> u64 {
    let data: u64 = images.iter().map(|i| i.record.stats.allocated_bytes).sum();
    (data * 3 + (4 << 30)).max(8 << 30).div_ceil(1 << 30) * (1 << 30)
}

/// Write `{prefix}.md`, `.json` and (with measurements) `.svg` into `out`, falling back to a
/// temporary directory when `out` is not writable; print the tables on stdout.
fn write_results(results: &Results, out: &std::path::Path, prefix: &str) -> Result<()> {
    let mut out = out.to_path_buf();
    let probe = out.join(".hellobench-write-test");
    if let Err(e) = std::fs::create_dir_all(&out).and_then(|()| std::fs::write(&probe, b"")) {
        let fallback = std::env::temp_dir().join("slacker-hellobench-results");
        progress!(
            "cannot create {} ({e}); writing to {} instead (pass --out DIR)",
            out.display(),
            fallback.display()
        );
        out = fallback;
        std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
    } else {
        let _ = std::fs::remove_file(&probe);
    }
    let md = results.markdown();
    std::fs::write(out.join(format!("{prefix}.md")), &md)?;
    std::fs::write(out.join(format!("{prefix}.json")), results.to_json())?;
    if !results.paths.is_empty() {
        std::fs::write(out.join(format!("{prefix}.svg")), report::svg(results))?;
    }
    println!("{md}");
    progress!(
        "wrote {}/{prefix}.{{md,json{}}}",
        out.display(),
        if results.paths.is_empty() { "" } else { ",svg" }
    );
    Ok(())
}
