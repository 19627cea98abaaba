//! # kms-mock: keys in memory, with fault injection, for tests
//!
//! [`MockProvider`] keeps keys in a map in memory: nothing survives the process, so it claims
//! every capability but `durable`. It passes the conformance suite, and it can misbehave on
//! demand:
//!
//! - **fail the next N calls** with a chosen [`ErrorKind`] (`unavailable`, `denied`, ...);
//! - **add latency** to every call;
//! - **panic** inside any call on a given key id, to test that plugin boundaries catch panics;
//! - **count calls** per operation ([`MockProvider::calls`]).
//!
//! In-process, a test drives the faults through methods; as a plugin (`libkms_mock.so`) or
//! through the CLI, through its options:
//!
//! ```toml
//! [provider]
//! name = "mock"
//! [provider.options]
//! fail_next = 1              # the next call fails...
//! fail_kind = "unavailable"  # ...with this kind (an error code; the default is unavailable)
//! latency_ms = 5             # every call sleeps this long first
//! panic_on = "key/id"        # any call on this key id panics
//! ```
//!
//! Faults apply to key operations (`get`, `get_version`, `create`, `get_or_create`, `rotate`,
//! `list`, `delete`), not to `capabilities` or `Display`. Every call is counted, failed ones
//! included.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

use std::collections::BTreeMap;
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use kms_core::config::{self, Registered};
use kms_core::{
    Capabilities, Error, ErrorKind, Key, KeyId, KeyInfo, KeyProvider, KeySpec, Result, SecretBytes,
};
use serde::Deserialize;

/// The options of the mock provider (`[provider.options]`).
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Options {
    /// How many of the next calls fail.
    #[serde(default)]
    pub fail_next: u32,
    /// The error code they fail with; `unavailable` if unset.
    #[serde(default)]
    pub fail_kind: Option<String>,
    /// Milliseconds every call sleeps first.
    #[serde(default)]
    pub latency_ms: u64,
    /// A key id whose calls panic.
    #[serde(default)]
    pub panic_on: Option<String>,
}

/// How many calls each operation received, failed ones included.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Calls {
    /// `get`.
    pub get: u64,
    /// `get_version`.
    pub get_version: u64,
    /// `create`.
    pub create: u64,
    /// `get_or_create`.
    pub get_or_create: u64,
    /// `rotate`.
    pub rotate: u64,
    /// `list`.
    pub list: u64,
    /// `delete`.
    pub delete: u64,
}

impl Calls {
    /// The sum over every operation.
    pub fn total(&self) -> u64 {
        self.get
            + self.get_version
            + self.create
            + self.get_or_create
            + self.rotate
            + self.list
            + self.delete
    }
}

#[derive(Clone, Copy)]
enum Op {
    Get,
    GetVersion,
    Create,
    GetOrCreate,
    Rotate,
    List,
    Delete,
}

impl Op {
    fn name(self) -> &'static str {
        match self {
            Op::Get => "get",
            Op::GetVersion => "get_version",
            Op::Create => "create",
            Op::GetOrCreate => "get_or_create",
            Op::Rotate => "rotate",
            Op::List => "list",
            Op::Delete => "delete",
        }
    }
}

/// The faults currently armed.
#[derive(Clone, Debug)]
struct Faults {
    fail_next: u32,
    fail_kind: ErrorKind,
    latency: Duration,
    panic_on: Option<KeyId>,
}

impl Default for Faults {
    fn default() -> Faults {
        Faults {
            fail_next: 0,
            fail_kind: ErrorKind::Unavailable,
            latency: Duration::ZERO,
            panic_on: None,
        }
    }
}

/// One version of a key.
struct Version {
    material: SecretBytes,
    created: u64,
}

/// Keys in memory, with fault injection and call counters.
#[derive(Default)]
pub struct MockProvider {
    keys: Mutex<BTreeMap<KeyId, Vec<Version>>>,
    faults: Mutex<Faults>,
    counters: [AtomicU64; 7],
}

