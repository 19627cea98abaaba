//! # kms-pkcs11: DEKs wrapped inside an HSM through PKCS#11
//!
//! The KEK is an AES-256 key object of a PKCS#11 token (an HSM, a smart card, SoftHSM2 for
//! tests), generated in the token as sensitive and never extractable. DEKs are wrapped and
//! unwrapped by the token with `CKM_AES_KEY_WRAP_PAD` (RFC 5649) and kept, wrapped, in the
//! wrapped-key store of `kms-core` in a local directory; the envelope logic is
//! [`kms_core::envelope::EnvelopeProvider`]'s, with [`TokenKek`] as its [`KeyWrapper`].
//!
//! Options (`[provider.options]`):
//!
//! ```toml
//! dir = "/var/lib/kms"                          # the store; relative to the configuration
//! module = "/usr/lib/softhsm/libsofthsm2.so"    # the PKCS#11 module
//! token_label = "kms"                           # the token, found by label
//! key_label = "kms-kek"                         # the KEK of generation 1
//! pin_env = "KMS_PKCS11_PIN"                    # the user PIN from this variable, or:
//! # pin_command = "cat /run/secrets/hsm-pin"    # a command printing the PIN
//! ```
//!
//! See `docs/providers/pkcs11.md` for the failure kinds, rotation, threads and fork.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

mod token;
mod wrapper;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use kms_core::config::{self, Context, Registered};
use kms_core::envelope::{
    CURRENT_KEK_META, EnvelopeProvider, fingerprint_meta_name, switch_generation,
};
use kms_core::fsutil::create_private_dir;
use kms_core::store::Store;
use kms_core::wrap::KeyWrapper;
use kms_core::{Error, ErrorKind, KeyProvider, Result, SecretBytes};
use serde::Deserialize;

use crate::token::Token;
pub use crate::wrapper::TokenKek;
use crate::wrapper::{Found, KEK_LEN};

/// The name of the store file inside the directory.
pub const STORE_FILE: &str = "keys.db";

/// How long `pin_command` may take.
pub const PIN_COMMAND_TIMEOUT: Duration = Duration::from_secs(30);

use kms_core::store::PROVIDER_META;
const ROTATION_META: &str = "pkcs11.rotation";

/// The metadata name of the label of KEK generation `generation`.
fn label_meta(generation: u32) -> String {
    format!("pkcs11.label.{generation}")
}

/// The label of the KEK that a rotation to `generation` generates: `<key_label>.g<N>`.
pub fn rotated_label(key_label: &str, generation: u32) -> String {
    format!("{key_label}.g{generation}")
}

/// The options of the pkcs11 provider.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Options {
    /// The store directory.
    pub dir: PathBuf,
    /// The path of the PKCS#11 module (`.so`).
    pub module: PathBuf,
    /// The label of the token.
    pub token_label: String,
    /// The label of the KEK of the first generation; rotations add `.g<N>`.
    pub key_label: String,
    /// The name of an environment variable holding the user PIN.
    #[serde(default)]
    pub pin_env: Option<String>,
    /// A shell command printing the user PIN (same rules as the command provider's
    /// `passphrase_command`).
    #[serde(default)]
    pub pin_command: Option<String>,
}

impl Options {
    /// Parses provider options and resolves relative paths against the configuration's
    /// directory.
    pub fn from_table(context: &Context, table: &toml::Table) -> Result<Options> {
        let mut options: Options = config::parse_options("pkcs11", table)?;
        options.dir = config::resolve(&context.base_dir, &options.dir);
        options.module = config::resolve(&context.base_dir, &options.module);
        options.validate()?;
        Ok(options)
    }

    fn validate(&self) -> Result<()> {
        let invalid = |message: String| Err(Error::new(ErrorKind::InvalidConfig, message));
        match (&self.pin_env, &self.pin_command) {
            (Some(_), Some(_)) => {
                return invalid(
                    "options of provider \"pkcs11\": give pin_env or pin_command, \
                                not both"
                        .into(),
                );
            }
            (None, None) => {
                return invalid(
                    "options of provider \"pkcs11\": the PIN comes from pin_env \
                                (an environment variable's name) or pin_command; a PIN is \
                                never written in the configuration"
                        .into(),
                );
            }
            _ => {}
        }
        for (name, value) in [
            ("token_label", &self.token_label),
            ("key_label", &self.key_label),
        ] {
            // PKCS#11 token labels are 32 bytes; key labels have no limit, but keep them sane.
            let max = if name == "token_label" { 32 } else { 100 };
            if value.is_empty() || value.len() > max || value.chars().any(char::is_control) {
                return invalid(format!(
                    "options of provider \"pkcs11\": {name} must be 1 to {max} bytes of \
                     printable text"
                ));
            }
        }
        Ok(())
    }

    fn store_path(&self) -> PathBuf {
        self.dir.join(STORE_FILE)
    }

