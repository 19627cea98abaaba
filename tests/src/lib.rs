//! Helpers shared by the integration tests.
//!
//! - [`kms_bin`]: the real `kms` binary, built once per test executable.
//! - [`Kms`]: a file-provider store in a temporary directory, driven through that binary with a
//!   configuration file. Every command it runs is checked for leaked key material: stderr never
//!   holds any key this store has printed, nor its master key, and a failing command prints
//!   nothing on stdout.
//! - [`Rng`]: a small seeded generator (seed from the OS, or `KMS_TEST_SEED` to replay a run).
//! - [`data_file`] and [`parse_id`]: the CLI cases kept as data under `tests/data/`.

pub mod fuzzing;

use std::ffi::OsStr;
use std::fmt;
use std::fs;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::{Mutex, OnceLock};

use base64::Engine;
use kms_core::SecretBytes;

/// The `kms` binary of the profile these tests were built with.
///
/// `cargo test -p kms-tests` does not build other packages' binaries, so the first call runs
/// `cargo build -p kms-cli` for the same profile and target directory (a no-op when the binary
/// is fresh). Set `KMS_TEST_NO_BUILD=1` to use an existing binary as it is.
pub fn kms_bin() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(build_kms)
}

fn build_kms() -> PathBuf {
    let exe = std::env::current_exe().expect("the path of the test executable");
    // target/<profile>/deps/<test>-<hash>
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("the test executable lives in target/<profile>/deps");
    let target_dir = profile_dir.parent().expect("target/<profile> has a parent");
    let profile = match profile_dir.file_name().and_then(OsStr::to_str) {
        Some("debug") => "dev",
        Some(name) => name,
        None => panic!("unexpected target layout: {}", profile_dir.display()),
    };
    let bin = profile_dir.join("kms");
    if std::env::var_os("KMS_TEST_NO_BUILD").is_none() || !bin.is_file() {
        let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
        let manifest = Path::new(env!("CARGO_MANIFEST_DIR")).join("../Cargo.toml");
        let status = Command::new(cargo)
            .args(["build", "--quiet", "-p", "kms-cli", "--profile", profile])
            .arg("--manifest-path")
            .arg(&manifest)
            .arg("--target-dir")
            .arg(target_dir)
            .stdin(Stdio::null())
            .status()
            .expect("cannot run cargo to build the kms binary");
        // A failed build with a binary present (the workspace mid-edit) falls back to that
        // binary, loudly; without one there is nothing to test.
        if !status.success() {
            assert!(bin.is_file(), "cargo build -p kms-cli failed: {status}");
            eprintln!(
                "warning: cargo build -p kms-cli failed ({status}); testing the existing {}",
                bin.display()
            );
        }
    }
    assert!(bin.is_file(), "no kms binary at {}", bin.display());
    bin
}

/// A `kms` command for `args`, with no configuration from the environment.
pub fn kms_command<I, S>(args: I) -> Command
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    let mut cmd = Command::new(kms_bin());
    cmd.args(args)
        .env_remove("KMS_CONFIG")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    cmd
}

/// The outcome of one `kms` process.
#[derive(Clone)]
pub struct Run {
    /// What ran (for messages).
    pub what: String,
    /// The exit status, or 128 + the signal that killed it.
    pub code: i32,
    /// Standard output (may hold key material: never printed by [`Run`]'s `Display`).
    pub stdout: Vec<u8>,
    /// Standard error.
    pub stderr: String,
}

/// The exit code of `status`, or 128 + the signal that ended it.
pub fn exit_code(status: ExitStatus) -> i32 {
    status
        .code()
        .unwrap_or_else(|| 128 + status.signal().unwrap_or(0))
}

impl Run {
    /// Runs `cmd` to completion.
    pub fn of(mut cmd: Command) -> Run {
        let what = format!("{cmd:?}");
        let out = cmd
            .output()
            .unwrap_or_else(|e| panic!("cannot run {what}: {e}"));
        Run {
            what,
            code: exit_code(out.status),
            stdout: out.stdout,
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }

    /// Stdout as text.
    pub fn stdout_text(&self) -> String {
        String::from_utf8(self.stdout.clone()).expect("stdout is UTF-8")
    }
}

impl fmt::Display for Run {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}\n  exit {}, {} bytes on stdout, stderr: {:?}",
            self.what,
            self.code,
            self.stdout.len(),
            self.stderr
        )
    }
}

