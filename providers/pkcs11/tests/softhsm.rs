//! The pkcs11 provider as a library, against a real SoftHSM2 token: conformance, the KEK's
//! attributes, wrong PINs, missing tokens and keys, moved blobs, racing threads, rotation.

mod common;

use std::collections::HashMap;
use std::sync::Arc;

use common::*;
use cryptoki::object::{Attribute, AttributeType};
use kms_core::conformance::assert_conforms;
use kms_core::{ErrorKind, KeyId, KeyLen, KeyProvider, KeySpec};

fn init_and_open(hsm: &Hsm, text: &str) -> kms_core::envelope::EnvelopeProvider {
    let options = parse(hsm, text);
    let line = kms_pkcs11::init(&options).expect("init");
    assert!(line.starts_with("initialised pkcs11 provider"), "{line}");
    kms_pkcs11::open(&options).expect("open")
}

fn open_err(hsm: &Hsm, text: &str) -> kms_core::Error {
    match kms_pkcs11::open(&parse(hsm, text)) {
        Ok(_) => panic!("the provider opened"),
        Err(e) => e,
    }
}

#[test]
fn library_conforms_and_the_kek_stays_in_the_token() {
    let Some(hsm) = enter("library_conforms_and_the_kek_stays_in_the_token") else {
        return;
    };

    // 1. Through the registry entry, as the CLI and kmsd open it.
    let registered = kms_pkcs11::registered();
    let table = table(&options("store"));
    let line = (registered.init.unwrap())(&context(&hsm), &table).unwrap();
    assert!(line.contains("generated in the token"), "{line}");
    let provider = (registered.open)(&context(&hsm), &table).unwrap();
    assert_conforms(provider.as_ref());
    let name = provider.to_string();
    assert!(name.contains(&format!("token \"{TOKEN}\"")), "{name}");
    assert!(name.contains(MODULE), "{name}");
    assert!(!name.contains(PIN), "{name}");

    // 2. The mechanism the provider uses, RFC 5649 as CKM_AES_KEY_WRAP_PAD, is the token's.
    let mechanisms = mechanisms();
    assert!(mechanisms.contains(&cryptoki::mechanism::MechanismType::AES_KEY_WRAP_PAD));

    // 3. The KEK: a token object, sensitive, never extractable, AES-256.
    let session = raw_session();
    let keys = keys_labelled(&session, KEY);
    assert_eq!(keys.len(), 1);
    let wanted = [
        AttributeType::Token,
        AttributeType::Sensitive,
        AttributeType::Extractable,
        AttributeType::ValueLen,
        AttributeType::NeverExtractable,
    ];
    let attributes = session.get_attributes(keys[0], &wanted).unwrap();
    for attribute in &attributes {
        match attribute {
            Attribute::Token(v) => assert!(*v),
            Attribute::Sensitive(v) => assert!(*v),
            Attribute::Extractable(v) => assert!(!*v),
            Attribute::NeverExtractable(v) => assert!(*v),
            Attribute::ValueLen(v) => assert_eq!(u64::from(*v), 32),
            _ => {}
        }
    }
    assert_eq!(attributes.len(), wanted.len());
    let value = session
        .get_attributes(keys[0], &[AttributeType::Value])
        .unwrap();
    assert!(value.is_empty(), "the KEK's value must not be readable");

    // 4. Keys survive reopening; a second init finds the store.
    let id = KeyId::new("cluster/wal").unwrap();
    let first = provider.get_or_create(&id, KeySpec::default()).unwrap();
    drop(provider);
    let again = kms_pkcs11::open(&parse(&hsm, &options("store"))).unwrap();
    assert_eq!(
        again.get(&id).unwrap().expose_secret(),
        first.expose_secret()
    );
    let err = kms_pkcs11::init(&parse(&hsm, &options("store"))).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::AlreadyExists, "{err}");

    // 5. A second store on the same token adopts the existing key rather than making another.
    let line = kms_pkcs11::init(&parse(&hsm, &options("store2"))).unwrap();
    assert!(line.contains("found in the token"), "{line}");
    assert_eq!(keys_labelled(&session, KEY).len(), 1);
}

#[test]
fn pin_from_a_command() {
    let Some(hsm) = enter("pin_from_a_command") else {
        return;
    };
    let text = format!(
        "dir = \"store\"\nmodule = \"{MODULE}\"\ntoken_label = \"{TOKEN}\"\n\
         key_label = \"{KEY}\"\npin_command = \"echo {PIN}\"\n"
    );
    let provider = init_and_open(&hsm, &text);
    let id = KeyId::new("a").unwrap();
    provider.create(&id, KeySpec::default()).unwrap();

    let failing = text.replace(&format!("echo {PIN}"), "exit 3");
    let err = open_err(&hsm, &failing);
    assert_ne!(err.kind(), ErrorKind::NotFound, "{err}");
    assert!(err.to_string().contains("pin_command"), "{err}");
}

