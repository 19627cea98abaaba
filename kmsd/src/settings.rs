//! The `[server]` section of the configuration.

use std::path::{Path, PathBuf};
use std::time::Duration;

use kms_core::config;
use kms_core::{Error, ErrorKind, Result};
use serde::Deserialize;

/// The `[server]` section, as written.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Raw {
    socket: PathBuf,
    #[serde(default = "default_mode")]
    socket_mode: String,
    #[serde(default = "default_idle_timeout")]
    idle_timeout: f64,
    #[serde(default = "default_cache_size")]
    cache_size: usize,
    #[serde(default = "default_cache_idle")]
    cache_idle: f64,
    #[serde(default)]
    audit_log: Option<PathBuf>,
    #[serde(default = "default_max_connections")]
    max_connections: usize,
    #[serde(default)]
    allow: Vec<Rule>,
}

fn default_mode() -> String {
    "0600".into()
}
fn default_idle_timeout() -> f64 {
    300.0
}
fn default_cache_size() -> usize {
    100_000
}
fn default_cache_idle() -> f64 {
    300.0
}
fn default_max_connections() -> usize {
    1024
}

/// What a rule lets its callers do.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Op {
    /// GET and GET-VERSION.
    Get,
    /// CREATE and ROTATE; GET-OR-CREATE needs `get` and `create`.
    Create,
    /// LIST.
    List,
    /// DELETE.
    Delete,
    /// STATS.
    Stats,
}

/// One `[[server.allow]]` rule: callers with one of these uids or (primary) gids may do `ops`
/// on key ids starting with `prefix`.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rule {
    /// Caller uids.
    #[serde(default)]
    pub uids: Vec<u32>,
    /// Caller primary gids.
    #[serde(default)]
    pub gids: Vec<u32>,
    /// The key id prefix the rule covers; empty covers every key.
    #[serde(default)]
    pub prefix: String,
    /// What the caller may do.
    pub ops: Vec<Op>,
}

/// The server's settings, checked.
#[derive(Clone, Debug)]
pub struct Settings {
    /// The socket path.
    pub socket: PathBuf,
    /// The socket's mode.
    pub socket_mode: u32,
    /// Idle connections are closed after this long.
    pub idle_timeout: Duration,
    /// At most this many keys are cached.
    pub cache_size: usize,
    /// Cached keys unused for this long are dropped (and zeroized).
    pub cache_idle: Duration,
    /// The audit log, if any.
    pub audit_log: Option<PathBuf>,
    /// At most this many connections at once.
    pub max_connections: usize,
    /// Authorization rules besides the server's own uid.
    pub allow: Vec<Rule>,
}

fn seconds(name: &str, value: f64) -> Result<Duration> {
    if value > 0.0 && value <= 86_400.0 * 365.0 {
        Ok(Duration::from_secs_f64(value))
    } else {
        let message = format!("[server] {name} must be a positive number of seconds, not {value}");
        Err(Error::new(ErrorKind::InvalidConfig, message))
    }
}

impl Settings {
    /// Checks the `[server]` table; relative paths resolve against `base_dir`.
    pub fn from_table(table: &toml::Table, base_dir: &Path) -> Result<Settings> {
        let raw: Raw =
            toml::Value::Table(table.clone())
                .try_into()
                .map_err(|e: toml::de::Error| {
                    let message = format!("[server]: {}", e.to_string().trim());
                    Error::new(ErrorKind::InvalidConfig, message)
                })?;
        let socket_mode = u32::from_str_radix(raw.socket_mode.trim_start_matches("0o"), 8)
            .ok()
            .filter(|m| *m <= 0o777)
            .ok_or_else(|| {
                let message = format!(
                    "[server] socket_mode {:?} is not an octal mode",
                    raw.socket_mode
                );
                Error::new(ErrorKind::InvalidConfig, message)
            })?;
        if raw.cache_size == 0 || raw.max_connections == 0 {
            let message = "[server] cache_size and max_connections must be at least 1";
            return Err(Error::new(ErrorKind::InvalidConfig, message));
        }
        for rule in &raw.allow {
            kms_core::validate_prefix(&rule.prefix)?;
            if rule.uids.is_empty() && rule.gids.is_empty() {
                let message = "[[server.allow]] rule names no uids or gids";
                return Err(Error::new(ErrorKind::InvalidConfig, message));
            }
        }
        Ok(Settings {
            socket: config::resolve(base_dir, &raw.socket),
            socket_mode,
            idle_timeout: seconds("idle_timeout", raw.idle_timeout)?,
            cache_size: raw.cache_size,
            cache_idle: seconds("cache_idle", raw.cache_idle)?,
            audit_log: raw.audit_log.map(|p| config::resolve(base_dir, &p)),
            max_connections: raw.max_connections,
            allow: raw.allow,
        })
    }

    /// The settings of `kmsd --dev DIR`.
    pub fn dev(dir: &Path) -> Settings {
        let mut table = toml::Table::new();
        table.insert(
            "socket".into(),
            dir.join("kms.sock").display().to_string().into(),
        );
        table.insert(
            "audit_log".into(),
            dir.join("audit.log").display().to_string().into(),
        );
        Settings::from_table(&table, Path::new("")).expect("the development settings are valid")
    }
}