/// Decodes a key printed with `--format hex`: one line of lowercase hex, 16, 24 or 32 bytes.
pub fn parse_hex_line(stdout: &[u8]) -> Vec<u8> {
    let text = std::str::from_utf8(stdout).expect("hex output is UTF-8");
    let line = text
        .strip_suffix('\n')
        .unwrap_or_else(|| panic!("hex output does not end in a newline: {} bytes", text.len()));
    assert!(
        line.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')),
        "hex output holds something other than one line of lowercase hex"
    );
    assert!(
        [32, 48, 64].contains(&line.len()),
        "hex output has {} digits",
        line.len()
    );
    hex::decode(line).expect("valid hex")
}

/// Fails if `text` holds any 8-byte window of a secret: as raw bytes, as hex (any case), or
/// the secret's base64.
pub fn assert_no_secret(text: &[u8], secrets: &[Vec<u8>], what: &dyn fmt::Display) {
    let lower = text.to_ascii_lowercase();
    let contains = |needle: &[u8]| lower.windows(needle.len()).any(|w| w == needle);
    let raw_contains = |needle: &[u8]| text.windows(needle.len()).any(|w| w == needle);
    for secret in secrets {
        for window in secret.windows(8) {
            assert!(
                !raw_contains(window),
                "raw key material appears in the output of {what}"
            );
            assert!(
                !contains(hex::encode(window).as_bytes()),
                "key material (hex) appears in the output of {what}"
            );
        }
        let b64 = base64::engine::general_purpose::STANDARD.encode(secret);
        assert!(
            !text.windows(16).any(|w| w == &b64.as_bytes()[..16]),
            "key material (base64) appears in the output of {what}"
        );
    }
}

/// A file-provider store in a temporary directory, driven through the `kms` binary.
///
/// The temporary directory (store, configuration, logs) is removed on drop.
pub struct Kms {
    tmp: tempfile::TempDir,
    /// The store directory (`dir` of the provider options).
    pub dir: PathBuf,
    /// The configuration file naming the store.
    pub config: PathBuf,
    secrets: Mutex<Vec<Vec<u8>>>,
}

/// What must not change when a command is refused: the listing, the row count and the bytes of
/// the store file.
#[derive(Debug, PartialEq, Eq)]
pub struct Snapshot {
    /// `kms list` output.
    pub list: String,
    /// Rows in the `keys` table.
    pub rows: usize,
    /// The store file's bytes.
    pub file: Vec<u8>,
}

/// The configuration text of a file provider in `dir`.
pub fn file_config(dir: &Path) -> String {
    format!(
        "[provider]\nname = \"file\"\n[provider.options]\ndir = \"{}\"\n",
        dir.display()
    )
}

