//! `kms-bench compare`: kmsd against OpenBao Transit and against the pkcs11 provider on
//! SoftHSM, all driven by the same load generator (`kms-load`) in the same run.
//!
//! Started here, on loopback, and stopped at the end:
//!
//! - kmsd over the file provider twice on one store: with its cache (cached `GET`, durable
//!   `GET-OR-CREATE` of new ids) and with a cache of one key (uncached `GET`: 4,096 keys, each
//!   client walking its own run of them, so every `GET` reads the store and unwraps);
//! - `bao server -dev` (in-memory storage, the fastest OpenBao there is), with Transit: the
//!   peers `decrypt` (of kmsd's `GET`) and `datakey/plaintext` (of `GET-OR-CREATE`);
//! - kmsd over the openbao provider on that server, cache of one key: every `GET` is a Transit
//!   decrypt through kmsd;
//! - a SoftHSM2 token and kmsd over the pkcs11 provider, cache of one key: every `GET` is an
//!   unwrap in the token, every create a wrap in it.
//!
//! Each load runs `LOAD_SECONDS` with 1, 8 and 32 clients; for each client count every target
//! is measured in turn before the next count, so that all ratios come from minutes apart.

use std::io::{BufRead as _, BufReader};
use std::net::TcpListener;
use std::os::unix::fs::PermissionsExt as _;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};

use crate::report::{Row, Table};

/// How long each load runs.
const LOAD_SECONDS: &str = "3";

/// Keys asked in turn by the uncached loads. kmsd's cache of "one key" keeps one per shard
/// (16), so with this many keys a key's slot is almost always taken again before it comes
/// back; the table shows the hit share measured from kmsd's own counters.
const UNCACHED_KEYS: &str = "4096";

/// The client counts of the issue.
const CLIENTS: [usize; 3] = [1, 8, 32];

/// BRIEF section 9: cached `GET` through kmsd at least 30x Transit decrypt, p99 under 1 ms,
/// with 8 clients; at least 5,000 durable creates per second with 8 clients.
const GET_BAR: f64 = 30.0;
const GET_P99_BAR_US: f64 = 1000.0;
const CREATE_BAR: f64 = 5000.0;
const BAR_CLIENTS: usize = 8;

/// SoftHSM2's module as Debian installs it.
const SOFTHSM_MODULE: &str = "/usr/lib/softhsm/libsofthsm2.so";
const HSM_PIN: &str = "2468-bench";
const HSM_PIN_ENV: &str = "KMS_BENCH_PKCS11_PIN";

/// What one `kms-load` run reports.
#[derive(Clone, Copy)]
struct Load {
    rps: f64,
    requests: f64,
    p50_us: f64,
    p99_us: f64,
    /// kmsd's cache hits and provider calls during the run (none for OpenBao).
    cache: Option<(f64, f64)>,
}

impl Load {
    fn show(&self) -> String {
        let mut shown = format!(
            "{}/s, p50 {}, p99 {}",
            thousands(self.rps),
            micros(self.p50_us),
            micros(self.p99_us)
        );
        if let Some((hits, calls)) = self.cache {
            let requests = self.requests.max(1.0);
            shown.push_str(&format!(
                ", {:.1}% cache hits, {:.2} provider calls per request",
                100.0 * hits / requests,
                calls / requests
            ));
        }
        shown
    }
}

fn thousands(value: f64) -> String {
    let digits = format!("{:.0}", value);
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    out
}

fn micros(us: f64) -> String {
    if us >= 1000.0 {
        format!("{:.2} ms", us / 1000.0)
    } else {
        format!("{us:.0} us")
    }
}

/// The loads measured, one per target and client count.
#[derive(Default)]
struct Figures {
    cached_get: Vec<Result<Load>>,
    uncached_get: Vec<Result<Load>>,
    create: Vec<Result<Load>>,
    transit_decrypt: Vec<Result<Load>>,
    transit_datakey: Vec<Result<Load>>,
    openbao_get: Vec<Result<Load>>,
    pkcs11_get: Vec<Result<Load>>,
    pkcs11_create: Vec<Result<Load>>,
}

