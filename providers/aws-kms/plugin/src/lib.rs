//! The aws-kms provider as a plugin: `libkms_aws_kms.so`, exporting `kms_provider_entry` under
//! the provider name `aws-kms`.
//!
//! Nothing but the export lives here; the provider is the `kms-aws-kms` library, which programs
//! link as a plain rlib. See docs/plugin-guide.md for why plugins are thin `cdylib` crates.
#![deny(unsafe_code)]

kms_core::export_registered!(provider::registered, name = "aws-kms");
