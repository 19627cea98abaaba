//! The mock provider as a plugin: `libkms_mock.so`, exporting `kms_provider_entry`.
//!
//! Nothing but the export lives here; the provider is the `kms-mock` library. Each process that
//! loads it starts with no keys: the mock keeps them in memory only.
#![deny(unsafe_code)]

use kms_core::config::Context;
use kms_core::toml::Table;
use kms_core::{KeyProvider, Result};

fn open(context: &Context, options: &Table) -> Result<Box<dyn KeyProvider>> {
    (provider::registered().open)(context, options)
}

kms_core::export_provider!(open);