/// `text` as a TOML basic string, quoted and escaped.
pub fn toml_string(text: &str) -> String {
    let mut out = String::with_capacity(text.len() + 2);
    out.push('"');
    for c in text.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if c.is_control() => out.push_str(&format!("\\u{:04X}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// The configuration text of a command provider in `dir` unlocked by `passphrase_command`,
/// with `iterations` PBKDF2 iterations for new slots.
///
/// Plugins next to the executable are not searched, so that `kms` runs the command provider
/// linked into it, built from this workspace's sources, rather than a `libkms_command.so` that
/// may be older.
pub fn command_config(dir: &Path, passphrase_command: &str, iterations: u32) -> String {
    format!(
        "[provider]\nname = \"command\"\n[provider.options]\ndir = {}\n\
         passphrase_command = {}\ntimeout = 10\niterations = {iterations}\n\
         [plugins]\nnext_to_executable = false\n",
        toml_string(&dir.display().to_string()),
        toml_string(passphrase_command),
    )
}

impl Kms {
    /// A new, initialised store (`kms --config FILE init`).
    pub fn new() -> Kms {
        let kms = Kms::uninitialised();
        let run = kms.run(["init"]);
        assert_eq!(run.code, 0, "{run}");
        assert!(run.stdout.is_empty(), "init printed on stdout");
        assert!(run.stderr.contains("initialised"), "{run}");
        kms.remember(&fs::read(kms.master_key_path()).expect("master.key"));
        kms
    }

    /// A configuration naming a store directory that does not exist yet.
    pub fn uninitialised() -> Kms {
        let tmp = tempfile::Builder::new()
            .prefix("kms-test-")
            .tempdir()
            .expect("a temporary directory");
        let dir = tmp.path().join("store");
        let config = tmp.path().join("kms.toml");
        fs::write(&config, file_config(&dir)).expect("write the configuration");
        Kms {
            tmp,
            dir,
            config,
            secrets: Mutex::new(Vec::new()),
        }
    }

    /// The temporary directory holding the store and the configuration.
    pub fn root(&self) -> &Path {
        self.tmp.path()
    }

    /// The store file.
    pub fn store_path(&self) -> PathBuf {
        self.dir.join(kms_file::STORE_FILE)
    }

    /// The master key file.
    pub fn master_key_path(&self) -> PathBuf {
        self.dir.join(kms_file::MASTER_KEY_FILE)
    }

    /// Adds key material that must never appear on stderr.
    pub fn remember(&self, secret: &[u8]) {
        self.secrets.lock().unwrap().push(secret.to_vec());
    }

    /// Every secret remembered so far.
    pub fn secrets(&self) -> Vec<Vec<u8>> {
        self.secrets.lock().unwrap().clone()
    }

    /// Runs `kms --config FILE ARGS...`.
    pub fn run<I, S>(&self, args: I) -> Run
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let mut full: Vec<std::ffi::OsString> = vec!["--config".into(), self.config.clone().into()];
        full.extend(args.into_iter().map(|a| a.as_ref().to_owned()));
        self.checked(Run::of(kms_command(full)))
    }

    /// Runs `kms ARGS...` with no configuration added.
    pub fn run_bare<I, S>(&self, args: I) -> Run
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let mut cmd = kms_command(args);
        cmd.current_dir(self.root());
        self.checked(Run::of(cmd))
    }

    /// Checks a finished run: no key material on stderr, nothing on stdout after a failure, and
    /// a failure explained in one `kms: ...` line.
    pub fn checked(&self, run: Run) -> Run {
        assert_no_secret(run.stderr.as_bytes(), &self.secrets(), &run.what);
        // (A process killed by a signal has no chance to print anything.)
        if run.code != 0 && run.code < 128 {
            assert!(run.stdout.is_empty(), "a failing command printed: {run}");
            assert!(
                !run.stderr.trim().is_empty(),
                "a failure without a message: {run}"
            );
        }
        run
    }

    /// Runs a command that prints one key in hex; returns the key and remembers it.
    pub fn key<I, S>(&self, args: I) -> Vec<u8>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let run = self.run(args);
        assert_eq!(run.code, 0, "{run}");
        let key = parse_hex_line(&run.stdout);
        self.remember(&key);
        key
    }

    /// `kms create ID`.
    pub fn create(&self, id: &str) -> Vec<u8> {
        self.key(["create", id])
    }

    /// `kms get ID`.
    pub fn get(&self, id: &str) -> Vec<u8> {
        self.key(["get", id])
    }

    /// Runs a command that must fail with `code`, with stderr one `kms: ` line holding every
    /// fragment (compared case-insensitively).
    pub fn fails<I, S>(&self, args: I, code: i32, fragments: &[&str]) -> Run
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let run = self.run(args);
        assert_failure(&run, code, fragments);
        run
    }

    /// `kms list`: (id, version, bits) per line.
    pub fn list(&self) -> Vec<(String, u32, u32)> {
        let run = self.run(["list"]);
        assert_eq!(run.code, 0, "{run}");
        parse_list(&run.stdout_text())
    }

    /// The number of rows in the store's `keys` table, read with SQLite directly.
    pub fn rows(&self) -> usize {
        let conn = self.sqlite();
        let n: i64 = conn
            .query_row("SELECT COUNT(*) FROM keys", [], |row| row.get(0))
            .expect("count the keys");
        usize::try_from(n).expect("a count")
    }

    /// A direct SQLite connection to the store (close it before running `kms` again if the
    /// test looks at the raw file).
    pub fn sqlite(&self) -> rusqlite::Connection {
        rusqlite::Connection::open_with_flags(
            self.store_path(),
            rusqlite::OpenFlags::SQLITE_OPEN_READ_WRITE,
        )
        .expect("open the store with SQLite")
    }

    /// The listing, the row count and the store file's bytes.
    pub fn snapshot(&self) -> Snapshot {
        let run = self.run(["list"]);
        assert_eq!(run.code, 0, "{run}");
        let rows = self.rows();
        self.assert_no_wal();
        Snapshot {
            list: run.stdout_text(),
            rows,
            file: fs::read(self.store_path()).expect("read the store file"),
        }
    }

    /// Asserts that SQLite left no write-ahead log behind (every connection closed cleanly), so
    /// that the store file alone holds every row.
    pub fn assert_no_wal(&self) {
        let wal = self.dir.join(format!("{}-wal", kms_file::STORE_FILE));
        assert!(
            !wal.exists(),
            "{} exists: a connection is still open",
            wal.display()
        );
    }
}

