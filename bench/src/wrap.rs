//! AES key wrap: kms `Kek::wrap` / `Kek::unwrap` of a 32-byte DEK, and `Kek::wrap_many` /
//! `Kek::unwrap_many` of batches of them, against OpenSSL's `id-aes256-wrap-pad` at 32-byte
//! blocks; aes-kw alone to show the cost of the binding.

use std::process::Command;
use std::time::Duration;

use aes_kw::{KeyInit, KwpAes256};
use anyhow::{Context as _, Result};
use kms_core::wrap::{BINDING_LEN, Kek, KeyWrapper, binding};
use kms_core::{KeyId, SecretBytes};

use crate::report::{Row, Table, per_second};
use crate::timing::rate;

/// How long each kms figure is timed: as long as `openssl speed -seconds 2`.
const TIMED: Duration = Duration::from_secs(2);

/// How long each figure shown for context only is timed.
const TIMED_CONTEXT: Duration = Duration::from_secs(1);

/// Interleaved rounds; each figure is the best of its rounds, the one least disturbed by other
/// work on the machine, for kms and OpenSSL alike.
const ROUNDS: usize = 3;

/// The DEK length measured, in bytes.
const DEK_LEN: usize = 32;

/// Keys per `wrap_many` / `unwrap_many` call: the batch a KEK rotation hands over.
const BATCH: usize = 256;

/// The bar of BRIEF section 9: kms wraps at least five times as fast as OpenSSL.
const BAR: f64 = 5.0;

/// The best rates seen, per second.
struct Rates {
    kms_wrap: f64,
    kms_unwrap: f64,
    /// Keys per second through `wrap_many` / `unwrap_many`.
    kms_wrap_many: f64,
    kms_unwrap_many: f64,
    raw_wrap_dek: f64,
    raw_wrap_bound: f64,
    binding: f64,
    openssl_wrap: Result<f64>,
    openssl_unwrap: Result<f64>,
}

/// What every figure works on: one KEK, key id and DEK.
struct Subject {
    kek: Kek,
    kwp: KwpAes256,
    id: KeyId,
    dek: SecretBytes,
    wrapped: Vec<u8>,
    /// `BATCH` keys of distinct ids, and their blobs.
    batch: Vec<(KeyId, SecretBytes, Vec<u8>)>,
}

pub fn run(table: &mut Table) -> Result<()> {
    // 1. The subject.
    let subject = Subject::new()?;

    // 2. Rounds of kms, aes-kw and OpenSSL, interleaved; the best of each.
    let mut rates = Rates {
        kms_wrap: 0.0,
        kms_unwrap: 0.0,
        kms_wrap_many: 0.0,
        kms_unwrap_many: 0.0,
        raw_wrap_dek: 0.0,
        raw_wrap_bound: 0.0,
        binding: 0.0,
        openssl_wrap: Err(anyhow::anyhow!("not measured")),
        openssl_unwrap: Err(anyhow::anyhow!("not measured")),
    };
    for _ in 0..ROUNDS {
        subject.round(&mut rates);
    }

    // 3. The rows.
    push_rows(table, &rates);
    Ok(())
}

impl Subject {
    fn new() -> Result<Subject> {
        let material = SecretBytes::random(Kek::LEN)?;
        let kek = Kek::new(&material)?;
        let kwp = KwpAes256::new_from_slice(material.expose_secret())
            .map_err(|_| anyhow::anyhow!("a 32-byte AES key is refused"))?;
        let id = KeyId::new("db/16384/rel/24576")?;
        let dek = SecretBytes::random(DEK_LEN)?;
        let wrapped = kek.wrap(&id, 1, &dek)?;
        let mut batch = Vec::with_capacity(BATCH);
        for i in 0..BATCH {
            let id = KeyId::new(&format!("db/16384/rel/{}", 24576 + i))?;
            let dek = SecretBytes::random(DEK_LEN)?;
            let wrapped = kek.wrap(&id, 1, &dek)?;
            batch.push((id, dek, wrapped));
        }
        Ok(Subject {
            kek,
            kwp,
            id,
            dek,
            wrapped,
            batch,
        })
    }

