//! Provider plugins: providers delivered as `.so` files, written in Rust or C, against a
//! versioned C ABI.
//!
//! - [`abi`]: the ABI, version 1: the function table, the types that cross the boundary and
//!   the rules by which the ABI evolves. Its C twin is `include/kms_provider.h`.
//! - [`sdk`]: the Rust side of a plugin: [`export_provider!`](crate::export_provider) turns a
//!   [`KeyProvider`](crate::KeyProvider) into a plugin and catches its panics at the boundary.
//! - The loader: [`Plugin::load`] checks a file's ownership and mode, loads it (never to unload
//!   it), checks the table's version and size, and opens providers that are
//!   `Box<dyn KeyProvider>` like any other; [`PluginSearch`] finds `libkms_<name>.so` in the
//!   configured directories and next to the executable.
//!
//! [`config::Registry`](crate::config::Registry) is where names become providers: with plugins
//! enabled, it looks for a plugin first and falls back to a linked-in provider of that name.
//! `docs/plugin-guide.md` is the guide for plugin authors.

pub mod abi;
mod loader;
pub mod sdk;

pub use loader::{
    Plugin, PluginSearch, executable_dir, is_plugin_name, is_plugin_path, library_file_name,
};
