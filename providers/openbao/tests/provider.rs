//! The openbao provider as a library against a real OpenBao dev server: conformance, denied
//! tokens, blobs moved between ids, AppRole, several addresses, a missing Transit key, TLS.

mod common;

use common::{Bao, KEY, init_and_open, open, private_dir, token_options, write_private};
use kms_core::conformance::assert_conforms;
use kms_core::store::Store;
use kms_core::wrap::KeyWrapper;
use kms_core::{ErrorKind, KeyId, KeySpec};

fn id(text: &str) -> KeyId {
    KeyId::new(text).unwrap()
}

#[test]
fn conforms_as_a_library() {
    let bao = Bao::dev();
    let dir = private_dir();
    let provider = init_and_open(dir.path(), &token_options(&bao, dir.path(), &bao.token));
    assert_conforms(provider.as_ref());
    assert_eq!(
        provider.to_string(),
        format!("openbao provider (transit/{KEY})")
    );
    assert!(provider.capabilities().durable);

    // The store holds Transit ciphertexts, never the key.
    let key = provider
        .get_or_create(&id("cluster/wal"), KeySpec::default())
        .unwrap();
    let store = Store::open(&dir.path().join("store/keys.db")).unwrap();
    let record = store.latest(&id("cluster/wal")).unwrap().unwrap();
    assert!(record.wrapped.starts_with(b"vault:v1:"), "{record:?}");
    let blob = String::from_utf8(record.wrapped).unwrap();
    assert!(!blob.contains(&kms_core_hex(key.expose_secret())));
    let mode = std::fs::metadata(dir.path().join("store")).unwrap();
    assert_eq!(
        std::os::unix::fs::PermissionsExt::mode(&mode.permissions()) & 0o777,
        0o700
    );
}

fn kms_core_hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[test]
fn init_twice_is_refused_and_keys_survive_reopening() {
    let bao = Bao::dev();
    let dir = private_dir();
    let options = token_options(&bao, dir.path(), &bao.token);
    let first = {
        let provider = init_and_open(dir.path(), &options);
        provider
            .get_or_create(&id("a"), KeySpec::default())
            .unwrap()
    };
    let err = (kms_openbao::registered().init.unwrap())(
        &common::context(dir.path()),
        &common::table(&options),
    )
    .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::AlreadyExists, "{err}");
    let provider = open(dir.path(), &options).unwrap();
    assert_eq!(provider.get(&id("a")).unwrap(), first);
}

#[test]
fn a_wrong_or_revoked_token_is_denied_and_creates_nothing() {
    let bao = Bao::dev();
    let dir = private_dir();
    let options = token_options(&bao, dir.path(), &bao.token);
    init_and_open(dir.path(), &options)
        .get_or_create(&id("kept"), KeySpec::default())
        .unwrap();

    // 1. A token the server does not know: opening is denied, naming the address.
    let wrong = token_options(&bao, dir.path(), "s.not-a-token");
    let err = open(dir.path(), &wrong)
        .err()
        .expect("a wrong token is refused");
    assert_eq!(err.kind(), ErrorKind::Denied, "{err}");
    assert!(
        err.to_string()
            .contains(&format!("openbao at {} denied", bao.addr)),
        "{err}"
    );
    assert!(!err.to_string().contains("not-a-token"), "{err}");

    // 2. A token revoked while the provider is open: reads and creates are denied, never
    //    NotFound, and nothing is stored.
    let child = bao.cli(&["token", "create", "-field=token", "-policy=root"]);
    let options = token_options(&bao, dir.path(), child.trim());
    let provider = open(dir.path(), &options).unwrap();
    bao.cli(&["token", "revoke", child.trim()]);
    let err = provider.get(&id("kept")).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Denied, "{err}");
    assert_eq!(err.key_id(), Some(&id("kept")));
    for _ in 0..2 {
        let err = provider
            .get_or_create(&id("new"), KeySpec::default())
            .unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Denied, "{err}");
        assert!(
            err.to_string().contains("denied transit encrypt (403)"),
            "{err}"
        );
    }
    let err = provider
        .create(&id("new2"), KeySpec::default())
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Denied, "{err}");
    let ids: Vec<String> = provider
        .list("")
        .unwrap()
        .into_iter()
        .map(|k| k.id.to_string())
        .collect();
    assert_eq!(ids, ["kept"]);
}

