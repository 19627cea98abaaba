//! Durable creates: `EnvelopeProvider::create` through the file provider, from 8 threads and
//! from 1, on a real disk so that every acknowledged create has been fsynced.

use std::sync::Barrier;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};
use kms_core::{KeyId, KeyProvider, KeySpec};
use kms_file::Options;

use crate::report::{Row, Table, per_second};

/// Creates per thread.
const PER_THREAD: usize = 2_000;

/// The bar of BRIEF section 9, with 8 concurrent clients.
const BAR: f64 = 5_000.0;

pub fn run(table: &mut Table) -> Result<()> {
    let eight = creates_per_second(8)?;
    let one = creates_per_second(1)?;

    table.push(
        Row::new(
            "durable creates, 8 threads x 2,000 (EnvelopeProvider::create)",
            per_second(eight),
        )
        .against(format!("1 thread: {}", per_second(one)), Some(eight / one))
        .bar(">= 5,000/s", eight >= BAR),
    );
    table.push(Row::new(
        "durable creates, 1 thread x 2,000",
        per_second(one),
    ));
    table.note(format!(
        "creates: a fresh file provider (kms_file::init) under {}, SQLite WAL with \
         synchronous = FULL; timed from the release of all threads to the last acknowledgement; \
         every key is then counted back with list",
        crate::target_dir()?.join("kms-bench-tmp").display()
    ));
    Ok(())
}

/// Creates per second with `threads` writers, each making `PER_THREAD` new keys.
fn creates_per_second(threads: usize) -> Result<f64> {
    // 1. A fresh provider on disk.
    let dir = crate::scratch_dir(&format!("store-{threads}"))?;
    let options = Options::in_dir(&dir);
    kms_file::init(&options)?;
    let provider = kms_file::open(&options)?;

    // 2. The ids, made before the clock starts.
    let ids: Vec<Vec<KeyId>> = (0..threads)
        .map(|t| {
            (0..PER_THREAD)
                .map(|i| KeyId::new(&format!("bench/t{t}/k{i:05}")))
                .collect::<kms_core::Result<_>>()
        })
        .collect::<kms_core::Result<_>>()?;

    // 3. All threads released at once; timed until the last one is done.
    let elapsed = timed_creates(&provider, &ids)?;

    // 4. Every acknowledged key is there.
    let stored = provider.list("bench/")?.len();
    if stored != threads * PER_THREAD {
        bail!(
            "{stored} keys stored, {} acknowledged",
            threads * PER_THREAD
        );
    }
    drop(provider);
    std::fs::remove_dir_all(&dir).with_context(|| format!("cannot remove {}", dir.display()))?;
    Ok((threads * PER_THREAD) as f64 / elapsed.as_secs_f64())
}

fn timed_creates(provider: &dyn KeyProvider, ids: &[Vec<KeyId>]) -> Result<Duration> {
    let start_line = Barrier::new(ids.len() + 1);
    std::thread::scope(|scope| {
        let workers: Vec<_> = ids
            .iter()
            .map(|mine| {
                let start_line = &start_line;
                scope.spawn(move || -> kms_core::Result<()> {
                    start_line.wait();
                    for id in mine {
                        provider.create(id, KeySpec::default())?;
                    }
                    Ok(())
                })
            })
            .collect();
        start_line.wait();
        let start = Instant::now();
        for worker in workers {
            worker.join().expect("a create thread panicked")?;
        }
        Ok(start.elapsed())
    })
}
