//! A store of a million keys: built once (and kept under the target directory), then opened and
//! read in a fresh child process, so that its open time, `get` latency and peak RSS are its own.

use std::collections::{BTreeMap, HashSet};
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context as _, Result, bail};
use kms_core::wrap::{Kek, KeyWrapper};
use kms_core::{KeyId, KeyProvider, SecretBytes};
use kms_file::{MASTER_KEY_FILE, Options, STORE_FILE};
use rusqlite::{Connection, params};

use crate::report::{Row, Table};
use crate::timing::{XorShift, percentile};

/// The hidden subcommand the parent runs in a child process.
pub const PROBE_COMMAND: &str = "__million-probe";

/// Keys in the store.
const KEYS: u64 = 1_000_000;

/// Random ids read by a probe.
const SAMPLES: usize = 10_000;

/// Written last into a complete store; its text names what was built.
const MARKER_FILE: &str = "kms-bench-complete";
const MARKER_TEXT: &str = "keys=1000000 ids=db/NNN/rel/NNNNNNN len=32\n";

/// The bars of BRIEF section 9.
const OPEN_BAR: Duration = Duration::from_millis(200);
const GET_P99_BAR: Duration = Duration::from_micros(200);

/// The id of key `i`: zero-padded, so ids sort in the order they are made.
fn key_id(i: u64) -> String {
    format!("db/{:03}/rel/{i:07}", i / 10_000)
}

/// What a probe measured.
struct Probe {
    open: Duration,
    p50: Duration,
    p99: Duration,
    max: Duration,
    vm_hwm_kib: u64,
}

pub fn run(table: &mut Table) -> Result<()> {
    // 1. The store: kept from an earlier run if complete, else built now.
    let dir = crate::target_dir()?.join("kms-bench-million");
    let built = ensure_store(&dir)?;
    let size = store_size(&dir)?;

    // 2. A probe with the file evicted from the OS page cache, then one with it cached.
    let seed = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(1, |d| d.as_nanos() as u64);
    let cold = probe_in_child(&dir, "cold", seed)?;
    read_through(&dir.join(STORE_FILE))?;
    let warm = probe_in_child(&dir, "warm", seed.rotate_left(17) ^ 0x9e37)?;

    // 3. The rows.
    push_rows(table, &dir, built, size, &cold, &warm);
    Ok(())
}

fn push_rows(
    table: &mut Table,
    dir: &Path,
    built: Option<Duration>,
    size: u64,
    cold: &Probe,
    warm: &Probe,
) {
    let build = match built {
        Some(took) => format!("built in {:.1} s", took.as_secs_f64()),
        None => "kept from an earlier run".to_string(),
    };
    table.push(Row::new("1,000,000-key store: build", build));
    table.push(Row::new(
        "1,000,000-key store: file size",
        format!("{:.1} MB", size as f64 / 1e6),
    ));
    for (cache, probe) in [("OS cache cold", cold), ("OS cache warm", warm)] {
        table.push(
            Row::new(
                format!("open (kms_file::open), {cache}"),
                millis(probe.open),
            )
            .bar("< 200 ms", probe.open < OPEN_BAR),
        );
        table.push(Row::new(
            format!("uncached get p50 (max {}), {cache}", micros(probe.max)),
            micros(probe.p50),
        ));
        table.push(
            Row::new(format!("uncached get p99, {cache}"), micros(probe.p99))
                .bar("< 200 us", probe.p99 < GET_P99_BAR),
        );
        table.push(Row::new(
            format!("peak RSS of the probe process (VmHWM), {cache}"),
            format!("{:.1} MiB", probe.vm_hwm_kib as f64 / 1024.0),
        ));
    }
    table.note(format!(
        "million: store in {}; each probe is a fresh child process that opens the store with \
         kms_file::open and reads 10,000 distinct random ids never read before in that process \
         through provider.get (row read + unwrap), each timed alone; cold = keys.db evicted from \
         the page cache with posix_fadvise(DONTNEED) first, warm = the file read through once \
         first",
        dir.display()
    ));
}

fn millis(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1e3)
}

fn micros(d: Duration) -> String {
    format!("{:.1} us", d.as_secs_f64() * 1e6)
}

/// Makes sure a complete store is at `dir`; the time it took to build, if it was built now.
fn ensure_store(dir: &Path) -> Result<Option<Duration>> {
    if is_complete(dir) {
        return Ok(None);
    }
    if dir.exists() {
        fs::remove_dir_all(dir).with_context(|| format!("cannot remove {}", dir.display()))?;
    }
    let start = Instant::now();
    build(dir)?;
    Ok(Some(start.elapsed()))
}

