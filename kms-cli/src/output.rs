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

/// Writes one line per key: id, newest version, bits, creation time (UTC).
pub fn print_list(keys: &[KeyInfo]) -> Result<(), Failure> {
    let mut out = String::new();
    for key in keys {
        out.push_str(&format!(
            "{}\tv{}\t{}\t{}\n",
            key.id,
            key.version,
            key.len.bits(),
            utc(key.created)
        ));
    }
    write_stdout(out.as_bytes())
}

fn write_stdout(bytes: &[u8]) -> Result<(), Failure> {
    let mut stdout = std::io::stdout().lock();
    stdout
        .write_all(bytes)
        .and_then(|_| stdout.flush())
        .map_err(|e| Failure {
            code: 1,
            message: format!("cannot write to standard output: {e}"),
        })
}

/// Seconds since the epoch as `YYYY-MM-DDTHH:MM:SSZ` (proleptic Gregorian calendar).
fn utc(secs: u64) -> String {
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    // Civil date from a day count (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem / 60 % 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    #[test]
    fn utc_dates() {
        assert_eq!(super::utc(0), "1970-01-01T00:00:00Z");
        assert_eq!(super::utc(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(super::utc(1_796_330_096), "2026-12-03T19:54:56Z");
    }
}
