//! `kms-load`: a load generator for kmsd (protocol v1 on a Unix socket), and for OpenBao's
//! Transit engine over HTTP, so that both are measured by the same client.
//!
//! Each client is a thread with its own connection sending one request at a time and timing
//! each answer. The figures: requests per second over the whole run, and latency percentiles.
//!
//! ```text
//! kms-load --socket /run/kms/kms.sock --clients 8 --seconds 5 --op get
//! kms-load --spawn-dev /var/tmp/kms-load --clients 8 --op get-or-create-new
//! BAO_TOKEN=... kms-load --openbao http://127.0.0.1:8200 --transit-key bench --op transit-decrypt
//! ```
#![forbid(unsafe_code)]

use std::io::{BufRead, BufReader, ErrorKind, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use clap::{Parser, ValueEnum};

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Op {
    /// GET of a few existing keys: served from kmsd's cache after the first touch.
    Get,
    /// GET of keys not asked for before in this run: each one unwrapped by the provider.
    GetUncached,
    /// GET-OR-CREATE of new ids: every request a durable create.
    GetOrCreateNew,
    /// GET of `--keys` keys once each, then report kmsd's memory (with `--spawn-dev`).
    Fill,
    /// OpenBao: `POST /v1/<mount>/decrypt/<key>` of one 32-byte key encrypted before timing,
    /// the peer of kmsd's `GET`.
    TransitDecrypt,
    /// OpenBao: `POST /v1/<mount>/datakey/plaintext/<key>` (a new 256-bit key, returned in
    /// clear and wrapped), the peer of kmsd's `GET-OR-CREATE` of a new id.
    TransitDatakey,
}

impl Op {
    fn is_transit(self) -> bool {
        matches!(self, Op::TransitDecrypt | Op::TransitDatakey)
    }
}

/// Load generator for kmsd.
#[derive(Parser, Debug)]
#[command(name = "kms-load")]
struct Args {
    /// kmsd's socket.
    #[arg(long, required_unless_present_any = ["spawn_dev", "openbao"])]
    socket: Option<PathBuf>,
    /// Start `kmsd --dev DIR` (from beside this binary) and load it.
    #[arg(long, value_name = "DIR", conflicts_with_all = ["socket", "openbao"])]
    spawn_dev: Option<PathBuf>,
    /// Load OpenBao's Transit engine at this address (`http://127.0.0.1:8200`) instead of
    /// kmsd; with `--op transit-decrypt` or `transit-datakey`.
    #[arg(long, value_name = "URL", conflicts_with = "socket")]
    openbao: Option<String>,
    /// The environment variable holding the OpenBao token.
    #[arg(long, value_name = "VAR", default_value = "BAO_TOKEN")]
    token_env: String,
    /// The Transit mount.
    #[arg(long, default_value = "transit")]
    transit_mount: String,
    /// The Transit key (created before timing if missing; not derived).
    #[arg(long, default_value = "kms-load")]
    transit_key: String,
    /// Concurrent clients.
    #[arg(long, default_value_t = 8)]
    clients: usize,
    /// How long to run.
    #[arg(long, default_value_t = 5.0)]
    seconds: f64,
    /// What to ask.
    #[arg(long, value_enum, default_value_t = Op::Get)]
    op: Op,
    /// Distinct keys for `get` (created first if missing) and for `fill`.
    #[arg(long, default_value_t = 64)]
    keys: usize,
    /// Prefix of the ids this run uses.
    #[arg(long, default_value = "load")]
    prefix: String,
    /// Ids of `get-uncached` and `fill`: `prefix/N`, or the 1,000,000-key benchmark store's
    /// `db/NNN/rel/NNNNNNN` (see `kms-bench million`).
    #[arg(long, value_enum, default_value_t = Ids::Prefix)]
    ids: Ids,
    /// With `--spawn-dev`: kmsd's cache size (its `cache_size` setting).
    #[arg(long, default_value_t = 100_000)]
    cache_size: usize,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Ids {
    /// `<prefix>/<n>`.
    Prefix,
    /// `db/<n / 10000>/rel/<n>`, zero-padded, as in the benchmark's million-key store.
    Million,
}

fn indexed_id(args: &Args, index: usize) -> String {
    match args.ids {
        Ids::Prefix => format!("{}/{index}", args.prefix),
        Ids::Million => format!("db/{:03}/rel/{index:07}", index / 10_000),
    }
}

struct Conn {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
    line: String,
}

impl Conn {
    fn open(socket: &Path) -> Result<Conn> {
        let stream =
            UnixStream::connect(socket).with_context(|| format!("connect {}", socket.display()))?;
        // A server that accepts and never answers is an error, not a hang.
        stream.set_read_timeout(Some(Duration::from_secs(30)))?;
        let mut conn = Conn {
            reader: BufReader::new(stream.try_clone()?),
            writer: stream,
            line: String::new(),
        };
        conn.read()
            .with_context(|| format!("no greeting from {}", socket.display()))?;
        if conn.line.starts_with("ERR") {
            bail!("kmsd refused the connection: {}", conn.line.trim_end());
        }
        if !conn.line.starts_with("KMS/1") {
            bail!("not a kmsd: {:?}", conn.line);
        }
        Ok(conn)
    }

    fn read(&mut self) -> Result<()> {
        self.line.clear();
        match self.reader.read_line(&mut self.line) {
            Ok(0) => bail!("kmsd closed the connection"),
            Ok(_) => Ok(()),
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                bail!("no answer within 30 s")
            }
            Err(e) => Err(e.into()),
        }
    }

    /// Sends one request and checks its answer is `OK`.
    fn ask(&mut self, request: &str) -> Result<()> {
        self.writer.write_all(request.as_bytes())?;
        self.read()?;
        if !self.line.starts_with("OK") {
            bail!("{} -> {}", request.trim_end(), self.line.trim_end());
        }
        Ok(())
    }
}

/// One client of OpenBao's HTTP API: its own agent, so its own keep-alive connection.
struct Transit {
    agent: ureq::Agent,
    token: String,
    /// `<address>/v1/<mount>`.
    base: String,
}

impl Transit {
    fn new(args: &Args, address: &str) -> Result<Transit> {
        let token = std::env::var(&args.token_env)
            .with_context(|| format!("the OpenBao token is not in ${}", args.token_env))?;
        let config = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .max_redirects(0)
            .proxy(None)
            .timeout_global(Some(Duration::from_secs(30)))
            .build();
        Ok(Transit {
            agent: config.into(),
            token,
            base: format!(
                "{}/v1/{}",
                address.trim_end_matches('/'),
                args.transit_mount.trim_matches('/')
            ),
        })
    }

    /// `POST <base>/<path>` with a JSON body; the answer's JSON, or an error with its status.
    fn post(&self, path: &str, body: &serde_json::Value) -> Result<serde_json::Value> {
        let url = format!("{}/{path}", self.base);
        // Sent as the openbao provider sends its requests: one body with its length.
        let body = serde_json::to_vec(body)?;
        let mut response = self
            .agent
            .post(&url)
            .header("X-Vault-Token", &self.token)
            .header("Content-Type", "application/json")
            .send(&body[..])
            .with_context(|| format!("POST {url}"))?;
        let status = response.status().as_u16();
        let text = response
            .body_mut()
            .read_to_string()
            .with_context(|| format!("POST {url}: reading the answer"))?;
        if !(200..300).contains(&status) {
            bail!("POST {url} -> {status} {}", text.trim());
        }
        if text.trim().is_empty() {
            return Ok(serde_json::Value::Null);
        }
        serde_json::from_str(&text).with_context(|| format!("POST {url}: the answer is not JSON"))
    }

    /// Makes the key if missing and returns a ciphertext of 32 random-looking bytes under it.
    fn prepare(&self, key: &str) -> Result<String> {
        self.post(&format!("keys/{key}"), &serde_json::json!({}))?;
        let plaintext = BASE64.encode([0x5a_u8; 32]);
        let answer = self.post(
            &format!("encrypt/{key}"),
            &serde_json::json!({ "plaintext": plaintext }),
        )?;
        answer["data"]["ciphertext"]
            .as_str()
            .map(str::to_string)
            .context("Transit's encrypt answer holds no ciphertext")
    }

    /// One timed request: the answer must carry a plaintext.
    fn ask(&self, path: &str, body: &serde_json::Value) -> Result<()> {
        let answer = self.post(path, body)?;
        if answer["data"]["plaintext"].as_str().is_none() {
            bail!("POST {}/{path}: the answer holds no plaintext", self.base);
        }
        Ok(())
    }
}

struct Outcome {
    latencies_ns: Vec<u64>,
}

fn run_transit_client(
    address: &str,
    args: &Args,
    ciphertext: &str,
    deadline: Instant,
) -> Result<Outcome> {
    let transit = Transit::new(args, address)?;
    let key = &args.transit_key;
    let (path, body) = match args.op {
        Op::TransitDecrypt => (
            format!("decrypt/{key}"),
            serde_json::json!({ "ciphertext": ciphertext }),
        ),
        Op::TransitDatakey => (
            format!("datakey/plaintext/{key}"),
            serde_json::json!({ "bits": 256 }),
        ),
        _ => bail!("with --openbao, --op is transit-decrypt or transit-datakey"),
    };
    let mut latencies_ns = Vec::with_capacity(1 << 14);
    while Instant::now() < deadline {
        let started = Instant::now();
        transit.ask(&path, &body)?;
        latencies_ns.push(started.elapsed().as_nanos() as u64);
    }
    Ok(Outcome { latencies_ns })
}

fn run_client(
    socket: &Path,
    args: &Args,
    client: usize,
    deadline: Instant,
    run_tag: &str,
) -> Result<Outcome> {
    let mut conn = Conn::open(socket)?;
    let mut latencies_ns = Vec::with_capacity(1 << 16);
    let mut n: usize = 0;
    let stride = args.clients;
    while Instant::now() < deadline {
        let request = match args.op {
            // Each client walks its own run of keys, so that no two clients ask for the same
            // key at once: kmsd would merge their misses into one provider call.
            Op::Get => format!(
                "GET {}/{}\n",
                args.prefix,
                (client * args.keys / args.clients + n) % args.keys
            ),
            Op::GetUncached => format!("GET {}\n", indexed_id(args, client + n * stride)),
            Op::GetOrCreateNew => format!("GET-OR-CREATE {}/{run_tag}/{client}/{n}\n", args.prefix),
            Op::Fill => {
                let index = client + n * stride;
                if index >= args.keys {
                    break;
                }
                format!("GET {}\n", indexed_id(args, index))
            }
            Op::TransitDecrypt | Op::TransitDatakey => {
                bail!("--op transit-decrypt and transit-datakey need --openbao URL")
            }
        };
        let started = Instant::now();
        conn.ask(&request)?;
        latencies_ns.push(started.elapsed().as_nanos() as u64);
        n += 1;
    }
    Ok(Outcome { latencies_ns })
}

fn percentile(sorted: &[u64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let index = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[index] as f64 / 1000.0
}

/// Starts kmsd over the file provider in `dir` (initialised first if empty), with a
/// configuration written beside it.
fn spawn_kmsd(dir: &Path, cache_size: usize) -> Result<(Child, PathBuf)> {
    if dir.exists() && !dir.is_dir() {
        bail!("--spawn-dev {}: not a directory", dir.display());
    }
    let kmsd = std::env::current_exe()?.with_file_name("kmsd");
    let dir = std::path::absolute(dir)?;
    let socket = dir.join("kms.sock");
    let config = dir.with_extension("kms-load.toml");
    let text = format!(
        "[provider]\nname = \"file\"\n[provider.options]\ndir = {:?}\n\
         [server]\nsocket = {:?}\ncache_size = {cache_size}\n",
        dir.display().to_string(),
        socket.display().to_string()
    );
    std::fs::write(&config, text)?;
    if !dir.join("keys.db").exists() {
        kms_file::init(&kms_file::Options::in_dir(&dir))?;
    }
    let child = Command::new(&kmsd)
        .arg("--config")
        .arg(&config)
        .args(["--log-level", "warn"])
        .stdout(Stdio::null())
        .spawn()
        .with_context(|| format!("start {}", kmsd.display()))?;
    let deadline = Instant::now() + Duration::from_secs(30);
    while Conn::open(&socket).is_err() {
        if Instant::now() > deadline {
            bail!("kmsd did not come up on {}", socket.display());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok((child, socket))
}

/// Resident and peak memory of a process, in KiB, from /proc.
fn memory_kib(pid: u32) -> (u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .unwrap_or(0)
    };
    (field("VmRSS:"), field("VmHWM:"))
}

/// A kmsd started here, stopped however `main` ends.
struct Spawned(Option<Child>);

impl Drop for Spawned {
    fn drop(&mut self) {
        if let Some(child) = self.0.as_mut() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn main() -> std::process::ExitCode {
    match run() {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            // One line, whatever RUST_BACKTRACE says: kms-bench puts it in a table cell.
            let text = format!("{e:#}").replace(['\n', '\r'], " ");
            eprintln!("kms-load: {text}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn run() -> Result<()> {
    let args = Args::parse();
    if args.clients == 0 || args.clients > 10_000 {
        bail!("--clients is 1 to 10000, not {}", args.clients);
    }
    if !(args.seconds.is_finite() && args.seconds > 0.0 && args.seconds <= 86_400.0) {
        bail!(
            "--seconds is more than 0 and at most 86400, not {}",
            args.seconds
        );
    }
    if args.keys == 0 {
        bail!("--keys is at least 1");
    }
    if let Some(address) = &args.openbao {
        if !args.op.is_transit() {
            bail!("with --openbao, --op is transit-decrypt or transit-datakey");
        }
        let ciphertext = Transit::new(&args, address)?.prepare(&args.transit_key)?;
        let (all, elapsed) = timed_run(&args, |_client, deadline| {
            run_transit_client(address, &args, &ciphertext, deadline)
        })?;
        print_figures(&args, &all, elapsed, None);
        return Ok(());
    }
    if args.op.is_transit() {
        bail!("--op transit-decrypt and transit-datakey need --openbao URL");
    }
    let (mut child, socket) = match &args.spawn_dev {
        Some(dir) => {
            let (child, socket) = spawn_kmsd(dir, args.cache_size)?;
            (Spawned(Some(child)), socket)
        }
        None => (
            Spawned(None),
            args.socket.clone().expect("clap requires --socket"),
        ),
    };

    // 1. Keys for `get` exist and are cached before timing starts.
    if args.op == Op::Get {
        let mut conn = Conn::open(&socket)?;
        for i in 0..args.keys {
            conn.ask(&format!("GET-OR-CREATE {}/{i}\n", args.prefix))?;
        }
    }

    // 2. The run, between two readings of kmsd's cache counters.
    let before = cache_counters(&socket)?;
    let run_tag = format!("{}", std::process::id());
    let (all, elapsed) = timed_run(&args, |client, deadline| {
        run_client(&socket, &args, client, deadline, &run_tag)
    })?;
    let after = cache_counters(&socket)?;

    // 3. Figures, after kmsd (if started here) is measured and stopped.
    let memory = child.0.as_ref().map(|c| memory_kib(c.id()));
    drop(child.0.take().map(|c| Spawned(Some(c))));
    print_figures(&args, &all, elapsed, memory);
    println!(
        "kmsd_cache_hits={} kmsd_cache_misses={} kmsd_provider_calls={}",
        after.0.saturating_sub(before.0),
        after.1.saturating_sub(before.1),
        after.2.saturating_sub(before.2)
    );
    Ok(())
}

/// kmsd's `cache_hits` and `cache_misses` counters, and its calls of the provider's `get` and
/// `get_or_create` (several misses of one key at once make one call), from `STATS`.
fn cache_counters(socket: &Path) -> Result<(u64, u64, u64)> {
    let mut conn = Conn::open(socket)?;
    conn.ask("STATS\n")?;
    let field = |name: &str| -> Result<u64> {
        conn.line
            .split_whitespace()
            .find_map(|pair| pair.strip_prefix(name)?.strip_prefix('='))
            .and_then(|value| value.parse().ok())
            .with_context(|| format!("kmsd's STATS has no {name}: {}", conn.line.trim_end()))
    };
    let calls = field("provider_get")? + field("provider_get_or_create")?;
    Ok((field("cache_hits")?, field("cache_misses")?, calls))
}

/// Runs `client` on `--clients` threads until `--seconds` have passed; every latency, sorted,
/// and the elapsed seconds.
fn timed_run(
    args: &Args,
    client: impl Fn(usize, Instant) -> Result<Outcome> + Sync,
) -> Result<(Vec<u64>, f64)> {
    let deadline = Instant::now() + Duration::from_secs_f64(args.seconds);
    let started = Instant::now();
    let outcomes: Vec<Result<Outcome>> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..args.clients)
            .map(|index| {
                let client = &client;
                scope.spawn(move || client(index, deadline))
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("client panicked"))
            .collect()
    });
    let elapsed = started.elapsed().as_secs_f64();
    let mut all = Vec::new();
    for outcome in outcomes {
        all.extend(outcome?.latencies_ns);
    }
    all.sort_unstable();
    Ok((all, elapsed))
}

/// The one-line result (and kmsd's memory when it was started here) on stdout.
fn print_figures(args: &Args, all: &[u64], elapsed: f64, memory: Option<(u64, u64)>) {
    let rps = all.len() as f64 / elapsed;
    let mut out = format!(
        "op={:?} clients={} requests={} seconds={elapsed:.2} rps={rps:.0} p50_us={:.1} \
         p99_us={:.1} p999_us={:.1}\n",
        args.op,
        args.clients,
        all.len(),
        percentile(all, 0.50),
        percentile(all, 0.99),
        percentile(all, 0.999)
    );
    if let Some((rss, hwm)) = memory {
        out.push_str(&format!("kmsd_rss_kib={rss} kmsd_peak_kib={hwm}\n"));
    }
    // A closed stdout (`| head -1`) is not an error worth a panic.
    let _ = std::io::stdout().write_all(out.as_bytes());
}
