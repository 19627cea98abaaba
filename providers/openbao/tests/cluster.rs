//! A three-node raft cluster of OpenBao on loopback: the provider is given the two standbys
//! first (they forward to the active node), then the active node is killed and the standbys
//! elect a new one while two threads keep creating and reading keys; errors come only during
//! the failover and only as "unavailable", no acknowledged key is lost, and the same provider
//! goes on serving every key.

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use common::{Bao, KEY, init_and_open, private_dir, write_private};
use kms_core::{ErrorKind, KeyId, KeyProvider, KeySpec};

#[test]
fn a_raft_cluster_serves_through_standbys_and_a_leader_failover() {
    let mut leader = Bao::persistent();
    let b = Bao::join(&leader, "node-b");
    let c = Bao::join(&leader, "node-c");
    let dir = private_dir();
    write_private(dir.path(), "token", &leader.token);
    let options = format!(
        "dir = \"store\"\naddress = [\"{}\", \"{}\", \"{}\"]\nkey = \"{KEY}\"\n\
         token_file = \"token\"\ntimeout_ms = 2000\nretries = 8\n",
        b.addr, c.addr, leader.addr
    );
    let provider = init_and_open(dir.path(), &options);
    let ids: Vec<KeyId> = (0..10)
        .map(|i| KeyId::new(&format!("cluster/{i}")).unwrap())
        .collect();
    let keys: Vec<_> = ids
        .iter()
        .map(|id| provider.create(id, KeySpec::default()).unwrap())
        .collect();

    // Load: two threads alternate a CREATE of a new id and a GET of a known key until told to
    // stop, keeping what was acknowledged and when each error came.
    let stop = AtomicBool::new(false);
    let provider = &provider;
    let (ids, keys, stop) = (&ids, &keys, &stop);
    let (killed_at, recovered_at, results) = std::thread::scope(|scope| {
        let workers: Vec<_> = (0..2)
            .map(|w| {
                scope.spawn(move || {
                    let (mut acked, mut errors) = (Vec::new(), Vec::new());
                    let mut i = 0usize;
                    while !stop.load(Ordering::Relaxed) {
                        i += 1;
                        let id = KeyId::new(&format!("load/{w}/{i}")).unwrap();
                        match provider.create(&id, KeySpec::default()) {
                            Ok(key) => acked.push((id, key)),
                            Err(e) => errors.push((Instant::now(), e)),
                        }
                        match provider.get(&ids[i % ids.len()]) {
                            Ok(key) => assert_eq!(key, keys[i % ids.len()]),
                            Err(e) => errors.push((Instant::now(), e)),
                        }
                    }
                    (acked, errors)
                })
            })
            .collect();

        // The active node dies after a second of load; the main thread waits for a GET to
        // succeed again (the new leader), then lets the load run 3 s more.
        std::thread::sleep(Duration::from_secs(1));
        let killed_at = Instant::now();
        leader.stop();
        let deadline = killed_at + Duration::from_secs(60);
        loop {
            match provider.get(&ids[0]) {
                Ok(key) => {
                    assert_eq!(key, keys[0]);
                    break;
                }
                Err(e) => {
                    assert_eq!(e.kind(), ErrorKind::Unavailable, "{e}");
                    assert!(Instant::now() < deadline, "no new leader: {e}");
                    std::thread::sleep(Duration::from_millis(200));
                }
            }
        }
        let recovered_at = Instant::now();
        std::thread::sleep(Duration::from_secs(3));
        stop.store(true, Ordering::Relaxed);
        let results: Vec<_> = workers.into_iter().map(|w| w.join().unwrap()).collect();
        (killed_at, recovered_at, results)
    });
    println!("failover took {:?}", recovered_at.duration_since(killed_at));

    // Errors: only "unavailable", only between the kill and shortly after the new leader.
    let mut acked = Vec::new();
    let window = results
        .iter()
        .flat_map(|(_, errors)| errors.iter().map(|(at, _)| at.duration_since(killed_at)))
        .max();
    let count: usize = results.iter().map(|(_, errors)| errors.len()).sum();
    println!("{count} unavailable answers under load, the last {window:?} after the kill");
    for (mine, errors) in results {
        for (at, e) in errors {
            assert_eq!(e.kind(), ErrorKind::Unavailable, "{e}");
            assert!(at >= killed_at, "an error before the leader died: {e}");
            assert!(
                at <= recovered_at + Duration::from_secs(2),
                "an error {:?} after the failover: {e}",
                at.duration_since(recovered_at)
            );
        }
        acked.extend(mine);
    }
    assert!(acked.len() > 10, "only {} creates under load", acked.len());

    // No acknowledged key lost, and full service: every key reads back, new ones are made.
    for (id, key) in acked.iter() {
        assert_eq!(&provider.get(id).unwrap(), key, "{id}");
    }
    for (id, key) in ids.iter().zip(keys) {
        assert_eq!(&provider.get(id).unwrap(), key);
    }
    let new = KeyId::new("after/failover").unwrap();
    let created = provider.get_or_create(&new, KeySpec::default()).unwrap();
    assert_eq!(provider.get(&new).unwrap(), created);
    drop((b, c));
}
