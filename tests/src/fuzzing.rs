//! The bodies of the fuzz targets, shared by `fuzz/` (cargo-fuzz, libFuzzer, nightly) and by
//! the stable test `tests/tests/fuzz_replay.rs`, which replays every seed and every saved
//! crash input through the same functions on each `cargo test`.
//!
//! Each function takes arbitrary bytes, drives one parser of untrusted input, and panics only
//! when an invariant is broken: a parser that accepts something it cannot print back the same,
//! a key id outside the rules, plaintext released from a damaged file, a damaged store row
//! served as a key. Errors are the expected outcome of most inputs and are not failures.
//!
//! | target | untrusted input |
//! | --- | --- |
//! | [`protocol`] | request and answer lines of protocol v1 (kmsd, kms-client, exec helpers) |
//! | [`key_id`] | key ids and list prefixes, from every front door |
//! | [`store_record`] | a row of the wrapped-key store (a damaged or hostile `keys.db`) |
//! | [`file_reader`] | the encrypted file header and chunk reader of `kms decrypt` |
//! | [`provider_options`] | the TOML configuration and provider options, passphrase output |

use std::io::Cursor;
use std::path::Path;
use std::sync::{Mutex, OnceLock};

use kms_core::envelope::EnvelopeProvider;
use kms_core::protocol::{self, Answer, Request};
use kms_core::store::Store;
use kms_core::wrap::Kek;
use kms_core::{ErrorKind, Key, KeyId, KeyProvider, MAX_KEY_ID_LEN, SecretBytes};

/// The names of the targets, as directories under `fuzz/seeds` and `fuzz/regressions`.
pub const TARGETS: &[&str] = &[
    "protocol",
    "key_id",
    "store_record",
    "file_reader",
    "provider_options",
];

/// Runs the target called `name` on `data`; `false` for an unknown name.
pub fn run(name: &str, data: &[u8]) -> bool {
    match name {
        "protocol" => protocol(data),
        "key_id" => key_id(data),
        "store_record" => store_record(data),
        "file_reader" => file_reader(data),
        "provider_options" => provider_options(data),
        _ => return false,
    }
    true
}

/// Protocol v1: a request line either fails with an "invalid input" error or parses into a
/// request that prints back as a line parsing to the same request; answer lines never panic.
pub fn protocol(data: &[u8]) {
    match protocol::parse_request(data) {
        Ok(request) => {
            let line = request.to_line();
            assert!(line.len() < protocol::MAX_LINE, "printed line too long");
            let again = protocol::parse_request(line.as_bytes())
                .unwrap_or_else(|e| panic!("{line:?} does not parse back: {e}"));
            assert_eq!(again, request, "{line:?} parses back differently");
            if let Some(id) = request.key_id() {
                assert_valid_id(id.as_str());
            }
            if let Request::List(prefix) = &request {
                assert!(prefix.len() <= MAX_KEY_ID_LEN);
            }
        }
        Err(e) => assert!(
            matches!(e.kind(), ErrorKind::InvalidInput | ErrorKind::InvalidKeyId),
            "{e}"
        ),
    }

    // The client side: answers from a server or an exec helper.
    if let Ok(text) = std::str::from_utf8(data) {
        if let Ok(Answer::Ok(payload)) = protocol::parse_answer(text) {
            let id = KeyId::new("fuzz/answer").expect("a valid id");
            if let Ok(key) = protocol::parse_key(&id, payload) {
                assert!(!key.expose_secret().is_empty());
            }
            let _ = protocol::parse_listed(payload);
        }
        let _ = protocol::parse_listed(text);
    }
}

