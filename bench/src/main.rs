//! kms-bench: kms measured against OpenSSL on the same machine, in the same run.
//!
//! ```text
//! cargo run --release -p kms-bench -- [all|wrap|kdf|crypt|store|rotate|million]
//! bench/compare.sh        # `kms-bench compare`: all of the above, plus kmsd under load
//!                         # against OpenBao Transit and the pkcs11 provider on SoftHSM2
//!                         # (`load` alone: only kmsd, OpenBao and SoftHSM2 under load)
//! ```
//!
//! Prints one Markdown table: each figure, the reference it is compared with, the ratio, the bar
//! of the brief and whether it is met. Scratch stores live under the Cargo target directory (a
//! real disk, so fsync is real); the store of a million keys is kept there between runs.
#![forbid(unsafe_code)]

mod compare;
mod crypt;
mod kdf;
mod million;
mod report;
mod rotate;
mod store;
mod timing;
mod wrap;

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context as _, Result, bail};

use report::Table;

const USAGE: &str = "usage: kms-bench [compare|load|all|wrap|kdf|crypt|store|rotate|million]";

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("kms-bench: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let command = args.first().map_or("all", String::as_str);
    if command == million::PROBE_COMMAND {
        return million::probe(&args[1..]);
    }
    if args.len() > 1 {
        bail!("{USAGE}");
    }

    let mut table = Table::default();
    match command {
        "compare" => {
            compare::run(&mut table)?;
            all(&mut table)?;
        }
        "load" => compare::run(&mut table)?,
        "all" => all(&mut table)?,
        "wrap" => wrap::run(&mut table)?,
        "kdf" => kdf::run(&mut table)?,
        "crypt" => crypt::run(&mut table)?,
        "store" => store::run(&mut table)?,
        "rotate" => rotate::run(&mut table)?,
        "million" => million::run(&mut table)?,
        "-h" | "--help" | "help" => {
            println!("{USAGE}");
            return Ok(());
        }
        other => bail!("unknown benchmark {other:?}; {USAGE}"),
    }
    table.note(machine_note());
    print!("{}", table.render());
    if table.any_missed() {
        println!("\nSome bars were missed (rows marked NO).");
    }
    Ok(())
}

/// Every group that needs no server, in order.
fn all(table: &mut Table) -> Result<()> {
    wrap::run(table)?;
    kdf::run(table)?;
    crypt::run(table)?;
    store::run(table)?;
    rotate::run(table)?;
    million::run(table)
}

/// Runs `command` to its end: its standard output, or an error naming `what` with the
/// command's standard error when it cannot start or fails.
pub fn run_checked(command: &mut std::process::Command, what: &str) -> Result<String> {
    let output = command
        .output()
        .with_context(|| format!("cannot run {what}"))?;
    if !output.status.success() {
        bail!(
            "{what} failed ({}): {}",
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

/// The Cargo target directory this binary was built into (`target/release/kms-bench`).
pub fn target_dir() -> Result<PathBuf> {
    let exe = std::env::current_exe().context("cannot find the benchmark binary")?;
    exe.parent()
        .and_then(|profile| profile.parent())
        .map(PathBuf::from)
        .context("the benchmark binary is not inside a Cargo target directory")
}

/// A fresh, empty directory for scratch stores: `<target>/kms-bench-tmp/<name>-<pid>`.
pub fn scratch_dir(name: &str) -> Result<PathBuf> {
    let dir = target_dir()?
        .join("kms-bench-tmp")
        .join(format!("{name}-{}", std::process::id()));
    if dir.exists() {
        std::fs::remove_dir_all(&dir).with_context(|| format!("cannot clear {}", dir.display()))?;
    }
    std::fs::create_dir_all(dir.parent().unwrap_or(&dir))
        .with_context(|| format!("cannot create the parent of {}", dir.display()))?;
    Ok(dir)
}

/// The machine the figures come from.
fn machine_note() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|info| {
            info.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, name)| name.trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let load = std::fs::read_to_string("/proc/loadavg")
        .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default();
    format!("machine: {cpu}, {cores} cores; load average at the end of the run: {load}")
}