impl Default for Kms {
    fn default() -> Kms {
        Kms::new()
    }
}

/// Asserts that `run` failed with `code` and one `kms: ` line on stderr holding every fragment
/// (case-insensitively).
pub fn assert_failure(run: &Run, code: i32, fragments: &[&str]) {
    assert_eq!(run.code, code, "wrong exit status: {run}");
    assert!(run.stdout.is_empty(), "a failing command printed: {run}");
    assert!(
        run.stderr.starts_with("kms: "),
        "stderr is not a kms message: {run}"
    );
    assert!(
        run.stderr.ends_with('\n') && run.stderr.trim_end().lines().count() == 1,
        "stderr is not one line: {run}"
    );
    let lower = run.stderr.to_lowercase();
    for fragment in fragments {
        assert!(
            lower.contains(&fragment.to_lowercase()),
            "stderr does not mention {fragment:?}: {run}"
        );
    }
}

/// Parses `kms list` output into (id, version, bits).
pub fn parse_list(text: &str) -> Vec<(String, u32, u32)> {
    text.lines()
        .map(|line| {
            let fields: Vec<&str> = line.split('\t').collect();
            assert_eq!(fields.len(), 4, "list line {line:?}");
            let version = fields[1]
                .strip_prefix('v')
                .and_then(|v| v.parse().ok())
                .unwrap_or_else(|| panic!("list line {line:?}: bad version"));
            let bits = fields[2]
                .parse()
                .unwrap_or_else(|_| panic!("list line {line:?}: bad bits"));
            assert!(
                fields[3].len() == 20 && fields[3].ends_with('Z'),
                "list line {line:?}: bad time"
            );
            (fields[0].to_string(), version, bits)
        })
        .collect()
}

/// A small generator (SplitMix64); not for secrets, only for test orders and delays.
pub struct Rng(u64);

impl Rng {
    /// Seeded from `KMS_TEST_SEED` if set, else from the OS; prints the seed so that a failure
    /// can be replayed.
    pub fn from_os(test: &str) -> Rng {
        let seed = match std::env::var("KMS_TEST_SEED") {
            Ok(text) => text.parse().expect("KMS_TEST_SEED is a number"),
            Err(_) => {
                let bytes = SecretBytes::random(8).expect("OS random bytes");
                u64::from_le_bytes(bytes.expose_secret().try_into().expect("8 bytes"))
            }
        };
        eprintln!("{test}: KMS_TEST_SEED={seed}");
        Rng(seed)
    }

    /// A generator with a fixed seed.
    pub fn seeded(seed: u64) -> Rng {
        Rng(seed)
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// A number in `lo..=hi`.
    pub fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.next_u64() % (hi - lo + 1)
    }

    /// Shuffles `items` (Fisher-Yates).
    pub fn shuffle<T>(&mut self, items: &mut [T]) {
        for i in (1..items.len()).rev() {
            let j = self.range(0, i as u64) as usize;
            items.swap(i, j);
        }
    }
}

/// The text of `tests/data/NAME`.
pub fn data_file(name: &str) -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("data")
        .join(name);
    fs::read_to_string(&path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()))
}

/// The lines of a data file that are not blank or `#` comments, as tab-separated fields.
pub fn data_rows(name: &str) -> Vec<Vec<String>> {
    data_file(name)
        .lines()
        .filter(|line| !line.trim().is_empty() && !line.starts_with('#'))
        .map(|line| line.split('\t').map(str::to_string).collect())
        .collect()
}