/// Whether `dir` holds a store this benchmark finished building and kms can read.
fn is_complete(dir: &Path) -> bool {
    let marked = fs::read_to_string(dir.join(MARKER_FILE)).is_ok_and(|m| m == MARKER_TEXT);
    marked && first_and_last_readable(dir).is_ok()
}

fn first_and_last_readable(dir: &Path) -> Result<()> {
    let provider = kms_file::open(&Options::in_dir(dir))?;
    for i in [0, KEYS - 1] {
        provider.get(&KeyId::new(&key_id(i))?)?;
    }
    Ok(())
}

/// Builds the store under a temporary name and renames it into place once complete.
fn build(dir: &Path) -> Result<()> {
    let building = PathBuf::from(format!("{}.building", dir.display()));
    if building.exists() {
        fs::remove_dir_all(&building)
            .with_context(|| format!("cannot remove {}", building.display()))?;
    }

    // 1. An empty store made by kms itself: master key, schema and KEK metadata.
    let options = Options::in_dir(&building);
    kms_file::init(&options)?;

    // 2. A million rows in one transaction, wrapped with the store's own master key.
    let master = fs::read(building.join(MASTER_KEY_FILE)).context("cannot read the master key")?;
    let kek = Kek::new(&SecretBytes::new(master))?;
    insert_rows(&building.join(STORE_FILE), &kek)?;

    // 3. kms reads it back; then it is marked complete and moved into place.
    first_and_last_readable(&building)?;
    fs::write(building.join(MARKER_FILE), MARKER_TEXT).context("cannot write the marker")?;
    fs::rename(&building, dir)
        .with_context(|| format!("cannot rename {} into place", building.display()))
}

/// Inserts `KEYS` version-1 rows in the layout of `kms_core::store` (`Store::insert` of a
/// `Record` with KEK generation 1, a 32-byte length and a blob from `Kek::wrap_many`).
fn insert_rows(path: &Path, kek: &Kek) -> Result<()> {
    const CHUNK: u64 = 4096;
    const DEK_LEN: usize = 32;
    let mut conn = Connection::open(path)?;
    // A cache, not a store of record: its completeness is the marker written after the final
    // checkpoint and fsync.
    conn.pragma_update(None, "synchronous", "OFF")?;
    conn.pragma_update(None, "cache_size", -262_144)?;
    let created = SystemTime::now().duration_since(UNIX_EPOCH)?.as_secs() as i64;

    let tx = conn.transaction()?;
    {
        let mut insert = tx.prepare(
            "INSERT INTO keys (id, version, kek, len, created, wrapped) \
             VALUES (?1, 1, 1, ?2, ?3, ?4)",
        )?;
        for first in (0..KEYS).step_by(CHUNK as usize) {
            let ids = (first..KEYS.min(first + CHUNK))
                .map(|i| KeyId::new(&key_id(i)))
                .collect::<kms_core::Result<Vec<KeyId>>>()?;
            let random = SecretBytes::random(CHUNK as usize * DEK_LEN)?;
            let deks: Vec<SecretBytes> = random
                .expose_secret()
                .chunks(DEK_LEN)
                .map(SecretBytes::copy_from)
                .collect();
            let items: Vec<_> = ids
                .iter()
                .zip(&deks)
                .map(|(id, dek)| (id, 1, dek))
                .collect();
            for (id, wrapped) in ids.iter().zip(kek.wrap_many(&items)) {
                insert.execute(params![id.as_str(), DEK_LEN as i64, created, wrapped?])?;
            }
        }
    }
    tx.commit()?;
    conn.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()))?;
    drop(conn);
    fs::File::open(path)?.sync_all()?;
    Ok(())
}

fn store_size(dir: &Path) -> Result<u64> {
    let path = dir.join(STORE_FILE);
    let md = fs::metadata(&path).with_context(|| format!("cannot stat {}", path.display()))?;
    Ok(md.len())
}

/// Reads the file once, so that it sits in the OS page cache.
fn read_through(path: &Path) -> Result<()> {
    let mut file = fs::File::open(path)?;
    std::io::copy(&mut file, &mut std::io::sink())?;
    Ok(())
}

