//! PBKDF2-HMAC-SHA256: `kms_core::kdf::pbkdf2_sha256` against OpenSSL's `PKCS5_PBKDF2_HMAC`,
//! in iterations per second at kms's default of 600,000 iterations and a 32-byte output.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};
use kms_core::kdf::{DEFAULT_ITERATIONS, pbkdf2_sha256};

use crate::report::{Row, Table, per_second};

/// How long each side derives in a round.
const TIMED: Duration = Duration::from_secs(2);

/// Interleaved rounds; each side's figure is the best of its rounds, the one least disturbed by
/// other work on the machine.
const ROUNDS: usize = 3;

/// The bar of BRIEF section 9: kms derives at least 2.5 times as fast as OpenSSL.
const BAR: f64 = 2.5;

/// How the OpenSSL figure was obtained.
#[derive(Clone, Copy)]
enum Method {
    /// The C harness `bench/c/pbkdf2.c`, linked against libcrypto: no process start-up.
    Harness,
    /// `openssl kdf ... PBKDF2` timed around the process: includes its start-up.
    Cli,
}

pub fn run(table: &mut Table) -> Result<()> {
    // 1. OpenSSL's side: the C harness if it compiles, else the command line.
    let method = match harness() {
        Ok(binary) => Some(binary),
        Err(e) => {
            table.note(format!(
                "PBKDF2: the C harness did not build ({e:#}); using `openssl kdf`"
            ));
            None
        }
    };
    let openssl = || match &method {
        Some(binary) => harness_iterations_per_second(binary).map(|r| (r, Method::Harness)),
        None => cli_iterations_per_second().map(|r| (r, Method::Cli)),
    };

    // 2. Rounds of kms and OpenSSL, interleaved; the best of each.
    let mut kms: f64 = 0.0;
    let mut reference: Result<(f64, Method)> = Err(anyhow::anyhow!("not measured"));
    for _ in 0..ROUNDS {
        kms = kms.max(kms_iterations_per_second());
        reference = match (reference, openssl()) {
            (Ok(old), Ok(new)) => Ok(if new.0 > old.0 { new } else { old }),
            (Ok(old), Err(_)) => Ok(old),
            (Err(_), new) => new,
        };
    }

    // 3. The row.
    push_row(table, kms, reference);
    Ok(())
}

fn kms_iterations_per_second() -> f64 {
    let derive = || {
        pbkdf2_sha256(
            b"kms-bench passphrase",
            b"kms-bench salt!\0",
            DEFAULT_ITERATIONS,
            32,
        )
    };
    drop(derive());
    let start = Instant::now();
    let mut rounds = 0u64;
    while start.elapsed() < TIMED {
        drop(std::hint::black_box(derive()));
        rounds += 1;
    }
    iterations_per_second(rounds, start.elapsed())
}

fn iterations_per_second(rounds: u64, elapsed: Duration) -> f64 {
    (u64::from(DEFAULT_ITERATIONS) * rounds) as f64 / elapsed.as_secs_f64()
}

/// Compiles `bench/c/pbkdf2.c` into the target directory.
fn harness() -> Result<PathBuf> {
    let source = Path::new(env!("CARGO_MANIFEST_DIR")).join("c/pbkdf2.c");
    let out_dir = crate::target_dir()?.join("kms-bench");
    std::fs::create_dir_all(&out_dir)
        .with_context(|| format!("cannot create {}", out_dir.display()))?;
    let binary = out_dir.join("pbkdf2-openssl");
    crate::run_checked(
        Command::new("cc")
            .args(["-O2", "-o"])
            .arg(&binary)
            .arg(&source)
            .arg("-lcrypto"),
        "cc",
    )?;
    Ok(binary)
}

fn harness_iterations_per_second(binary: &Path) -> Result<f64> {
    let stdout = crate::run_checked(
        Command::new(binary)
            .arg(DEFAULT_ITERATIONS.to_string())
            .arg(TIMED.as_secs_f64().to_string()),
        &format!("the PBKDF2 harness {}", binary.display()),
    )?;
    stdout
        .trim()
        .strip_prefix("iterations_per_second=")
        .and_then(|n| n.parse().ok())
        .with_context(|| format!("unexpected output of the PBKDF2 harness: {stdout:?}"))
}

/// `openssl kdf` run until `TIMED` has passed, timed around each process.
fn cli_iterations_per_second() -> Result<f64> {
    let iterations = format!("iter:{DEFAULT_ITERATIONS}");
    let start = Instant::now();
    let mut rounds = 0u64;
    while start.elapsed() < TIMED {
        let status = Command::new("openssl")
            .args([
                "kdf",
                "-keylen",
                "32",
                "-kdfopt",
                "digest:SHA256",
                "-kdfopt",
                "pass:x",
            ])
            .args(["-kdfopt", "salt:y", "-kdfopt", &iterations, "PBKDF2"])
            .stdout(Stdio::null())
            .status()
            .context("cannot run `openssl kdf`")?;
        if !status.success() {
            bail!("`openssl kdf` failed");
        }
        rounds += 1;
    }
    Ok(iterations_per_second(rounds, start.elapsed()))
}

fn push_row(table: &mut Table, kms: f64, reference: Result<(f64, Method)>) {
    let row = Row::new(
        "PBKDF2-HMAC-SHA256 iterations, 600,000 per derivation, 32-byte key",
        per_second(kms),
    );
    let bar = format!(">= {BAR}x OpenSSL");
    match reference {
        Ok((openssl, method)) => {
            let ratio = kms / openssl;
            table.push(
                row.against(per_second(openssl), Some(ratio))
                    .bar(bar, ratio >= BAR),
            );
            table.note(match method {
                Method::Harness => {
                    "PBKDF2: OpenSSL measured by bench/c/pbkdf2.c (PKCS5_PBKDF2_HMAC with \
                     EVP_sha256(), clock_gettime around the calls, no process start-up); each \
                     side derives for 2 s after one warm-up derivation, 3 rounds interleaved, the \
                     best of each side kept"
                }
                Method::Cli => {
                    "PBKDF2: OpenSSL measured with `openssl kdf ... PBKDF2` timed around each \
                     process, start-up included (the C harness was unavailable)"
                }
            });
        }
        Err(e) => {
            table.push(row.against("n/a", None).bar(bar, false));
            table.note(format!("PBKDF2: OpenSSL reference unavailable: {e:#}"));
        }
    }
}
