//! # kms-openbao: DEKs wrapped by an OpenBao (or Vault) Transit key
//!
//! Envelope encryption with the KEK inside OpenBao: every DEK is drawn from the OS CSPRNG on
//! this host, sent once to Transit `encrypt` and stored wrapped in a local store
//! (`<dir>/keys.db`, the [`Store`] of `kms-core`); reading a key sends the wrapped blob to
//! Transit `decrypt`. The Transit key never leaves the server.
//!
//! The Transit key must be a **derived** key (`bao write transit/keys/NAME derived=true`):
//! each call carries the context `kms/dek/v1/<version>/<key id>`, so that the server derives a
//! key per kms key id and version and a wrapped blob moved to another id or version fails
//! authentication on the server. Transit's `associated_data` would bind as well for
//! `encrypt`/`decrypt`, but `rewrap` ignores it, so KEK rotation could not be done on the
//! server; the context is honoured by all three. The id-and-version binding of `kms-core`
//! also travels inside the encrypted plaintext, so that a key that is not derived (which
//! ignores the context) would still not let a blob move unnoticed; opening refuses such a key.
//!
//! ```toml
//! [provider]
//! name = "openbao"
//! [provider.options]
//! dir = "/var/lib/kms"                       # the local store of wrapped keys
//! address = ["https://bao1:8200", "https://bao2:8200"]   # or one string
//! ca_file = "/etc/kms/openbao-ca.pem"        # for https
//! mount = "transit"                          # default
//! key = "kms"                                # the Transit key (derived=true)
//! token_env = "KMS_BAO_TOKEN"                # or token_file, or role_id + secret_id_*
//! ```
//!
//! See docs/providers/openbao.md for every option, the failure kinds and rotation.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod client;

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use kms_core::config::{self, Context, Registered};
use kms_core::envelope::{EnvelopeProvider, fingerprint_meta_name, switch_generation};
use kms_core::fsutil::{check_private, create_private_dir};
use kms_core::store::{Rewrapped, Store};
use kms_core::wrap::{BINDING_LEN, KeyWrapper, binding};
use kms_core::{
    Capabilities, Error, ErrorKind, Key, KeyId, KeyInfo, KeyProvider, KeySpec, MAX_SECRET_LEN,
    Result, SecretBytes,
};
use serde::Deserialize;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use zeroize::Zeroizing;

use crate::client::{Auth, Client, Failure, Scrubbed, Settings};

/// The name of the store file inside the directory.
pub const STORE_FILE: &str = "keys.db";

/// Metadata name of the KEK generation a rotation is moving to, while it runs.
pub const ROTATION_META: &str = "openbao.rotation.to";

/// Metadata name of the Transit key version that was newest when the rotation started.
pub const ROTATION_VERSION_META: &str = "openbao.rotation.transit_version";

/// Rows re-wrapped per Transit `rewrap` call and per store transaction during a rotation.
pub const REWRAP_BATCH: u32 = 50;

/// Bounds of `timeout_ms`.
pub const TIMEOUT_MS_RANGE: (u64, u64) = (100, 300_000);

/// The most retries `retries` may ask for.
pub const MAX_RETRIES: u32 = 10;

/// One address or several.
#[derive(Clone, Debug, Deserialize)]
#[serde(untagged)]
pub enum Addresses {
    /// One address.
    One(String),
    /// Several, tried in order.
    Many(Vec<String>),
}

impl Addresses {
    fn to_vec(&self) -> Vec<String> {
        match self {
            Addresses::One(a) => vec![a.clone()],
            Addresses::Many(list) => list.clone(),
        }
    }
}

fn default_mount() -> String {
    "transit".to_string()
}

fn default_approle_mount() -> String {
    "approle".to_string()
}

fn default_timeout_ms() -> u64 {
    5_000
}

fn default_retries() -> u32 {
    3
}

/// The options of the openbao provider. They hold no secret: the token and the AppRole secret
/// id are named by an environment variable or a file.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Options {
    /// The directory of the local store of wrapped keys.
    pub dir: PathBuf,
    /// The server address(es), `http://` or `https://`, tried in order.
    pub address: Addresses,
    /// The Transit mount.
    #[serde(default = "default_mount")]
    pub mount: String,
    /// The Transit key name.
    pub key: String,
    /// The namespace (`X-Vault-Namespace`).
    #[serde(default)]
    pub namespace: Option<String>,
    /// The environment variable that holds the token.
    #[serde(default)]
    pub token_env: Option<String>,
    /// A file (0600) that holds the token.
    #[serde(default)]
    pub token_file: Option<PathBuf>,
    /// The AppRole role id.
    #[serde(default)]
    pub role_id: Option<String>,
    /// The environment variable that holds the AppRole secret id.
    #[serde(default)]
    pub secret_id_env: Option<String>,
    /// A file (0600) that holds the AppRole secret id.
    #[serde(default)]
    pub secret_id_file: Option<PathBuf>,
    /// The mount of the AppRole auth method.
    #[serde(default = "default_approle_mount")]
    pub approle_mount: String,
    /// A PEM file of CA certificates trusted for `https` addresses.
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// The time limit of one HTTP request, in milliseconds.
    #[serde(default = "default_timeout_ms")]
    pub timeout_ms: u64,
    /// How many times a transient failure is retried.
    #[serde(default = "default_retries")]
    pub retries: u32,
}

