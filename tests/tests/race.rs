//! Racing `kms get-or-create` processes never yield two keys for one id.

use std::collections::BTreeMap;
use std::sync::Barrier;
use std::thread;

use kms_tests::{Kms, Rng, parse_hex_line};

const WORKERS: usize = 8;
const IDS: usize = 50;
const PASSES: usize = 4;

/// 8 workers each run 200 `kms get-or-create` processes, one after another, over the same 50
/// new ids (4 passes, each in the worker's own shuffled order): 1,600 processes, 8 at a time,
/// all racing to create the same keys. Every output for an id must be the same bytes, the
/// store must hold exactly 50 keys of one version, and `kms get` must return those bytes.
#[test]
fn racing_get_or_create_processes_agree_on_one_key_per_id() {
    let kms = Kms::new();
    let ids: Vec<String> = (0..IDS)
        .map(|i| format!("db/16384/rel/{}", 24576 + i))
        .collect();
    let mut rng = Rng::from_os("race");
    let seeds: Vec<u64> = (0..WORKERS).map(|_| rng.next_u64()).collect();
    let start = Barrier::new(WORKERS);

    let outputs: Vec<Vec<(usize, Vec<u8>)>> = thread::scope(|scope| {
        let workers: Vec<_> = seeds
            .iter()
            .map(|seed| {
                let (kms, ids, start) = (&kms, &ids, &start);
                let mut rng = Rng::seeded(*seed);
                scope.spawn(move || {
                    let mut order: Vec<usize> = (0..IDS).collect();
                    let mut seen = Vec::with_capacity(IDS * PASSES);
                    start.wait();
                    for _ in 0..PASSES {
                        rng.shuffle(&mut order);
                        for &i in &order {
                            let run = kms.run(["get-or-create", ids[i].as_str()]);
                            assert_eq!(run.code, 0, "{run}");
                            assert!(run.stderr.is_empty(), "{run}");
                            seen.push((i, run.stdout));
                        }
                    }
                    seen
                })
            })
            .collect();
        workers.into_iter().map(|w| w.join().unwrap()).collect()
    });

    // Every output for an id is the same bytes.
    let mut by_id: BTreeMap<usize, Vec<Vec<u8>>> = BTreeMap::new();
    for (i, out) in outputs.into_iter().flatten() {
        by_id.entry(i).or_default().push(out);
    }
    assert_eq!(by_id.len(), IDS);
    let mut keys = Vec::with_capacity(IDS);
    for (i, outs) in &by_id {
        assert_eq!(outs.len(), WORKERS * PASSES, "{}", ids[*i]);
        let first = &outs[0];
        let differing = outs.iter().filter(|o| *o != first).count();
        assert_eq!(
            differing,
            0,
            "{}: {differing} of {} outputs differ from the first",
            ids[*i],
            outs.len()
        );
        let key = parse_hex_line(first);
        kms.remember(&key);
        assert_eq!(kms.get(&ids[*i]), key, "{}", ids[*i]);
        keys.push(key);
    }

    // Exactly one key per id, each at version 1, and no two ids share bytes.
    let listed = kms.list();
    assert_eq!(listed.len(), IDS, "{listed:?}");
    let mut expected = ids.clone();
    expected.sort();
    let listed_ids: Vec<String> = listed.iter().map(|(id, _, _)| id.clone()).collect();
    assert_eq!(listed_ids, expected);
    assert!(
        listed
            .iter()
            .all(|(_, version, bits)| *version == 1 && *bits == 256)
    );
    assert_eq!(kms.rows(), IDS, "the store holds more than one row per id");
    keys.sort();
    keys.dedup();
    assert_eq!(keys.len(), IDS, "two ids got the same key");
}
