//! OpenBao stopped and started again under an open provider. The dev server keeps everything in
//! memory (a restart would lose the Transit key), so this test runs a real server with raft
//! storage (one node) on loopback, initialised and unsealed like a production one, and kills
//! it (SIGKILL): the provider sees refused connections, as when a node dies.

mod common;

use common::{Bao, init_and_open, private_dir, token_options};
use kms_core::{ErrorKind, KeyId, KeySpec};

#[test]
fn service_resumes_after_a_restart_without_reopening_the_provider() {
    let mut bao = Bao::persistent();
    let dir = private_dir();
    let options = token_options(&bao, dir.path(), &bao.token);
    let provider = init_and_open(dir.path(), &options);
    let a = KeyId::new("cluster/wal").unwrap();
    let key = provider.get_or_create(&a, KeySpec::default()).unwrap();

    // 1. The server is gone: every call is unavailable, naming the address; nothing is created.
    bao.stop();
    let err = provider.get(&a).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Unavailable, "{err}");
    let expected = format!("openbao at {} unreachable", bao.addr);
    assert!(err.to_string().contains(&expected), "{err}");
    assert_eq!(err.key_id(), Some(&a));
    let b = KeyId::new("cluster/tables").unwrap();
    for _ in 0..3 {
        let err = provider.get_or_create(&b, KeySpec::default()).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Unavailable, "{err}");
    }
    assert_eq!(provider.list("").unwrap().len(), 1);

    // 2. Sealed after the restart: still unavailable, saying so.
    bao.start_sealed();
    let err = provider.get(&a).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Unavailable, "{err}");
    assert!(err.to_string().contains("sealed"), "{err}");

    // 3. Unsealed: the same provider serves again, the same key.
    bao.unseal_now();
    assert_eq!(provider.get(&a).unwrap(), key);
    let created = provider.get_or_create(&b, KeySpec::default()).unwrap();
    assert_eq!(provider.get(&b).unwrap(), created);
}

#[test]
fn a_sealed_first_address_is_skipped_for_the_next() {
    let mut sealed = Bao::persistent();
    sealed.stop();
    sealed.start_sealed();
    let live = Bao::dev();
    let dir = private_dir();
    common::write_private(dir.path(), "token", &live.token);
    let options = format!(
        "dir = \"store\"\naddress = [\"{}\", \"{}\"]\nkey = \"{}\"\ntoken_file = \"token\"\n\
         retries = 0\n",
        sealed.addr,
        live.addr,
        common::KEY
    );
    let provider = init_and_open(dir.path(), &options);
    let id = KeyId::new("a").unwrap();
    let key = provider.get_or_create(&id, KeySpec::default()).unwrap();
    assert_eq!(provider.get(&id).unwrap(), key);

    // The sealed node alone: unavailable, saying it is sealed.
    let options = format!(
        "dir = \"store\"\naddress = \"{}\"\nkey = \"{}\"\ntoken_file = \"token\"\nretries = 0\n",
        sealed.addr,
        common::KEY
    );
    let err = common::open(dir.path(), &options).err().unwrap();
    assert_eq!(err.kind(), ErrorKind::Unavailable, "{err}");
    assert!(
        err.to_string()
            .contains("sealed or has no active node (503)"),
        "{err}"
    );
}
