//! File encryption: `kms_crypt::encrypt` and `kms_crypt::decrypt` of a 1 GiB file, file to
//! file, against `openssl speed -evp aes-256-gcm` at 1 MiB blocks; and the raw AEADs (ring,
//! which kms-crypt uses, and RustCrypto's aes-gcm) at the same block size, for the record of
//! why ring was chosen.

use std::fs::{self, File};
use std::io::{self, BufReader, Read, Write};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use aes_gcm::{AeadInOut, Aes256Gcm, KeyInit};
use anyhow::{Context as _, Result, bail};
use kms_core::{Key, KeyId, SecretBytes};
use ring::aead::{AES_256_GCM, Aad, LessSafeKey, Nonce, UnboundKey};

use crate::report::{Row, Table};
use crate::timing::XorShift;

/// The size of the file encrypted and decrypted: 1 GiB.
const FILE_LEN: u64 = 1 << 30;

/// The block size of `openssl speed` and of the raw AEAD figures: 1 MiB.
const BLOCK: usize = 1 << 20;

/// How long `openssl speed` and each raw AEAD figure run.
const TIMED: Duration = Duration::from_secs(3);

/// Interleaved rounds; each figure is the best of its rounds.
const ROUNDS: usize = 3;

/// The bar of BRIEF section 9: file encryption at least as fast as OpenSSL's AES-256-GCM.
const BAR: f64 = 1.0;

/// The best rates seen, in bytes per second.
#[derive(Default)]
struct Rates {
    encrypt_file: f64,
    decrypt_file: f64,
    encrypt_new_file: f64,
    decrypt_new_file: f64,
    copy_new_file: f64,
    encrypt_stream: f64,
    ring_seal: f64,
    rustcrypto_seal: f64,
    openssl_encrypt: Option<f64>,
    openssl_decrypt: Option<f64>,
    openssl_error: Option<String>,
}

pub fn run(table: &mut Table) -> Result<()> {
    // 1. A 1 GiB plaintext file and a key.
    let dir = crate::scratch_dir("crypt")?;
    fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let plain = dir.join("plain.bin");
    write_plaintext(&plain)?;
    let key = Key::new(KeyId::new("bench/file")?, 1, SecretBytes::random(32)?)?;

    // 2. Rounds of kms-crypt, the raw AEADs and OpenSSL, interleaved; the best of each.
    let mut rates = Rates::default();
    file_round(&dir, &plain, &key, Output::InPlace)?;
    if !same_contents(&plain, &dir.join("kept.bin"))? {
        bail!("the round trip did not give the plaintext back");
    }
    for _ in 0..ROUNDS {
        let (encrypt, decrypt) = file_round(&dir, &plain, &key, Output::InPlace)?;
        keep_best(&mut rates.encrypt_file, encrypt);
        keep_best(&mut rates.decrypt_file, decrypt);
        let (encrypt, decrypt) = file_round(&dir, &plain, &key, Output::New)?;
        keep_best(&mut rates.encrypt_new_file, encrypt);
        keep_best(&mut rates.decrypt_new_file, decrypt);
        keep_best(&mut rates.copy_new_file, copy_rate(&dir, &plain)?);
        match openssl_speed(false) {
            Ok(rate) => keep_best_of(&mut rates.openssl_encrypt, rate),
            Err(e) => rates.openssl_error = Some(format!("{e:#}")),
        }
        match openssl_speed(true) {
            Ok(rate) => keep_best_of(&mut rates.openssl_decrypt, rate),
            Err(e) => rates.openssl_error = Some(format!("{e:#}")),
        }
        keep_best(&mut rates.encrypt_stream, stream_rate(&key)?);
        keep_best(&mut rates.ring_seal, ring_rate());
        keep_best(&mut rates.rustcrypto_seal, rustcrypto_rate());
    }
    fs::remove_dir_all(&dir).with_context(|| format!("cannot remove {}", dir.display()))?;

    // 3. The rows.
    push_rows(table, &rates);
    Ok(())
}