impl Options {
    /// Parses and checks the options of a configuration.
    pub fn from_table(context: &Context, table: &toml::Table) -> Result<Options> {
        let options: Options = config::parse_options("openbao", table)?;
        options.check()?;
        Ok(options.resolved(context))
    }

    fn resolved(mut self, context: &Context) -> Options {
        let base = &context.base_dir;
        self.dir = config::resolve(base, &self.dir);
        for path in [
            &mut self.token_file,
            &mut self.secret_id_file,
            &mut self.ca_file,
        ] {
            if let Some(p) = path.as_mut() {
                *p = config::resolve(base, p);
            }
        }
        self
    }

    fn check(&self) -> Result<()> {
        let invalid = |message: String| Err(Error::new(ErrorKind::InvalidConfig, message));
        let addresses = self.address.to_vec();
        if addresses.is_empty() {
            return invalid("openbao: address names no server".to_string());
        }
        for a in &addresses {
            if !(a.starts_with("http://") || a.starts_with("https://")) || a.contains(['?', '#']) {
                return invalid(format!(
                    "openbao: address \"{}\" is not an http:// or https:// URL",
                    a.escape_debug()
                ));
            }
        }
        for (what, value) in [
            ("mount", &self.mount),
            ("key", &self.key),
            ("approle_mount", &self.approle_mount),
        ] {
            if !is_path_name(value, what != "key") {
                return invalid(format!(
                    "openbao: {what} \"{}\" must be letters, digits, '_', '-', '.'{}",
                    value.escape_debug(),
                    if what == "key" { "" } else { " and inner '/'" }
                ));
            }
        }
        if let Some(ns) = &self.namespace
            && !is_path_name(ns.trim_end_matches('/'), true)
        {
            return invalid(format!(
                "openbao: namespace \"{}\" is not a namespace path",
                ns.escape_debug()
            ));
        }
        let (lo, hi) = TIMEOUT_MS_RANGE;
        if !(lo..=hi).contains(&self.timeout_ms) {
            return invalid(format!(
                "openbao: timeout_ms is {}, allowed {lo} to {hi}",
                self.timeout_ms
            ));
        }
        if self.retries > MAX_RETRIES {
            return invalid(format!(
                "openbao: retries is {}, at most {MAX_RETRIES}",
                self.retries
            ));
        }
        let methods = [
            self.token_env.is_some(),
            self.token_file.is_some(),
            self.role_id.is_some(),
        ];
        if methods.iter().filter(|m| **m).count() != 1 {
            return invalid(
                "openbao: set exactly one of token_env, token_file or role_id (AppRole)"
                    .to_string(),
            );
        }
        let secret_ids = [self.secret_id_env.is_some(), self.secret_id_file.is_some()];
        let secret_ids = secret_ids.iter().filter(|m| **m).count();
        if self.role_id.is_some() && secret_ids != 1 {
            return invalid(
                "openbao: role_id needs exactly one of secret_id_env or secret_id_file".to_string(),
            );
        }
        if self.role_id.is_none() && secret_ids != 0 {
            return invalid("openbao: secret_id_env and secret_id_file need role_id".to_string());
        }
        Ok(())
    }

    fn display_name(&self) -> String {
        format!("openbao provider ({}/{})", self.mount, self.key)
    }

    fn store_path(&self) -> PathBuf {
        self.dir.join(STORE_FILE)
    }

    fn auth(&self) -> Result<Auth> {
        if let Some(var) = &self.token_env {
            return Ok(Auth::Token(secret_from_env(var, "token")?));
        }
        if let Some(path) = &self.token_file {
            return Ok(Auth::Token(secret_from_file(path, "token")?));
        }
        let role_id = self.role_id.clone().unwrap_or_default();
        let secret_id = match (&self.secret_id_env, &self.secret_id_file) {
            (Some(var), _) => secret_from_env(var, "AppRole secret id")?,
            (None, Some(path)) => secret_from_file(path, "AppRole secret id")?,
            (None, None) => unreachable!("checked with the options"),
        };
        Ok(Auth::AppRole {
            mount: self.approle_mount.clone(),
            role_id,
            secret_id,
        })
    }

    fn client(&self) -> Result<Client> {
        Client::new(Settings {
            addresses: self
                .address
                .to_vec()
                .into_iter()
                .map(|a| a.trim_end_matches('/').to_string())
                .collect(),
            namespace: self.namespace.clone(),
            ca_file: self.ca_file.clone(),
            timeout: Duration::from_millis(self.timeout_ms),
            retries: self.retries,
            backoff: Duration::from_millis(100),
            auth: self.auth()?,
        })
    }
}

/// Letters, digits, `_`, `-`, `.`, and inner `/` between non-empty segments if `slashes`.
fn is_path_name(text: &str, slashes: bool) -> bool {
    let segment_ok = |s: &str| {
        !s.is_empty()
            && s != "."
            && s != ".."
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'))
    };
    if slashes {
        text.len() <= 255 && text.split('/').all(segment_ok)
    } else {
        text.len() <= 255 && segment_ok(text)
    }
}

