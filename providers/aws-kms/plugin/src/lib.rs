//! The aws-kms provider as a plugin: `libkms_aws_kms.so`, exporting `kms_provider_entry` under
//! the provider name `aws-kms`.
//!
//! Nothing but the export lives here; the provider is the `kms-aws-kms` library, which programs
//! link as a plain rlib. See docs/plugin-guide.md for why plugins are thin `cdylib` crates.
#![deny(unsafe_code)]

use kms_core::config::Context;
use kms_core::toml::Table;
use kms_core::{Error, KeyProvider, Result};

fn open(context: &Context, options: &Table) -> Result<Box<dyn KeyProvider>> {
    (provider::registered().open)(context, options)
}

fn init(context: &Context, options: &Table) -> Result<String> {
    match provider::registered().init {
        Some(init) => init(context, options),
        None => Err(Error::unsupported("initialising storage")),
    }
}

kms_core::export_provider!(open, init = init, name = "aws-kms");
