//! A three-node raft cluster of OpenBao on loopback: the provider is given the two standbys
//! first (they forward to the active node), then the active node is killed and the standbys
//! elect a new one; the same provider goes on serving every key.

mod common;

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

    // The active node dies; until the standbys have elected a new one, calls may fail, but only
    // as unavailable.
    leader.stop();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        match provider.get(&ids[0]) {
            Ok(key) => {
                assert_eq!(key, keys[0]);
                break;
            }
            Err(e) => {
                assert_eq!(e.kind(), ErrorKind::Unavailable, "{e}");
                assert!(Instant::now() < deadline, "no new leader: {e}");
                std::thread::sleep(Duration::from_millis(500));
            }
        }
    }
    for (id, key) in ids.iter().zip(&keys) {
        assert_eq!(&provider.get(id).unwrap(), key);
    }
    let new = KeyId::new("after/failover").unwrap();
    let created = provider.get_or_create(&new, KeySpec::default()).unwrap();
    assert_eq!(provider.get(&new).unwrap(), created);
    drop((b, c));
}
