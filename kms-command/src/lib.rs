//! # kms-command: the KEK from a passphrase command
//!
//! Not built yet (issue 4). The pieces it will stand on are in `kms-core`: the PBKDF2 helper
//! with stored, bounds-checked parameters ([`kms_core::kdf`]), the wrapped-key store and the
//! envelope provider. See `docs/architecture.md` for the planned slot hierarchy.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub use kms_core::kdf::{DEFAULT_ITERATIONS, KdfParams};