pub fn run(table: &mut Table) -> Result<()> {
    let bins = Binaries::find()?;
    let scratch = crate::scratch_dir("compare")?;
    std::fs::create_dir_all(&scratch)?;
    std::fs::set_permissions(&scratch, std::fs::Permissions::from_mode(0o700))?;

    // 1. Everything under load is started first.
    let file_dir = scratch.join("file");
    kms_file::init(&kms_file::Options::in_dir(&file_dir))?;
    let file_options = format!("dir = {:?}\n", file_dir.display().to_string());
    let cached = Kmsd::start(
        &bins,
        &scratch,
        "file-cached",
        "file",
        &file_options,
        100_000,
        &[],
    )?;
    let uncached = Kmsd::start(
        &bins,
        &scratch,
        "file-uncached",
        "file",
        &file_options,
        1,
        &[],
    )?;
    let bao = Bao::start(&scratch.join("bao"));
    let openbao = match &bao {
        Ok(bao) => bao.kmsd(&bins, &scratch),
        Err(e) => Err(anyhow::anyhow!("no OpenBao server: {e:#}")),
    };
    let pkcs11 = pkcs11_kmsd(&bins, &scratch);

    // 2. The loads, every target for one client count before the next count.
    let mut figures = Figures::default();
    for clients in CLIENTS {
        let c = clients.to_string();
        let common = ["--clients", c.as_str(), "--seconds", LOAD_SECONDS];
        let on = |kmsd: &Kmsd, op: &str, prefix: &str| -> Result<Load> {
            let socket = kmsd.socket.display().to_string();
            let keys = if kmsd.cache_size == 1 {
                UNCACHED_KEYS
            } else {
                "64"
            };
            let args = [
                &common[..],
                &[
                    "--socket", &socket, "--op", op, "--prefix", prefix, "--keys", keys,
                ],
            ];
            load(&bins, &args.concat(), &[])
        };
        figures.cached_get.push(on(&cached, "get", "bench/get"));
        figures
            .uncached_get
            .push(on(&uncached, "get", "bench/uncached"));
        figures
            .create
            .push(on(&cached, "get-or-create-new", "bench/new"));
        match &bao {
            Ok(bao) => {
                let env = [("BAO_TOKEN", bao.token.as_str())];
                for (op, into) in [
                    ("transit-decrypt", &mut figures.transit_decrypt),
                    ("transit-datakey", &mut figures.transit_datakey),
                ] {
                    let args = [&common[..], &["--openbao", &bao.addr, "--op", op]];
                    into.push(load(&bins, &args.concat(), &env));
                }
            }
            Err(e) => {
                figures.transit_decrypt.push(Err(anyhow::anyhow!("{e:#}")));
                figures.transit_datakey.push(Err(anyhow::anyhow!("{e:#}")));
            }
        }
        figures
            .openbao_get
            .push(with(&openbao, |k| on(k, "get", "bench/openbao")));
        figures
            .pkcs11_get
            .push(with(&pkcs11, |k| on(k, "get", "bench/pkcs11")));
        figures.pkcs11_create.push(with(&pkcs11, |k| {
            on(k, "get-or-create-new", "bench/pkcs11-new")
        }));
    }
    drop((cached, uncached, openbao, pkcs11, bao));
    let _ = std::fs::remove_dir_all(&scratch);

    // 3. The rows.
    push_rows(table, &figures);
    table.note(format!(
        "kmsd and OpenBao: each load is `kms-load` (one thread and connection per client, one \
         request at a time), {LOAD_SECONDS} s per figure; kmsd on a Unix socket, OpenBao \
         `bao server -dev` (in-memory storage) over HTTP on loopback. Clients and servers share \
         the machine's cores. Uncached GET: kmsd with `cache_size = 1` (one key per cache shard, 16 in all) and 4,096 keys, each client walking its own run of them; hits and provider calls (get and get_or_create) per request are read from kmsd's STATS counters."
    ));
    Ok(())
}

fn with(kmsd: &Result<Kmsd>, f: impl FnOnce(&Kmsd) -> Result<Load>) -> Result<Load> {
    match kmsd {
        Ok(kmsd) => f(kmsd),
        Err(e) => Err(anyhow::anyhow!("{e:#}")),
    }
}

