//! KEK rotation: `kms_command::rotate_kek` over a store of 10,000 keys, and the key-wrap work
//! inside it (every DEK unwrapped by the old KEK and wrapped by the new) batched and one by one.

use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};
use kms_core::wrap::{Kek, KeyWrapper};
use kms_core::{KeyId, KeyProvider, KeySpec, SecretBytes};

use crate::report::{Row, Table, per_second};

/// Keys in the rotated store.
const KEYS: usize = 10_000;

/// `KEYS` as written in the table.
const KEYS_SHOWN: &str = "10,000";

/// Rotations timed; the best is kept.
const ROUNDS: usize = 3;

pub fn run(table: &mut Table) -> Result<()> {
    // 1. A command-provider store of `KEYS` keys, made by 8 threads.
    let dir = crate::scratch_dir("rotate")?;
    let options = kms_command::Options {
        dir: dir.clone(),
        passphrase_command: "printf kms-bench".into(),
        timeout: 30.0,
        iterations: kms_core::kdf::MIN_ITERATIONS,
    };
    kms_command::init(&options)?;
    let ids = fill(&options)?;

    // 2. Rotations of the same store, each re-wrapping every key; the best kept.
    let mut best = Duration::MAX;
    for _ in 0..ROUNDS {
        let start = Instant::now();
        let rotated = kms_command::rotate_kek(&options, |_| {})?;
        best = best.min(start.elapsed());
        if rotated.rewrapped != KEYS {
            bail!(
                "the rotation re-wrapped {} keys of {KEYS}",
                rotated.rewrapped
            );
        }
    }
    let provider = kms_command::open(&options)?;
    for id in [&ids[0], &ids[KEYS - 1]] {
        provider.get(id).context("a key after the rotations")?;
    }
    drop(provider);
    std::fs::remove_dir_all(&dir).with_context(|| format!("cannot remove {}", dir.display()))?;

    // 3. The key-wrap work of one rotation alone, batched and one by one.
    let (batched, one_by_one) = rewrap_work(&ids)?;

    table.push(Row::new(
        format!("KEK rotation of {KEYS_SHOWN} keys, command provider: time (keys/s)"),
        format!(
            "{:.1} ms ({})",
            best.as_secs_f64() * 1000.0,
            per_second(KEYS as f64 / best.as_secs_f64())
        ),
    ));
    table.push(
        Row::new(
            format!("its key-wrap work: unwrap_many + wrap_many of {KEYS_SHOWN} DEKs"),
            format!("{:.1} ms", batched.as_secs_f64() * 1000.0),
        )
        .against(
            format!("one by one: {:.1} ms", one_by_one.as_secs_f64() * 1000.0),
            Some(one_by_one.as_secs_f64() / batched.as_secs_f64()),
        ),
    );
    table.note(format!(
        "rotate: kms_command::rotate_kek on a store of {KEYS_SHOWN} 32-byte keys under {}, \
         rotated {ROUNDS} times (each re-wraps every key, 512 rows per fsynced transaction), the \
         fastest kept; the key-wrap row times the same unwrap-then-wrap of {KEYS_SHOWN} keys \
         from one local KEK to another \
         outside the store, batched (256 per call, as the rotation does) and with Kek::unwrap + \
         Kek::wrap per key; its ratio is the speed-up of batching",
        dir.display()
    ));
    Ok(())
}

/// Creates `KEYS` keys from 8 threads; returns their ids.
fn fill(options: &kms_command::Options) -> Result<Vec<KeyId>> {
    let ids = (0..KEYS)
        .map(|i| KeyId::new(&format!("db/16384/rel/{i:05}")))
        .collect::<kms_core::Result<Vec<_>>>()?;
    let provider = kms_command::open(options)?;
    std::thread::scope(|scope| {
        let workers: Vec<_> = ids
            .chunks(KEYS.div_ceil(8))
            .map(|mine| {
                let provider = &provider;
                scope.spawn(move || -> kms_core::Result<()> {
                    for id in mine {
                        provider.create(id, KeySpec::default())?;
                    }
                    Ok(())
                })
            })
            .collect();
        for worker in workers {
            worker.join().expect("a create thread panicked")?;
        }
        anyhow::Ok(())
    })?;
    Ok(ids)
}

/// The time to re-wrap `ids`' DEKs from one local KEK to another: batched, and one by one.
fn rewrap_work(ids: &[KeyId]) -> Result<(Duration, Duration)> {
    let old = Kek::new(&SecretBytes::random(Kek::LEN)?)?;
    let new = Kek::new(&SecretBytes::random(Kek::LEN)?)?;
    let mut blobs = Vec::with_capacity(ids.len());
    for id in ids {
        blobs.push(old.wrap(id, 1, &SecretBytes::random(32)?)?);
    }

    let mut batched = Duration::MAX;
    let mut single = Duration::MAX;
    for _ in 0..ROUNDS {
        let start = Instant::now();
        for (ids, blobs) in ids.chunks(256).zip(blobs.chunks(256)) {
            let sealed: Vec<_> = ids
                .iter()
                .zip(blobs)
                .map(|(id, b)| (id, 1, &b[..]))
                .collect();
            let deks = old
                .unwrap_many(&sealed)
                .into_iter()
                .collect::<kms_core::Result<Vec<_>>>()?;
            let items: Vec<_> = ids.iter().zip(&deks).map(|(id, d)| (id, 1, d)).collect();
            for wrapped in new.wrap_many(&items) {
                std::hint::black_box(wrapped?);
            }
        }
        batched = batched.min(start.elapsed());

        let start = Instant::now();
        for (id, blob) in ids.iter().zip(&blobs) {
            let dek = old.unwrap(id, 1, blob)?;
            std::hint::black_box(new.wrap(id, 1, &dek)?);
        }
        single = single.min(start.elapsed());
    }
    Ok((batched, single))
}