fn secret_from_env(var: &str, what: &str) -> Result<Zeroizing<String>> {
    match std::env::var(var) {
        Ok(value) if !value.trim().is_empty() => Ok(Zeroizing::new(value.trim().to_string())),
        Ok(_) => Err(Error::new(
            ErrorKind::InvalidConfig,
            format!("openbao: the {what} variable {var} is empty"),
        )),
        Err(_) => Err(Error::new(
            ErrorKind::InvalidConfig,
            format!("openbao: the {what} variable {var} is not set"),
        )),
    }
}

fn secret_from_file(path: &Path, what: &str) -> Result<Zeroizing<String>> {
    check_private(path, false)?;
    let raw = Zeroizing::new(std::fs::read(path).map_err(|e| {
        let message = format!(
            "openbao: cannot read the {what} file {}: {e}",
            path.display()
        );
        Error::new(ErrorKind::InvalidConfig, message)
    })?);
    let text = std::str::from_utf8(&raw).ok().map(str::trim).unwrap_or("");
    if text.is_empty() || text.contains(['\n', '\r', '\0']) {
        let message = format!(
            "openbao: the {what} file {} must hold one line of text",
            path.display()
        );
        return Err(Error::new(ErrorKind::InvalidConfig, message));
    }
    Ok(Zeroizing::new(text.to_string()))
}

/// The fingerprint of a Transit key: SHA-256 over a label, the namespace, the mount and the key
/// name. It holds no secret; it tells a store wrapped by one Transit key from another.
pub fn transit_fingerprint(namespace: Option<&str>, mount: &str, key: &str) -> Vec<u8> {
    let namespace = namespace.unwrap_or("").trim_end_matches('/');
    Sha256::new()
        .chain_update(b"openbao-transit\0")
        .chain_update(namespace.as_bytes())
        .chain_update(b"\0")
        .chain_update(mount.as_bytes())
        .chain_update(b"\0")
        .chain_update(key.as_bytes())
        .finalize()
        .to_vec()
}

/// The Transit derivation context of a key id and version.
pub fn context(id: &KeyId, version: u32) -> String {
    format!("kms/dek/v1/{version}/{id}")
}

/// What Transit says about the key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TransitKeyInfo {
    /// The key type (`aes256-gcm96`, ...).
    pub key_type: String,
    /// Whether keys are derived per context.
    pub derived: bool,
    /// The newest version.
    pub latest_version: u64,
    /// The oldest version that still decrypts.
    pub min_decryption_version: u64,
}

/// The Transit key, reached through a client: the KEK of the provider.
pub struct Transit {
    client: Client,
    mount: String,
    key: String,
    fingerprint: Vec<u8>,
}

impl fmt::Debug for Transit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Transit")
            .field("client", &self.client)
            .field("mount", &self.mount)
            .field("key", &self.key)
            .finish_non_exhaustive()
    }
}

/// The operation a failure happened in, for messages.
#[derive(Clone, Copy)]
enum Op {
    ReadKey,
    Encrypt,
    Decrypt,
    Rewrap,
    Rotate,
}

impl Op {
    fn describe(self) -> &'static str {
        match self {
            Op::ReadKey => "reading the transit key",
            Op::Encrypt => "transit encrypt",
            Op::Decrypt => "transit decrypt",
            Op::Rewrap => "transit rewrap",
            Op::Rotate => "transit key rotation",
        }
    }
}

impl Transit {
    /// A Transit key over `client`.
    pub fn new(client: Client, namespace: Option<&str>, mount: &str, key: &str) -> Transit {
        Transit {
            client,
            mount: mount.to_string(),
            key: key.to_string(),
            fingerprint: transit_fingerprint(namespace, mount, key),
        }
    }

    fn key_path(&self) -> String {
        format!("{}/keys/{}", self.mount, self.key)
    }

    /// Reads the key's description and checks that it can serve as a KEK: derived, an AEAD
    /// type, encryption and decryption allowed.
    pub fn check_key(&self) -> Result<TransitKeyInfo> {
        let answer = self
            .client
            .call("GET", &self.key_path(), None)
            .map_err(|f| self.error(Op::ReadKey, f, None))?;
        let data = answer.get("data").cloned().unwrap_or(Value::Null);
        let info = TransitKeyInfo {
            key_type: data
                .get("type")
                .and_then(Value::as_str)
                .unwrap_or("")
                .to_string(),
            derived: data
                .get("derived")
                .and_then(Value::as_bool)
                .unwrap_or(false),
            latest_version: data
                .get("latest_version")
                .and_then(Value::as_u64)
                .unwrap_or(0),
            min_decryption_version: data
                .get("min_decryption_version")
                .and_then(Value::as_u64)
                .unwrap_or(0),
        };
        let allowed = |field: &str| data.get(field).and_then(Value::as_bool).unwrap_or(false);
        let unusable = |why: String| {
            let message = format!(
                "transit key \"{}\" at mount \"{}\" of openbao at {} cannot wrap keys: {why}",
                self.key,
                self.mount,
                self.client.current_address()
            );
            Err(Error::new(ErrorKind::InvalidConfig, message))
        };
        if !matches!(
            info.key_type.as_str(),
            "aes256-gcm96" | "aes128-gcm96" | "chacha20-poly1305"
        ) {
            return unusable(format!(
                "its type is \"{}\", not aes256-gcm96",
                info.key_type.escape_debug()
            ));
        }
        if !info.derived {
            return unusable(format!(
                "it is not derived; create one with `bao write {}/keys/NAME derived=true`",
                self.mount
            ));
        }
        if !allowed("supports_encryption") || !allowed("supports_decryption") {
            return unusable("it does not allow encryption and decryption".to_string());
        }
        if info.latest_version == 0 {
            return unusable("its description has no latest_version".to_string());
        }
        Ok(info)
    }