fn push_rows(table: &mut Table, f: &Figures) {
    for (i, clients) in CLIENTS.iter().copied().enumerate() {
        let n = format!("{clients} client{}", if clients == 1 { "" } else { "s" });
        let at_bar = clients == BAR_CLIENTS;

        let decrypt = &f.transit_decrypt[i];
        let datakey = &f.transit_datakey[i];
        let row = versus(
            format!("cached GET, kmsd (file provider), {n}"),
            &f.cached_get[i],
            "Transit decrypt",
            decrypt,
        );
        let row = match (&f.cached_get[i], decrypt) {
            (Ok(k), Ok(b)) if at_bar => row.bar(
                format!(">= {GET_BAR}x, p99 < 1 ms"),
                k.rps / b.rps >= GET_BAR && k.p99_us < GET_P99_BAR_US,
            ),
            _ => row,
        };
        table.push(row);
        table.push(versus(
            format!("uncached GET, kmsd (file provider), {n}"),
            &f.uncached_get[i],
            "Transit decrypt",
            decrypt,
        ));
        let row = versus(
            format!("durable GET-OR-CREATE of new ids, kmsd (file provider), {n}"),
            &f.create[i],
            "Transit datakey",
            datakey,
        );
        let row = match &f.create[i] {
            Ok(k) if at_bar => row.bar(">= 5,000/s", k.rps >= CREATE_BAR),
            _ => row,
        };
        table.push(row);
        table.push(versus(
            format!("uncached GET, kmsd (openbao provider: a Transit decrypt each), {n}"),
            &f.openbao_get[i],
            "Transit decrypt",
            decrypt,
        ));
        table.push(versus(
            format!("uncached GET, kmsd (pkcs11 provider, SoftHSM2), {n}"),
            &f.pkcs11_get[i],
            "Transit decrypt",
            decrypt,
        ));
        table.push(versus(
            format!("durable GET-OR-CREATE of new ids, kmsd (pkcs11, SoftHSM2), {n}"),
            &f.pkcs11_create[i],
            "Transit datakey",
            datakey,
        ));
    }
}

/// A row of a kmsd figure against an OpenBao one.
fn versus(measure: String, kms: &Result<Load>, peer: &str, reference: &Result<Load>) -> Row {
    let shown = match kms {
        Ok(load) => load.show(),
        Err(e) => format!("not measured: {e:#}"),
    };
    let (against, ratio) = match (kms, reference) {
        (Ok(k), Ok(r)) => (format!("{peer}: {}", r.show()), Some(k.rps / r.rps)),
        (_, Ok(r)) => (format!("{peer}: {}", r.show()), None),
        (_, Err(e)) => (format!("{peer}: not measured: {e:#}"), None),
    };
    Row::new(measure, shown).against(against, ratio)
}

/// `kmsd`, `kms-load` and `kms`, beside this binary (`bench/compare.sh` builds them).
struct Binaries {
    kmsd: PathBuf,
    load: PathBuf,
    kms: PathBuf,
}

impl Binaries {
    fn find() -> Result<Binaries> {
        let exe = std::env::current_exe().context("cannot find the benchmark binary")?;
        let beside = |name: &str| -> Result<PathBuf> {
            let path = exe.with_file_name(name);
            if !path.is_file() {
                bail!(
                    "{} is missing: build it first (`cargo build --release -p kmsd -p kms-cli`, \
                     or run bench/compare.sh, which does)",
                    path.display()
                );
            }
            Ok(path)
        };
        Ok(Binaries {
            kmsd: beside("kmsd")?,
            load: beside("kms-load")?,
            kms: beside("kms")?,
        })
    }
}