/// Writes `FILE_LEN` bytes of pseudo-random data (AES does not care what it encrypts).
fn write_plaintext(path: &Path) -> Result<()> {
    let mut file =
        File::create(path).with_context(|| format!("cannot create {}", path.display()))?;
    let mut rng = XorShift::new(0x6b6d_735f_6372_7970);
    let mut block = vec![0u8; BLOCK];
    for _ in 0..FILE_LEN / BLOCK as u64 {
        for word in block.chunks_exact_mut(8) {
            word.copy_from_slice(&rng.next_u64().to_le_bytes());
        }
        file.write_all(&block)
            .with_context(|| format!("cannot write {}", path.display()))?;
    }
    file.sync_all()
        .with_context(|| format!("cannot fsync {}", path.display()))
}

/// Where a timed run writes.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Output {
    /// A new file, as `kms encrypt` writes (its page cache pages are allocated as it goes).
    New,
    /// The file of the previous round, overwritten in place without truncation: its pages are
    /// in the page cache, as the input's are.
    InPlace,
}

/// Encrypts the plaintext file to a file, then decrypts that back: in place, passes over the
/// whole file for at least `TIMED` each, as long as `openssl speed` runs; to new files, one
/// pass each. A pass is timed from opening the input to the last write; the fsync after each
/// phase is not timed (OpenSSL's figure has no I/O at all), so that no phase inherits the dirty
/// pages of the one before. Returns the encryption and decryption rates.
fn file_round(dir: &Path, plain: &Path, key: &Key, output: Output) -> Result<(f64, f64)> {
    let (encrypted, decrypted, min) = match output {
        Output::New => (dir.join("new.kms"), dir.join("new.bin"), Duration::ZERO),
        Output::InPlace => (dir.join("kept.kms"), dir.join("kept.bin"), TIMED),
    };
    let open_output = |path: &Path| {
        let mut options = fs::OpenOptions::new();
        options.write(true);
        match output {
            Output::New => options.create_new(true),
            Output::InPlace => options.create(true),
        };
        options
            .open(path)
            .with_context(|| format!("cannot create {}", path.display()))
    };

    let passes = |from: &Path, to: &Path, encrypt: bool| -> Result<f64> {
        let start = Instant::now();
        let mut bytes = 0;
        loop {
            let input =
                File::open(from).with_context(|| format!("cannot open {}", from.display()))?;
            let mut out = open_output(to)?;
            let len = if encrypt {
                kms_crypt::encrypt(key, input, &mut out).context("encrypt")?
            } else {
                kms_crypt::decrypt(|_, _| Ok(key.clone()), input, &mut out).context("decrypt")?
            };
            if len != FILE_LEN {
                bail!("a pass gave {len} bytes, not {FILE_LEN}");
            }
            bytes += len;
            if start.elapsed() >= min {
                let rate = bytes as f64 / start.elapsed().as_secs_f64();
                out.sync_all().context("fsync")?;
                return Ok(rate);
            }
        }
    };
    let encrypt = passes(plain, &encrypted, true)?;
    let decrypt = passes(&encrypted, &decrypted, false)?;

    if output == Output::New {
        for path in [&encrypted, &decrypted] {
            fs::remove_file(path).with_context(|| format!("cannot remove {}", path.display()))?;
        }
    }
    Ok((encrypt, decrypt))
}

/// A plain copy of the plaintext file to a new file with `std::io::copy` (the I/O alone, no
/// cryptography), timed as `file_round` times its phases; bytes per second.
fn copy_rate(dir: &Path, plain: &Path) -> Result<f64> {
    let copy = dir.join("copy.bin");
    let start = Instant::now();
    let mut input = File::open(plain).context("cannot open the plaintext")?;
    let mut out = File::create_new(&copy).context("cannot create the copy")?;
    let len = io::copy(&mut input, &mut out).context("copy")?;
    let rate = len as f64 / start.elapsed().as_secs_f64();
    out.sync_all().context("fsync")?;
    fs::remove_file(&copy).context("cannot remove the copy")?;
    Ok(rate)
}

