//! The aws-kms provider against a real moto server: the conformance suite (as a library and
//! as a plugin), the encryption context binding, refusals, an unreachable server, and KEK
//! rotation with ReEncrypt.

mod common;

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Arc;

use common::{Moto, in_moto_env, plugin_path, private_dir, table};
use kms_aws_kms::{Rotated, init, open, rotate_kek};
use kms_core::config::Context;
use kms_core::conformance::assert_conforms;
use kms_core::plugin::Plugin;
use kms_core::store::Record;
use kms_core::wrap::KeyWrapper;
use kms_core::{ErrorKind, KeyId, KeyProvider, KeySpec};

fn id(text: &str) -> KeyId {
    KeyId::new(text).unwrap()
}

#[test]
fn library_conforms() {
    if !in_moto_env("library_conforms") {
        return;
    }
    let moto = Moto::start();
    let dir = private_dir();
    let arn = moto.create_key();
    let options = moto.options(&dir.path().join("kms"), &arn);

    let line = init(&options).unwrap();
    assert!(line.contains(&arn), "{line}");
    let provider = open(&options).unwrap();
    assert_conforms(&provider);
    assert!(
        provider.to_string().contains(&moto.endpoint()),
        "{provider}"
    );

    // A second init refuses the initialised directory.
    assert_eq!(init(&options).unwrap_err().kind(), ErrorKind::AlreadyExists);
}

#[test]
fn plugin_conforms() {
    if !in_moto_env("plugin_conforms") {
        return;
    }
    let moto = Moto::start();
    let dir = private_dir();
    let arn = moto.create_key();
    let options = moto.options(&dir.path().join("kms"), &arn);

    let plugin = Plugin::load(&plugin_path()).expect("libkms_aws_kms.so loads");
    assert_eq!(plugin.name(), "aws-kms");
    assert!(plugin.has_init());
    let context = Context {
        base_dir: dir.path().to_path_buf(),
    };
    let line = plugin.init(&context, &table(&options)).unwrap();
    assert!(line.starts_with("initialised"), "{line}");
    let provider = plugin.open(&context, &table(&options)).unwrap();
    assert_conforms(provider.as_ref());

    // The plugin and the library read the same store.
    let key = provider
        .get_or_create(&id("via/plugin"), KeySpec::default())
        .unwrap();
    let library = open(&options).unwrap();
    assert_eq!(
        library.get(&id("via/plugin")).unwrap().expose_secret(),
        key.expose_secret()
    );
}

#[test]
fn blob_moved_to_another_id_or_version_is_corrupted() {
    if !in_moto_env("blob_moved_to_another_id_or_version_is_corrupted") {
        return;
    }
    let moto = Moto::start();
    let dir = private_dir();
    let options = moto.options(&dir.path().join("kms"), &moto.create_key());
    init(&options).unwrap();
    let provider = open(&options).unwrap();
    provider.create(&id("a"), KeySpec::default()).unwrap();
    provider.create(&id("b"), KeySpec::default()).unwrap();
    provider.rotate(&id("b"), KeySpec::default()).unwrap();

    // a's blob copied onto a new id "c": KMS refuses it for c's encryption context.
    let record = provider.store().latest(&id("a")).unwrap().unwrap();
    let moved = Record::new(1, record.kek, record.len, record.wrapped.clone());
    provider.store().insert(&id("c"), moved).unwrap();
    let err = provider.get(&id("c")).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Corrupted, "{err}");
    assert_eq!(err.key_id(), Some(&id("c")));
    assert!(err.to_string().contains(&moto.endpoint()), "{err}");

    // b version 1's blob under b version 2's context: refused too.
    let v1 = provider.store().version(&id("b"), 1).unwrap().unwrap();
    let v2 = provider.store().version(&id("b"), 2).unwrap().unwrap();
    let kek = kms_aws_kms::KmsKek::new(Arc::new(moto.admin()), options.key_id.clone());
    assert!(kek.unwrap(&id("b"), 1, &v1.wrapped).is_ok());
    let err = kek.unwrap(&id("b"), 2, &v1.wrapped).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Corrupted, "{err}");
    assert!(kek.unwrap(&id("b"), 2, &v2.wrapped).is_ok());

    // An altered blob is refused the same way.
    let mut altered = record.wrapped.clone();
    let last = altered.len() - 1;
    altered[last] ^= 1;
    let err = kek.unwrap(&id("a"), 1, &altered).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Corrupted, "{err}");
}