/// Runs `kms-load ARGS` and reads its `rps= p50_us= p99_us=` line.
fn load(bins: &Binaries, args: &[&str], env: &[(&str, &str)]) -> Result<Load> {
    let mut command = Command::new(&bins.load);
    command.args(args).stdin(Stdio::null());
    for (name, value) in env {
        command.env(name, value);
    }
    let out = command
        .output()
        .with_context(|| format!("cannot run {}", bins.load.display()))?;
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr);
        let last = stderr.lines().last().unwrap_or("no message").trim();
        bail!("{}", last.trim_start_matches("kms-load: "));
    }
    let stdout = String::from_utf8_lossy(&out.stdout);
    let field = |name: &str| -> Result<f64> {
        stdout
            .split_whitespace()
            .find_map(|pair| pair.strip_prefix(name)?.strip_prefix('='))
            .and_then(|value| value.parse().ok())
            .with_context(|| format!("kms-load printed no {name}: {stdout:?}"))
    };
    let cache = match (field("kmsd_cache_hits"), field("kmsd_provider_calls")) {
        (Ok(hits), Ok(calls)) => Some((hits, calls)),
        _ => None,
    };
    Ok(Load {
        rps: field("rps")?,
        requests: field("requests")?,
        p50_us: field("p50_us")?,
        p99_us: field("p99_us")?,
        cache,
    })
}

/// A kmsd started here, killed on drop.
struct Kmsd {
    child: Child,
    socket: PathBuf,
    cache_size: usize,
}