/// Key ids: what `KeyId::new` accepts follows the rules of BRIEF section 2, checked here by
/// an independent oracle in both directions.
pub fn key_id(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let accepted = KeyId::new(text);
    assert_eq!(
        accepted.is_ok(),
        id_oracle(text),
        "KeyId::new and the rules disagree on {text:?}"
    );
    match accepted {
        Ok(id) => assert_eq!(id.as_str(), text),
        Err(e) => {
            assert_eq!(e.kind(), ErrorKind::InvalidKeyId, "{e}");
            // The message shows the id only in an escaped, bounded form.
            let message = e.to_string();
            assert!(
                !message.contains('\n') && !message.contains('\0'),
                "{message:?}"
            );
            assert!(message.len() < 1024, "message of {} bytes", message.len());
        }
    }
    let _ = kms_core::validate_prefix(text);
}

fn assert_valid_id(text: &str) {
    assert!(id_oracle(text), "accepted id {text:?} breaks the rules");
}

/// The key id rules, written independently of `kms_core::id`.
fn id_oracle(text: &str) -> bool {
    let bytes = text.as_bytes();
    if bytes.is_empty() || bytes.len() > MAX_KEY_ID_LEN || bytes[0] == b'/' {
        return false;
    }
    let allowed = |b: &u8| b.is_ascii_alphanumeric() || b"._:/-".contains(b);
    if !bytes.iter().all(allowed) {
        return false;
    }
    text.split('/')
        .all(|s| !s.is_empty() && s != "." && s != "..")
}

/// A store whose single key row the fuzzer writes, column by column, with any SQLite type.
struct FuzzStore {
    _dir: tempfile::TempDir,
    provider: EnvelopeProvider,
    raw: rusqlite::Connection,
    id: KeyId,
    dek: Vec<u8>,
}

fn fuzz_store() -> &'static Mutex<FuzzStore> {
    static STORE: OnceLock<Mutex<FuzzStore>> = OnceLock::new();
    STORE.get_or_init(|| {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let path = dir.path().join("keys.db");
        let kek = Kek::new(&SecretBytes::copy_from(&[7u8; 32])).expect("a KEK");
        let store = Store::create(&path, &EnvelopeProvider::initial_meta(&kek)).expect("store");
        let provider = EnvelopeProvider::open("fuzz store", store, Box::new(kek)).expect("open");
        let id = KeyId::new("fuzz/key").expect("a valid id");
        let key = provider
            .create(&id, kms_core::KeySpec::default())
            .expect("a first key");
        let raw = rusqlite::Connection::open(&path).expect("a second connection");
        raw.pragma_update(None, "synchronous", "OFF")
            .expect("pragma");
        Mutex::new(FuzzStore {
            _dir: dir,
            provider,
            raw,
            id,
            dek: key.expose_secret().to_vec(),
        })
    })
}

/// One column value chosen by the fuzzer: its SQLite type and bytes.
fn column(data: &mut &[u8]) -> rusqlite::types::Value {
    use rusqlite::types::Value;
    let (tag, rest) = data.split_first().map_or((0, &[][..]), |(t, r)| (*t, r));
    *data = rest;
    let take = |data: &mut &[u8], n: usize| {
        let n = n.min(data.len());
        let (head, tail) = data.split_at(n);
        *data = tail;
        head.to_vec()
    };
    match tag % 5 {
        0 => Value::Null,
        1 => {
            let bytes = take(data, 8);
            let mut buf = [0u8; 8];
            buf[..bytes.len()].copy_from_slice(&bytes);
            Value::Integer(i64::from_le_bytes(buf))
        }
        2 => Value::Real(f64::from(tag)),
        3 => {
            let n = take(data, 1).first().copied().unwrap_or(0) as usize;
            Value::Text(String::from_utf8_lossy(&take(data, n)).into_owned())
        }
        _ => {
            let n = take(data, 1).first().copied().unwrap_or(0) as usize;
            Value::Blob(take(data, n))
        }
    }
}