#[test]
fn wrong_pin_is_denied_and_creates_nothing() {
    let Some(hsm) = enter("wrong_pin_is_denied_and_creates_nothing") else {
        return;
    };
    let wrong = options_text("store", TOKEN, KEY, WRONG_PIN_ENV);

    // 1. init with a wrong PIN: denied, no directory, no key in the token.
    let err = kms_pkcs11::init(&parse(&hsm, &wrong)).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Denied, "{err}");
    let shown = err.to_string();
    assert!(shown.contains("CKR_PIN_INCORRECT"), "{shown}");
    assert!(shown.contains(MODULE) && shown.contains(TOKEN), "{shown}");
    assert!(
        !shown.contains("9999"),
        "the PIN must not be shown: {shown}"
    );
    assert!(!hsm.dir.join("store").exists());
    assert!(keys_labelled(&raw_session(), KEY).is_empty());

    // 2. open with a wrong PIN, the right one being logged in by this very process: still
    //    denied (PKCS#11 logins are per process, so the provider compares the PINs).
    let provider = init_and_open(&hsm, &options("store"));
    let id = KeyId::new("db/1").unwrap();
    let err = open_err(&hsm, &wrong);
    assert_eq!(err.kind(), ErrorKind::Denied, "{err}");
    assert_eq!(provider.list("").unwrap().len(), 0);
    assert_eq!(provider.get(&id).unwrap_err().kind(), ErrorKind::NotFound);

    // 3. An unset PIN variable is a configuration error.
    let unset = options_text("store", TOKEN, KEY, "KMS_TEST_NO_SUCH_VARIABLE");
    let err = open_err(&hsm, &unset);
    assert_eq!(err.kind(), ErrorKind::InvalidConfig, "{err}");
}

#[test]
fn missing_module_token_and_key_are_told_apart() {
    let Some(hsm) = enter("missing_module_token_and_key_are_told_apart") else {
        return;
    };
    let provider = init_and_open(&hsm, &options("store"));
    let id = KeyId::new("a").unwrap();
    provider.create(&id, KeySpec::default()).unwrap();
    drop(provider);

    // A module that does not exist.
    let text = options("store").replace(MODULE, "/nonexistent/libpkcs11.so");
    let err = open_err(&hsm, &text);
    assert_eq!(err.kind(), ErrorKind::InvalidConfig, "{err}");
    assert!(
        err.to_string().contains("/nonexistent/libpkcs11.so"),
        "{err}"
    );

    // A token that is not there.
    let text = options_text("store", "no-such-token", KEY, PIN_ENV);
    let err = open_err(&hsm, &text);
    assert_eq!(err.kind(), ErrorKind::Unavailable, "{err}");
    assert!(
        err.to_string().contains(&format!(
            "token \"no-such-token\" of module {MODULE} is not present"
        )),
        "{err}"
    );

    // The KEK deleted from the token: a clear error, never "key not found".
    let session = raw_session();
    for key in keys_labelled(&session, KEY) {
        session.destroy_object(key).unwrap();
    }
    let err = open_err(&hsm, &options("store"));
    assert_eq!(err.kind(), ErrorKind::InvalidConfig, "{err}");
    assert!(
        err.to_string().contains("the KEK \"kms-kek\" is missing"),
        "{err}"
    );
}

#[test]
fn moved_or_altered_blob_is_corrupted() {
    let Some(hsm) = enter("moved_or_altered_blob_is_corrupted") else {
        return;
    };
    let provider = init_and_open(&hsm, &options("store"));
    let (a, b, c) = (
        KeyId::new("a").unwrap(),
        KeyId::new("b").unwrap(),
        KeyId::new("c").unwrap(),
    );
    for id in [&a, &b, &c] {
        provider.create(id, KeySpec::default()).unwrap();
    }
    drop(provider);

    let db = rusqlite::Connection::open(hsm.dir.join("store/keys.db")).unwrap();
    db.execute(
        "UPDATE keys SET wrapped = (SELECT wrapped FROM keys WHERE id = 'a') WHERE id = 'b'",
        [],
    )
    .unwrap();
    let wrapped: Vec<u8> = db
        .query_row("SELECT wrapped FROM keys WHERE id = 'c'", [], |r| r.get(0))
        .unwrap();
    let mut flipped = wrapped.clone();
    flipped[5] ^= 0x40;
    db.execute("UPDATE keys SET wrapped = ?1 WHERE id = 'c'", [flipped])
        .unwrap();
    drop(db);

    let provider = kms_pkcs11::open(&parse(&hsm, &options("store"))).unwrap();
    provider.get(&a).unwrap();
    let err = provider.get(&b).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Corrupted, "{err}");
    assert!(
        err.to_string().contains("another key id or version"),
        "{err}"
    );
    let err = provider.get(&c).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Corrupted, "{err}");
    assert!(err.to_string().contains("integrity"), "{err}");
    // A corrupted key is never replaced by a new one.
    let err = provider.get_or_create(&b, KeySpec::default()).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Corrupted, "{err}");
}

