//! The configuration file shared by the `kms` CLI and `kmsd`, and the registry that builds a
//! provider from it by name.
//!
//! ```toml
//! [provider]
//! name = "file"
//! [provider.options]
//! dir = "/var/lib/kms"
//! ```
//!
//! Unknown keys are errors everywhere, in the file and in each provider's options: a misspelt
//! option silently ignored is how a key ends up where nobody expected it.

use std::fmt;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use serde::de::DeserializeOwned;

use crate::error::{Error, ErrorKind, Result};
use crate::plugin::{self, Plugin, PluginSearch};
use crate::provider::KeyProvider;

/// The whole configuration file.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Which provider holds the keys.
    pub provider: ProviderConfig,
    /// Settings of `kmsd`, read by the server; the CLI ignores them.
    #[serde(default)]
    pub server: Option<toml::Table>,
    /// Where plugins are looked for.
    #[serde(default)]
    pub plugins: Option<toml::Table>,
    /// The directory relative paths in the file are resolved against (the file's directory).
    #[serde(skip)]
    pub base_dir: PathBuf,
}

/// The `[provider]` section.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProviderConfig {
    /// A provider name such as `file`, or a path to a plugin.
    pub name: String,
    /// The provider's own options, checked by the provider.
    #[serde(default)]
    pub options: toml::Table,
}

impl Config {
    /// Reads and parses a configuration file.
    pub fn load(path: &Path) -> Result<Config> {
        let text = std::fs::read_to_string(path).map_err(|e| {
            Error::new(
                ErrorKind::InvalidConfig,
                format!("cannot read configuration {}: {e}", path.display()),
            )
        })?;
        let base = path.parent().map(Path::to_path_buf).unwrap_or_default();
        Config::parse(&text, base)
            .map_err(|e| e.context(format!("configuration {}", path.display())))
    }

    /// Parses configuration text; relative paths will resolve against `base_dir`.
    pub fn parse(text: &str, base_dir: PathBuf) -> Result<Config> {
        let mut config: Config = toml::from_str(text).map_err(|e| {
            let message = e
                .to_string()
                .split_whitespace()
                .collect::<Vec<_>>()
                .join(" ");
            Error::new(ErrorKind::InvalidConfig, message)
        })?;
        config.base_dir = base_dir;
        Ok(config)
    }
}

/// Parses a provider's options into its own options type, which should use
/// `#[serde(deny_unknown_fields)]`.
pub fn parse_options<T: DeserializeOwned>(provider: &str, options: &toml::Table) -> Result<T> {
    T::deserialize(toml::Value::Table(options.clone())).map_err(|e| {
        let message = format!(
            "options of provider \"{provider}\": {}",
            // One line: serde puts the field path ("in `dir`") on a line of its own.
            e.to_string()
                .split_whitespace()
                .collect::<Vec<_>>()
                .join(" ")
        );
        Error::new(ErrorKind::InvalidConfig, message)
    })
}

/// Resolves `path` against the configuration's directory unless it is absolute.
pub fn resolve(base_dir: &Path, path: &Path) -> PathBuf {
    if path.is_absolute() || base_dir.as_os_str().is_empty() {
        path.to_path_buf()
    } else {
        base_dir.join(path)
    }
}

/// What a provider constructor receives besides its options.
#[derive(Clone, Debug, Default)]
pub struct Context {
    /// The directory relative paths resolve against.
    pub base_dir: PathBuf,
}

/// Builds a provider from its options.
pub type OpenFn = fn(&Context, &toml::Table) -> Result<Box<dyn KeyProvider>>;

/// Initialises a provider's storage (for `kms init`); returns a line describing what was made.
pub type InitFn = fn(&Context, &toml::Table) -> Result<String>;

/// One provider known by name.
#[derive(Clone, Copy)]
pub struct Registered {
    /// The name used in `[provider] name = ...`.
    pub name: &'static str,
    /// What it is, in a few words.
    pub summary: &'static str,
    /// Opens it.
    pub open: OpenFn,
    /// Initialises its storage, if it has any.
    pub init: Option<InitFn>,
}

impl fmt::Debug for Registered {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Registered")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

/// The providers a program knows by name. The core registers none: the program that links
/// providers (the CLI, the server, a test) decides which exist.
///
/// With [`enable_plugins`](Registry::enable_plugins), the registry also opens plugins: a name
/// holding a `/` is the path of a plugin file (relative to the configuration's directory), and
/// any other name is first looked up as `libkms_<name>.so` in the plugin directories (see
/// [`PluginSearch::from_config`]); only when no such file exists does a linked-in provider of
/// that name serve. A plugin that exists but fails its checks is an error, never a fallback.
#[derive(Clone, Debug, Default)]
pub struct Registry {
    entries: Vec<Registered>,
    plugins: bool,
}

/// What a provider name resolved to.
enum Resolved<'a> {
    Linked(&'a Registered),
    Plugin(Plugin),
}

impl Registry {
    /// An empty registry.
    pub fn new() -> Registry {
        Registry::default()
    }

    /// Adds (or replaces) a provider.
    pub fn register(&mut self, entry: Registered) -> &mut Registry {
        self.entries.retain(|e| e.name != entry.name);
        self.entries.push(entry);
        self
    }