#[test]
fn disabled_or_deleted_or_denied_keys_are_refused_clearly() {
    if !in_moto_env("disabled_or_deleted_or_denied_keys_are_refused_clearly") {
        return;
    }
    let moto = Moto::start();
    let admin = moto.admin();
    let dir = private_dir();

    // 1. DisableKey: moto still answers Decrypt for a disabled key, so the provider checks
    //    the key's state itself (DescribeKey) at init and open.
    let arn = moto.create_key();
    let options = moto.options(&dir.path().join("disabled"), &arn);
    init(&options).unwrap();
    open(&options)
        .unwrap()
        .create(&id("k"), KeySpec::default())
        .unwrap();
    // moto finds the key of DisableKey and ScheduleKeyDeletion by its bare id, not its ARN.
    let bare = |arn: &str| arn.rsplit('/').next().unwrap().to_string();
    let disable = admin.client().disable_key().key_id(bare(&arn)).send();
    admin.call("DisableKey", disable).unwrap().unwrap();
    let err = open(&options).err().expect("open fails");
    assert_eq!(err.kind(), ErrorKind::Denied, "{err}");
    assert!(err.to_string().contains("is disabled"), "{err}");
    assert!(err.to_string().contains("Disabled"), "{err}");
    assert!(err.to_string().contains(&arn), "{err}");

    // Init with a disabled key creates nothing.
    let fresh = moto.options(&dir.path().join("fresh"), &arn);
    let err = init(&fresh).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Denied, "{err}");
    assert!(!fresh.dir.join("keys.db").exists());

    // 2. ScheduleKeyDeletion: the key is PendingDeletion, refused the same way.
    let arn = moto.create_key();
    let options = moto.options(&dir.path().join("deleted"), &arn);
    init(&options).unwrap();
    let schedule = admin
        .client()
        .schedule_key_deletion()
        .key_id(bare(&arn))
        .pending_window_in_days(7)
        .send();
    admin
        .call("ScheduleKeyDeletion", schedule)
        .unwrap()
        .unwrap();
    let err = open(&options).err().expect("open fails");
    assert_eq!(err.kind(), ErrorKind::Denied, "{err}");
    assert!(err.to_string().contains("PendingDeletion"), "{err}");

    // 3. A key policy denying DescribeKey: moto answers AccessDeniedException.
    let policy = r#"{"Version": "2012-10-17", "Statement": [{"Effect": "Deny",
        "Principal": {"AWS": "*"}, "Action": ["kms:DescribeKey"], "Resource": "*"}]}"#;
    let arn = moto.create_key_with_policy(Some(policy));
    let options = moto.options(&dir.path().join("denied"), &arn);
    let err = init(&options).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Denied, "{err}");
    assert!(err.to_string().contains("denied"), "{err}");
    assert!(!options.dir.join("keys.db").exists());

    // 4. A key that does not exist is a configuration error, never kms's NotFound.
    let options = moto.options(&dir.path().join("none"), "alias/no-such-key");
    let err = init(&options).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::InvalidConfig, "{err}");
    assert!(!options.dir.join("keys.db").exists());
}

#[test]
fn stopped_server_is_unavailable_and_creates_nothing() {
    if !in_moto_env("stopped_server_is_unavailable_and_creates_nothing") {
        return;
    }
    let mut moto = Moto::start();
    let dir = private_dir();
    let options = moto.options(&dir.path().join("kms"), &moto.create_key());
    init(&options).unwrap();
    let provider = open(&options).unwrap();
    let existing = provider
        .create(&id("existing"), KeySpec::default())
        .unwrap();
    moto.stop();

    for err in [
        provider.get(&id("existing")).unwrap_err(),
        provider
            .get_or_create(&id("new"), KeySpec::default())
            .unwrap_err(),
        provider.create(&id("new"), KeySpec::default()).unwrap_err(),
        provider
            .rotate(&id("existing"), KeySpec::default())
            .unwrap_err(),
        open(&options).err().expect("open fails"),
    ] {
        assert_eq!(err.kind(), ErrorKind::Unavailable, "{err}");
        assert!(err.to_string().contains(&moto.endpoint()), "{err}");
        assert!(err.to_string().contains("unreachable"), "{err}");
    }

    // Nothing was created or rotated: the store holds the one key, at version 1.
    let listed = provider.list("").unwrap();
    assert_eq!(listed.len(), 1, "{listed:?}");
    assert_eq!((listed[0].id.as_str(), listed[0].version), ("existing", 1));
    let fresh = moto.options(&dir.path().join("fresh"), &options.key_id);
    assert_eq!(init(&fresh).unwrap_err().kind(), ErrorKind::Unavailable);
    assert!(!fresh.dir.join("keys.db").exists());
    drop(existing);
}

