//! Helpers shared by the integration tests.
//!
//! - [`kms_bin`]: the real `kms` binary, built once per test executable.
//! - [`Kms`]: a file-provider store in a temporary directory, driven through that binary with a
//!   configuration file. Every command it runs is checked for leaked key material: stderr never
//!   holds any key this store has printed, nor its master key, and a failing command prints
//!   nothing on stdout.
//! - [`kmsd_bin`] and [`Kmsd`]: the real `kmsd` binary, and a running instance of it.
//! - [`Rng`]: a small seeded generator (seed from the OS, or `KMS_TEST_SEED` to replay a run).
//! - [`check_acknowledged`]: what must hold of a store after any crash; [`KekState`]: where a
//!   command-provider store is in a KEK rotation.
//! - [`data_file`] and [`parse_id`]: the CLI cases kept as data under `tests/data/`.

pub mod fuzzing;

use std::collections::{BTreeMap, BTreeSet};
use std::ffi::OsStr;
use std::fmt;
use std::fs::{self, File};
use std::io::{ErrorKind as ErrorKindIo, Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use base64::Engine;
use kms_core::envelope::{CURRENT_KEK_META, fingerprint_meta_name};
use kms_core::store::Store;
use kms_core::{KeyId, KeyInfo, KeyProvider, SecretBytes};
use rustix::fs::{Mode, OFlags};

/// The `kms` binary of the profile these tests were built with.
///
/// `cargo test -p kms-tests` does not build other packages' binaries, so the first call runs
/// `cargo build -p kms-cli` for the same profile and target directory (a no-op when the binary
/// is fresh). Set `KMS_TEST_NO_BUILD=1` to use an existing binary as it is.
pub fn kms_bin() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| build_binary("kms-cli", "kms"))
}

/// The `kmsd` binary of the profile these tests were built with, built like [`kms_bin`]
/// (`cargo build -p kmsd`).
pub fn kmsd_bin() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| build_binary("kmsd", "kmsd"))
}