    /// The provider's name in messages: its store, token and module, never the PIN.
    pub fn display_name(&self) -> String {
        format!(
            "pkcs11 provider at {} (token \"{}\" of module {})",
            self.dir.display(),
            self.token_label,
            self.module.display()
        )
    }

    /// Reads the PIN from the environment variable or the command.
    fn pin(&self) -> Result<SecretBytes> {
        if let Some(var) = &self.pin_env {
            let value = std::env::var_os(var).ok_or_else(|| {
                let message = format!("the PIN variable {var} (pin_env) is not set");
                Error::new(ErrorKind::InvalidConfig, message)
            })?;
            let value = value.into_encoded_bytes();
            if value.is_empty() {
                let message = format!("the PIN variable {var} (pin_env) is empty");
                return Err(Error::new(ErrorKind::InvalidConfig, message));
            }
            return Ok(SecretBytes::new(value));
        }
        let template = self.pin_command.as_deref().unwrap_or_default();
        let prompt = format!("PIN of token \"{}\": ", self.token_label);
        let invocation = kms_command::command::Invocation {
            template,
            prompt: &prompt,
            dir: &self.dir,
            timeout: PIN_COMMAND_TIMEOUT,
        };
        kms_command::command::run(&invocation).map_err(|e| e.context("pin_command"))
    }

    fn token(&self) -> Result<Arc<Token>> {
        Token::open(&self.module, &self.token_label, self.pin()?)
    }
}

/// The registry entry of the pkcs11 provider, under the name `pkcs11`.
pub fn registered() -> Registered {
    Registered {
        name: "pkcs11",
        summary: "keys wrapped inside an HSM through PKCS#11 (AES key wrap with padding)",
        open: |context, table| {
            let options = Options::from_table(context, table)?;
            Ok(Box::new(open(&options)?) as Box<dyn KeyProvider>)
        },
        init: Some(|context, table| init(&Options::from_table(context, table)?)),
    }
}

/// Creates the store, and the KEK in the token if no key has its label. The PIN is checked
/// before anything is made: a wrong PIN leaves no directory, no store and no key.
pub fn init(options: &Options) -> Result<String> {
    let name = options.display_name();
    let done = (|| {
        // 1. Refuse an existing store before touching the token.
        let path = options.store_path();
        if std::fs::symlink_metadata(&path).is_ok() {
            let message = format!("{} already exists: already initialised", path.display());
            return Err(Error::new(ErrorKind::AlreadyExists, message));
        }

        // 2. The token (the login checks the PIN) and its KEK, found or generated.
        let token = options.token()?;
        let (kek, made) = match TokenKek::find(&token, &options.key_label)? {
            Found::Key(kek) => (kek, false),
            Found::Missing => (TokenKek::generate(&token, &options.key_label)?, true),
        };

        // 3. The directory and the store, recording the KEK's fingerprint and label.
        create_private_dir(&options.dir)?;
        let mut meta = EnvelopeProvider::initial_meta(&kek);
        meta.push((PROVIDER_META.to_string(), b"pkcs11".to_vec()));
        meta.push((label_meta(1), options.key_label.as_bytes().to_vec()));
        Store::create(&path, &meta)?;
        let how = if made {
            "generated in the token"
        } else {
            "found in the token"
        };
        Ok(format!(
            "initialised {name}: KEK \"{}\" (AES-{}, {how}), store {}",
            options.key_label,
            KEK_LEN * 8,
            path.display()
        ))
    })();
    done.map_err(|e| e.with_backend(&name))
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
                let message = format!("store metadata {name} is unreadable");
                Error::new(ErrorKind::Corrupted, message)
            }),
    }
}

fn generation_label(store: &Store, generation: u32) -> Result<String> {
    let raw = store.meta(&label_meta(generation))?.ok_or_else(|| {
        let message = format!(
            "store {} records no KEK label for generation {generation}",
            store.path().display()
        );
        Error::new(ErrorKind::Corrupted, message)
    })?;
    String::from_utf8(raw).map_err(|_| {
        let message = format!("the KEK label of generation {generation} is not text");
        Error::new(ErrorKind::Corrupted, message)
    })
}

fn open_store(options: &Options) -> Result<Store> {
    let store = kms_core::store::open_initialised(&options.dir, &options.store_path())?;
    kms_core::store::check_made_by(&store, "pkcs11")?;
    Ok(store)
}

/// The store and the token, with the generations the store needs.
struct Opened {
    store: Store,
    token: Arc<Token>,
    current: u32,
    target: Option<u32>,
}

fn open_parts(options: &Options) -> Result<Opened> {
    let store = open_store(options)?;
    let current = read_generation(&store, CURRENT_KEK_META)?.unwrap_or(1);
    let target = read_generation(&store, ROTATION_META)?;
    let token = options.token()?;
    Ok(Opened {
        store,
        token,
        current,
        target,
    })
}

