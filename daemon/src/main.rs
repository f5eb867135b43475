//! `amidalad`: see the library documentation.

use std::process::ExitCode;

use clap::Parser;
use tracing_subscriber::EnvFilter;

fn main() -> ExitCode {
    // The executor and validators run as amidalad-exec, or as amidalad where there is none.
    amidalad::helper::run_if_asked();
    let cli = amidalad::config::Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        // Colours only on a terminal: not in files, not in the journal.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let config = match amidalad::config::Config::load(&cli) {
        Ok(config) => config,
        Err(e) => {
            eprintln!("amidalad: {e:#}");
            return ExitCode::FAILURE;
        }
    };
    // Every connection, build and import holds descriptors: the soft limit (often 1024) up
    // to the hard one, so that the connection limits, not the descriptor table, say when.
    raise_descriptor_limit();
    // Before the runtime starts its threads: capabilities are per thread, and inherited.
    if nix::unistd::geteuid().is_root() {
        match amidalad::drop_capabilities(config.policy.net_raw) {
            Ok(kept) => {
                let mut kept: Vec<String> = kept.iter().map(|c| c.to_string()).collect();
                kept.sort();
                tracing::info!(kept = %kept.join(","), "capabilities dropped but for those kept");
            }
            Err(e) => {
                eprintln!("amidalad: {e:#}");
                return ExitCode::FAILURE;
            }
        }
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("amidalad: starting the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(amidalad::run(config)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            ExitCode::FAILURE
        }
    }
}

fn raise_descriptor_limit() {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    if let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) {
        let want = hard.min(1 << 20);
        if soft < want {
            if let Err(e) = setrlimit(Resource::RLIMIT_NOFILE, want, hard) {
                eprintln!("amidalad: raising the descriptor limit to {want}: {e}");
            }
        }
    }
}