/// Runs a probe in a fresh process of this binary and reads its figures.
fn probe_in_child(dir: &Path, cache: &str, seed: u64) -> Result<Probe> {
    let exe = std::env::current_exe()?;
    let stdout = crate::run_checked(
        Command::new(exe)
            .arg(PROBE_COMMAND)
            .arg(dir)
            .arg(cache)
            .arg(seed.to_string()),
        "the probe process",
    )?;
    parse_probe(&stdout)
}

fn parse_probe(line: &str) -> Result<Probe> {
    let fields: BTreeMap<&str, u64> = line
        .split_whitespace()
        .filter_map(|f| f.split_once('='))
        .filter_map(|(k, v)| Some((k, v.parse().ok()?)))
        .collect();
    let get = |name: &str| {
        fields
            .get(name)
            .copied()
            .with_context(|| format!("the probe printed no {name}: {line:?}"))
    };
    Ok(Probe {
        open: Duration::from_nanos(get("open_ns")?),
        p50: Duration::from_nanos(get("p50_ns")?),
        p99: Duration::from_nanos(get("p99_ns")?),
        max: Duration::from_nanos(get("max_ns")?),
        vm_hwm_kib: get("vm_hwm_kib")?,
    })
}

/// The child side: `__million-probe DIR cold|warm SEED`.
pub fn probe(args: &[String]) -> Result<()> {
    let [dir, cache, seed] = args else {
        bail!("usage: kms-bench {PROBE_COMMAND} DIR cold|warm SEED");
    };
    let dir = PathBuf::from(dir);
    let seed: u64 = seed.parse().context("SEED is a number")?;

    // 1. The ids, made before anything is timed.
    let ids = sample_ids(seed)?;

    // 2. A cold probe starts with the store out of the page cache.
    match cache.as_str() {
        "cold" => evict(&dir.join(STORE_FILE))?,
        "warm" => {}
        other => bail!("unknown cache state {other:?}"),
    }

    // 3. Open, then one get per id, each timed alone.
    let start = Instant::now();
    let provider = kms_file::open(&Options::in_dir(&dir))?;
    let open = start.elapsed();
    let mut latencies = Vec::with_capacity(ids.len());
    for id in &ids {
        let start = Instant::now();
        let key = provider.get(id)?;
        latencies.push(start.elapsed());
        std::hint::black_box(key);
    }
    latencies.sort_unstable();

    // 4. The figures, for the parent.
    println!(
        "open_ns={} p50_ns={} p99_ns={} max_ns={} vm_hwm_kib={}",
        open.as_nanos(),
        percentile(&latencies, 50.0).as_nanos(),
        percentile(&latencies, 99.0).as_nanos(),
        latencies.last().copied().unwrap_or_default().as_nanos(),
        vm_hwm_kib()?
    );
    Ok(())
}

/// `SAMPLES` distinct ids of the store, drawn at random.
fn sample_ids(seed: u64) -> Result<Vec<KeyId>> {
    let mut rng = XorShift::new(seed);
    let mut seen = HashSet::with_capacity(SAMPLES);
    let mut ids = Vec::with_capacity(SAMPLES);
    while ids.len() < SAMPLES {
        let i = rng.below(KEYS);
        if seen.insert(i) {
            ids.push(KeyId::new(&key_id(i))?);
        }
    }
    Ok(ids)
}

/// Drops the file's pages from the OS page cache.
fn evict(path: &Path) -> Result<()> {
    let file = fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    rustix::fs::fadvise(&file, 0, None, rustix::fs::Advice::DontNeed)
        .with_context(|| format!("cannot evict {} from the page cache", path.display()))
}

/// Peak resident set size of this process, from `/proc/self/status`.
fn vm_hwm_kib() -> Result<u64> {
    let status = fs::read_to_string("/proc/self/status")?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .context("no VmHWM in /proc/self/status")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_sort_in_the_order_they_are_made() {
        assert_eq!(key_id(0), "db/000/rel/0000000");
        assert_eq!(key_id(KEYS - 1), "db/099/rel/0999999");
        assert!(key_id(9_999) < key_id(10_000));
        assert!(KeyId::new(&key_id(123_456)).is_ok());
    }

    #[test]
    fn parses_a_probe_line() {
        let p = parse_probe("open_ns=5 p50_ns=1 p99_ns=2 max_ns=3 vm_hwm_kib=4\n").unwrap();
        assert_eq!(
            (p.open, p.p99, p.vm_hwm_kib),
            (Duration::from_nanos(5), Duration::from_nanos(2), 4)
        );
        assert!(parse_probe("open_ns=5").is_err());
    }
}
