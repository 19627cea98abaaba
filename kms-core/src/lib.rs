//! # kms-core
//!
//! The shared core of kms, a key manager for databases that encrypt their files (TDE). A
//! database asks for its data encryption keys (DEKs) by key id; kms hands them out, creates
//! them when asked, keeps them wrapped under a key encryption key (KEK) that lives elsewhere,
//! and never loses one.
//!
//! This crate holds what every provider and every program shares; it never decides where keys
//! live:
//!
//! - [`KeyProvider`]: the object-safe trait every place keys can live implements (`get`,
//!   `create`, `get_or_create`, `list`, `delete`, versions and capability queries), used as
//!   `Box<dyn KeyProvider>`.
//! - [`KeyId`]: validated key ids; [`SecretBytes`] and [`Key`]: key material that zeroizes on
//!   drop and never shows itself through `Debug`.
//! - [`Error`] and [`ErrorKind`]: the failure kinds callers act on.
//! - [`wrap`]: AES key wrap with padding (RFC 5649) bound to key id and version; [`kdf`]:
//!   PBKDF2-HMAC-SHA256 with stored, bounds-checked parameters.
//! - [`store`]: the wrapped-key store on SQLite, durable, multi-process and group-committed;
//!   [`envelope`]: the provider logic over it, shared by the file, command and cloud providers.
//! - [`config`]: the TOML configuration and the registry that opens a provider by name.
//! - [`conformance`]: the suite every provider must pass, third-party ones included.
//! - [`plugin`]: providers as `.so` plugins: the versioned C ABI, the loader and the Rust SDK
//!   ([`export_provider!`]). The only module with `unsafe` code.
//!
//! ```
//! use kms_core::{KeyId, KeyProvider, KeySpec};
//!
//! fn database_startup(keys: &dyn KeyProvider) -> kms_core::Result<()> {
//!     let wal = KeyId::new("cluster/wal")?;
//!     let key = keys.get_or_create(&wal, KeySpec::default())?;
//!     assert_eq!(key.expose_secret().len(), 32);
//!     Ok(())
//! }
//! ```
#![deny(unsafe_code)]
#![warn(missing_docs)]
#![warn(clippy::undocumented_unsafe_blocks)]

pub mod config;
pub mod conformance;
pub mod envelope;
mod error;
pub mod fsutil;
mod id;
pub mod kdf;
#[allow(unsafe_code)]
pub mod plugin;
pub mod protocol;
mod provider;
mod secret;
pub mod store;
pub mod time;
pub mod wrap;

pub use error::{Error, ErrorKind, Result};
pub use id::{KeyId, MAX_KEY_ID_LEN, show_untrusted, validate_prefix};
pub use provider::{Capabilities, KeyProvider};
pub use secret::{Key, KeyInfo, KeyLen, KeySpec, MAX_SECRET_LEN, SecretBytes};
/// The `toml` crate, whose `Table` carries provider options (re-exported for plugin authors).
pub use toml;