    /// The registered providers.
    pub fn entries(&self) -> &[Registered] {
        &self.entries
    }

    /// Makes [`open`](Registry::open) and [`init`](Registry::init) load plugins: by path, and
    /// by name before the linked-in providers.
    pub fn enable_plugins(&mut self) -> &mut Registry {
        self.plugins = true;
        self
    }

    /// Whether plugins are loaded.
    pub fn plugins_enabled(&self) -> bool {
        self.plugins
    }

    /// Finds what the configuration's provider name stands for.
    fn resolve(&self, config: &Config) -> Result<Resolved<'_>> {
        let name = &config.provider.name;
        if !self.plugins {
            return self.find(name).map(Resolved::Linked);
        }
        if plugin::is_plugin_path(name) {
            let path = resolve(&config.base_dir, Path::new(name));
            return Plugin::load(&path).map(Resolved::Plugin);
        }
        let search = PluginSearch::from_config(Some(config))?;
        if let Some(path) = search.find(name) {
            return Plugin::load(&path).map(Resolved::Plugin);
        }
        if let Some(entry) = self.entries.iter().find(|e| e.name == *name) {
            return Ok(Resolved::Linked(entry));
        }

        // Nothing: say where we looked and what there is.
        let mut available: Vec<String> = self
            .entries
            .iter()
            .map(|e| format!("{} (linked in)", e.name))
            .collect();
        for path in search.discover() {
            let file = path.file_name().unwrap_or_default().to_string_lossy();
            let stem = file.trim_start_matches("libkms_").trim_end_matches(".so");
            available.push(format!("{stem} (plugin {})", path.display()));
        }
        let searched: Vec<String> = search
            .dirs()
            .iter()
            .map(|d| d.display().to_string())
            .collect();
        let message = format!(
            "unknown provider \"{}\": no {} in {}, and no provider of that name is linked in; \
             available: {}",
            name.escape_debug(),
            if plugin::is_plugin_name(name) {
                plugin::library_file_name(name)
            } else {
                "plugin file".to_string()
            },
            if searched.is_empty() {
                "no plugin directory".to_string()
            } else {
                searched.join(", ")
            },
            if available.is_empty() {
                "none".to_string()
            } else {
                available.join(", ")
            }
        );
        Err(Error::new(ErrorKind::InvalidConfig, message))
    }

    /// The entry named `name`, or an error listing what is available.
    pub fn find(&self, name: &str) -> Result<&Registered> {
        self.entries.iter().find(|e| e.name == name).ok_or_else(|| {
            let known: Vec<&str> = self.entries.iter().map(|e| e.name).collect();
            let message = format!(
                "unknown provider \"{}\"; available: {}",
                name.escape_debug(),
                if known.is_empty() {
                    "none".to_string()
                } else {
                    known.join(", ")
                }
            );
            Error::new(ErrorKind::InvalidConfig, message)
        })
    }

    /// Opens the provider a configuration names.
    pub fn open(&self, config: &Config) -> Result<Box<dyn KeyProvider>> {
        let context = Context {
            base_dir: config.base_dir.clone(),
        };
        let entry = match self.resolve(config)? {
            Resolved::Linked(entry) => entry,
            Resolved::Plugin(plugin) => return plugin.open(&context, &config.provider.options),
        };
        (entry.open)(&context, &config.provider.options)
    }

    /// Initialises the storage of the provider a configuration names.
    pub fn init(&self, config: &Config) -> Result<String> {
        let entry = match self.resolve(config)? {
            Resolved::Linked(entry) => entry,
            Resolved::Plugin(plugin) => {
                let context = Context {
                    base_dir: config.base_dir.clone(),
                };
                return plugin.init(&context, &config.provider.options);
            }
        };
        let init = entry.init.ok_or_else(|| {
            let message = format!("provider \"{}\" has nothing to initialise", entry.name);
            Error::new(ErrorKind::Unsupported, message)
        })?;
        let context = Context {
            base_dir: config.base_dir.clone(),
        };
        init(&context, &config.provider.options)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_keys_are_errors() {
        let err =
            Config::parse("[provider]\nname = \"file\"\nnmae = 1\n", PathBuf::new()).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::InvalidConfig);
        assert!(err.to_string().contains("nmae"), "{err}");
        let err = Config::parse("[provder]\nname = \"file\"\n", PathBuf::new()).unwrap_err();
        assert!(err.to_string().contains("provder"), "{err}");
        let err = Config::parse("[provider\n", PathBuf::new()).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::InvalidConfig);
    }

    #[test]
    fn unknown_provider_lists_the_known_ones() {
        fn open(_: &Context, _: &toml::Table) -> Result<Box<dyn KeyProvider>> {
            Err(Error::unsupported("anything"))
        }
        let mut registry = Registry::new();
        registry.register(Registered {
            name: "file",
            summary: "",
            open,
            init: None,
        });
        let config = Config::parse("[provider]\nname = \"flie\"\n", PathBuf::new()).unwrap();
        let err = registry.open(&config).err().unwrap();
        assert_eq!(
            err.to_string(),
            "unknown provider \"flie\"; available: file"
        );
    }
}
