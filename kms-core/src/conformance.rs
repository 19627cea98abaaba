//! The conformance suite every [`KeyProvider`] must pass: the file and command providers, the
//! mock, the cloud backends, plugins loaded from `.so` files, and third-party providers.
//!
//! Call [`assert_conforms`] from a test with a provider whose store may hold other keys: the
//! suite works under a fresh random prefix and leaves its keys behind (it deletes only where the
//! provider can delete, and only keys it made).
//!
//! ```no_run
//! # fn provider() -> Box<dyn kms_core::KeyProvider> { unimplemented!() }
//! kms_core::conformance::assert_conforms(provider().as_ref());
//! ```

use std::collections::HashSet;

use crate::error::{ErrorKind, Result};
use crate::id::KeyId;
use crate::provider::KeyProvider;
use crate::secret::{Key, KeyLen, KeySpec, SecretBytes};

/// The outcome of one run of the suite.
#[derive(Debug, Default)]
pub struct Report {
    /// Checks that passed.
    pub passed: Vec<&'static str>,
    /// Checks that failed, with what was wrong.
    pub failed: Vec<(&'static str, String)>,
    /// Checks skipped because the provider does not claim the capability.
    pub skipped: Vec<&'static str>,
}

impl Report {
    /// Whether every check that ran passed.
    pub fn is_ok(&self) -> bool {
        self.failed.is_empty()
    }
}

impl std::fmt::Display for Report {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(
            f,
            "{} passed, {} failed, {} skipped",
            self.passed.len(),
            self.failed.len(),
            self.skipped.len()
        )?;
        for (name, why) in &self.failed {
            writeln!(f, "  FAILED {name}: {why}")?;
        }
        Ok(())
    }
}

type Check = fn(&Suite<'_>) -> std::result::Result<(), String>;

struct Suite<'a> {
    provider: &'a dyn KeyProvider,
    prefix: String,
    /// Hex of every key the suite saw, to check that none leaks into names or errors.
    seen: std::sync::Mutex<Vec<String>>,
}

