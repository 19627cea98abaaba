//! # kms-aws-kms: keys wrapped by an AWS KMS key
//!
//! Envelope encryption with the KEK in AWS KMS. The DEKs are drawn from the OS CSPRNG (by
//! `kms_core::envelope`), wrapped by KMS `Encrypt` under the configured KMS key with the
//! encryption context `{"kms:key-id": <id>, "kms:version": <version>}`, and the ciphertext
//! blobs are kept in the wrapped-key store of `kms-core` in the provider's directory. Reading a
//! key is one KMS `Decrypt`; the KMS key never leaves KMS.
//!
//! The store records, per KEK generation, the KMS key's ARN (as DescribeKey returns it) and a
//! fingerprint (SHA-256 over a label and the ARN), so that opening it with another KMS key is
//! refused as "wrong KEK". [`rotate_kek`] moves every DEK to a new KMS key, or to the same key
//! after AWS rotated its material, with `ReEncrypt`; it is resumable after a crash.
//!
//! Options (`[provider.options]`):
//!
//! ```toml
//! dir = "/var/lib/kms"                 # required; relative to the configuration file
//! key_id = "alias/kms-tde"             # required; key id, key ARN, alias name or alias ARN
//! region = "eu-west-1"                 # optional; else AWS_REGION or the profile's region
//! endpoint = "http://127.0.0.1:5000"   # optional; an endpoint override (tests, VPC endpoints)
//! profile = "kms"                      # optional; a profile of ~/.aws/config
//! connect_timeout = 3.0                # seconds; optional
//! operation_timeout = 10.0             # seconds for one call, retries included; optional
//! max_attempts = 3                     # attempts of one call (transient failures); optional
//! ```
//!
//! Credentials come from the standard chain of the AWS SDK (environment, profile, web
//! identity, ECS, IMDS). See docs/providers/aws-kms.md.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod client;
pub mod wrapper;

use std::fs;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use kms_core::config::{self, Context, Registered};
use kms_core::envelope::{CURRENT_KEK_META, EnvelopeProvider, switch_generation};
use kms_core::fsutil::create_private_dir;
use kms_core::store::{Rewrapped, Store, fingerprint_meta_name};
use kms_core::wrap::{KeyWrapper, hex_prefix};
use kms_core::{Error, ErrorKind, KeyId, KeyProvider, Result, SecretBytes};
use serde::Deserialize;

/// The AWS SDK for KMS, as this crate uses it (for tools and tests that make keys).
pub use aws_sdk_kms;
pub use client::Kms;
pub use wrapper::KmsKek;

/// The provider's name in configurations: `aws-kms` (its plugin is `libkms_aws_kms.so`).
pub const NAME: &str = "aws-kms";

/// The name of the store file inside the directory.
pub const STORE_FILE: &str = "keys.db";

/// Metadata name of the pending rotation's target generation.
pub const ROTATION_META: &str = "aws-kms.rotation";

/// Metadata name of the ARN of the KMS key of KEK generation `generation`.
pub fn arn_meta_name(generation: u32) -> String {
    format!("aws-kms.arn.{generation}")
}

/// The options of the aws-kms provider.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Options {
    /// The provider's directory, holding the wrapped-key store.
    pub dir: PathBuf,
    /// The KMS key: key id, key ARN, alias name (`alias/...`) or alias ARN.
    pub key_id: String,
    /// The AWS region; else from the environment or the profile.
    #[serde(default)]
    pub region: Option<String>,
    /// An endpoint URL override.
    #[serde(default)]
    pub endpoint: Option<String>,
    /// A named profile of the shared AWS configuration.
    #[serde(default)]
    pub profile: Option<String>,
    /// Seconds to wait for a TCP (and TLS) connection.
    #[serde(default = "default_connect_timeout")]
    pub connect_timeout: f64,
    /// Seconds one call may take, retries included.
    #[serde(default = "default_operation_timeout")]
    pub operation_timeout: f64,
    /// Attempts of one call; only transient failures are retried.
    #[serde(default = "default_max_attempts")]
    pub max_attempts: u32,
}

