//! `kmsd`: the kms key server.
//!
//! Loads the provider named in the configuration (exactly as the `kms` CLI does) and serves
//! its keys over a Unix socket in protocol v1 (`docs/protocol.md`), with authorization by peer
//! credentials, a cache of unwrapped keys, and an audit log.
#![deny(unsafe_code)]

use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context as _, Result};
use clap::Parser;
use kms_core::ErrorKind;
use kms_core::config::{Config, Registry};
use kmsd::{Listen, Settings, harden};

/// The kms key server: serves one provider's keys over a Unix socket.
#[derive(Parser, Debug)]
#[command(name = "kmsd", version)]
struct Args {
    /// The configuration file: [provider] and [server] sections.
    #[arg(
        long,
        short = 'c',
        env = "KMS_CONFIG",
        value_name = "FILE",
        required_unless_present = "dev"
    )]
    config: Option<PathBuf>,

    /// Try kms out: the file provider in DIR (initialised on first run), socket DIR/kms.sock.
    #[arg(long, value_name = "DIR", conflicts_with = "config")]
    dev: Option<PathBuf>,

    /// Log level: error, warn, info, debug or trace.
    #[arg(long, default_value = "info")]
    log_level: tracing::Level,
}

/// The providers linked into this binary.
fn registry() -> Registry {
    // As in the CLI: a name finds its plugin (libkms_<name>.so) first, the linked-in
    // providers are the fallback when no such plugin exists.
    let mut registry = Registry::new();
    registry.enable_plugins();
    registry.register(kms_file::registered());
    registry.register(kms_command::registered());
    registry.register(kms_openbao::registered());
    registry.register(kms_aws_kms::registered());
    registry.register(kms_client::exec::registered());
    registry.register(kms_pkcs11::registered());
    registry
}

fn main() -> ExitCode {
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_max_level(args.log_level)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_target(false)
        .init();
    match run(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("kmsd: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: Args) -> Result<()> {
    // 1. Configuration and provider.
    let registry = registry();
    let (config, settings) = match &args.dev {
        Some(dir) => dev_config(&registry, dir)?,
        None => {
            let path = args
                .config
                .as_ref()
                .expect("clap requires --config without --dev");
            let config = Config::load(path)?;
            let table = config.server.clone().ok_or_else(|| {
                anyhow::anyhow!("configuration {} has no [server] section", path.display())
            })?;
            let settings = Settings::from_table(&table, &config.base_dir)?;
            (config, settings)
        }
    };
    harden::disable_core_dumps();
    let provider = registry.open(&config)?;
    harden::lock_memory();

    // 2. The socket: inherited from systemd, or bound here.
    let listen = match harden::systemd_listener()? {
        Some(listener) => Listen::Inherited(listener),
        None => Listen::Bind,
    };

    // 3. SIGTERM and SIGINT wake the accept loop through a socket pair.
    let (wake_rx, wake_tx) = UnixStream::pair().context("cannot create the signal pipe")?;
    for signal in [signal_hook::consts::SIGTERM, signal_hook::consts::SIGINT] {
        signal_hook::low_level::pipe::register(signal, wake_tx.try_clone()?)
            .context("cannot install the signal handler")?;
    }

    // 4. Serve.
    let dev = args.dev.clone();
    kmsd::serve(provider, settings, listen, &wake_rx, |socket| {
        if let Some(dir) = &dev {
            // The kms binary built beside kmsd, if there is one; else whatever `kms` is on PATH.
            let beside = std::env::current_exe().map(|exe| exe.with_file_name("kms"));
            let kms = match beside {
                Ok(path) if path.is_file() => path.display().to_string(),
                _ => "kms".to_string(),
            };
            println!(
                "kmsd: serving the file provider in {} on {}\n\
                 kmsd: try: {kms} --socket {} get-or-create demo/key",
                dir.display(),
                socket.display(),
                socket.display()
            );
        }
    })
}

/// `--dev DIR`: the file provider in DIR, initialised on first run.
fn dev_config(registry: &Registry, dir: &Path) -> Result<(Config, Settings)> {
    let text = format!(
        "[provider]\nname = \"file\"\n[provider.options]\ndir = {:?}\n",
        dir.display().to_string()
    );
    let config = Config::parse(&text, PathBuf::new())?;
    match registry.init(&config) {
        Ok(line) => tracing::info!("{line}"),
        Err(e) if e.kind() == ErrorKind::AlreadyExists => {}
        Err(e) => return Err(e.into()),
    }
    Ok((config, Settings::dev(dir)))
}