impl Suite<'_> {
    fn id(&self, name: &str) -> KeyId {
        KeyId::new(&format!("{}{name}", self.prefix)).expect("suite ids are valid")
    }

    fn saw(&self, key: &Key) {
        self.seen.lock().unwrap().push(hex(key.expose_secret()));
    }

    fn check_no_leak(&self, text: &str) -> std::result::Result<(), String> {
        let lower = text.to_lowercase();
        for h in self.seen.lock().unwrap().iter() {
            if lower.contains(&h[..16]) {
                return Err(format!("key material appears in {text:?}"));
            }
        }
        Ok(())
    }

    fn expect_kind<T>(
        &self,
        what: &str,
        result: Result<T>,
        kind: ErrorKind,
    ) -> std::result::Result<(), String> {
        match result {
            Ok(_) => Err(format!("{what}: succeeded, expected {kind}")),
            Err(e) if e.kind() == kind => self.check_no_leak(&e.to_string()),
            Err(e) => Err(format!("{what}: expected {kind}, got {}: {e}", e.kind())),
        }
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn ok<T>(what: &str, result: Result<T>) -> std::result::Result<T, String> {
    result.map_err(|e| format!("{what}: {} error: {e}", e.kind()))
}

fn same(a: &Key, b: &Key) -> bool {
    a.expose_secret() == b.expose_secret() && a.version() == b.version() && a.id() == b.id()
}

const CHECKS: &[(&str, Check)] = &[
    ("get of a missing key is NotFound", |s| {
        let id = s.id("missing");
        s.expect_kind("get", s.provider.get(&id), ErrorKind::NotFound)
    }),
    ("create makes a 256-bit key that get returns", |s| {
        let id = s.id("create/default");
        let created = ok("create", s.provider.create(&id, KeySpec::default()))?;
        s.saw(&created);
        if created.expose_secret().len() != 32 || created.id() != &id || created.version() != 1 {
            return Err(format!("create returned {created:?}"));
        }
        let got = ok("get", s.provider.get(&id))?;
        if !same(&created, &got) {
            return Err("get returned other bytes than create".into());
        }
        Ok(())
    }),
    (
        "create of an existing id is AlreadyExists and keeps the key",
        |s| {
            let id = s.id("create/twice");
            let first = ok("create", s.provider.create(&id, KeySpec::default()))?;
            s.saw(&first);
            s.expect_kind(
                "second create",
                s.provider.create(&id, KeySpec::default()),
                ErrorKind::AlreadyExists,
            )?;
            let got = ok("get", s.provider.get(&id))?;
            if !same(&first, &got) {
                return Err("the key changed after a refused create".into());
            }
            Ok(())
        },
    ),
    ("create honours 128, 192 and 256 bits", |s| {
        for len in [KeyLen::Aes128, KeyLen::Aes192, KeyLen::Aes256] {
            let id = s.id(&format!("len/{}", len.bits()));
            let key = ok("create", s.provider.create(&id, KeySpec::new(len)))?;
            s.saw(&key);
            let got = ok("get", s.provider.get(&id))?;
            if key.expose_secret().len() != len.bytes() || !same(&key, &got) {
                return Err(format!(
                    "{} bits: created {} bytes",
                    len.bits(),
                    key.expose_secret().len()
                ));
            }
        }
        Ok(())
    }),
    ("keys are random and distinct", |s| {
        let mut all = HashSet::new();
        for i in 0..16 {
            let key = ok(
                "create",
                s.provider
                    .create(&s.id(&format!("distinct/{i}")), KeySpec::default()),
            )?;
            s.saw(&key);
            if key.expose_secret().iter().all(|b| *b == 0)
                || !all.insert(key.expose_secret().to_vec())
            {
                return Err("two keys are equal, or a key is all zeros".into());
            }
        }
        Ok(())
    }),
    (
        "get_or_create creates once and then returns the same key",
        |s| {
            let id = s.id("goc/once");
            let first = ok(
                "get_or_create",
                s.provider.get_or_create(&id, KeySpec::default()),
            )?;
            s.saw(&first);
            let second = ok(
                "get_or_create",
                s.provider.get_or_create(&id, KeySpec::new(KeyLen::Aes128)),
            )?;
            let got = ok("get", s.provider.get(&id))?;
            if !same(&first, &second) || !same(&first, &got) {
                return Err("get_or_create returned different keys for one id".into());
            }
            Ok(())
        },
    ),
    ("get_or_create racing on one new id yields one key", |s| {
        for round in 0..4 {
            let id = s.id(&format!("goc/race/{round}"));
            let keys: Vec<Result<Key>> = std::thread::scope(|scope| {
                let handles: Vec<_> = (0..8)
                    .map(|_| scope.spawn(|| s.provider.get_or_create(&id, KeySpec::default())))
                    .collect();
                handles
                    .into_iter()
                    .map(|h| h.join().expect("get_or_create panicked"))
                    .collect()
            });
            let keys: Vec<Key> = keys
                .into_iter()
                .map(|k| ok("get_or_create", k))
                .collect::<std::result::Result<_, _>>()?;
            s.saw(&keys[0]);
            if keys.iter().any(|k| !same(k, &keys[0])) {
                return Err(format!(
                    "round {round}: racing callers received different keys"
                ));
            }
            let got = ok("get", s.provider.get(&id))?;
            if !same(&got, &keys[0]) {
                return Err(format!(
                    "round {round}: the stored key is not the one handed out"
                ));
            }
        }
        Ok(())
    }),
    ("the display name is set and secret-free", |s| {
        let name = s.provider.to_string();
        if name.trim().is_empty() {
            return Err("the provider's display name is empty".into());
        }
        s.check_no_leak(&name)
    }),
];

const LIST_CHECK: (&str, Check) = ("list returns the ids under a prefix, sorted", |s| {
    let mut made = Vec::new();
    for name in ["list/b", "list/a", "list/c/d", "listx"] {
        let id = s.id(name);
        ok(
            "create",
            s.provider.create(&id, KeySpec::new(KeyLen::Aes128)),
        )?;
        made.push(id);
    }
    let listed = ok("list", s.provider.list(&format!("{}list/", s.prefix)))?;
    let ids: Vec<String> = listed.iter().map(|k| k.id.to_string()).collect();
    let expected: Vec<String> = ["list/a", "list/b", "list/c/d"]
        .iter()
        .map(|n| format!("{}{n}", s.prefix))
        .collect();
    if ids != expected {
        return Err(format!("listed {ids:?}, expected {expected:?}"));
    }
    if listed.iter().any(|k| k.bytes != 16 || k.version != 1) {
        return Err(format!(
            "list reported wrong lengths or versions: {listed:?}"
        ));
    }
    let all = ok("list", s.provider.list(&s.prefix))?;
    if !made.iter().all(|id| all.iter().any(|k| &k.id == id)) {
        return Err("list of the whole prefix misses keys".into());
    }
    Ok(())
});

const DELETE_CHECK: (&str, Check) = (
    "delete removes a key; deleting a missing key is NotFound",
    |s| {
        let id = s.id("delete/me");
        let key = ok("create", s.provider.create(&id, KeySpec::default()))?;
        s.saw(&key);
        ok("delete", s.provider.delete(&id))?;
        s.expect_kind("get after delete", s.provider.get(&id), ErrorKind::NotFound)?;
        s.expect_kind("second delete", s.provider.delete(&id), ErrorKind::NotFound)
    },
);

const VERSIONS_CHECK: (&str, Check) =
    ("rotate adds a version; older versions stay readable", |s| {
        let id = s.id("versions/k");
        let v1 = ok("create", s.provider.create(&id, KeySpec::default()))?;
        let v2 = ok("rotate", s.provider.rotate(&id, KeySpec::default()))?;
        s.saw(&v1);
        s.saw(&v2);
        if v2.version() != 2 || v1.expose_secret() == v2.expose_secret() {
            return Err(format!("rotate returned version {}", v2.version()));
        }
        let latest = ok("get", s.provider.get(&id))?;
        let old = ok("get_version 1", s.provider.get_version(&id, 1))?;
        if !same(&latest, &v2) || !same(&old, &v1) {
            return Err("versions read back wrong".into());
        }
        s.expect_kind(
            "get_version 3",
            s.provider.get_version(&id, 3),
            ErrorKind::NotFound,
        )?;
        s.expect_kind(
            "rotate of a missing key",
            s.provider
                .rotate(&s.id("versions/none"), KeySpec::default()),
            ErrorKind::NotFound,
        )
    });

/// Runs every check against `provider`, under `prefix` (which should be new to the provider).
pub fn run(provider: &dyn KeyProvider, prefix: &str) -> Report {
    let suite = Suite {
        provider,
        prefix: prefix.to_string(),
        seen: Default::default(),
    };
    let caps = provider.capabilities();
    let mut report = Report::default();
    let optional = [
        (caps.list, LIST_CHECK),
        (caps.delete, DELETE_CHECK),
        (caps.versions, VERSIONS_CHECK),
    ];
    let all = CHECKS.iter().map(|c| (true, *c)).chain(optional);
    for (enabled, (name, check)) in all {
        if !enabled {
            report.skipped.push(name);
            continue;
        }
        let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| check(&suite)));
        match outcome {
            Ok(Ok(())) => report.passed.push(name),
            Ok(Err(why)) => report.failed.push((name, why)),
            Err(_) => report.failed.push((name, "the check panicked".to_string())),
        }
    }
    report
}

/// Runs the suite under a fresh random prefix and panics with the report if a check failed.
pub fn assert_conforms(provider: &dyn KeyProvider) {
    let tag = SecretBytes::random(6)
        .map(|r| hex(r.expose_secret()))
        .unwrap_or_else(|_| "fixed".into());
    let report = run(provider, &format!("conformance/{tag}/"));
    assert!(
        report.is_ok(),
        "provider {provider} fails the conformance suite: {report}"
    );
}