fn same_contents(a: &Path, b: &Path) -> Result<bool> {
    let mut a = BufReader::with_capacity(BLOCK, File::open(a)?);
    let mut b = BufReader::with_capacity(BLOCK, File::open(b)?);
    let (mut x, mut y) = (vec![0u8; BLOCK], vec![0u8; BLOCK]);
    loop {
        let n = a.read(&mut x)?;
        let m = b.read(&mut y[..n.max(1)])?;
        if n == 0 {
            return Ok(m == 0);
        }
        b.read_exact(&mut y[m..n])?;
        if x[..n] != y[..n] {
            return Ok(false);
        }
    }
}

/// kms-crypt without files: 1 GiB from `io::repeat` into `io::sink`, the format's own cost.
fn stream_rate(key: &Key) -> Result<f64> {
    let start = Instant::now();
    let len = kms_crypt::encrypt(key, io::repeat(0x5a).take(FILE_LEN), io::sink())?;
    Ok(len as f64 / start.elapsed().as_secs_f64())
}

/// ring's AES-256-GCM sealing 1 MiB blocks in place, bytes per second.
fn ring_rate() -> f64 {
    let key = LessSafeKey::new(UnboundKey::new(&AES_256_GCM, &[7; 32]).expect("a 32-byte key"));
    let mut block = vec![0u8; BLOCK];
    timed_blocks(|| {
        let nonce = Nonce::assume_unique_for_key([0; 12]);
        let tag = key.seal_in_place_separate_tag(nonce, Aad::empty(), &mut block);
        let _ = std::hint::black_box(tag);
    })
}

/// RustCrypto's aes-gcm sealing 1 MiB blocks in place, bytes per second.
fn rustcrypto_rate() -> f64 {
    let cipher = Aes256Gcm::new_from_slice(&[7; 32]).expect("a 32-byte key");
    let mut block = vec![0u8; BLOCK];
    timed_blocks(|| {
        let nonce = aes_gcm::Nonce::from([0; 12]);
        let tag = cipher.encrypt_inout_detached(&nonce, b"", (&mut block[..]).into());
        let _ = std::hint::black_box(tag);
    })
}

/// Calls `seal` (one block each) for `TIMED` after a short warm-up; bytes per second.
fn timed_blocks(mut seal: impl FnMut()) -> f64 {
    for _ in 0..16 {
        seal();
    }
    let start = Instant::now();
    let mut blocks = 0u64;
    while start.elapsed() < TIMED {
        for _ in 0..16 {
            seal();
        }
        blocks += 16;
    }
    blocks as f64 * BLOCK as f64 / start.elapsed().as_secs_f64()
}

fn keep_best(best: &mut f64, rate: f64) {
    *best = best.max(rate);
}

fn keep_best_of(best: &mut Option<f64>, rate: f64) {
    *best = Some(best.map_or(rate, |old| old.max(rate)));
}

/// `openssl speed -elapsed -seconds 3 -bytes 1048576 -evp aes-256-gcm` (with `-decrypt`),
/// in bytes per second.
fn openssl_speed(decrypt: bool) -> Result<f64> {
    let mut command = Command::new("openssl");
    command.arg("speed");
    if decrypt {
        command.arg("-decrypt");
    }
    command.args(["-elapsed", "-seconds", "3", "-bytes", "1048576"]);
    command.args(["-evp", "aes-256-gcm"]);
    let stdout = crate::run_checked(&mut command, "`openssl speed`")?;
    let kilobytes = parse_speed_row(&stdout, "AES-256-GCM")
        .context("`openssl speed` printed no AES-256-GCM row")?;
    Ok(kilobytes * 1000.0)
}

