//! Printing keys and listings.

use std::io::{IsTerminal, Write};

use base64::Engine;
use kms_core::{Key, KeyInfo};
use zeroize::Zeroizing;

use crate::Failure;

/// How a key is printed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// Lowercase hex on one line.
    Hex,
    /// Standard base64 with padding on one line.
    Base64,
    /// The bytes themselves, no newline.
    Raw,
}

impl Format {
    /// Refuses raw bytes to a terminal before anything is opened or created.
    pub fn check_terminal(self) -> Result<(), Failure> {
        if self == Format::Raw && std::io::stdout().is_terminal() {
            return Err(Failure {
                code: 2,
                kind: kms_core::ErrorKind::InvalidInput,
                message: "refusing to write raw key bytes to a terminal; redirect stdout or use --format hex".into(),
            });
        }
        Ok(())
    }
}

/// Writes the key to stdout in `format`; the intermediate text is zeroized.
pub fn print_key(key: &Key, format: Format) -> Result<(), Failure> {
    let secret = key.expose_secret();
    let text: Zeroizing<Vec<u8>> = Zeroizing::new(match format {
        Format::Hex => {
            let mut line = hex::encode(secret).into_bytes();
            line.push(b'\n');
            line
        }
        Format::Base64 => {
            let mut line = base64::engine::general_purpose::STANDARD
                .encode(secret)
                .into_bytes();
            line.push(b'\n');
            line
        }
        Format::Raw => secret.to_vec(),
    });
    write_stdout(&text)
}

/// Writes a secret as one line, for `ssl_passphrase_command`; a secret that cannot be one line
/// (it holds a CR, an LF or a NUL) is refused.
pub fn print_passphrase(key: &Key) -> Result<(), Failure> {
    // Only text is printed: UTF-8 without control characters. A generated key (random bytes)
    // is refused every time, not only when it happens to hold a line break, and nothing that
    // could drive a terminal reaches one.
    let secret = key.expose_secret();
    let is_text = std::str::from_utf8(secret).is_ok_and(|t| !t.chars().any(char::is_control));
    if !is_text {
        return Err(Failure {
            code: 1,
            kind: kms_core::ErrorKind::InvalidInput,
            message: format!(
                "secret \"{}\" is not a one-line text passphrase (UTF-8 without control \
                 characters): kms passphrase prints secrets stored with kms import, not keys",
                key.id()
            ),
        });
    }
    let mut line = Zeroizing::new(Vec::with_capacity(secret.len() + 1));
    line.extend_from_slice(secret);
    line.push(b'\n');
    write_stdout(&line)
}

/// Writes one line per key: id, newest version, bits, creation time (UTC).
pub fn print_list(keys: &[KeyInfo]) -> Result<(), Failure> {
    let mut out = String::new();
    for key in keys {
        out.push_str(&format!(
            "{}\tv{}\t{}\t{}\n",
            key.id,
            key.version,
            key.bytes * 8,
            kms_core::time::format_utc(key.created)
        ));
    }
    write_stdout(out.as_bytes())
}

fn write_stdout(bytes: &[u8]) -> Result<(), Failure> {
    let mut stdout = std::io::stdout().lock();
    stdout
        .write_all(bytes)
        .and_then(|_| stdout.flush())
        .map_err(|e| Failure::other(format!("cannot write to standard output: {e}")))
}
