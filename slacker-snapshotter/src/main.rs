//! `slacker-snapshotter --config FILE`: serves containerd's snapshots API on slacker
//! volumes (see the library docs). `slacker-snapshotter --fd-keeper SOCKET` is the
//! keeper process the snapshotter starts itself (`slacker_snapshotter::keeper`).

use std::path::PathBuf;
use std::process::ExitCode;

use slacker_snapshotter::{Config, SlackerSnapshotter, config::KEYS_HELP, keeper};

fn usage() -> String {
    format!(
        "slacker-snapshotter: a containerd snapshotter (proxy plugin) on slacker volumes\n\n\
         Usage: slacker-snapshotter --config FILE\n\
         \x20      slacker-snapshotter --fd-keeper SOCKET\n\n\
         Options:\n  --config FILE   the configuration file (TOML)\n\
         \x20 --fd-keeper SOCKET\n\
         \x20                 run as the keeper process that holds the FUSE connections of\n\
         \x20                 lazily served volumes (NFS, RBD) across a crash or restart of\n\
         \x20                 the snapshotter; the snapshotter starts it itself on\n\
         \x20                 <root>/keeper.sock (see fd_keeper below); it exits once it\n\
         \x20                 holds nothing and no snapshotter is connected\n\
         \x20 --help          this text\n\n\
         {KEYS_HELP}"
    )
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_max_level(tracing::Level::INFO)
        .init();
    let mut args = std::env::args().skip(1);
    let mut config = None;
    while let Some(a) = args.next() {
        match a.as_str() {
            "--help" | "-h" => {
                print!("{}", usage());
                return ExitCode::SUCCESS;
            }
            keeper::FLAG => {
                let Some(socket) = args.next().map(PathBuf::from) else {
                    eprintln!(
                        "{} SOCKET: the socket is missing\n\n{}",
                        keeper::FLAG,
                        usage()
                    );
                    return ExitCode::from(2);
                };
                keeper::detach();
                return match keeper::run(&socket) {
                    Ok(()) => ExitCode::SUCCESS,
                    Err(e) => {
                        eprintln!("slacker-snapshotter: {e}");
                        ExitCode::FAILURE
                    }
                };
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