impl Kmsd {
    /// Writes `<scratch>/<name>.toml` for `provider` with `options` and starts kmsd on it.
    fn start(
        bins: &Binaries,
        scratch: &Path,
        name: &str,
        provider: &str,
        options: &str,
        cache_size: usize,
        env: &[(&str, &str)],
    ) -> Result<Kmsd> {
        let socket = scratch.join(format!("{name}.sock"));
        let config = scratch.join(format!("{name}.toml"));
        let text = format!(
            "[provider]\nname = \"{provider}\"\n[provider.options]\n{options}\
             [server]\nsocket = {:?}\ncache_size = {cache_size}\n",
            socket.display().to_string()
        );
        std::fs::write(&config, text)?;
        let log = std::fs::File::create(scratch.join(format!("{name}.log")))?;
        let mut command = Command::new(&bins.kmsd);
        command
            .arg("--config")
            .arg(&config)
            .args(["--log-level", "warn"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log);
        for (key, value) in env {
            command.env(key, value);
        }
        let child = command
            .spawn()
            .with_context(|| format!("cannot start {}", bins.kmsd.display()))?;
        let mut kmsd = Kmsd {
            child,
            socket,
            cache_size,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        while !greets(&kmsd.socket) {
            if let Ok(Some(status)) = kmsd.child.try_wait() {
                let log = std::fs::read_to_string(scratch.join(format!("{name}.log")))
                    .unwrap_or_default();
                bail!("kmsd ({name}) exited with {status}: {}", log.trim());
            }
            if Instant::now() > deadline {
                bail!("kmsd ({name}) did not answer on {}", kmsd.socket.display());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(kmsd)
    }
}

/// Whether a kmsd greets on `socket`.
fn greets(socket: &Path) -> bool {
    let Ok(stream) = UnixStream::connect(socket) else {
        return false;
    };
    let mut line = String::new();
    BufReader::new(stream).read_line(&mut line).is_ok() && line.starts_with("KMS/1")
}

impl Drop for Kmsd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs `kms --config CONFIG init` with `env`.
fn kms_init(bins: &Binaries, config: &Path, env: &[(&str, &str)]) -> Result<()> {
    let mut command = Command::new(&bins.kms);
    command.arg("--config").arg(config).arg("init");
    for (key, value) in env {
        command.env(key, value);
    }
    crate::run_checked(&mut command, "kms init").map(drop)
}

/// A SoftHSM2 token in `<scratch>/hsm` and a kmsd over the pkcs11 provider on it.
fn pkcs11_kmsd(bins: &Binaries, scratch: &Path) -> Result<Kmsd> {
    if !Path::new(SOFTHSM_MODULE).exists() {
        bail!("SoftHSM2 is not installed ({SOFTHSM_MODULE}; apt-get install softhsm2)");
    }
    let hsm = scratch.join("hsm");
    let tokens = hsm.join("tokens");
    std::fs::create_dir_all(&tokens)?;
    let conf = hsm.join("softhsm2.conf");
    std::fs::write(
        &conf,
        format!(
            "directories.tokendir = {}\nobjectstore.backend = file\nlog.level = ERROR\n",
            tokens.display()
        ),
    )?;
    let conf_text = conf.display().to_string();
    crate::run_checked(
        Command::new("softhsm2-util")
            .args(["--init-token", "--free", "--label", "kms-bench"])
            .args(["--pin", HSM_PIN, "--so-pin", "1357-bench"])
            .env("SOFTHSM2_CONF", &conf),
        "softhsm2-util --init-token",
    )?;
    let options = format!(
        "dir = {:?}\nmodule = \"{SOFTHSM_MODULE}\"\ntoken_label = \"kms-bench\"\n\
         key_label = \"kms-kek\"\npin_env = \"{HSM_PIN_ENV}\"\n",
        hsm.join("store").display().to_string()
    );
    let env = [
        ("SOFTHSM2_CONF", conf_text.as_str()),
        (HSM_PIN_ENV, HSM_PIN),
    ];
    let config = hsm.join("init.toml");
    std::fs::write(
        &config,
        format!("[provider]\nname = \"pkcs11\"\n[provider.options]\n{options}"),
    )?;
    kms_init(bins, &config, &env)?;
    Kmsd::start(bins, scratch, "pkcs11", "pkcs11", &options, 1, &env)
}

/// `bao server -dev` on a free loopback port with Transit enabled; killed on drop.
struct Bao {
    child: Child,
    addr: String,
    token: String,
    dir: PathBuf,
}

impl Bao {
    fn start(dir: &Path) -> Result<Bao> {
        let bin = std::env::var_os("KMS_BAO").map_or_else(|| PathBuf::from("bao"), PathBuf::from);
        std::fs::create_dir_all(dir)?;
        let port = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        let token = format!("bench-{}", std::process::id());
        let log = std::fs::File::create(dir.join("server.log"))?;
        let child = Command::new(&bin)
            .arg("server")
            .arg("-dev")
            .arg(format!("-dev-root-token-id={token}"))
            .arg(format!("-dev-listen-address=127.0.0.1:{port}"))
            .env("HOME", dir)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| {
                format!(
                    "cannot start {} (install OpenBao; see .ci/run)",
                    bin.display()
                )
            })?;
        let mut bao = Bao {
            child,
            addr: format!("http://127.0.0.1:{port}"),
            token,
            dir: dir.to_path_buf(),
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        while bao.cli(&bin, &["status"]).is_err() {
            if let Ok(Some(status)) = bao.child.try_wait() {
                let log = std::fs::read_to_string(dir.join("server.log")).unwrap_or_default();
                bail!("bao server exited with {status}: {}", log.trim());
            }
            if Instant::now() > deadline {
                bail!("bao server did not come up on {}", bao.addr);
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        bao.cli(&bin, &["secrets", "enable", "transit"])?;
        bao.cli(&bin, &["write", "-f", "transit/keys/kms", "derived=true"])?;
        Ok(bao)
    }

    fn cli(&self, bin: &Path, args: &[&str]) -> Result<String> {
        crate::run_checked(
            Command::new(bin)
                .args(args)
                .env("BAO_ADDR", &self.addr)
                .env("BAO_TOKEN", &self.token)
                .env("HOME", &self.dir)
                .stdin(Stdio::null()),
            &format!("{} {}", bin.display(), args.join(" ")),
        )
    }

    /// kmsd over the openbao provider on this server, with a cache of one key.
    fn kmsd(&self, bins: &Binaries, scratch: &Path) -> Result<Kmsd> {
        let token_file = scratch.join("bao-token");
        std::fs::write(&token_file, format!("{}\n", self.token))?;
        std::fs::set_permissions(&token_file, std::fs::Permissions::from_mode(0o600))?;
        let options = format!(
            "dir = {:?}\naddress = \"{}\"\nkey = \"kms\"\ntoken_file = {:?}\n",
            scratch.join("openbao-store").display().to_string(),
            self.addr,
            token_file.display().to_string()
        );
        let config = scratch.join("openbao-init.toml");
        std::fs::write(
            &config,
            format!("[provider]\nname = \"openbao\"\n[provider.options]\n{options}"),
        )?;
        kms_init(bins, &config, &[])?;
        Kmsd::start(bins, scratch, "openbao", "openbao", &options, 1, &[])
    }
}

impl Drop for Bao {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