/// The wrapped-key store: a row with any value in any column is either served as the very key
/// that was stored or refused with an error; it is never served as other bytes.
pub fn store_record(data: &[u8]) {
    let fuzz = fuzz_store().lock().unwrap_or_else(|p| p.into_inner());
    let mut data = data;
    let version = column(&mut data);
    let kek = column(&mut data);
    let len = column(&mut data);
    let created = column(&mut data);
    let wrapped = if data.first() == Some(&0xff) {
        // Keep the genuine blob sometimes, so that the other columns are what is damaged.
        None
    } else {
        Some(column(&mut data))
    };

    // Damage the row (the schema's CHECK and NOT NULL may refuse some values: that is fine).
    let original: Vec<u8> = fuzz
        .raw
        .query_row(
            "SELECT wrapped FROM keys WHERE id = ?1 ORDER BY version LIMIT 1",
            [fuzz.id.as_str()],
            |r| r.get(0),
        )
        .expect("the fuzz row");
    let blob = wrapped.unwrap_or(rusqlite::types::Value::Blob(original.clone()));
    let _ = fuzz.raw.execute(
        "UPDATE keys SET version = ?1, kek = ?2, len = ?3, created = ?4, wrapped = ?5 \
         WHERE id = ?6",
        rusqlite::params![version, kek, len, created, blob, fuzz.id.as_str()],
    );

    // Read it back through the provider: the stored key or an error, nothing else.
    match fuzz.provider.get(&fuzz.id) {
        Ok(key) => assert_eq!(
            key.expose_secret(),
            &fuzz.dek[..],
            "a damaged row was served as other bytes"
        ),
        Err(e) => assert!(
            matches!(
                e.kind(),
                ErrorKind::Corrupted | ErrorKind::NotFound | ErrorKind::WrongKek
            ),
            "unexpected error kind for a damaged row: {e}"
        ),
    }
    let _ = fuzz.provider.list("");

    // Restore the row for the next input.
    fuzz.raw
        .execute("DELETE FROM keys WHERE id = ?1", [fuzz.id.as_str()])
        .expect("delete");
    fuzz.raw
        .execute(
            "INSERT INTO keys (id, version, kek, len, created, wrapped) \
             VALUES (?1, 1, 1, ?2, 0, ?3)",
            rusqlite::params![fuzz.id.as_str(), fuzz.dek.len() as i64, original],
        )
        .expect("restore");
}

/// The secret every file key in [`file_reader`] has, whatever id and version a header names.
const FILE_KEY: [u8; 32] = [0x5a; 32];

/// The encrypted file reader: a file is decrypted in full, or refused with nothing released
/// but the plaintext of chunks that authenticated; ranged decryption never panics.
pub fn file_reader(data: &[u8]) {
    let lookup =
        |id: &KeyId, version: u32| Key::new(id.clone(), version, SecretBytes::copy_from(&FILE_KEY));

    let _ = kms_crypt::read_header(data);

    let mut plain = Vec::new();
    let whole = kms_crypt::decrypt(lookup, data, &mut plain);
    if let Ok(n) = whole {
        assert_eq!(n as usize, plain.len());
        assert!(
            kms_crypt::read_header(data).is_ok(),
            "a file that decrypts has a readable header"
        );
    }

    // A range from the first 16 bytes of the input, as `kms decrypt --offset --length` takes.
    let mut nums = [0u8; 16];
    let n = data.len().min(16);
    nums[..n].copy_from_slice(&data[..n]);
    let offset = u64::from_le_bytes(nums[..8].try_into().expect("8 bytes")) % (1 << 22);
    let length = u64::from_le_bytes(nums[8..].try_into().expect("8 bytes")) % (1 << 22);
    let mut part = Vec::new();
    let ranged =
        kms_crypt::decrypt_range(lookup, Cursor::new(data), offset, Some(length), &mut part);
    if let (Ok(_), Ok(m)) = (&whole, &ranged) {
        let start = offset as usize;
        assert_eq!(
            &plain[start..start + *m as usize],
            &part[..],
            "range differs"
        );
    }
}

