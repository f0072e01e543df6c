//! `slacker`: convert standard container images into slacker images, push, pull, run,
//! list, remove, and collect unreferenced snapshots.
//!
//! ```text
//! slacker convert [--plain-http] SRC DST   pull SRC (any tar/tar+gzip/tar+zstd layers), apply it
//!                                           into a volume losslessly, snapshot, push DST as a
//!                                           slacker image + plain export, SRC's config kept
//! slacker pull [--plain-http] IMAGE        record IMAGE's layers (lazily for slacker images)
//! slacker push [--plain-http] NAME [DST]   push a local image (reference + plain export)
//! slacker run IMAGE [-- CMD...]            clone, mount, run with the image's Env, WorkingDir,
//!                                           User; Entrypoint + (CMD or the image's Cmd)
//! slacker ls | rm IMAGE | gc [--dry-run]
//! ```
//!
//! Storage is chosen by the same `[backend]` table as the snapshotter's
//! ([`slacker_config::BackendConfig`]), in the file named by `--config`, else
//! `$SLACKER_CONFIG`, else `/etc/slacker/config.toml`; an optional `[cli]` table sets
//! `state` (layer metadata and the local image list, default `/var/lib/slacker/cli`),
//! `store` (the layer store name, default `cli`) and `volume_size` (bytes of a fresh
//! volume). `--json` prints one JSON document on stdout for scripts; otherwise long work
//! shows a spinner on stderr.
#![forbid(unsafe_code)]

mod images;
mod run;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use clap::{Parser, Subcommand};
use serde::Deserialize;
use serde_json::{Value, json};
use slacker_config::BackendConfig;
use slacker_core::layer::TarOptions;
use slacker_core::persist::{DirStore, MetaStore};
use slacker_core::{Backend, Error, ErrorKind, LayerStore, LayerStoreOptions, Result};
use slacker_oci::{ClientOptions, PullReport, PushOptions, PushReport, RegistryClient};

use images::{ImageRecord, Images};

/// The layer store over whatever backend the config names.
pub(crate) type Store = LayerStore<Arc<dyn Backend>>;