    /// One round of every figure, each kept if it beats the best so far.
    fn round(&self, best: &mut Rates) {
        let Subject {
            kek,
            kwp,
            id,
            dek,
            wrapped,
            batch,
        } = self;
        keep_best(
            &mut best.kms_wrap,
            rate(TIMED, || kek.wrap(id, 1, dek).expect("wrap")),
        );
        keep_best_of(&mut best.openssl_wrap, openssl_speed(false));
        let unwrap = rate(TIMED, || kek.unwrap(id, 1, wrapped).expect("unwrap"));
        keep_best(&mut best.kms_unwrap, unwrap);
        keep_best_of(&mut best.openssl_unwrap, openssl_speed(true));

        let to_wrap: Vec<_> = batch.iter().map(|(id, dek, _)| (id, 1, dek)).collect();
        let calls = rate(TIMED, || {
            let wrapped = kek.wrap_many(&to_wrap);
            assert!(wrapped.iter().all(Result::is_ok), "wrap_many");
            wrapped
        });
        keep_best(&mut best.kms_wrap_many, calls * BATCH as f64);
        let to_unwrap: Vec<_> = batch.iter().map(|(id, _, w)| (id, 1, &w[..])).collect();
        let calls = rate(TIMED, || {
            let deks = kek.unwrap_many(&to_unwrap);
            assert!(deks.iter().all(Result::is_ok), "unwrap_many");
            deks
        });
        keep_best(&mut best.kms_unwrap_many, calls * BATCH as f64);

        let mut out = [0u8; BINDING_LEN + DEK_LEN + 8];
        let plain_dek = [0x5a_u8; DEK_LEN];
        let raw = rate(TIMED_CONTEXT, || {
            kwp.wrap_key(&plain_dek, &mut out).expect("wrap").len()
        });
        keep_best(&mut best.raw_wrap_dek, raw);
        let plain_bound = [0x5a_u8; BINDING_LEN + DEK_LEN];
        let raw = rate(TIMED_CONTEXT, || {
            kwp.wrap_key(&plain_bound, &mut out).expect("wrap").len()
        });
        keep_best(&mut best.raw_wrap_bound, raw);
        keep_best(&mut best.binding, rate(TIMED_CONTEXT, || binding(id, 1)));
    }
}

fn keep_best(best: &mut f64, rate: f64) {
    *best = best.max(rate);
}

/// Keeps the best successful rate; the latest error while there is none.
fn keep_best_of(best: &mut Result<f64>, rate: Result<f64>) {
    match (best.as_ref(), rate) {
        (Ok(old), Ok(new)) => *best = Ok(old.max(new)),
        (Err(_), new) => *best = new,
        (Ok(_), Err(_)) => {}
    }
}

/// Wraps (or, with `decrypt`, unwraps) per second by `openssl speed` at 32-byte blocks.
fn openssl_speed(decrypt: bool) -> Result<f64> {
    let mut command = Command::new("openssl");
    command.arg("speed");
    if decrypt {
        command.arg("-decrypt");
    }
    // -elapsed: divide by wall-clock time, as kms's figures are, not by user CPU time, whose
    // tick-based accounting on a busy virtual machine can overstate the rate by half.
    command.args(["-elapsed", "-seconds", "2", "-bytes", "32"]);
    command.args(["-evp", "id-aes256-wrap-pad"]);
    let stdout = crate::run_checked(&mut command, "`openssl speed`")?;
    let kilobytes = parse_speed_row(&stdout, "AES-256-WRAP-PAD")
        .context("`openssl speed` printed no AES-256-WRAP-PAD row")?;
    Ok(kilobytes * 1000.0 / DEK_LEN as f64)
}

/// The first figure of the row `name` of `openssl speed` output, in thousands of bytes per
/// second (`AES-256-WRAP-PAD    10183.54k`).
fn parse_speed_row(output: &str, name: &str) -> Option<f64> {
    let row = output.lines().find(|l| l.starts_with(name))?;
    let figure = row[name.len()..].split_whitespace().next()?;
    figure.strip_suffix('k')?.parse().ok()
}