/// The first figure of the row `name`, in thousands of bytes per second.
fn parse_speed_row(output: &str, name: &str) -> Option<f64> {
    let row = output.lines().find(|l| l.starts_with(name))?;
    let figure = row[name.len()..].split_whitespace().next()?;
    figure.strip_suffix('k')?.parse().ok()
}

/// Bytes per second as `1234 MB/s` (MB = 10^6 bytes, as OpenSSL's k = 1000 bytes).
fn megabytes(rate: f64) -> String {
    format!("{:.0} MB/s", rate / 1e6)
}

fn push_rows(table: &mut Table, rates: &Rates) {
    let bar = format!(">= {BAR:.1}x OpenSSL");
    let compared = |what: &str, kms: f64, openssl: Option<f64>| {
        let ratio = openssl.map(|reference| kms / reference);
        let reference = openssl.map_or("n/a".to_string(), megabytes);
        Row::new(what, megabytes(kms))
            .against(reference, ratio)
            .bar(bar.clone(), ratio.is_some_and(|r| r >= BAR))
    };
    table.push(compared(
        "encrypt a 1 GiB file, kms_crypt::encrypt, output overwritten in place",
        rates.encrypt_file,
        rates.openssl_encrypt,
    ));
    table.push(compared(
        "decrypt a 1 GiB file, kms_crypt::decrypt, output overwritten in place",
        rates.decrypt_file,
        rates.openssl_decrypt,
    ));
    let context = |what: &str, kms: f64| {
        let ratio = rates.openssl_encrypt.map(|reference| kms / reference);
        let reference = rates.openssl_encrypt.map_or("n/a".to_string(), megabytes);
        Row::new(what, megabytes(kms)).against(reference, ratio)
    };
    table.push(context(
        "encrypt a 1 GiB file to a new file, kms_crypt::encrypt",
        rates.encrypt_new_file,
    ));
    let ratio = rates
        .openssl_decrypt
        .map(|reference| rates.decrypt_new_file / reference);
    let reference = rates.openssl_decrypt.map_or("n/a".to_string(), megabytes);
    table.push(
        Row::new(
            "decrypt a 1 GiB file to a new file, kms_crypt::decrypt",
            megabytes(rates.decrypt_new_file),
        )
        .against(reference, ratio),
    );
    table.push(context(
        "copy the 1 GiB file to a new file, std::io::copy (no cryptography)",
        rates.copy_new_file,
    ));
    table.push(context(
        "encrypt 1 GiB memory to memory (io::repeat to io::sink), kms_crypt",
        rates.encrypt_stream,
    ));
    table.push(context(
        "AES-256-GCM seal of 1 MiB blocks, ring alone (used by kms-crypt)",
        rates.ring_seal,
    ));
    table.push(context(
        "AES-256-GCM seal of 1 MiB blocks, RustCrypto aes-gcm 0.11 alone",
        rates.rustcrypto_seal,
    ));

    table.note(
        "crypt: single thread; files of 1 GiB under target/kms-bench-tmp, timed from opening \
         the input to the last write, without fsync (page cache), the plaintext file warm; \
         OpenSSL is `openssl speed -elapsed -seconds 3 -bytes 1048576 -evp aes-256-gcm` (with \
         -decrypt for decryption), k * 1000 bytes per second; the raw AEAD rows seal 1 MiB \
         blocks for 3 s; 3 rounds interleaved, the best of each kept; MB = 10^6 bytes",
    );
    if let Some(e) = &rates.openssl_error {
        table.note(format!("OpenSSL AES-256-GCM reference unavailable: {e}"));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_speed_row() {
        let output = "type        1048576 bytes\nAES-256-GCM    2858418.18k\n";
        assert_eq!(parse_speed_row(output, "AES-256-GCM"), Some(2858418.18));
        assert_eq!(megabytes(2.5e9), "2500 MB/s");
    }
}