#[test]
fn a_wrapped_key_moved_to_another_id_or_version_fails_on_the_server() {
    let bao = Bao::dev();
    let dir = private_dir();
    let options = token_options(&bao, dir.path(), &bao.token);
    let provider = init_and_open(dir.path(), &options);
    provider.create(&id("a"), KeySpec::default()).unwrap();
    let b = provider.create(&id("b"), KeySpec::default()).unwrap();
    drop(provider);

    // 1. Straight against Transit: the context of another id or version does not decrypt.
    let parsed =
        kms_openbao::Options::from_table(&common::context(dir.path()), &common::table(&options))
            .unwrap();
    let transit = kms_openbao::transit(&parsed).unwrap();
    let store = Store::open(&dir.path().join("store/keys.db")).unwrap();
    let blob_a = store.latest(&id("a")).unwrap().unwrap();
    assert!(transit.unwrap(&id("a"), 1, &blob_a.wrapped).is_ok());
    for (other, version) in [("b", 1), ("a", 2), ("a/b", 1)] {
        let err = transit
            .unwrap(&id(other), version, &blob_a.wrapped)
            .unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Corrupted, "{err}");
        // The server refused it (the binding inside the plaintext was never reached).
        assert!(
            err.to_string()
                .contains("fails authentication by transit key"),
            "{err}"
        );
        assert_eq!(err.key_id(), Some(&id(other)));
    }

    // 2. Through the provider: a's row copied onto b.
    store.delete(&id("b")).unwrap();
    store.insert(&id("b"), blob_a.clone()).unwrap();
    drop(store);
    let provider = open(dir.path(), &options).unwrap();
    let err = provider.get(&id("b")).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Corrupted, "{err}");
    assert!(
        err.to_string()
            .starts_with("openbao provider (transit/kms): wrapped key \"b\""),
        "{err}"
    );
    assert_ne!(
        provider.get(&id("a")).unwrap().expose_secret(),
        b.expose_secret()
    );

    // 3. A damaged blob is corrupted too, not NotFound.
    let store = Store::open(&dir.path().join("store/keys.db")).unwrap();
    let mut bad = blob_a;
    // A character in the middle of the base64: the last ones may carry only padding bits,
    // which a lenient decoder ignores.
    let middle = bad.wrapped.len() / 2;
    bad.wrapped[middle] = if bad.wrapped[middle] == b'A' {
        b'B'
    } else {
        b'A'
    };
    store.delete(&id("a")).unwrap();
    store.insert(&id("a"), bad).unwrap();
    assert_eq!(
        provider.get(&id("a")).unwrap_err().kind(),
        ErrorKind::Corrupted
    );
}

#[test]
fn approle_logs_in_and_logs_in_again_when_the_token_expires() {
    let bao = Bao::dev();
    let dir = private_dir();
    let policy = format!(
        "path \"transit/keys/{KEY}\" {{ capabilities = [\"read\"] }}\n\
         path \"transit/encrypt/{KEY}\" {{ capabilities = [\"update\"] }}\n\
         path \"transit/decrypt/{KEY}\" {{ capabilities = [\"update\"] }}\n"
    );
    let policy_file = write_private(dir.path(), "policy.hcl", &policy);
    bao.cli(&["policy", "write", "kms", policy_file.to_str().unwrap()]);
    bao.cli(&["auth", "enable", "approle"]);
    bao.cli(&[
        "write",
        "auth/approle/role/kms",
        "token_policies=kms",
        "token_ttl=3s",
        "token_max_ttl=3s",
    ]);
    let role_id = bao.read_field("auth/approle/role/kms/role-id", "role_id");
    let secret_id = bao.cli(&[
        "write",
        "-f",
        "-field=secret_id",
        "auth/approle/role/kms/secret-id",
    ]);
    write_private(dir.path(), "secret-id", secret_id.trim());
    let options = format!(
        "dir = \"store\"\naddress = \"{}\"\nkey = \"{KEY}\"\nrole_id = \"{role_id}\"\n\
         secret_id_file = \"secret-id\"\n",
        bao.addr
    );
    let provider = init_and_open(dir.path(), &options);
    let a = provider
        .get_or_create(&id("a"), KeySpec::default())
        .unwrap();

    // The token expires; the next calls log in again and go through.
    std::thread::sleep(std::time::Duration::from_secs(4));
    assert_eq!(provider.get(&id("a")).unwrap(), a);
    provider
        .get_or_create(&id("b"), KeySpec::default())
        .unwrap();

    // The policy allows no create on encrypt: a wrong secret id is denied at login.
    write_private(
        dir.path(),
        "secret-id",
        "00000000-0000-0000-0000-000000000000",
    );
    let err = open(dir.path(), &options).err().unwrap();
    assert_eq!(err.kind(), ErrorKind::Denied, "{err}");
    assert!(!err.to_string().contains(secret_id.trim()), "{err}");
}