    /// Transit `rotate`: a new newest version of the key.
    pub fn rotate(&self) -> Result<()> {
        let path = format!("{}/rotate", self.key_path());
        self.client
            .call("POST", &path, Some(&json!({})))
            .map_err(|f| self.error(Op::Rotate, f, None))?;
        Ok(())
    }

    /// Transit `rewrap` of many blobs at once: each under the newest key version, without the
    /// DEKs leaving the server.
    pub fn rewrap(&self, items: &[(KeyId, u32, Vec<u8>)]) -> Result<Vec<Vec<u8>>> {
        let mut batch = Vec::with_capacity(items.len());
        for (id, version, wrapped) in items {
            let ciphertext = ciphertext_text(id, *version, wrapped)?;
            batch.push(json!({
                "ciphertext": ciphertext,
                "context": B64.encode(context(id, *version)),
            }));
        }
        let path = format!("{}/rewrap/{}", self.mount, self.key);
        let answer = self
            .client
            .call("POST", &path, Some(&json!({ "batch_input": batch })))
            .map_err(|f| self.error(Op::Rewrap, f, None))?;
        let results = answer
            .pointer("/data/batch_results")
            .and_then(Value::as_array)
            .filter(|r| r.len() == items.len())
            .ok_or_else(|| self.malformed(Op::Rewrap, "no batch_results of the right length"))?;
        let mut out = Vec::with_capacity(items.len());
        for ((id, version, _), result) in items.iter().zip(results) {
            if let Some(error) = result.get("error").and_then(Value::as_str)
                && !error.is_empty()
            {
                let failure = Failure::Status {
                    address: self.client.current_address().to_string(),
                    status: 400,
                    errors: error.to_string(),
                };
                let err = self.error(Op::Rewrap, failure, Some((id, *version)));
                return Err(err.with_key_id(id));
            }
            match result.get("ciphertext").and_then(Value::as_str) {
                Some(c) if c.starts_with("vault:v") => out.push(c.as_bytes().to_vec()),
                _ => return Err(self.malformed(Op::Rewrap, "a result without ciphertext")),
            }
        }
        Ok(out)
    }

    fn malformed(&self, op: Op, what: &str) -> Error {
        let message = format!(
            "openbao at {} gave a malformed answer to {}: {what}",
            self.client.current_address(),
            op.describe()
        );
        Error::new(ErrorKind::Other, message)
    }

    /// Words a failed call: the kind callers act on, the address, and what the server said.
    fn error(&self, op: Op, failure: Failure, key: Option<(&KeyId, u32)>) -> Error {
        let (address, status, errors) = match failure {
            Failure::Unreachable { address, why } => {
                let message = format!("openbao at {address} unreachable: {why}");
                return Error::new(ErrorKind::Unavailable, message);
            }
            Failure::LoginRefused {
                address,
                status,
                errors,
            } => {
                let message =
                    format!("openbao at {address} refused the AppRole login ({status}): {errors}");
                let err = Error::new(ErrorKind::Denied, message);
                return match key {
                    Some((id, _)) => err.with_key_id(id),
                    None => err,
                };
            }
            Failure::Status {
                address,
                status,
                errors,
            } => (address, status, errors),
        };
        let op = op.describe();
        let at = format!("openbao at {address}");
        let transit_key = format!("transit key \"{}\" at mount \"{}\"", self.key, self.mount);
        let lower = errors.to_ascii_lowercase();
        let (kind, message) = match status {
            403 => (
                ErrorKind::Denied,
                format!("{at} denied {op} (403): {errors}"),
            ),
            429 => (
                ErrorKind::Unavailable,
                format!("{at} is throttling requests (429) during {op}: {errors}"),
            ),
            501 => (
                ErrorKind::Unavailable,
                format!("{at} is not initialised (501): {errors}"),
            ),
            503 => (
                ErrorKind::Unavailable,
                format!("{at} is sealed or has no active node (503) during {op}: {errors}"),
            ),
            s if s >= 500 => (
                ErrorKind::Unavailable,
                format!("{at} failed {op} ({s}): {errors}"),
            ),
            s if (300..400).contains(&s) => (
                ErrorKind::Unavailable,
                format!("{at} redirected {op} ({s}): a standby without request forwarding"),
            ),
            404 if lower.contains("no handler for route") || lower.contains("unsupported path") => {
                (
                    ErrorKind::InvalidConfig,
                    format!(
                        "{at} has no transit engine at mount \"{}\" (404): {errors}",
                        self.mount
                    ),
                )
            }
            404 => (
                ErrorKind::InvalidConfig,
                format!("{transit_key} does not exist on {at} (404); create it first"),
            ),
            400 if lower.contains("key not found") => (
                ErrorKind::InvalidConfig,
                format!("{transit_key} does not exist on {at}: {errors}"),
            ),
            400 if lower.contains("too old") || lower.contains("disallowed by policy") => (
                ErrorKind::WrongKek,
                format!(
                    "{transit_key} on {at} no longer decrypts this blob's version \
                     (min_decryption_version was raised): {errors}"
                ),
            ),
            400 if lower.contains("message authentication failed") => match key {
                Some((id, version)) => (
                    ErrorKind::Corrupted,
                    format!(
                        "wrapped key \"{id}\" version {version} fails authentication by \
                         {transit_key} on {at}: altered, moved from another key id or \
                         version, or wrapped by another transit key"
                    ),
                ),
                None => (
                    ErrorKind::Corrupted,
                    format!("{at} could not authenticate a wrapped key: {errors}"),
                ),
            },
            400 if lower.contains("invalid ciphertext") || lower.contains("ciphertext") => {
                match key {
                    Some((id, version)) => (
                        ErrorKind::Corrupted,
                        format!(
                            "wrapped key \"{id}\" version {version} is not a valid transit \
                             ciphertext for {at}: {errors}"
                        ),
                    ),
                    None => (ErrorKind::Corrupted, format!("{at}: {errors}")),
                }
            }
            s => (
                ErrorKind::Other,
                format!("{at} refused {op} ({s}): {errors}"),
            ),
        };
        let err = Error::new(kind, message);
        match key {
            Some((id, _)) => err.with_key_id(id),
            None => err,
        }
    }
}