/// Builds `package` for this test executable's profile and target directory, and returns the
/// path of its binary `bin`.
fn build_binary(package: &str, bin: &str) -> PathBuf {
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
    let path = profile_dir.join(bin);
    if std::env::var_os("KMS_TEST_NO_BUILD").is_none() || !path.is_file() {
        let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
        let manifest = Path::new(env!("CARGO_MANIFEST_DIR")).join("../Cargo.toml");
        let status = Command::new(cargo)
            .args(["build", "--quiet", "-p", package, "--profile", profile])
            .arg("--manifest-path")
            .arg(&manifest)
            .arg("--target-dir")
            .arg(target_dir)
            .stdin(Stdio::null())
            .status()
            .unwrap_or_else(|e| panic!("cannot run cargo to build the {bin} binary: {e}"));
        // A failed build with a binary present (the workspace mid-edit) falls back to that
        // binary, loudly; without one there is nothing to test.
        if !status.success() {
            assert!(path.is_file(), "cargo build -p {package} failed: {status}");
            eprintln!(
                "warning: cargo build -p {package} failed ({status}); testing the existing {}",
                path.display()
            );
        }
    }
    assert!(path.is_file(), "no {bin} binary at {}", path.display());
    path
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
/// Plugins next to the executable are not searched ([`LINKED_ONLY`]).
pub fn command_config(dir: &Path, passphrase_command: &str, iterations: u32) -> String {
    format!(
        "[provider]\nname = \"command\"\n[provider.options]\ndir = {}\n\
         passphrase_command = {}\ntimeout = 10\niterations = {iterations}\n{LINKED_ONLY}",
        toml_string(&dir.display().to_string()),
        toml_string(passphrase_command),
    )
}

/// A `[plugins]` section that searches no plugin next to the executable, so that `kms` and
/// `kmsd` run the providers linked into them, built from this workspace's sources, rather than
/// a `libkms_<name>.so` beside them that may be older.
pub const LINKED_ONLY: &str = "[plugins]\nnext_to_executable = false\n";

impl Kms {
    /// A new, initialised file-provider store (`kms --config FILE init`).
    pub fn new() -> Kms {
        let kms = Kms::init_with(file_config);
        kms.remember(&fs::read(kms.master_key_path()).expect("master.key"));
        kms
    }

    /// A new store initialised by `kms --config FILE init`, FILE holding `config(dir)` for the
    /// store directory `dir`.
    pub fn init_with(config: impl FnOnce(&Path) -> String) -> Kms {
        let kms = Kms::uninitialised();
        fs::write(&kms.config, config(&kms.dir)).expect("write the configuration");
        let run = kms.run(["init"]);
        assert_eq!(run.code, 0, "{run}");
        assert!(run.stdout.is_empty(), "init printed on stdout");
        assert!(run.stderr.contains("initialised"), "{run}");
        kms
    }

    /// Appends a `[server]` section to the configuration, with the socket `kms.sock` in the
    /// temporary directory, and returns the socket's path: `kmsd --config FILE` then serves
    /// this store, and `kms --config FILE` still opens it in-process.
    pub fn add_server(&self) -> PathBuf {
        let socket = self.root().join("kms.sock");
        let section = format!(
            "[server]\nsocket = {}\n",
            toml_string(&socket.display().to_string())
        );
        let mut text = fs::read_to_string(&self.config).expect("read the configuration");
        text.push_str(&section);
        fs::write(&self.config, text).expect("write the configuration");
        socket
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

    /// `n` delays in `lo..hi` microseconds, one drawn in each of `n` equal strata, shuffled:
    /// random points that still cover the whole span.
    pub fn stratified(&mut self, n: u64, lo: u64, hi: u64) -> Vec<Duration> {
        let width = (hi - lo) / n;
        let mut delays: Vec<Duration> = (0..n)
            .map(|k| Duration::from_micros(self.range(lo + k * width, lo + (k + 1) * width - 1)))
            .collect();
        self.shuffle(&mut delays);
        delays
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

/// When to send SIGKILL.
#[derive(Clone, Copy, Debug)]
pub enum KillAt {
    /// This long after the process was started.
    Delay(Duration),
    /// Once the process is blocked writing to its stderr, a pipe left with room for only this
    /// many bytes: a kill at an exact point, right after the output that fits.
    StderrFull(usize),
}

/// Linux's page size, the unit of a pipe's capacity.
pub const PAGE: usize = 4096;

/// A FIFO at `path` that can take only `room` (< [`PAGE`]) more bytes: our end (read-write,
/// non-blocking), the writing end for the child (blocking) and the bytes already in it.
pub fn full_fifo(path: &Path, room: usize) -> (File, File, usize) {
    assert!(room < PAGE, "room for {room} bytes");
    rustix::fs::mkfifoat(rustix::fs::CWD, path, Mode::from_raw_mode(0o600)).expect("mkfifo");
    let mut ours = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(OFlags::NONBLOCK.bits() as i32)
        .open(path)
        .expect("open the FIFO");
    // Its capacity in pages: writes of one page are atomic, so fill it page by page, then
    // empty it.
    let page = [b'.'; PAGE];
    let mut pages = 0;
    loop {
        match ours.write(&page) {
            Ok(n) => {
                assert_eq!(n, PAGE, "a partial write of one page");
                pages += 1;
            }
            Err(e) if e.kind() == ErrorKindIo::WouldBlock => break,
            Err(e) => panic!("fill the FIFO: {e}"),
        }
    }
    drain(&mut ours);
    // Every page full but the last, which has `room` bytes free; a write that does not fit
    // there cannot start another page and blocks.
    for _ in 1..pages {
        ours.write_all(&page).expect("fill the FIFO");
    }
    ours.write_all(&page[..PAGE - room]).expect("fill the FIFO");
    let theirs = fs::OpenOptions::new()
        .write(true)
        .open(path)
        .expect("open the FIFO's writing end");
    (ours, theirs, pages * PAGE - room)
}

/// Everything that can be read from `file` (non-blocking) now.
pub fn drain(file: &mut File) -> Vec<u8> {
    let mut out = Vec::new();
    let mut buf = [0u8; PAGE];
    loop {
        match file.read(&mut buf) {
            Ok(0) => return out,
            Ok(n) => out.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == ErrorKindIo::WouldBlock => return out,
            Err(e) => panic!("read the FIFO: {e}"),
        }
    }
}

/// Waits until process `pid` is blocked writing to a pipe, or has exited (a zombie), or a
/// minute has passed.
pub fn wait_blocked_in_pipe_write(pid: u32) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while Instant::now() < deadline {
        let wchan = fs::read_to_string(format!("/proc/{pid}/wchan")).unwrap_or_default();
        let stat = fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        let zombie = stat
            .rsplit(')')
            .next()
            .unwrap_or("")
            .trim_start()
            .starts_with('Z');
        if wchan.contains("pipe_write") || zombie {
            return;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}

impl Kms {
    /// Runs `kms --config FILE ARGS...` and sends it SIGKILL at `at`; returns the run, whose
    /// code is 137 if the kill landed before the process ended by itself.
    pub fn run_and_kill(&self, args: &[&str], at: KillAt) -> Run {
        let mut cmd = kms_command(["--config".as_ref(), self.config.as_os_str()]);
        cmd.args(args);
        self.spawn_and_kill(cmd, &format!("kms {}", args.join(" ")), at)
    }

    /// Runs `cmd` (from [`kms_command`], `what` naming it in messages) and sends it SIGKILL at
    /// `at`, as [`run_and_kill`](Kms::run_and_kill) does.
    pub fn spawn_and_kill(&self, mut cmd: Command, what: &str, at: KillAt) -> Run {
        let fifo_path = self.root().join("stderr.fifo");
        let mut fifo = None;
        if let KillAt::StderrFull(room) = at {
            let (ours, theirs, prefilled) = full_fifo(&fifo_path, room);
            cmd.stderr(theirs);
            fifo = Some((ours, prefilled));
        }
        let started = Instant::now();
        let mut child = cmd.spawn().expect("start kms");
        drop(cmd);
        let pid = rustix::process::Pid::from_child(&child);
        let reader = child.stderr.take().map(|mut stderr| {
            std::thread::spawn(move || {
                let mut all = Vec::new();
                stderr.read_to_end(&mut all).expect("read stderr");
                all
            })
        });
        match at {
            KillAt::Delay(delay) => std::thread::sleep(delay.saturating_sub(started.elapsed())),
            KillAt::StderrFull(_) => wait_blocked_in_pipe_write(child.id()),
        }
        // The child is not reaped before `wait`, so the pid is still its own.
        let _ = rustix::process::kill_process(pid, rustix::process::Signal::KILL);
        let status = child.wait().expect("wait for kms");
        let mut stdout = Vec::new();
        let mut out = child.stdout.take().expect("stdout is piped");
        out.read_to_end(&mut stdout).expect("read stdout");
        let stderr = match (reader, fifo) {
            (Some(reader), _) => reader.join().expect("the stderr reader"),
            (None, Some((mut ours, prefilled))) => {
                let all = drain(&mut ours);
                fs::remove_file(&fifo_path).expect("remove the FIFO");
                all[prefilled..].to_vec()
            }
            (None, None) => unreachable!("stderr is piped or a FIFO"),
        };
        self.checked(Run {
            what: format!("{what} (killed at {at:?})"),
            code: exit_code(status),
            stdout,
            stderr: String::from_utf8_lossy(&stderr).into_owned(),
        })
    }
}

/// A `kmsd` process serving one configuration, killed with SIGKILL when dropped.
pub struct Kmsd {
    child: Option<Child>,
    config: PathBuf,
    socket: PathBuf,
    log: PathBuf,
}

impl Kmsd {
    /// Starts `kmsd --config CONFIG --log-level warn`, its stderr appended to `log`, and waits
    /// until it answers on `socket` (the socket its configuration names).
    pub fn start(config: &Path, socket: &Path, log: &Path) -> Kmsd {
        let mut kmsd = Kmsd {
            child: None,
            config: config.to_path_buf(),
            socket: socket.to_path_buf(),
            log: log.to_path_buf(),
        };
        kmsd.restart();
        kmsd
    }

    /// Starts kmsd again after [`kill`](Kmsd::kill), and waits until it answers.
    pub fn restart(&mut self) {
        assert!(self.child.is_none(), "kmsd is already running");
        let stderr = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("open kmsd's log");
        let child = Command::new(kmsd_bin())
            .arg("--config")
            .arg(&self.config)
            .args(["--log-level", "warn"])
            .env_remove("KMS_CONFIG")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .expect("start kmsd");
        let child = self.child.insert(child);

        // Serving once a connection gets the greeting. The deadline only turns a kmsd that
        // hangs into a failure instead of a stuck test.
        let deadline = Instant::now() + Duration::from_secs(60);
        while kms_client::Client::connect(&self.socket).is_err() {
            if let Some(status) = child.try_wait().expect("poll kmsd") {
                self.child = None;
                panic!("kmsd exited at start ({status}): {}", self.log_text());
            }
            assert!(
                Instant::now() < deadline,
                "kmsd did not serve on {} within a minute: {}",
                self.socket.display(),
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// The socket kmsd serves.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// Whether kmsd was started and not killed since.
    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }

    /// A new connection to kmsd.
    pub fn connect(&self) -> kms_client::RemoteProvider {
        kms_client::RemoteProvider::connect(&self.socket)
            .unwrap_or_else(|e| panic!("cannot connect to kmsd: {e}"))
    }

    /// What kmsd wrote to its log so far.
    pub fn log_text(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Sends kmsd SIGKILL and waits until it is gone; panics if it had exited by itself.
    pub fn kill(&mut self) {
        let mut child = self.child.take().expect("kmsd is running");
        if let Some(status) = child.try_wait().expect("poll kmsd") {
            panic!("kmsd exited by itself ({status}): {}", self.log_text());
        }
        // Not reaped yet, so the pid is still kmsd's.
        let _ = rustix::process::kill_process(
            rustix::process::Pid::from_child(&child),
            rustix::process::Signal::KILL,
        );
        let status = child.wait().expect("wait for kmsd");
        assert_eq!(exit_code(status), 128 + 9, "kmsd: {}", self.log_text());
    }
}

impl Drop for Kmsd {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Reads every key `provider` lists and checks the acknowledged ones: each is listed and reads
/// back with identical bytes. Returns the listing.
pub fn check_acknowledged(
    provider: &dyn KeyProvider,
    acked: &BTreeMap<String, Vec<u8>>,
    context: &str,
) -> Vec<KeyInfo> {
    let listed = provider
        .list("")
        .unwrap_or_else(|e| panic!("{context}: {provider} does not list: {e}"));
    let ids: BTreeSet<&str> = listed.iter().map(|info| info.id.as_str()).collect();
    for (id, bytes) in acked {
        assert!(
            ids.contains(id.as_str()),
            "{context}: acknowledged key {id} is not listed by {provider}"
        );
        let got = provider
            .get(&KeyId::new(id).expect("a valid id"))
            .unwrap_or_else(|e| panic!("{context}: acknowledged key {id} is lost: {e}"));
        assert!(
            got.expose_secret() == bytes.as_slice(),
            "{context}: acknowledged key {id} changed ({provider})"
        );
    }
    for info in &listed {
        provider
            .get(&info.id)
            .unwrap_or_else(|e| panic!("{context}: listed key {} does not read: {e}", info.id));
    }
    listed
}

/// The metadata entry of an unfinished KEK rotation of the command provider (its target
/// generation).
pub const ROTATION_META: &str = "command.rotation";

/// The KEK rotation state of a command-provider store, read from its metadata and rows.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KekState {
    /// `kek.current`.
    pub current: u32,
    /// `command.rotation`: the target generation of an unfinished rotation.
    pub rotation: Option<u32>,
    /// Rows per KEK generation.
    pub rows: BTreeMap<u32, u64>,
    /// Every metadata name.
    pub meta: Vec<String>,
}

impl KekState {
    /// Reads the state of the store of `kms` (a command-provider store).
    pub fn read(kms: &Kms, context: &str) -> KekState {
        let path = kms.dir.join(kms_command::STORE_FILE);
        let store = Store::open(&path)
            .unwrap_or_else(|e| panic!("{context}: the store file does not open: {e}"));
        let generation = |name: &str| {
            let raw = store.meta(name).expect("read the metadata")?;
            let text = String::from_utf8(raw).expect("a generation is text");
            Some(text.parse::<u32>().expect("a generation is a number"))
        };
        KekState {
            current: generation(CURRENT_KEK_META).unwrap_or(1),
            rotation: generation(ROTATION_META),
            rows: store
                .count_by_kek()
                .expect("count rows")
                .into_iter()
                .collect(),
            meta: store
                .meta_with_prefix("")
                .expect("read the metadata")
                .into_iter()
                .map(|(name, _)| name)
                .collect(),
        }
    }

    /// The number of rows under KEK generation `generation`.
    pub fn rows_under(&self, generation: u32) -> u64 {
        self.rows.get(&generation).copied().unwrap_or(0)
    }

    /// The number of rows.
    pub fn total_rows(&self) -> u64 {
        self.rows.values().sum()
    }

    /// Where a kill of `kms rotate-kek` landed, from the store's state `before` the run and
    /// this state, read after it.
    pub fn rotation_phase(&self, run: &Run, before: &KekState) -> &'static str {
        let old_left = self.rows_under(self.current);
        if run.code == 0 {
            "after the process had exited"
        } else if self.current > before.current {
            "phase 3, after the switch committed (before the process exited)"
        } else if self.rotation.is_none() {
            "phase 1, before the new master key was committed"
        } else if old_left == self.total_rows() {
            "phase 2, new master key committed, no key re-wrapped yet"
        } else if old_left > 0 {
            "phase 2, part of the keys re-wrapped"
        } else {
            "phase 3, every key re-wrapped, before the switch"
        }
    }

    /// What must hold whenever no process is running, whatever was killed where: `total` rows,
    /// every one under the current generation or the rotation's target, and the slot (of the
    /// one slot `primary`) and fingerprint of exactly the live generations.
    pub fn check(&self, total: u64, context: &str) {
        let live: Vec<u32> = std::iter::once(self.current).chain(self.rotation).collect();
        if let Some(target) = self.rotation {
            assert_eq!(target, self.current + 1, "{context}: {self:?}");
        }
        assert_eq!(
            self.total_rows(),
            total,
            "{context}: rows were lost or added: {self:?}"
        );
        assert!(
            self.rows.keys().all(|g| live.contains(g)),
            "{context}: a row is under a generation that is not live: {self:?}"
        );
        let mut expected: Vec<String> = live
            .iter()
            .flat_map(|&g| {
                [
                    format!("command.slot.primary.{g}"),
                    fingerprint_meta_name(g),
                ]
            })
            .collect();
        expected.sort();
        let mut found: Vec<String> = self
            .meta
            .iter()
            .filter(|n| n.starts_with("command.slot.") || n.ends_with(".fingerprint"))
            .cloned()
            .collect();
        found.sort();
        assert_eq!(found, expected, "{context}: slots and fingerprints");
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