#[test]
fn the_second_address_serves_when_the_first_is_dead() {
    let bao = Bao::dev();
    let dir = private_dir();
    let dead = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    write_private(dir.path(), "token", &bao.token);
    let options = format!(
        "dir = \"store\"\naddress = [\"http://127.0.0.1:{dead}\", \"{}\"]\nkey = \"{KEY}\"\n\
         token_file = \"token\"\ntimeout_ms = 1000\nretries = 0\n",
        bao.addr
    );
    let provider = init_and_open(dir.path(), &options);
    let a = provider
        .get_or_create(&id("a"), KeySpec::default())
        .unwrap();
    assert_eq!(provider.get(&id("a")).unwrap(), a);
    assert_conforms(provider.as_ref());

    // Only dead addresses: unavailable, naming the address tried last, nothing created.
    let options = format!(
        "dir = \"store\"\naddress = [\"http://127.0.0.1:{dead}\"]\nkey = \"{KEY}\"\n\
         token_file = \"token\"\ntimeout_ms = 1000\nretries = 2\n"
    );
    let started = std::time::Instant::now();
    let err = open(dir.path(), &options).err().unwrap();
    assert_eq!(err.kind(), ErrorKind::Unavailable, "{err}");
    assert!(
        err.to_string()
            .contains(&format!("openbao at http://127.0.0.1:{dead} unreachable")),
        "{err}"
    );
    // Two retries with backoff (100 ms, 200 ms), not more.
    assert!(started.elapsed() >= std::time::Duration::from_millis(300));
    assert!(started.elapsed() < std::time::Duration::from_secs(5));
}

#[test]
fn a_missing_or_unsuitable_transit_key_is_a_clear_error() {
    let bao = Bao::dev();
    let dir = private_dir();
    write_private(dir.path(), "token", &bao.token);
    let options = |key: &str, mount: &str| {
        format!(
            "dir = \"store\"\naddress = \"{}\"\nkey = \"{key}\"\nmount = \"{mount}\"\n\
             token_file = \"token\"\n",
            bao.addr
        )
    };
    let init = |text: &str| {
        (kms_openbao::registered().init.unwrap())(
            &common::context(dir.path()),
            &common::table(text),
        )
    };

    let err = init(&options("nope", "transit")).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::InvalidConfig, "{err}");
    assert!(
        err.to_string()
            .contains("transit key \"nope\" at mount \"transit\" does not exist"),
        "{err}"
    );

    let err = init(&options(KEY, "elsewhere")).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::InvalidConfig, "{err}");
    assert!(
        err.to_string()
            .contains("no transit engine at mount \"elsewhere\""),
        "{err}"
    );

    bao.cli(&["write", "-f", "transit/keys/plain"]);
    let err = init(&options("plain", "transit")).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::InvalidConfig, "{err}");
    assert!(err.to_string().contains("it is not derived"), "{err}");
    assert!(!dir.path().join("store/keys.db").exists());

    // A Transit key deleted under a running provider: a clear error, never NotFound.
    let provider = init_and_open(dir.path(), &options(KEY, "transit"));
    provider.create(&id("a"), KeySpec::default()).unwrap();
    bao.cli(&[
        "write",
        &format!("transit/keys/{KEY}/config"),
        "deletion_allowed=true",
    ]);
    bao.cli(&["delete", &format!("transit/keys/{KEY}")]);
    let err = provider.get(&id("a")).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::InvalidConfig, "{err}");
    assert!(err.to_string().contains("does not exist"), "{err}");
    assert_eq!(err.key_id(), Some(&id("a")));
}

#[test]
fn tls_with_a_configured_ca_file() {
    let bao = Bao::dev_tls();
    let dir = private_dir();
    write_private(dir.path(), "token", &bao.token);
    let options = format!(
        "dir = \"store\"\naddress = \"{}\"\nkey = \"{KEY}\"\ntoken_file = \"token\"\n\
         ca_file = \"{}\"\n",
        bao.addr,
        bao.ca_file().display()
    );
    let provider = init_and_open(dir.path(), &options);
    let a = provider
        .get_or_create(&id("a"), KeySpec::default())
        .unwrap();
    assert_eq!(provider.get(&id("a")).unwrap(), a);

    // Without the CA the server is not trusted: unavailable, not a silent plain connection.
    let untrusted = format!(
        "dir = \"store\"\naddress = \"{}\"\nkey = \"{KEY}\"\ntoken_file = \"token\"\nretries = 0\n",
        bao.addr
    );
    let err = open(dir.path(), &untrusted).err().unwrap();
    assert_eq!(err.kind(), ErrorKind::Unavailable, "{err}");
    assert!(
        err.to_string()
            .contains(&format!("openbao at {} unreachable", bao.addr)),
        "{err}"
    );
}

