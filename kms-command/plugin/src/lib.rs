//! The command provider as a plugin: `libkms_command.so`, exporting `kms_provider_entry`.
//!
//! Nothing but the export lives here; the provider is the `kms-command` library, which programs
//! link as a plain rlib. See docs/plugin-guide.md for why plugins are thin `cdylib` crates.
#![deny(unsafe_code)]

kms_core::export_registered!(provider::registered);