fn default_connect_timeout() -> f64 {
    3.0
}

fn default_operation_timeout() -> f64 {
    10.0
}

fn default_max_attempts() -> u32 {
    3
}

fn seconds(value: f64, name: &str) -> Result<Duration> {
    if !(value > 0.0 && value <= 3600.0) {
        let message = format!("{name} must be more than 0 and at most 3600 seconds, not {value}");
        return Err(Error::new(ErrorKind::InvalidConfig, message));
    }
    Ok(Duration::from_secs_f64(value))
}

impl Options {
    /// Options for a directory and a KMS key, with every other option at its default.
    pub fn new(dir: impl Into<PathBuf>, key_id: impl Into<String>) -> Options {
        Options {
            dir: dir.into(),
            key_id: key_id.into(),
            region: None,
            endpoint: None,
            profile: None,
            connect_timeout: default_connect_timeout(),
            operation_timeout: default_operation_timeout(),
            max_attempts: default_max_attempts(),
        }
    }

    /// Parses and checks an options table, resolving `dir` against the configuration's
    /// directory.
    pub fn from_table(context: &Context, table: &toml::Table) -> Result<Options> {
        let mut options: Options = config::parse_options(NAME, table)?;
        options.dir = config::resolve(&context.base_dir, &options.dir);
        options.check()?;
        Ok(options)
    }

    fn check(&self) -> Result<()> {
        if self.key_id.trim().is_empty() {
            return Err(Error::new(
                ErrorKind::InvalidConfig,
                "key_id must not be empty",
            ));
        }
        seconds(self.connect_timeout, "connect_timeout")?;
        seconds(self.operation_timeout, "operation_timeout")?;
        if !(1..=10).contains(&self.max_attempts) {
            let message = format!("max_attempts must be 1 to 10, not {}", self.max_attempts);
            return Err(Error::new(ErrorKind::InvalidConfig, message));
        }
        Ok(())
    }

    fn connect_timeout(&self) -> Duration {
        seconds(self.connect_timeout, "").unwrap_or(Duration::from_secs(3))
    }

    fn operation_timeout(&self) -> Duration {
        seconds(self.operation_timeout, "").unwrap_or(Duration::from_secs(10))
    }

    fn attempt_timeout(&self) -> Duration {
        let per_attempt = self.operation_timeout() / self.max_attempts.max(1);
        per_attempt.max(Duration::from_millis(500))
    }

    /// Where requests go: the endpoint override, else the region, else the default chain's.
    pub fn location(&self) -> String {
        match (&self.endpoint, &self.region) {
            (Some(endpoint), _) => endpoint.clone(),
            (None, Some(region)) => format!("region {region}"),
            (None, None) => "the default region".to_string(),
        }
    }

    fn store_path(&self) -> PathBuf {
        self.dir.join(STORE_FILE)
    }

    /// The provider's name in messages: the KMS key, where it is asked, and the directory.
    pub fn display_name(&self) -> String {
        format!(
            "aws-kms provider (KMS key {} at {}) at {}",
            self.key_id,
            self.location(),
            self.dir.display()
        )
    }
}

/// The registry entry of the provider, under the name `aws-kms`.
pub fn registered() -> Registered {
    Registered {
        name: NAME,
        summary: "keys wrapped by an AWS KMS key (Encrypt/Decrypt with an encryption context)",
        open: |context, options| {
            let options = Options::from_table(context, options)?;
            Ok(Box::new(open(&options)?) as Box<dyn KeyProvider>)
        },
        init: Some(|context, options| init(&Options::from_table(context, options)?)),
    }
}