/// Parses an id written as a quoted string with the escapes `\\`, `\"`, `\n`, `\t`, `\r`,
/// `\0` and `\xHH`, optionally followed by ` * N` for N copies: `"k" * 256`.
pub fn parse_id(spec: &str) -> Vec<u8> {
    let spec = spec.trim();
    let body = spec
        .strip_prefix('"')
        .unwrap_or_else(|| panic!("id {spec:?} does not start with a quote"));
    let mut out = Vec::new();
    let mut chars = body.char_indices();
    let rest = loop {
        let (at, c) = chars
            .next()
            .unwrap_or_else(|| panic!("id {spec:?} has no closing quote"));
        match c {
            '"' => break &body[at + 1..],
            '\\' => {
                let (_, e) = chars.next().expect("an escape");
                match e {
                    '\\' | '"' => out.push(e as u8),
                    'n' => out.push(b'\n'),
                    't' => out.push(b'\t'),
                    'r' => out.push(b'\r'),
                    '0' => out.push(0),
                    'x' => {
                        let hi = chars.next().expect("\\xHH").1;
                        let lo = chars.next().expect("\\xHH").1;
                        let hex = format!("{hi}{lo}");
                        out.push(u8::from_str_radix(&hex, 16).expect("\\xHH"));
                    }
                    other => panic!("id {spec:?}: unknown escape \\{other}"),
                }
            }
            c => {
                let mut buf = [0u8; 4];
                out.extend_from_slice(c.encode_utf8(&mut buf).as_bytes());
            }
        }
    };
    let rest = rest.trim();
    if rest.is_empty() {
        return out;
    }
    let count: usize = rest
        .strip_prefix('*')
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or_else(|| panic!("id {spec:?}: expected `* N` after the string"));
    out.repeat(count)
}

/// Waits until no live process is left in process group `pgid` (zombies do not count): a
/// process killed with SIGKILL in the middle of an fsync finishes the write before it dies, so
/// a test must not look at the store until the whole group is gone.
pub fn wait_for_group_exit(pgid: u32) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let alive = std::fs::read_dir("/proc")
            .map(|entries| {
                entries.flatten().any(|entry| {
                    let stat =
                        std::fs::read_to_string(entry.path().join("stat")).unwrap_or_default();
                    // pid (comm) state ppid pgrp ...: the fields after the last ')'.
                    let mut fields = stat.rsplit(')').next().unwrap_or("").split_whitespace();
                    let state = fields.next().unwrap_or("Z");
                    let pgrp = fields.nth(1).and_then(|f| f.parse::<u32>().ok());
                    pgrp == Some(pgid) && state != "Z" && state != "X"
                })
            })
            .unwrap_or(false);
        if !alive {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "process group {pgid} did not exit"
        );
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_parse() {
        assert_eq!(parse_id(r#""a\nb""#), b"a\nb");
        assert_eq!(parse_id(r#""""#), b"");
        assert_eq!(parse_id(r#""k" * 3"#), b"kkk");
        assert_eq!(parse_id(r#""\x01\0\\\"""#), b"\x01\0\\\"");
    }

    #[test]
    fn toml_strings_round_trip() {
        for text in [
            "printf pw",
            "printf 'pw\\r\\n'",
            "a\"b\\c",
            "tab\there",
            "nul\0",
        ] {
            let doc = format!("x = {}", toml_string(text));
            let table: toml::Table = doc.parse().unwrap();
            assert_eq!(table["x"].as_str(), Some(text), "{doc}");
        }
    }

    #[test]
    fn secrets_are_found_in_every_form() {
        let secret = vec![0xab; 32];
        let secrets = [secret.clone()];
        let found = |text: &[u8]| {
            std::panic::catch_unwind(|| assert_no_secret(text, &secrets, &"test")).is_err()
        };
        assert!(found(
            format!("x {} y", hex::encode(&secret[..8])).as_bytes()
        ));
        assert!(found(hex::encode_upper(&secret).as_bytes()));
        assert!(found(&secret[3..12]));
        let b64 = base64::engine::general_purpose::STANDARD.encode(&secret);
        assert!(found(b64.as_bytes()));
        assert!(!found(b"nothing to see"));
    }
}