/// The stored blob as the Transit ciphertext string it is.
fn ciphertext_text<'a>(id: &KeyId, version: u32, wrapped: &'a [u8]) -> Result<&'a str> {
    match std::str::from_utf8(wrapped) {
        Ok(text) if text.starts_with("vault:v") && text.len() < 4096 => Ok(text),
        _ => {
            let message =
                format!("wrapped key \"{id}\" version {version} is not a transit ciphertext");
            Err(Error::new(ErrorKind::Corrupted, message).with_key_id(id))
        }
    }
}

impl KeyWrapper for Transit {
    fn fingerprint(&self) -> Vec<u8> {
        self.fingerprint.clone()
    }

    fn wrap(&self, id: &KeyId, version: u32, dek: &SecretBytes) -> Result<Vec<u8>> {
        if dek.is_empty() || dek.len() > MAX_SECRET_LEN {
            let message = format!("a key to wrap has 1 to {MAX_SECRET_LEN} bytes");
            return Err(Error::new(ErrorKind::InvalidInput, message));
        }

        // 1. The plaintext: the id-and-version binding, then the key.
        let mut plain = Zeroizing::new(Vec::with_capacity(BINDING_LEN + dek.len()));
        plain.extend_from_slice(&binding(id, version));
        plain.extend_from_slice(dek.expose_secret());
        let encoded = Zeroizing::new(B64.encode(&plain[..]));

        // 2. Transit encrypt under the key derived for this id and version.
        let body = Scrubbed(json!({
            "plaintext": encoded.as_str(),
            "context": B64.encode(context(id, version)),
        }));
        let path = format!("{}/encrypt/{}", self.mount, self.key);
        let answer = self
            .client
            .call("POST", &path, Some(&body))
            .map_err(|f| self.error(Op::Encrypt, f, Some((id, version))))
            .map_err(|e| e.with_key_id(id))?;
        match answer.pointer("/data/ciphertext").and_then(Value::as_str) {
            Some(c) if c.starts_with("vault:v") => Ok(c.as_bytes().to_vec()),
            _ => Err(self.malformed(Op::Encrypt, "no ciphertext").with_key_id(id)),
        }
    }

    fn unwrap(&self, id: &KeyId, version: u32, wrapped: &[u8]) -> Result<SecretBytes> {
        let corrupted = |why: &str| {
            let message = format!("wrapped key \"{id}\" version {version} {why}");
            Error::new(ErrorKind::Corrupted, message).with_key_id(id)
        };

        // 1. Transit decrypt under the key derived for this id and version.
        let ciphertext = ciphertext_text(id, version, wrapped)?;
        let body = json!({
            "ciphertext": ciphertext,
            "context": B64.encode(context(id, version)),
        });
        let path = format!("{}/decrypt/{}", self.mount, self.key);
        let mut answer = self
            .client
            .call("POST", &path, Some(&body))
            .map_err(|f| self.error(Op::Decrypt, f, Some((id, version))))
            .map_err(|e| e.with_key_id(id))?;
        let encoded = match answer.pointer_mut("/data/plaintext").map(Value::take) {
            Some(Value::String(text)) => Zeroizing::new(text),
            _ => {
                return Err(self.malformed(Op::Decrypt, "no plaintext").with_key_id(id));
            }
        };
        let plain = Zeroizing::new(
            B64.decode(encoded.as_bytes())
                .map_err(|_| corrupted("decrypts to text that is not base64"))?,
        );

        // 2. The binding must be the one of this id and version.
        if plain.len() <= BINDING_LEN || plain.len() > BINDING_LEN + MAX_SECRET_LEN {
            return Err(corrupted("decrypts to a key of an impossible length"));
        }
        let (bound, dek) = plain.split_at(BINDING_LEN);
        let expected = binding(id, version);
        let same = bound
            .iter()
            .zip(expected.iter())
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            == 0;
        if !same {
            return Err(corrupted("belongs to another key id or version"));
        }
        Ok(SecretBytes::copy_from(dek))
    }
}