#[test]
fn throttling_is_unavailable_says_so_and_creates_nothing() {
    let bao = Bao::dev();
    let dir = private_dir();
    let options = token_options(&bao, dir.path(), &bao.token);
    let provider = init_and_open(dir.path(), &options);
    let a = provider
        .get_or_create(&id("a"), KeySpec::default())
        .unwrap();

    // A real rate-limit quota on the Transit mount: one request a minute.
    bao.cli(&[
        "write",
        "sys/quotas/rate-limit/kms",
        "rate=1",
        "interval=60s",
        "path=transit/",
    ]);
    let err = (0..5)
        .find_map(|_| provider.get(&id("a")).err())
        .expect("the quota throttles");
    assert_eq!(err.kind(), ErrorKind::Unavailable, "{err}");
    assert!(
        err.to_string().contains(&format!(
            "openbao at {} is throttling requests (429)",
            bao.addr
        )),
        "{err}"
    );
    let err = provider
        .get_or_create(&id("b"), KeySpec::default())
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Unavailable, "{err}");
    assert_eq!(provider.list("").unwrap().len(), 1);

    // The quota lifted, the same provider serves.
    bao.cli(&["delete", "sys/quotas/rate-limit/kms"]);
    assert_eq!(provider.get(&id("a")).unwrap(), a);
}

#[test]
fn a_server_that_never_answers_times_out_as_unavailable() {
    // A socket that accepts connections (the kernel does) and never answers: a hung node.
    let hung = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = format!("http://{}", hung.local_addr().unwrap());
    let dir = private_dir();
    write_private(dir.path(), "token", "s.some-token");
    let options = format!(
        "dir = \"store\"\naddress = \"{addr}\"\nkey = \"{KEY}\"\ntoken_file = \"token\"\n\
         timeout_ms = 300\nretries = 1\n"
    );
    let started = std::time::Instant::now();
    let err = (kms_openbao::registered().init.unwrap())(
        &common::context(dir.path()),
        &common::table(&options),
    )
    .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Unavailable, "{err}");
    assert!(
        err.to_string()
            .contains(&format!("openbao at {addr} unreachable: timed out")),
        "{err}"
    );
    // Two attempts of 300 ms and one backoff of 100 ms: bounded.
    assert!(started.elapsed() >= std::time::Duration::from_millis(600));
    assert!(started.elapsed() < std::time::Duration::from_secs(5));
    assert!(!dir.path().join("store/keys.db").exists());
}

#[test]
fn a_namespace_is_sent_and_keeps_its_keys_apart() {
    let bao = Bao::dev();
    bao.cli(&["namespace", "create", "team-a"]);
    bao.cli(&["secrets", "enable", "-namespace=team-a", "transit"]);
    bao.cli(&[
        "write",
        "-namespace=team-a",
        "transit/keys/ns-only",
        "derived=true",
    ]);
    let dir = private_dir();
    write_private(dir.path(), "token", &bao.token);
    let options = |namespace: &str| {
        format!(
            "dir = \"store\"\naddress = \"{}\"\nkey = \"ns-only\"\n\
             token_file = \"token\"\n{namespace}",
            bao.addr
        )
    };

    // Outside the namespace the key does not exist.
    let err = (kms_openbao::registered().init.unwrap())(
        &common::context(dir.path()),
        &common::table(&options("")),
    )
    .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::InvalidConfig, "{err}");

    // Inside it, the provider works; the namespace is part of the fingerprint.
    let inside = options("namespace = \"team-a\"\n");
    let provider = init_and_open(dir.path(), &inside);
    let a = provider
        .get_or_create(&id("a"), KeySpec::default())
        .unwrap();
    assert_eq!(provider.get(&id("a")).unwrap(), a);
    assert_conforms(provider.as_ref());
    // A key of the same name outside the namespace is another KEK: wrong KEK, not a key
    // store silently read with another key.
    bao.cli(&["write", "transit/keys/ns-only", "derived=true"]);
    let err = open(dir.path(), &options("")).err().unwrap();
    assert_eq!(err.kind(), ErrorKind::WrongKek, "{err}");
}