/// Locks `mutex`, going on after a panic elsewhere (a panic is a fault the mock injects; the
/// map is never left half-updated, since every update is one insert or remove).
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn error_kind(code: &str) -> Result<ErrorKind> {
    ErrorKind::from_code(code).ok_or_else(|| {
        let codes: Vec<&str> = ErrorKind::ALL.iter().map(|k| k.code()).collect();
        let message = format!(
            "options of provider \"mock\": unknown fail_kind \"{}\"; one of: {}",
            code.escape_debug(),
            codes.join(", ")
        );
        Error::new(ErrorKind::InvalidConfig, message)
    })
}

impl MockProvider {
    /// An empty mock with no fault armed.
    pub fn new() -> MockProvider {
        MockProvider::default()
    }

    /// A mock with the faults `options` arm.
    pub fn with_options(options: &Options) -> Result<MockProvider> {
        let mock = MockProvider::new();
        let kind = match &options.fail_kind {
            Some(code) => error_kind(code)?,
            None => ErrorKind::Unavailable,
        };
        let panic_on = match &options.panic_on {
            Some(id) => Some(KeyId::new(id).map_err(|e| {
                let message = format!("options of provider \"mock\": panic_on: {}", e.message());
                Error::new(ErrorKind::InvalidConfig, message)
            })?),
            None => None,
        };
        mock.fail_next(options.fail_next, kind);
        mock.set_latency(Duration::from_millis(options.latency_ms));
        mock.panic_on(panic_on);
        Ok(mock)
    }

    /// Makes the next `n` calls fail with `kind` (0 disarms).
    pub fn fail_next(&self, n: u32, kind: ErrorKind) {
        let mut faults = lock(&self.faults);
        faults.fail_next = n;
        faults.fail_kind = kind;
    }

    /// Makes every call sleep `latency` first.
    pub fn set_latency(&self, latency: Duration) {
        lock(&self.faults).latency = latency;
    }

    /// Makes every call on `id` panic (`None` disarms).
    pub fn panic_on(&self, id: Option<KeyId>) {
        lock(&self.faults).panic_on = id;
    }

    /// How many calls each operation has received.
    pub fn calls(&self) -> Calls {
        let [
            get,
            get_version,
            create,
            get_or_create,
            rotate,
            list,
            delete,
        ] = self.counters.each_ref().map(|c| c.load(Ordering::Relaxed));
        Calls {
            get,
            get_version,
            create,
            get_or_create,
            rotate,
            list,
            delete,
        }
    }

    /// How many keys it holds.
    pub fn len(&self) -> usize {
        lock(&self.keys).len()
    }

    /// Whether it holds no key.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Counts the call, then applies the armed faults: latency, an injected failure, a panic.
    fn enter(&self, op: Op, id: Option<&KeyId>) -> Result<()> {
        self.counters[op as usize].fetch_add(1, Ordering::Relaxed);
        let (latency, failure, panic) = {
            let mut faults = lock(&self.faults);
            let failure = (faults.fail_next > 0).then(|| {
                faults.fail_next -= 1;
                (faults.fail_kind, faults.fail_next)
            });
            let panic = id.is_some() && faults.panic_on.as_ref() == id;
            (faults.latency, failure, panic)
        };
        if !latency.is_zero() {
            std::thread::sleep(latency);
        }
        if let Some((kind, left)) = failure {
            let message = format!(
                "injected {kind} failure in {} ({left} more to come)",
                op.name()
            );
            let error = Error::new(kind, message).with_backend(self);
            return Err(match id {
                Some(id) => error.with_key_id(id),
                None => error,
            });
        }
        if panic {
            let id = id.map(KeyId::as_str).unwrap_or_default();
            panic!("mock provider: panic_on \"{id}\" in {}", op.name());
        }
        Ok(())
    }

    fn named<T>(&self, result: Result<T>) -> Result<T> {
        result.map_err(|e| e.with_backend(self))
    }

    fn key(id: &KeyId, number: usize, version: &Version) -> Result<Key> {
        Key::new(id.clone(), number as u32 + 1, version.material.clone())
    }

    fn new_version(spec: KeySpec) -> Result<Version> {
        Ok(Version {
            material: SecretBytes::random(spec.len.bytes())?,
            created: now(),
        })
    }
}

impl fmt::Display for MockProvider {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("mock provider")
    }
}