/// A shared handle on the Transit key: every KEK generation of a store uses the same Transit
/// key (a rotation adds a Transit key version, not a new key).
#[derive(Clone, Debug)]
struct SharedTransit(Arc<Transit>);

impl KeyWrapper for SharedTransit {
    fn fingerprint(&self) -> Vec<u8> {
        self.0.fingerprint()
    }

    fn wrap(&self, id: &KeyId, version: u32, dek: &SecretBytes) -> Result<Vec<u8>> {
        self.0.wrap(id, version, dek)
    }

    fn unwrap(&self, id: &KeyId, version: u32, wrapped: &[u8]) -> Result<SecretBytes> {
        self.0.unwrap(id, version, wrapped)
    }
}

/// The registry entry of the openbao provider, under the name `openbao`.
pub fn registered() -> Registered {
    Registered {
        name: "openbao",
        summary: "keys in a local store wrapped by an OpenBao/Vault Transit key",
        open: |context, options| {
            let options = Options::from_table(context, options)?;
            Ok(Box::new(open(&options)?) as Box<dyn KeyProvider>)
        },
        init: Some(|context, options| {
            let options = Options::from_table(context, options)?;
            init(&options)
        }),
    }
}

/// The Transit key of `options`, checked on the server.
pub fn transit(options: &Options) -> Result<Transit> {
    let client = options.client()?;
    let transit = Transit::new(
        client,
        options.namespace.as_deref(),
        &options.mount,
        &options.key,
    );
    transit.check_key()?;
    Ok(transit)
}

/// Creates the directory (0700) and an empty store recording the Transit key's fingerprint,
/// after checking that the Transit key exists and can wrap keys.
pub fn init(options: &Options) -> Result<String> {
    let name = options.display_name();
    let done = (|| {
        let store_path = options.store_path();
        create_private_dir(&options.dir)?;
        if std::fs::symlink_metadata(&store_path).is_ok() {
            let message = format!(
                "{} already exists: this provider is already initialised",
                store_path.display()
            );
            return Err(Error::new(ErrorKind::AlreadyExists, message));
        }
        let transit = transit(options)?;
        Store::create(&store_path, &EnvelopeProvider::initial_meta(&transit))?;
        Ok(format!(
            "initialised {name}: store {}, keys wrapped by transit key \"{}\" at mount \"{}\" \
             of openbao at {}",
            store_path.display(),
            options.key,
            options.mount,
            transit.client.current_address()
        ))
    })();
    done.map_err(|e| e.with_backend(&name))
}

/// Opens an initialised openbao provider. Contacts the server once, to check the Transit key.
pub fn open(options: &Options) -> Result<OpenbaoProvider> {
    let name = options.display_name();
    let opened = (|| -> Result<OpenbaoProvider> {
        let (store, transit) = open_parts(options)?;
        let transit = Arc::new(transit);
        let inner = envelope(&name, store, &transit)?;
        Ok(OpenbaoProvider {
            name: name.clone(),
            store_path: options.store_path(),
            transit,
            inner: RwLock::new(Arc::new(inner)),
        })
    })();
    opened.map_err(|e| e.with_backend(&name))
}

/// The envelope provider over `store` as its metadata stands: the current KEK generation and,
/// during a rotation, the target one, both served by the same Transit key.
fn envelope(name: &str, store: Store, transit: &Arc<Transit>) -> Result<EnvelopeProvider> {
    let rotation = rotation_target(&store)?;
    let mut provider =
        EnvelopeProvider::open(name, store, Box::new(SharedTransit(transit.clone())))?;

    // During a rotation new keys are written for the target generation, so that the rotation
    // never has to chase them.
    if let Some(to) = rotation {
        provider.add_wrapper(to, Box::new(SharedTransit(transit.clone())))?;
        provider.write_with(to)?;
    }
    Ok(provider)
}

/// The openbao provider: the envelope provider of `kms-core` over the local store and the
/// Transit key, which follows KEK rotations made by another process (`kms rotate-kek`) while
/// it is open: when the store says a key is wrapped by a generation it has not loaded, or that
/// its writing generation was retired, it reads the store's KEK records again and retries once.
pub struct OpenbaoProvider {
    name: String,
    store_path: PathBuf,
    transit: Arc<Transit>,
    inner: RwLock<Arc<EnvelopeProvider>>,
}