#[test]
fn racing_threads_get_the_same_bytes() {
    let Some(hsm) = enter("racing_threads_get_the_same_bytes") else {
        return;
    };
    let shared = Arc::new(init_and_open(&hsm, &options("store")));
    let ids: Vec<KeyId> = (0..40)
        .map(|i| KeyId::new(&format!("race/{i}")).unwrap())
        .collect();

    // Four threads share one provider, four open their own (as separate programs would).
    let results: Vec<Vec<Vec<u8>>> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..8)
            .map(|t| {
                let shared = shared.clone();
                let ids = &ids;
                let hsm = &hsm;
                scope.spawn(move || {
                    let own;
                    let provider: &dyn KeyProvider = if t % 2 == 0 {
                        shared.as_ref()
                    } else {
                        own = kms_pkcs11::open(&parse(hsm, &options("store"))).unwrap();
                        &own
                    };
                    ids.iter()
                        .map(|id| {
                            let key = provider.get_or_create(id, KeySpec::default()).unwrap();
                            key.expose_secret().to_vec()
                        })
                        .collect()
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for result in &results[1..] {
        assert_eq!(result, &results[0]);
    }
    assert_eq!(shared.list("race/").unwrap().len(), ids.len());
    assert!(shared.list("race/").unwrap().iter().all(|k| k.version == 1));
}

#[test]
fn rotation_rewraps_a_thousand_keys() {
    let Some(hsm) = enter("rotation_rewraps_a_thousand_keys") else {
        return;
    };
    let options_text = options("store");
    let provider = init_and_open(&hsm, &options_text);
    let lens = [KeyLen::Aes128, KeyLen::Aes192, KeyLen::Aes256];
    let mut before = HashMap::new();
    for i in 0..1000 {
        let id = KeyId::new(&format!("db/{i}")).unwrap();
        let key = provider.create(&id, KeySpec::new(lens[i % 3])).unwrap();
        before.insert(id, key.expose_secret().to_vec());
    }
    let id = KeyId::new("db/0").unwrap();
    let v2 = provider.rotate(&id, KeySpec::default()).unwrap();
    drop(provider);

    // 1. Rotate: a new key in the token, every row re-wrapped.
    let options = parse(&hsm, &options_text);
    let mut reports = 0;
    let rotated = kms_pkcs11::rotate_kek(&options, |_| reports += 1).unwrap();
    assert_eq!((rotated.from, rotated.to), (1, 2));
    assert_eq!(rotated.label, "kms-kek.g2");
    assert_eq!(rotated.rewrapped, 1001);
    assert!(!rotated.resumed);
    assert!(reports >= 4, "one report per batch of 256");
    let session = raw_session();
    assert_eq!(keys_labelled(&session, "kms-kek.g2").len(), 1);
    assert_eq!(keys_labelled(&session, KEY).len(), 1, "the old KEK stays");

    // 2. Every key reads back identically, older versions too.
    let provider = kms_pkcs11::open(&options).unwrap();
    for (id, bytes) in &before {
        let key = provider.get_version(id, 1).unwrap();
        assert_eq!(key.expose_secret(), bytes.as_slice(), "{id}");
    }
    assert_eq!(
        provider.get(&id).unwrap().expose_secret(),
        v2.expose_secret()
    );
    let counts = provider.store().count_by_kek().unwrap();
    assert_eq!(counts, vec![(2, 1001)]);

    // 3. The old KEK is no longer needed: the store opens without it.
    for key in keys_labelled(&session, KEY) {
        session.destroy_object(key).unwrap();
    }
    drop(provider);
    let provider = kms_pkcs11::open(&options).unwrap();
    assert_eq!(
        provider.get(&id).unwrap().expose_secret(),
        v2.expose_secret()
    );

    // 4. And again, to generation 3.
    let rotated = kms_pkcs11::rotate_kek(&options, |_| {}).unwrap();
    assert_eq!(
        (rotated.from, rotated.to, rotated.label.as_str()),
        (2, 3, "kms-kek.g3")
    );
    let provider = kms_pkcs11::open(&options).unwrap();
    for (id, bytes) in before.iter().take(50) {
        assert_eq!(
            provider.get_version(id, 1).unwrap().expose_secret(),
            bytes.as_slice()
        );
    }
}