impl fmt::Debug for MockProvider {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MockProvider")
            .field("keys", &self.len())
            .field("faults", &*lock(&self.faults))
            .field("calls", &self.calls())
            .finish()
    }
}

impl KeyProvider for MockProvider {
    fn get(&self, id: &KeyId) -> Result<Key> {
        self.enter(Op::Get, Some(id))?;
        let keys = lock(&self.keys);
        let versions = keys.get(id).ok_or_else(|| Error::not_found(id));
        self.named(versions.and_then(|v| Self::key(id, v.len() - 1, &v[v.len() - 1])))
    }

    fn get_version(&self, id: &KeyId, version: u32) -> Result<Key> {
        self.enter(Op::GetVersion, Some(id))?;
        let keys = lock(&self.keys);
        let found = keys
            .get(id)
            .and_then(|v| Some((version.checked_sub(1)? as usize, v)))
            .and_then(|(n, v)| Some((n, v.get(n)?)));
        self.named(match found {
            Some((n, v)) => Self::key(id, n, v),
            None => {
                let message = format!("key \"{id}\" has no version {version}");
                Err(Error::new(ErrorKind::NotFound, message).with_key_id(id))
            }
        })
    }

    fn create(&self, id: &KeyId, spec: KeySpec) -> Result<Key> {
        self.enter(Op::Create, Some(id))?;
        let mut keys = lock(&self.keys);
        if keys.contains_key(id) {
            return self.named(Err(Error::already_exists(id)));
        }
        let version = self.named(Self::new_version(spec))?;
        let key = Self::key(id, 0, &version);
        keys.insert(id.clone(), vec![version]);
        self.named(key)
    }

    fn get_or_create(&self, id: &KeyId, spec: KeySpec) -> Result<Key> {
        self.enter(Op::GetOrCreate, Some(id))?;
        // One lock over the lookup and the insert: racing callers see one key.
        let mut keys = lock(&self.keys);
        if let Some(v) = keys.get(id) {
            return self.named(Self::key(id, v.len() - 1, &v[v.len() - 1]));
        }
        let version = self.named(Self::new_version(spec))?;
        let key = Self::key(id, 0, &version);
        keys.insert(id.clone(), vec![version]);
        self.named(key)
    }

    fn rotate(&self, id: &KeyId, spec: KeySpec) -> Result<Key> {
        self.enter(Op::Rotate, Some(id))?;
        let mut keys = lock(&self.keys);
        let Some(versions) = keys.get_mut(id) else {
            return self.named(Err(Error::not_found(id)));
        };
        let version = self.named(Self::new_version(spec))?;
        let key = Self::key(id, versions.len(), &version);
        versions.push(version);
        self.named(key)
    }

    fn list(&self, prefix: &str) -> Result<Vec<KeyInfo>> {
        self.enter(Op::List, None)?;
        self.named(kms_core::validate_prefix(prefix))?;
        let keys = lock(&self.keys);
        let listed = keys
            .iter()
            .filter(|(id, _)| id.as_str().starts_with(prefix))
            .map(|(id, versions)| {
                let newest = &versions[versions.len() - 1];
                KeyInfo {
                    id: id.clone(),
                    version: versions.len() as u32,
                    bytes: newest.material.len() as u32,
                    created: newest.created,
                }
            })
            .collect();
        Ok(listed)
    }

    fn delete(&self, id: &KeyId) -> Result<()> {
        self.enter(Op::Delete, Some(id))?;
        match lock(&self.keys).remove(id) {
            Some(_) => Ok(()),
            None => self.named(Err(Error::not_found(id))),
        }
    }

    fn capabilities(&self) -> Capabilities {
        let mut caps = Capabilities::ALL;
        caps.durable = false;
        caps
    }
}

/// The registry entry of the mock provider, under the name `mock`.
pub fn registered() -> Registered {
    Registered {
        name: "mock",
        summary: "keys in memory, with fault injection (for tests)",
        open: |_, options| {
            let options: Options = config::parse_options("mock", options)?;
            Ok(Box::new(MockProvider::with_options(&options)?) as Box<dyn KeyProvider>)
        },
        init: None,
    }
}