/// The configuration: any TOML text is refused with a configuration error or parsed; the
/// options of the file, command and mock providers are checked without touching any file;
/// passphrase command templates expand without panicking and command output follows the rules.
pub fn provider_options(data: &[u8]) {
    let (selector, rest) = data.split_first().map_or((0, &[][..]), |(s, r)| (*s, r));
    let Ok(text) = std::str::from_utf8(rest) else {
        return;
    };
    match selector % 3 {
        0 => {
            if let Ok(config) = kms_core::config::Config::parse(text, "/nonexistent".into()) {
                let options = &config.provider.options;
                let _ = kms_core::config::parse_options::<kms_file::Options>("file", options);
                let context = kms_core::config::Context {
                    base_dir: "/nonexistent".into(),
                };
                let _ = kms_command::Options::from_table(&context, options);
                if let Ok(mock) =
                    kms_core::config::parse_options::<kms_mock::Options>("mock", options)
                {
                    // The mock opens in memory; latency is capped so that inputs stay fast.
                    let mock = kms_mock::Options {
                        latency_ms: 0,
                        ..mock
                    };
                    let _ = kms_mock::MockProvider::with_options(&mock);
                }
            }
        }
        1 => {
            // A hostile template: expands or is refused; without placeholders it is unchanged.
            let dir = Path::new("/var/lib/kms store");
            if let Ok((line, _uses_tty)) = kms_command::command::expand(text, "Prompt: ", dir, 7)
                && !text.contains('%')
            {
                assert_eq!(line, text);
            }
            // A hostile prompt or directory: the shell gets back exactly that one word.
            let (line, _) = kms_command::command::expand("%p", text, dir, -1)
                .expect("%p is a known placeholder");
            assert_eq!(shell_unquote(&line).as_deref(), Some(text), "{line:?}");
            let (line, _) = kms_command::command::expand("%d", "", Path::new(text), -1)
                .expect("%d is a known placeholder");
            assert_eq!(shell_unquote(&line).as_deref(), Some(text), "{line:?}");
        }
        _ => match kms_command::command::parse_output(rest) {
            Ok(secret) => {
                let bytes = secret.expose_secret();
                assert!(!bytes.is_empty());
                assert!(!bytes.contains(&b'\n') && !bytes.contains(&b'\r') && !bytes.contains(&0));
            }
            Err(e) => assert!(!e.to_string().is_empty()),
        },
    }
}

/// Reads one shell word made only of single-quoted parts and `\'` (what `shell_quote`
/// writes), as `/bin/sh` would; `None` for anything else.
fn shell_unquote(line: &str) -> Option<String> {
    let mut out = String::new();
    let mut chars = line.chars();
    let mut any = false;
    while let Some(c) = chars.next() {
        any = true;
        match c {
            '\'' => loop {
                match chars.next()? {
                    '\'' => break,
                    c => out.push(c),
                }
            },
            '\\' => out.push(chars.next()?),
            _ => return None,
        }
    }
    any.then_some(out)
}

/// Seeds of [`file_reader`]: real encrypted files under its key, of zero, one and three
/// chunks (4 KiB chunks, the smallest the format allows, to keep inputs short).
pub fn file_reader_seeds() -> Vec<(String, Vec<u8>)> {
    let mut seeds = Vec::new();
    for (name, len, chunk_log2) in [
        ("empty", 0usize, 12u8),
        ("one-chunk", 100, 12),
        ("three-chunks", 2 * 4096 + 17, 12),
        ("default-chunks", 300, kms_crypt::CHUNK_LOG2),
    ] {
        let id = KeyId::new("fuzz/file").expect("a valid id");
        let key = Key::new(id, 3, SecretBytes::copy_from(&FILE_KEY)).expect("a key");
        let plain: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
        let params = kms_crypt::TestParams {
            salt: [1; kms_crypt::SALT_LEN],
            nonce_prefix: [2; kms_crypt::NONCE_PREFIX_LEN],
            chunk_log2,
        };
        let mut out = Vec::new();
        kms_crypt::encrypt_with_params(&key, params, &plain[..], &mut out).expect("encrypt");
        seeds.push((name.to_string(), out));
    }
    seeds
}