impl OpenbaoProvider {
    fn current(&self) -> Arc<EnvelopeProvider> {
        self.inner.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Runs `f`, and once more over a reloaded envelope if it failed with a KEK generation
    /// this provider has not loaded.
    fn with<T>(&self, f: impl Fn(&EnvelopeProvider) -> Result<T>) -> Result<T> {
        let seen = self.current();
        match f(&seen) {
            Err(e) if e.kind() == ErrorKind::WrongKek => match self.reload(&seen) {
                Ok(fresh) => f(&fresh),
                Err(_) => Err(e),
            },
            other => other,
        }
    }

    fn reload(&self, seen: &Arc<EnvelopeProvider>) -> Result<Arc<EnvelopeProvider>> {
        let mut slot = self.inner.write().unwrap_or_else(|p| p.into_inner());
        if !Arc::ptr_eq(&slot, seen) {
            // Another thread reloaded meanwhile.
            return Ok(slot.clone());
        }
        let store = Store::open(&self.store_path)?;
        let fresh = Arc::new(envelope(&self.name, store, &self.transit)?);
        *slot = fresh.clone();
        Ok(fresh)
    }

    /// The KEK generation new keys are read under (for tests and tools).
    pub fn current_generation(&self) -> u32 {
        self.current().current_generation()
    }
}

impl fmt::Debug for OpenbaoProvider {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("OpenbaoProvider")
            .field("name", &self.name)
            .field("store_path", &self.store_path)
            .field("transit", &self.transit)
            .finish_non_exhaustive()
    }
}

impl fmt::Display for OpenbaoProvider {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.name)
    }
}

impl KeyProvider for OpenbaoProvider {
    fn get(&self, id: &KeyId) -> Result<Key> {
        self.with(|p| p.get(id))
    }

    fn create(&self, id: &KeyId, spec: KeySpec) -> Result<Key> {
        self.with(|p| p.create(id, spec))
    }

    fn get_or_create(&self, id: &KeyId, spec: KeySpec) -> Result<Key> {
        self.with(|p| p.get_or_create(id, spec))
    }

    fn get_version(&self, id: &KeyId, version: u32) -> Result<Key> {
        self.with(|p| p.get_version(id, version))
    }

    fn rotate(&self, id: &KeyId, spec: KeySpec) -> Result<Key> {
        self.with(|p| p.rotate(id, spec))
    }

    fn import(&self, id: &KeyId, secret: &SecretBytes) -> Result<Key> {
        self.with(|p| p.import(id, secret))
    }

    fn list(&self, prefix: &str) -> Result<Vec<KeyInfo>> {
        self.with(|p| p.list(prefix))
    }

    fn delete(&self, id: &KeyId) -> Result<()> {
        self.with(|p| p.delete(id))
    }

    fn capabilities(&self) -> Capabilities {
        self.current().capabilities()
    }
}

fn open_parts(options: &Options) -> Result<(Store, Transit)> {
    let store = kms_core::store::open_initialised(&options.dir, &options.store_path())?;
    let transit = transit(options)?;
    Ok((store, transit))
}

fn meta_number(store: &Store, name: &str) -> Result<Option<u64>> {
    match store.meta(name)? {
        None => Ok(None),
        Some(raw) => std::str::from_utf8(&raw)
            .ok()
            .and_then(|s| s.parse::<u64>().ok())
            .map(Some)
            .ok_or_else(|| {
                let message = format!(
                    "store {} is damaged: its record {name} is unreadable",
                    store.path().display()
                );
                Error::new(ErrorKind::Corrupted, message)
            }),
    }
}

fn rotation_target(store: &Store) -> Result<Option<u32>> {
    Ok(meta_number(store, ROTATION_META)?.map(|g| g as u32))
}

/// What a KEK rotation did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rotated {
    /// The KEK generation the store was at.
    pub from: u32,
    /// The generation it is at now.
    pub to: u32,
    /// Whether this call resumed an interrupted rotation.
    pub resumed: bool,
    /// Keys re-wrapped by this call.
    pub rewrapped: usize,
    /// The Transit key version every stored key is wrapped by now (at least).
    pub transit_version: u64,
}