/// Creates the directory (0700) and an empty store recording the KMS key's ARN and
/// fingerprint, after checking that the key is enabled and that Encrypt and Decrypt work
/// under it. Refuses a directory that already holds a store.
pub fn init(options: &Options) -> Result<String> {
    let name = options.display_name();
    let done = (|| {
        options.check()?;
        let store_path = options.store_path();

        // 1. The directory: made 0700, or an existing one that passes the checks of open.
        create_private_dir(&options.dir)?;
        if fs::symlink_metadata(&store_path).is_ok() {
            let message = format!(
                "{} already exists: this provider is already initialised",
                store_path.display()
            );
            return Err(Error::new(ErrorKind::AlreadyExists, message));
        }

        // 2. The KMS key: enabled, and answering Encrypt and Decrypt for these credentials.
        let kms = Arc::new(Kms::connect(options)?);
        let described = kms.describe_enabled(&options.key_id)?;
        let kek = KmsKek::new(kms, described.arn.clone());
        let probe_id = KeyId::new("aws-kms/init-check")?;
        let probe = SecretBytes::random(32)?;
        let wrapped = kek.wrap(&probe_id, 1, &probe)?;
        if kek.unwrap(&probe_id, 1, &wrapped)?.expose_secret() != probe.expose_secret() {
            let message = format!("KMS key {} did not give back what it encrypted", kek.arn());
            return Err(Error::new(ErrorKind::Corrupted, message));
        }

        // 3. The store, recording generation 1: the fingerprint and the ARN.
        let mut meta = EnvelopeProvider::initial_meta(&kek);
        meta.push((arn_meta_name(1), described.arn.clone().into_bytes()));
        Store::create(&store_path, &meta)?;
        Ok(format!(
            "initialised {name}: KMS key {}, store {}",
            described.arn,
            store_path.display()
        ))
    })();
    done.map_err(|e| e.with_backend(&name))
}

/// The KEK generations of a store: the current one and a pending rotation's target.
struct Generations {
    current: u32,
    target: Option<u32>,
}

fn read_generation(store: &Store, name: &str) -> Result<Option<u32>> {
    match store.meta(name)? {
        None => Ok(None),
        Some(raw) => std::str::from_utf8(&raw)
            .ok()
            .and_then(|s| s.parse::<u32>().ok())
            .filter(|g| *g >= 1)
            .map(Some)
            .ok_or_else(|| {
                let message = format!(
                    "store {} is damaged: its metadata {name} is unreadable",
                    store.path().display()
                );
                Error::new(ErrorKind::Corrupted, message)
            }),
    }
}

fn generations(store: &Store) -> Result<Generations> {
    Ok(Generations {
        current: read_generation(store, CURRENT_KEK_META)?.unwrap_or(1),
        target: read_generation(store, ROTATION_META)?,
    })
}

fn recorded_arn(store: &Store, generation: u32) -> Result<String> {
    store
        .meta(&arn_meta_name(generation))?
        .and_then(|raw| String::from_utf8(raw).ok())
        .ok_or_else(|| {
            let message = format!(
                "store {} is damaged: it records no KMS key for KEK generation {generation}",
                store.path().display()
            );
            Error::new(ErrorKind::Corrupted, message)
        })
}

fn open_store(options: &Options) -> Result<Store> {
    kms_core::store::open_initialised(&options.dir, &options.store_path())
}

