//! `slacker-snapshotter --config FILE`: serves containerd's snapshots API on slacker
//! volumes (see the library docs).

use std::path::PathBuf;
use std::process::ExitCode;

use slacker_snapshotter::{Config, SlackerSnapshotter, config::KEYS_HELP};

fn usage() -> String {
    format!(
        "slacker-snapshotter: a containerd snapshotter (proxy plugin) on slacker volumes\n\n\
         Usage: slacker-snapshotter --config FILE\n\n\
         Options:\n  --config FILE   the configuration file (TOML)\n  --help          this text\n\n\
         {KEYS_HELP}"
    )
}

fn main() -> ExitCode {
    let mut args = std::env::args().skip(1);
    let mut config = None;
    while let Some(a) = args.next() {
        match a.as_str() {
            "--help" | "-h" => {
                print!("{}", usage());
                return ExitCode::SUCCESS;
            }
            "--config" => config = args.next().map(PathBuf::from),
            other => {
                eprintln!("unknown argument {other:?}\n\n{}", usage());
                return ExitCode::from(2);
            }
        }
    }
    let Some(path) = config else {
        eprintln!("--config FILE is required\n\n{}", usage());
        return ExitCode::from(2);
    };
    let config = match Config::load(&path) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("slacker-snapshotter: {e}");
            return ExitCode::from(2);
        }
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("a tokio runtime");
    rt.block_on(async move {
        let address = config.address.clone();
        let metrics = config.metrics_address;
        let s = match SlackerSnapshotter::open(config).await {
            Ok(s) => s,
            Err(e) => {
                eprintln!("slacker-snapshotter: {e}");
                return ExitCode::FAILURE;
            }
        };
        if let Some(addr) = metrics {
            let s = s.clone();
            tokio::spawn(async move {
                if let Err(e) = slacker_snapshotter::metrics::serve(s, addr).await {
                    eprintln!("slacker-snapshotter: metrics on {addr}: {e}");
                }
            });
        }
        let shutdown = async {
            let mut term =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
                    .expect("a SIGTERM handler");
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
        };
        eprintln!("slacker-snapshotter: serving on {}", address.display());
        match slacker_snapshotter::serve(s, &address, shutdown).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("slacker-snapshotter: {e}");
                ExitCode::FAILURE
            }
        }
    })
}