/// Rotates the KEK: Transit `rotate` (a new key version on the server), then Transit `rewrap`
/// of every stored key, [`REWRAP_BATCH`] at a time, each batch committed with the new KEK
/// generation, then the switch. Crash-safe and resumable: the target generation and the
/// Transit version seen before rotating are recorded first, so a rotation interrupted at any
/// point leaves every key readable, and calling this again finishes it without rotating the
/// Transit key a second time.
pub fn rotate_kek(options: &Options, mut progress: impl FnMut(usize)) -> Result<Rotated> {
    let name = options.display_name();
    let done = (|| -> Result<Rotated> {
        // The envelope provider checks the store's fingerprint against the Transit key; the
        // rotation then works on its store and the shared Transit key directly.
        let (store, transit) = open_parts(options)?;
        let transit = Arc::new(transit);
        let provider = EnvelopeProvider::open(
            name.clone(),
            store,
            Box::new(SharedTransit(transit.clone())),
        )?;
        let store = provider.store();
        let from = provider.current_generation();

        // 1. Start, or find, the rotation: the target generation (same Transit key, same
        //    fingerprint) and the Transit version before rotating, in one transaction.
        let (to, before, resumed) = match rotation_target(store)? {
            Some(to) => {
                let before = meta_number(store, ROTATION_VERSION_META)?.unwrap_or(0);
                (to, before, true)
            }
            None => {
                let to = from
                    .checked_add(1)
                    .ok_or_else(|| Error::new(ErrorKind::Other, "KEK generations are exhausted"))?;
                let before = transit.check_key()?.latest_version;
                store.update_meta(
                    vec![
                        (fingerprint_meta_name(to), transit.fingerprint()),
                        (ROTATION_META.to_string(), to.to_string().into_bytes()),
                        (
                            ROTATION_VERSION_META.to_string(),
                            before.to_string().into_bytes(),
                        ),
                    ],
                    Vec::new(),
                )?;
                (to, before, false)
            }
        };

        // 2. The new Transit key version, unless an interrupted run already made it.
        let mut info = transit.check_key()?;
        if info.latest_version <= before {
            transit.rotate()?;
            info = transit.check_key()?;
        }

        // 3. Every row of the old generation re-wrapped on the server, batch by batch; each
        //    batch commits its rows with the new generation.
        let mut rewrapped = 0;
        loop {
            loop {
                let rows = store.wrapped_by(from, REWRAP_BATCH)?;
                if rows.is_empty() {
                    break;
                }
                let items: Vec<(KeyId, u32, Vec<u8>)> = rows
                    .into_iter()
                    .map(|(id, record)| (id, record.version, record.wrapped))
                    .collect();
                let blobs = transit.rewrap(&items)?;
                let batch = items
                    .into_iter()
                    .zip(blobs)
                    .map(|((id, version, _), wrapped)| Rewrapped {
                        id,
                        version,
                        from_kek: from,
                        to_kek: to,
                        wrapped,
                    })
                    .collect();
                rewrapped += store.rewrap_batch(batch)?;
                progress(rewrapped);
            }

            // 4. The switch, only once no row is left under the old generation.
            let retired = vec![ROTATION_META.to_string(), ROTATION_VERSION_META.to_string()];
            if switch_generation(store, from, to, retired)? {
                return Ok(Rotated {
                    from,
                    to,
                    resumed,
                    rewrapped,
                    transit_version: info.latest_version,
                });
            }
        }
    })();
    done.map_err(|e| e.with_backend(&name))
}

/// Whether `dir` holds an initialised openbao-provider store.
pub fn is_initialised(dir: &Path) -> bool {
    std::fs::symlink_metadata(dir.join(STORE_FILE)).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table(text: &str) -> toml::Table {
        text.parse().unwrap()
    }

    #[test]
    fn options_refuse_mistakes_before_any_call() {
        let context = Context::default();
        let base = "dir = \"d\"\naddress = \"http://127.0.0.1:1\"\nkey = \"kms\"\n";
        let cases = [
            ("", "exactly one of token_env"),
            (
                "token_env = \"A\"\ntoken_file = \"f\"",
                "exactly one of token_env",
            ),
            ("role_id = \"r\"", "exactly one of secret_id_env"),
            ("token_env = \"A\"\nsecret_id_env = \"S\"", "need role_id"),
            ("token_env = \"A\"\ntimeout_ms = 5", "timeout_ms is 5"),
            ("token_env = \"A\"\nretries = 11", "retries is 11"),
            ("token_env = \"A\"\ntoken = \"s.abc\"", "unknown field"),
            ("token_env = \"A\"\nmount = \"../x\"", "mount"),
        ];
        for (extra, expected) in cases {
            let err = Options::from_table(&context, &table(&format!("{base}{extra}"))).unwrap_err();
            assert_eq!(err.kind(), ErrorKind::InvalidConfig, "{err}");
            assert!(err.to_string().contains(expected), "{extra}: {err}");
            assert!(!err.to_string().contains("s.abc"), "{err}");
        }
        let err = Options::from_table(
            &context,
            &table("dir = \"d\"\naddress = \"ftp://x\"\nkey = \"k\"\ntoken_env = \"A\""),
        )
        .unwrap_err();
        assert!(err.to_string().contains("not an http"), "{err}");
    }

    #[test]
    fn addresses_take_one_or_many() {
        let context = Context::default();
        let options = Options::from_table(
            &context,
            &table(
                "dir = \"d\"\naddress = [\"http://a:1\", \"http://b:2/\"]\nkey = \"k\"\n\
                 token_env = \"A\"",
            ),
        )
        .unwrap();
        assert_eq!(options.address.to_vec().len(), 2);
        assert_eq!(options.mount, "transit");
        assert_eq!(options.timeout_ms, 5_000);
    }

    #[test]
    fn fingerprint_names_namespace_mount_and_key() {
        let a = transit_fingerprint(None, "transit", "kms");
        assert_eq!(a, transit_fingerprint(Some(""), "transit", "kms"));
        assert_ne!(a, transit_fingerprint(Some("team"), "transit", "kms"));
        assert_ne!(a, transit_fingerprint(None, "transit2", "kms"));
        assert_ne!(a, transit_fingerprint(None, "transit", "kms2"));
    }

    #[test]
    fn debug_of_auth_hides_the_secrets() {
        let auth = Auth::AppRole {
            mount: "approle".into(),
            role_id: "role".into(),
            secret_id: Zeroizing::new("very-secret-id".into()),
        };
        assert!(!format!("{auth:?}").contains("very-secret-id"));
        let auth = Auth::Token(Zeroizing::new("s.token-value".into()));
        assert!(!format!("{auth:?}").contains("token-value"));
    }
}