#[derive(Parser, Debug)]
#[command(
    name = "slacker",
    version,
    about = "Lazy container images (Slacker, FAST'16)"
)]
struct Cli {
    /// Config file: TOML with a `[backend]` table (and an optional `[cli]` table).
    #[arg(long, global = true, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Print one JSON document on stdout (for scripts).
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Pull a standard image, apply it into a volume, push it as a slacker image (with a
    /// plain export beside it) keeping the source's config. Idempotent.
    Convert {
        /// Speak plain HTTP to the registries (loopback registries).
        #[arg(long)]
        plain_http: bool,
        /// The standard image to convert.
        src: String,
        /// The slacker image to push.
        dst: String,
    },
    /// Pull an image (slacker images lazily: no data moves) and record it locally.
    Pull {
        /// Speak plain HTTP.
        #[arg(long)]
        plain_http: bool,
        /// The image.
        image: String,
    },
    /// Push a local image as a slacker image.
    Push {
        /// Speak plain HTTP.
        #[arg(long)]
        plain_http: bool,
        /// Push only the slacker manifest (no plain export, no index).
        #[arg(long)]
        no_plain_export: bool,
        /// The local image.
        name: String,
        /// Where to push it (default: its name).
        dst: Option<String>,
    },
    /// Run a command in a fresh clone of a local image.
    Run {
        /// The local image.
        image: String,
        /// The command (default: the image's Entrypoint and Cmd).
        #[arg(last = true)]
        cmd: Vec<String>,
    },
    /// List local images.
    Ls,
    /// Remove a local image and the layers no other image uses.
    Rm {
        /// The local image.
        image: String,
    },
    /// Remove snapshots that nothing holds (no layer of any store sharing the backend).
    Gc {
        /// Only report what would be removed.
        #[arg(long)]
        dry_run: bool,
    },
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    backend: BackendConfig,
    #[serde(default)]
    cli: CliTable,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct CliTable {
    state: Option<PathBuf>,
    store: Option<String>,
    volume_size: Option<u64>,
}

/// Everything a command needs.
pub(crate) struct Ctx {
    pub store: Store,
    pub images: Images,
    pub state: PathBuf,
    pub json: bool,
}

fn config_path(arg: Option<PathBuf>) -> PathBuf {
    arg.or_else(|| std::env::var_os("SLACKER_CONFIG").map(PathBuf::from))
        .unwrap_or_else(|| PathBuf::from("/etc/slacker/config.toml"))
}

async fn open(config: &Path, json: bool) -> Result<Ctx> {
    let text = std::fs::read_to_string(config)
        .map_err(|e| Error::Config(format!("{}: {e}", config.display())))?;
    let cfg: FileConfig =
        toml::from_str(&text).map_err(|e| Error::Config(format!("{}: {e}", config.display())))?;
    let state = cfg
        .cli
        .state
        .unwrap_or_else(|| PathBuf::from("/var/lib/slacker/cli"));
    std::fs::create_dir_all(state.join("layers"))
        .map_err(|e| Error::Config(format!("{}: {e}", state.display())))?;
    let backend = cfg.backend.open().await?;
    let meta: Arc<dyn MetaStore> = Arc::new(
        DirStore::open(state.join("layers"))
            .map_err(|e| Error::Config(format!("{}: {e}", state.display())))?,
    );
    let mut opts = LayerStoreOptions::new(cfg.cli.store.unwrap_or_else(|| "cli".to_owned()))
        .with_tar_options(TarOptions::default().with_allow_devices(true))
        .with_scratch_dir(state.clone());
    if let Some(v) = cfg.cli.volume_size {
        opts = opts.with_volume_size(v);
    }
    let store = LayerStore::open(backend, meta, opts).await?;
    let images = Images::open(&state)?;
    Ok(Ctx {
        store,
        images,
        state,
        json,
    })
}

/// A spinner on stderr while `f` runs (hidden with `--json` or without a terminal).
async fn step<T>(json: bool, what: String, f: impl std::future::Future<Output = T>) -> T {
    let pb = if json {
        indicatif::ProgressBar::hidden()
    } else {
        let pb = indicatif::ProgressBar::new_spinner();
        pb.enable_steady_tick(Duration::from_millis(120));
        pb
    };
    pb.set_message(what.clone());
    let t = std::time::Instant::now();
    let out = f.await;
    pb.finish_and_clear();
    if !json {
        eprintln!("{what}: {:.1} s", t.elapsed().as_secs_f64());
    }
    out
}

fn client(plain_http: bool) -> RegistryClient {
    RegistryClient::new(if plain_http {
        ClientOptions::plain_http()
    } else {
        ClientOptions::default()
    })
}

fn pull_json(p: &PullReport) -> Value {
    json!({
        "top_layer": p.top_layer,
        "manifest_digest": p.manifest_digest,
        "picked_from_index": p.picked_from_index,
        "bytes_downloaded": p.bytes_downloaded(),
        "layers": p.layers.iter().map(|l| json!({
            "id": l.id,
            "digest": l.blob.digest,
            "media_type": l.blob.media_type,
            "size": l.blob.size,
            "downloaded": l.blob.transferred,
            "kind": format!("{:?}", l.kind).to_lowercase(),
            "losses": l.losses.iter().map(|x| format!("{x:?}")).collect::<Vec<_>>(),
        })).collect::<Vec<_>>(),
    })
}

fn push_json(p: &PushReport) -> Value {
    json!({
        "manifest_digest": p.manifest_digest,
        "index_digest": p.index_digest,
        "plain_manifest_digest": p.plain_manifest_digest,
        "plain_export_lossless": p.plain_export_lossless,
        "plain_export_reused": p.plain_export_reused,
        "bytes_uploaded": p.bytes_uploaded(),
        "blobs_uploaded": p.blobs.iter().filter(|b| b.transferred).count(),
        "blobs_reused": p.blobs.iter().filter(|b| !b.transferred).count(),
    })
}

fn record_of(p: &PullReport, source: &str) -> ImageRecord {
    ImageRecord {
        top: p.top_layer.clone(),
        layers: p.layers.iter().map(|l| l.id.clone()).collect(),
        config: p.config.clone(),
        source: Some(source.to_owned()),
    }
}

async fn convert(ctx: &mut Ctx, plain_http: bool, src: &str, dst: &str) -> Result<Value> {
    let c = client(plain_http);
    let t = std::time::Instant::now();
    let pulled = step(
        ctx.json,
        format!("pull {src}"),
        c.pull_image(&ctx.store, src),
    )
    .await?;
    let pull_secs = t.elapsed().as_secs_f64();
    let opts = PushOptions::default()
        .with_plain_export(true)
        .with_config(pulled.config.clone());
    let t = std::time::Instant::now();
    let pushed = step(
        ctx.json,
        format!("push {dst}"),
        c.push_image(&ctx.store, &pulled.top_layer, dst, &opts),
    )
    .await?;
    let push_secs = t.elapsed().as_secs_f64();
    ctx.images.put(dst, record_of(&pulled, src))?;
    let mut pull = pull_json(&pulled);
    pull["seconds"] = json!(pull_secs);
    let mut push = push_json(&pushed);
    push["seconds"] = json!(push_secs);
    Ok(json!({"src": src, "dst": dst, "pull": pull, "push": push}))
}

async fn pull(ctx: &mut Ctx, plain_http: bool, image: &str) -> Result<Value> {
    let c = client(plain_http);
    let pulled = step(
        ctx.json,
        format!("pull {image}"),
        c.pull_image(&ctx.store, image),
    )
    .await?;
    ctx.images.put(image, record_of(&pulled, image))?;
    Ok(json!({"image": image, "pull": pull_json(&pulled)}))
}

async fn push(
    ctx: &mut Ctx,
    plain_http: bool,
    plain_export: bool,
    name: &str,
    dst: Option<&str>,
) -> Result<Value> {
    let rec = ctx.images.get(name)?;
    let dst = dst.unwrap_or(name);
    let c = client(plain_http);
    let opts = PushOptions::default()
        .with_plain_export(plain_export)
        .with_config(rec.config.clone());
    let pushed = step(
        ctx.json,
        format!("push {dst}"),
        c.push_image(&ctx.store, &rec.top, dst, &opts),
    )
    .await?;
    if dst != name {
        ctx.images.put(dst, rec)?;
    }
    Ok(json!({"image": name, "dst": dst, "push": push_json(&pushed)}))
}

async fn ls(ctx: &Ctx) -> Result<Value> {
    let mut out = Vec::new();
    for (name, rec) in ctx.images.all() {
        let size = match ctx.store.layer(&rec.top).await {
            Ok(l) => Some(l.size),
            Err(_) => None,
        };
        let cmd = rec.config.config().as_ref().and_then(|c| c.cmd().clone());
        out.push(json!({
            "image": name,
            "top_layer": rec.top,
            "layers": rec.layers.len(),
            "volume_size": size,
            "source": rec.source,
            "cmd": cmd,
        }));
    }
    Ok(Value::Array(out))
}

async fn rm(ctx: &mut Ctx, image: &str) -> Result<Value> {
    let rec = ctx.images.get(image)?;
    ctx.images.remove(image)?;
    let used: std::collections::BTreeSet<String> = ctx
        .images
        .all()
        .into_iter()
        .flat_map(|(_, r)| r.layers)
        .collect();
    let mut removed = Vec::new();
    let mut kept = Vec::new();
    for id in rec.layers.iter().rev() {
        if used.contains(id) {
            kept.push(json!({"layer": id, "why": "used by another image"}));
            continue;
        }
        match ctx.store.remove(id).await {
            Ok(()) => removed.push(id.clone()),
            Err(e) if e.kind() == ErrorKind::NotFound => {}
            Err(e) => kept.push(json!({"layer": id, "why": e.to_string()})),
        }
    }
    Ok(json!({"image": image, "removed_layers": removed, "kept_layers": kept}))
}

async fn gc(ctx: &Ctx, dry_run: bool) -> Result<Value> {
    let b = ctx.store.backend();
    let mut removed = Vec::new();
    let mut held = 0u64;
    for s in b.list_snapshots().await? {
        let st = b.stat_snapshot(&s).await?;
        if !st.holds.is_empty() {
            held += 1;
            continue;
        }
        if !dry_run {
            match b.remove_snapshot(&s).await {
                Ok(()) => {}
                // Held meanwhile, or removed by another worker: not ours to remove.
                Err(e) if matches!(e.kind(), ErrorKind::InUse | ErrorKind::NotFound) => continue,
                Err(e) => return Err(e),
            }
        }
        removed.push(s.to_string());
    }
    Ok(json!({"dry_run": dry_run, "removed": removed, "kept_held": held}))
}

async fn main_inner(cli: Cli) -> Result<(Value, i32)> {
    let mut ctx = open(&config_path(cli.config), cli.json).await?;
    let v = match cli.cmd {
        Cmd::Convert {
            plain_http,
            src,
            dst,
        } => convert(&mut ctx, plain_http, &src, &dst).await?,
        Cmd::Pull { plain_http, image } => pull(&mut ctx, plain_http, &image).await?,
        Cmd::Push {
            plain_http,
            no_plain_export,
            name,
            dst,
        } => {
            push(
                &mut ctx,
                plain_http,
                !no_plain_export,
                &name,
                dst.as_deref(),
            )
            .await?
        }
        Cmd::Run { image, cmd } => {
            let code = run::run(&ctx, &image, &cmd).await?;
            return Ok((json!({"image": image, "exit_code": code}), code));
        }
        Cmd::Ls => ls(&ctx).await?,
        Cmd::Rm { image } => rm(&mut ctx, &image).await?,
        Cmd::Gc { dry_run } => gc(&ctx, dry_run).await?,
    };
    Ok((v, 0))
}

fn human(v: &Value) {
    match v {
        Value::Array(rows) => {
            for r in rows {
                println!(
                    "{}\t{}\t{}",
                    r["image"].as_str().unwrap_or(""),
                    r["top_layer"].as_str().unwrap_or(""),
                    r["cmd"]
                );
            }
        }
        other => println!(
            "{}",
            serde_json::to_string_pretty(other).unwrap_or_default()
        ),
    }
}

fn main() {
    let cli = Cli::parse();
    let json = cli.json;
    let is_run = matches!(cli.cmd, Cmd::Run { .. });
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime");
    match rt.block_on(main_inner(cli)) {
        Ok((v, code)) => {
            if json {
                println!("{v}");
            } else if !is_run {
                human(&v);
            }
            std::process::exit(code);
        }
        Err(e) => {
            if json {
                println!(
                    "{}",
                    json!({"error": e.to_string(), "kind": format!("{:?}", e.kind())})
                );
            } else {
                eprintln!("slacker: {e}");
            }
            std::process::exit(match e.kind() {
                ErrorKind::Config | ErrorKind::InvalidInput => 2,
                _ => 1,
            });
        }
    }
}