/// Opens an initialised provider.
///
/// The configured KMS key must be the store's current KEK or, during an unfinished rotation,
/// its target; the other live generation's key is taken from the ARN the store records. A key
/// that is not enabled is refused with the "key disabled" error ([`ErrorKind::Denied`]).
pub fn open(options: &Options) -> Result<EnvelopeProvider> {
    let name = options.display_name();
    let opened = (|| {
        options.check()?;
        let store = open_store(options)?;
        let generations = generations(&store)?;

        // 1. The configured key, as KMS knows it now.
        let kms = Arc::new(Kms::connect(options)?);
        let configured = kms.describe_enabled(&options.key_id)?;
        let configured_fp = wrapper::fingerprint(&configured.arn);
        let fingerprint_of =
            |g: u32| -> Result<Option<Vec<u8>>> { store.meta(&fingerprint_meta_name(g)) };

        // 2. Which generation it is; the other live one comes from the store's record.
        let current_arn = if fingerprint_of(generations.current)? == Some(configured_fp.clone()) {
            configured.arn.clone()
        } else if let Some(target) = generations.target
            && fingerprint_of(target)? == Some(configured_fp.clone())
        {
            recorded_arn(&store, generations.current)?
        } else {
            let recorded = recorded_arn(&store, generations.current)
                .unwrap_or_else(|_| "an unrecorded key".to_string());
            let message = format!(
                "wrong KEK: store {} is wrapped by KMS key {recorded} (fingerprint {}), but \
                 key_id {} is KMS key {}; set key_id to the store's key",
                store.path().display(),
                hex_prefix(&wrapper::fingerprint(&recorded)),
                options.key_id,
                configured.arn
            );
            return Err(Error::new(ErrorKind::WrongKek, message));
        };
        let current = KmsKek::new(kms.clone(), current_arn);
        let mut provider = EnvelopeProvider::open(name.clone(), store, Box::new(current))?;

        // 3. During a rotation, new keys go to the target at once.
        if let Some(target) = generations.target {
            let arn = recorded_arn(provider.store(), target)?;
            provider.add_wrapper(target, Box::new(KmsKek::new(kms, arn)))?;
            provider.write_with(target)?;
        }
        Ok(provider)
    })();
    opened.map_err(|e| e.with_backend(&name))
}

/// The result of [`rotate_kek`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rotated {
    /// The generation the keys were wrapped by.
    pub from: u32,
    /// The generation they are wrapped by now.
    pub to: u32,
    /// The ARN of the KMS key of `to`.
    pub arn: String,
    /// Whether this call resumed an interrupted rotation.
    pub resumed: bool,
    /// Keys re-wrapped by this call.
    pub rewrapped: usize,
}

/// Rows re-wrapped per store transaction by [`rotate_kek`].
pub const ROTATION_BATCH: u32 = 100;

