//! The pkcs11 provider as a plugin: `libkms_pkcs11.so`, exporting `kms_provider_entry`.
//!
//! Nothing but the export lives here; the provider is the `kms-pkcs11` library, which programs
//! link as a plain rlib. See docs/plugin-guide.md for why plugins are thin `cdylib` crates.
#![deny(unsafe_code)]

kms_core::export_registered!(provider::registered);
