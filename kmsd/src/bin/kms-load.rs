//! `kms-load`: a load generator for kmsd (protocol v1 on a Unix socket).
//!
//! Each client is a thread with its own connection sending one request at a time and timing
//! each answer. The figures: requests per second over the whole run, and latency percentiles.
//!
//! ```text
//! kms-load --socket /run/kms/kms.sock --clients 8 --seconds 5 --op get
//! kms-load --spawn-dev /var/tmp/kms-load --clients 8 --op get-or-create-new
//! ```
#![forbid(unsafe_code)]

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
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
}

/// Load generator for kmsd.
#[derive(Parser, Debug)]
#[command(name = "kms-load")]
struct Args {
    /// kmsd's socket.
    #[arg(long, required_unless_present = "spawn_dev")]
    socket: Option<PathBuf>,
    /// Start `kmsd --dev DIR` (from beside this binary) and load it.
    #[arg(long, value_name = "DIR", conflicts_with = "socket")]
    spawn_dev: Option<PathBuf>,
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
        let mut conn = Conn {
            reader: BufReader::new(stream.try_clone()?),
            writer: stream,
            line: String::new(),
        };
        conn.read()?;
        if !conn.line.starts_with("KMS/1") {
            bail!("not a kmsd: {:?}", conn.line);
        }
        Ok(conn)
    }

    fn read(&mut self) -> Result<()> {
        self.line.clear();
        if self.reader.read_line(&mut self.line)? == 0 {
            bail!("kmsd closed the connection");
        }
        Ok(())
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

struct Outcome {
    latencies_ns: Vec<u64>,
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
            Op::Get => format!("GET {}/{}\n", args.prefix, (client + n * 7) % args.keys),
            Op::GetUncached => format!("GET {}\n", indexed_id(args, client + n * stride)),
            Op::GetOrCreateNew => format!("GET-OR-CREATE {}/{run_tag}/{client}/{n}\n", args.prefix),
            Op::Fill => {
                let index = client + n * stride;
                if index >= args.keys {
                    break;
                }
                format!("GET {}\n", indexed_id(args, index))
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

fn main() -> Result<()> {
    let args = Args::parse();
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

    // 2. The run.
    let run_tag = format!("{}", std::process::id());
    let deadline = Instant::now() + Duration::from_secs_f64(args.seconds);
    let started = Instant::now();
    let outcomes: Vec<Result<Outcome>> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..args.clients)
            .map(|client| {
                let (socket, args, run_tag) = (&socket, &args, &run_tag);
                scope.spawn(move || run_client(socket, args, client, deadline, run_tag))
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

    // 3. Figures, after kmsd (if started here) is measured and stopped.
    let memory = child.0.as_ref().map(|c| memory_kib(c.id()));
    drop(child.0.take().map(|c| Spawned(Some(c))));
    let rps = all.len() as f64 / elapsed;
    let mut out = format!(
        "op={:?} clients={} requests={} seconds={elapsed:.2} rps={rps:.0} p50_us={:.1} \
         p99_us={:.1} p999_us={:.1}\n",
        args.op,
        args.clients,
        all.len(),
        percentile(&all, 0.50),
        percentile(&all, 0.99),
        percentile(&all, 0.999)
    );
    if let Some((rss, hwm)) = memory {
        out.push_str(&format!("kmsd_rss_kib={rss} kmsd_peak_kib={hwm}\n"));
    }
    // A closed stdout (`| head -1`) is not an error worth a panic.
    let _ = std::io::stdout().write_all(out.as_bytes());
    Ok(())
}