impl Opened {
    /// The provider, reading the current generation and, during a rotation, writing the
    /// target one.
    fn into_provider(self, name: &str) -> Result<EnvelopeProvider> {
        let label = generation_label(&self.store, self.current)?;
        let current = TokenKek::require(&self.token, &label)?;
        let target = match self.target {
            Some(t) => Some((
                t,
                TokenKek::require(&self.token, &generation_label(&self.store, t)?)?,
            )),
            None => None,
        };
        let mut provider = EnvelopeProvider::open(name, self.store, Box::new(current))?;
        if let Some((generation, kek)) = target {
            provider.add_wrapper(generation, Box::new(kek))?;
            provider.write_with(generation)?;
        }
        Ok(provider)
    }
}

/// Opens an initialised provider: reads the PIN, logs in to the token, finds the KEK.
pub fn open(options: &Options) -> Result<EnvelopeProvider> {
    let name = options.display_name();
    let opened = (|| open_parts(options)?.into_provider(&name))();
    opened.map_err(|e| e.with_backend(&name))
}

/// What a KEK rotation did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rotated {
    /// The generation the store was at.
    pub from: u32,
    /// The generation it is at now.
    pub to: u32,
    /// The label of the new KEK.
    pub label: String,
    /// Whether this call resumed an interrupted rotation.
    pub resumed: bool,
    /// Keys re-wrapped by this call.
    pub rewrapped: usize,
}

/// Rotates the KEK: a new AES-256 key in the token, labelled `<key_label>.g<N>`, then every
/// DEK re-wrapped under it, then the switch. Crash-safe and resumable: each row records the
/// generation that wrapped it, an interrupted rotation leaves every key readable (the provider
/// opens with both KEKs), and calling this again finishes it. The old KEK stays in the token.
pub fn rotate_kek(options: &Options, mut progress: impl FnMut(usize)) -> Result<Rotated> {
    let name = options.display_name();
    let done = (|| {
        let opened = open_parts(options)?;
        let from = opened.current;

        // 1. Start, or find, the rotation: the new KEK in the token (a key left by a rotation
        //    that died before recording it is adopted), then its fingerprint, label and the
        //    target generation in one transaction.
        let (to, resumed) = match opened.target {
            Some(target) => (target, true),
            None => {
                let to = from
                    .checked_add(1)
                    .ok_or_else(|| Error::new(ErrorKind::Other, "KEK generations are exhausted"))?;
                let label = rotated_label(&options.key_label, to);
                let kek = match TokenKek::find(&opened.token, &label)? {
                    Found::Key(kek) => kek,
                    Found::Missing => TokenKek::generate(&opened.token, &label)?,
                };
                let set = vec![
                    (fingerprint_meta_name(to), kek.fingerprint()),
                    (label_meta(to), label.into_bytes()),
                    (ROTATION_META.to_string(), to.to_string().into_bytes()),
                ];
                opened.store.update_meta(set, Vec::new())?;
                (to, false)
            }
        };
        let label = generation_label(&opened.store, to)?;

        // 2. Re-wrap every key of the old generation, batch by batch.
        let provider = open_parts(options)?.into_provider(&name)?;
        let mut rewrapped = 0;
        for _ in 0..1000 {
            rewrapped += provider.rewrap_all(from, to, 256, &mut progress)?;

            // 3. The switch, only once no row is left under the old generation.
            let retired = vec![ROTATION_META.to_string(), label_meta(from)];
            if switch_generation(provider.store(), from, to, retired)? {
                return Ok(Rotated {
                    from,
                    to,
                    label,
                    resumed,
                    rewrapped,
                });
            }
        }
        let message = "keys keep being written under the old KEK; stop other writers and resume";
        Err(Error::new(ErrorKind::Unavailable, message))
    })();
    done.map_err(|e| e.with_backend(&name))
}

/// The path of the store file of `options`.
pub fn store_path(options: &Options) -> PathBuf {
    options.store_path()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table(text: &str) -> toml::Table {
        text.parse().unwrap()
    }

    #[test]
    fn options_need_exactly_one_pin_source() {
        let context = Context::default();
        let base = "dir = \"d\"\nmodule = \"/m.so\"\ntoken_label = \"t\"\nkey_label = \"k\"\n";
        let err = Options::from_table(&context, &table(base)).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::InvalidConfig);
        assert!(err.to_string().contains("pin_env"), "{err}");
        let both = format!("{base}pin_env = \"P\"\npin_command = \"echo 1\"\n");
        assert!(Options::from_table(&context, &table(&both)).is_err());
        let one = format!("{base}pin_env = \"P\"\n");
        assert!(Options::from_table(&context, &table(&one)).is_ok());
        let pin = format!("{base}pin = \"1234\"\n");
        let err = Options::from_table(&context, &table(&pin)).unwrap_err();
        assert!(err.to_string().contains("unknown field"), "{err}");
    }

    #[test]
    fn rotated_labels() {
        assert_eq!(rotated_label("kms-kek", 2), "kms-kek.g2");
    }
}