/// Moves every DEK to KEK generation `current + 1`, wrapped by the KMS key `to_key_id` (key id,
/// ARN or alias), or by the configured key when `None` (after AWS rotated its key material,
/// this re-encrypts every DEK under the newest material). Each DEK is moved inside KMS with
/// `ReEncrypt`, keeping its encryption context; the DEKs never leave KMS in plaintext.
///
/// Crash-safe and resumable: the target is recorded first; each batch of rows changes in one
/// transaction and each row records its generation, so keys stay readable at every point; the
/// switch of the current generation happens, in one transaction, only once no row is left
/// under the old one. Calling this again after an interruption finishes the same rotation
/// (`to_key_id` must then be `None` or the same key). Once done, set `key_id` to the new key.
pub fn rotate_kek(
    options: &Options,
    to_key_id: Option<&str>,
    mut progress: impl FnMut(usize),
) -> Result<Rotated> {
    let name = options.display_name();
    let done = (|| {
        options.check()?;
        let store = open_store(options)?;
        let generations = generations(&store)?;
        let from = generations.current;
        let kms = Arc::new(Kms::connect(options)?);

        // The configured key must be the store's (current, or the target of this rotation),
        // as for open: a wrong key_id never silently becomes the target.
        let configured = kms.describe_enabled(&options.key_id)?;
        let is_store_key = |g: Option<u32>| -> Result<bool> {
            Ok(match g {
                Some(g) => {
                    store.meta(&fingerprint_meta_name(g))?
                        == Some(wrapper::fingerprint(&configured.arn))
                }
                None => false,
            })
        };
        if !is_store_key(Some(from))? && !is_store_key(generations.target)? {
            let message = format!(
                "wrong KEK: store {} is wrapped by KMS key {}, but key_id {} is KMS key {}; set \
                 key_id to the store's key (and name the new key with --to)",
                store.path().display(),
                recorded_arn(&store, from)?,
                options.key_id,
                configured.arn
            );
            return Err(Error::new(ErrorKind::WrongKek, message));
        }
        let wanted = match to_key_id {
            Some(key) => kms.describe_enabled(key)?,
            None => configured,
        };

        // 1. Start, or find, the rotation: the target's fingerprint and ARN and the rotation
        //    record, in one transaction.
        let (to, resumed) = match generations.target {
            Some(target) => {
                let arn = recorded_arn(&store, target)?;
                if to_key_id.is_some() && arn != wanted.arn {
                    let message = format!(
                        "an unfinished rotation to KMS key {arn} is in this store; resume it \
                         first (without a new key, or with that key)"
                    );
                    return Err(Error::new(ErrorKind::InvalidInput, message));
                }
                (target, true)
            }
            None => {
                let to = from
                    .checked_add(1)
                    .ok_or_else(|| Error::new(ErrorKind::Other, "KEK generations are exhausted"))?;
                let set = vec![
                    (fingerprint_meta_name(to), wrapper::fingerprint(&wanted.arn)),
                    (arn_meta_name(to), wanted.arn.clone().into_bytes()),
                    (ROTATION_META.to_string(), to.to_string().into_bytes()),
                ];
                store.update_meta(set, Vec::new())?;
                (to, false)
            }
        };
        let old = KmsKek::new(kms.clone(), recorded_arn(&store, from)?);
        let new = KmsKek::new(kms, recorded_arn(&store, to)?);

        // 2. Every row of the old generation, batch by batch, then the switch once none is
        //    left (a writer that opened before the rotation may still add rows: go round
        //    again, a bounded number of times).
        let mut rewrapped = 0;
        for _ in 0..1000 {
            loop {
                let rows = store.wrapped_by(from, ROTATION_BATCH)?;
                if rows.is_empty() {
                    break;
                }
                let mut batch = Vec::with_capacity(rows.len());
                for (id, record) in rows {
                    let wrapped = old.re_encrypt(&new, &id, record.version, &record.wrapped)?;
                    batch.push(Rewrapped {
                        id,
                        version: record.version,
                        from_kek: from,
                        to_kek: to,
                        wrapped,
                    });
                }
                rewrapped += store.rewrap_batch(batch)?;
                progress(rewrapped);
            }
            let retired = vec![ROTATION_META.to_string(), arn_meta_name(from)];
            if switch_generation(&store, from, to, retired)? {
                return Ok(Rotated {
                    from,
                    to,
                    arn: new.arn().to_string(),
                    resumed,
                    rewrapped,
                });
            }
        }
        let message = "keys are being added under the old KEK faster than the rotation moves \
                       them; stop the writers and resume the rotation";
        Err(Error::new(ErrorKind::Unavailable, message))
    })();
    done.map_err(|e| e.with_backend(&name))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Options> {
        let context = Context {
            base_dir: PathBuf::from("/etc/kms"),
        };
        Options::from_table(&context, &text.parse::<toml::Table>().unwrap())
    }

    #[test]
    fn options_are_checked() {
        let options = parse("dir = \"keys\"\nkey_id = \"alias/a\"").unwrap();
        assert_eq!(options.dir, PathBuf::from("/etc/kms/keys"));
        assert_eq!((options.connect_timeout, options.max_attempts), (3.0, 3));
        assert_eq!(options.location(), "the default region");

        for bad in [
            "dir = \"k\"\nkey_id = \"a\"\nsecret_access_key = \"x\"",
            "dir = \"k\"",
            "dir = \"k\"\nkey_id = \" \"",
            "dir = \"k\"\nkey_id = \"a\"\noperation_timeout = 0.0",
            "dir = \"k\"\nkey_id = \"a\"\nmax_attempts = 0",
        ] {
            let err = parse(bad).unwrap_err();
            assert_eq!(err.kind(), ErrorKind::InvalidConfig, "{bad}: {err}");
        }
    }

    #[test]
    fn fingerprints_name_the_key_only() {
        let a = wrapper::fingerprint("arn:aws:kms:eu-west-1:1:key/a");
        assert_eq!(a.len(), 32);
        assert_ne!(a, wrapper::fingerprint("arn:aws:kms:eu-west-1:1:key/b"));
        assert_eq!(a, wrapper::fingerprint("arn:aws:kms:eu-west-1:1:key/a"));
    }
}