#[test]
fn callable_from_many_threads_and_inside_a_tokio_runtime() {
    if !in_moto_env("callable_from_many_threads_and_inside_a_tokio_runtime") {
        return;
    }
    let moto = Moto::start();
    let dir = private_dir();
    let options = moto.options(&dir.path().join("kms"), &moto.create_key());
    init(&options).unwrap();
    let provider = Arc::new(open(&options).unwrap());
    let key = provider.create(&id("shared"), KeySpec::default()).unwrap();

    let threads: Vec<_> = (0..8)
        .map(|_| {
            let provider = provider.clone();
            std::thread::spawn(move || {
                for _ in 0..10 {
                    provider.get(&id("shared")).unwrap();
                }
            })
        })
        .collect();
    for thread in threads {
        thread.join().unwrap();
    }

    // From inside another program's runtime (where block_on would panic).
    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let read = runtime.block_on(async { provider.get(&id("shared")).unwrap() });
    assert_eq!(read.expose_secret(), key.expose_secret());

    // And dropped there.
    runtime.block_on(async move { drop(provider) });
}

#[test]
fn rotation_of_1000_keys_is_resumable_and_keeps_every_key() {
    if !in_moto_env("rotation_of_1000_keys_is_resumable_and_keeps_every_key") {
        return;
    }
    let moto = Moto::start();
    let dir = private_dir();
    let old_arn = moto.create_key();
    let new_arn = moto.create_key();
    let options = moto.options(&dir.path().join("kms"), &old_arn);
    init(&options).unwrap();

    // 1. A thousand keys, made by four threads.
    let provider = Arc::new(open(&options).unwrap());
    let threads: Vec<_> = (0..4)
        .map(|t| {
            let provider = provider.clone();
            std::thread::spawn(move || {
                (0..250)
                    .map(|i| {
                        let key = id(&format!("db/{t}/{i}"));
                        let dek = provider.create(&key, KeySpec::default()).unwrap();
                        (key, dek.expose_secret().to_vec())
                    })
                    .collect::<Vec<_>>()
            })
        })
        .collect();
    let keys: Vec<(KeyId, Vec<u8>)> = threads
        .into_iter()
        .flat_map(|t| t.join().unwrap())
        .collect();
    assert_eq!(keys.len(), 1000);
    drop(provider);

    // 2. A rotation to the new KMS key, interrupted after its third batch.
    let interrupted = catch_unwind(AssertUnwindSafe(|| {
        rotate_kek(&options, Some(&new_arn), |done| {
            if done >= 300 {
                panic!("interrupted at {done}");
            }
        })
    }));
    assert!(interrupted.is_err());

    // Meanwhile every key reads back, under either generation, with either key configured.
    let halfway = open(&options).unwrap();
    let counts = halfway.store().count_by_kek().unwrap();
    assert_eq!(counts, vec![(1, 700), (2, 300)], "{counts:?}");
    for (key, dek) in keys.iter().step_by(7) {
        assert_eq!(halfway.get(key).unwrap().expose_secret(), &dek[..]);
    }
    // New keys go to the target generation at once.
    halfway.create(&id("during"), KeySpec::default()).unwrap();
    drop(halfway);
    let with_new = moto.options(&options.dir, &new_arn);
    open(&with_new).unwrap();

    // A rotation to a third key is refused while this one is unfinished.
    let other = moto.create_key();
    let err = rotate_kek(&options, Some(&other), |_| {}).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::InvalidInput, "{err}");

    // A key_id that is not the store's is refused, never made the target.
    let stranger = moto.options(&options.dir, &other);
    let err = rotate_kek(&stranger, None, |_| {}).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::WrongKek, "{err}");

    // 3. Resumed: it finishes the same rotation.
    let rotated = rotate_kek(&options, None, |_| {}).unwrap();
    assert_eq!(
        rotated,
        Rotated {
            from: 1,
            to: 2,
            arn: new_arn.clone(),
            resumed: true,
            rewrapped: 700,
        }
    );

    // 4. The old key no longer opens the store; the new one reads every key identically.
    let err = open(&options).err().expect("open fails");
    assert_eq!(err.kind(), ErrorKind::WrongKek, "{err}");
    assert!(err.to_string().contains(&new_arn), "{err}");
    let provider = open(&with_new).unwrap();
    assert_eq!(provider.store().count_by_kek().unwrap(), vec![(2, 1001)]);
    for (key, dek) in &keys {
        assert_eq!(
            provider.get(key).unwrap().expose_secret(),
            &dek[..],
            "{key}"
        );
    }
    drop(provider);

    // 5. A rotation on the same key (after AWS rotated its material): generation 3.
    let rotated = rotate_kek(&with_new, None, |_| {}).unwrap();
    assert_eq!((rotated.from, rotated.to, rotated.resumed), (2, 3, false));
    assert_eq!(rotated.rewrapped, 1001);
    let provider = open(&with_new).unwrap();
    for (key, dek) in keys.iter().step_by(10) {
        assert_eq!(
            provider.get(key).unwrap().expose_secret(),
            &dek[..],
            "{key}"
        );
    }
}