fn push_rows(table: &mut Table, rates: &Rates) {
    let (openssl_wrap, openssl_unwrap) = (&rates.openssl_wrap, &rates.openssl_unwrap);
    let against = |kms: f64, openssl: &Result<f64>| match openssl {
        Ok(reference) => (per_second(*reference), Some(kms / reference)),
        Err(_) => ("n/a".to_string(), None),
    };
    let bar = format!(">= {BAR}x OpenSSL");

    let (reference, ratio) = against(rates.kms_wrap, openssl_wrap);
    table.push(
        Row::new(
            "AES-KWP wrap of a 32-byte DEK, kms Kek::wrap (binding + RFC 5649)",
            per_second(rates.kms_wrap),
        )
        .against(reference, ratio)
        .bar(bar.clone(), ratio.is_some_and(|r| r >= BAR)),
    );
    let (reference, ratio) = against(rates.kms_unwrap, openssl_unwrap);
    table.push(
        Row::new(
            "AES-KWP unwrap of a 32-byte DEK, kms Kek::unwrap",
            per_second(rates.kms_unwrap),
        )
        .against(reference, ratio)
        .bar(bar.clone(), ratio.is_some_and(|r| r >= BAR)),
    );
    let (reference, ratio) = against(rates.kms_wrap_many, openssl_wrap);
    table.push(
        Row::new(
            format!("AES-KWP wrap of 32-byte DEKs, kms Kek::wrap_many, {BATCH} per call"),
            per_second(rates.kms_wrap_many),
        )
        .against(reference, ratio)
        .bar(bar.clone(), ratio.is_some_and(|r| r >= BAR)),
    );
    let (reference, ratio) = against(rates.kms_unwrap_many, openssl_unwrap);
    table.push(
        Row::new(
            format!("AES-KWP unwrap of 32-byte DEKs, kms Kek::unwrap_many, {BATCH} per call"),
            per_second(rates.kms_unwrap_many),
        )
        .against(reference, ratio)
        .bar(bar, ratio.is_some_and(|r| r >= BAR)),
    );
    let (reference, ratio) = against(rates.raw_wrap_dek, openssl_wrap);
    table.push(
        Row::new(
            "AES-KWP wrap of 32 bytes, aes-kw KwpAes256 alone (no binding)",
            per_second(rates.raw_wrap_dek),
        )
        .against(reference, ratio),
    );
    table.push(Row::new(
        "AES-KWP wrap of 48 bytes (binding || DEK), aes-kw alone",
        per_second(rates.raw_wrap_bound),
    ));
    table.push(Row::new(
        "binding alone: SHA-256(label || version || id)[..16]",
        per_second(rates.binding),
    ));
    table.push(Row::new(
        "cost of the binding: Kek::wrap time / aes-kw 32-byte wrap time",
        format!("{:.2}x", rates.raw_wrap_dek / rates.kms_wrap),
    ));

    table.note(
        "wrap: single thread, warm; kms figures timed over 2 s (context rows 1 s), OpenSSL is \
         `openssl speed -elapsed -seconds 2 -bytes 32 -evp id-aes256-wrap-pad` (with -decrypt \
         for unwrap; -elapsed so that both sides divide by wall-clock time) converted as \
         k * 1000 / 32 operations per second; 3 rounds interleaved, the best of each side kept",
    );
    table.note(format!(
        "wrap_many / unwrap_many: keys per second, {BATCH} keys of distinct ids per call, each \
         with its own binding and output buffer; the same OpenSSL figure as the single-key rows"
    ));
    for (what, result) in [("wrap", openssl_wrap), ("unwrap", openssl_unwrap)] {
        if let Err(e) = result {
            table.note(format!("OpenSSL {what} reference unavailable: {e:#}"));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_speed_row() {
        let output = "The 'numbers' are in 1000s of bytes per second processed.\n\
                      type             32 bytes\n\
                      AES-256-WRAP-PAD    10183.54k\n";
        assert_eq!(parse_speed_row(output, "AES-256-WRAP-PAD"), Some(10183.54));
        assert_eq!(parse_speed_row(output, "AES-128-WRAP-PAD"), None);
    }
}
