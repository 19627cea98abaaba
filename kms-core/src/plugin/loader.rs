//! The host side: finding, checking, loading and calling provider plugins.
//!
//! # The loader's contract
//! - A plugin file is checked before `dlopen`: it must be a regular file owned by root or by
//!   the user running kms, not writable by its group or others, in a directory with the same
//!   properties (symbolic links are resolved first and the real file is what is checked and
//!   loaded). Loading runs the library's initialisers, so a file anyone else could have written
//!   is never loaded.
//! - `dlopen` uses `RTLD_NOW | RTLD_LOCAL`: unresolved symbols fail at load, not mid-call, and
//!   the plugin's symbols do not leak into later plugins.
//! - The library is never unloaded: a provider, a key buffer or a thread-local destructor of
//!   the plugin may outlive any handle the host could track, so the `Library` is leaked.
//! - The table's `abi_version` and `table_size` are read first; nothing else is read or
//!   called unless the version is [`KMS_ABI_VERSION`] and the size covers revision 1. Fields
//!   appended later are read only when `table_size` covers them.
//! - The host trusts a plugin as much as linked-in code: a plugin that writes past the
//!   buffers it is given, returns dangling pointers or calls `abort` takes the process with it.
//!   What the host does defend against is everything short of that: wrong sizes, null
//!   pointers, oversized messages, invalid UTF-8, bad key lengths and panics (through the SDK).

use std::ffi::{CStr, CString, c_char, c_void};
use std::fmt;
use std::fs;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::Deserialize;

use super::abi::{
    self, ENTRY_SYMBOL, EntryFn, KMS_ABI_VERSION, KMS_MESSAGE_CAP, KMS_OK, KmsKey, KmsKeyInfo,
    KmsMessage, KmsOption, KmsProviderV1Table,
};
use crate::config::{Config, Context};
use crate::error::{Error, ErrorKind, Result};
use crate::id::{KeyId, MAX_KEY_ID_LEN};
use crate::provider::{Capabilities, KeyProvider};
use crate::secret::MAX_SECRET_LEN;
use crate::secret::{Key, KeyInfo, KeyLen, KeySpec, SecretBytes};

/// The file name of the plugin of provider `name`: `libkms_<name>.so`, with any `-` in the name
/// written `_` (Rust library names cannot hold `-`).
pub fn library_file_name(name: &str) -> String {
    format!("libkms_{}.so", name.replace('-', "_"))
}

/// Whether a provider name is a path to a plugin (it holds a `/`) rather than a name.
pub fn is_plugin_path(name: &str) -> bool {
    name.contains('/')
}

/// Whether `name` can be looked up as `libkms_<name>.so`: 1 to 64 of `[A-Za-z0-9_-]`.
pub fn is_plugin_name(name: &str) -> bool {
    (1..=64).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

/// The directory of the running executable, searched for plugins by default.
pub fn executable_dir() -> Option<PathBuf> {
    let exe = std::env::current_exe().ok()?;
    exe.parent().map(Path::to_path_buf)
}

/// The `[plugins]` section of the configuration.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PluginsConfig {
    /// Directories searched in order, before the executable's directory.
    #[serde(default)]
    dirs: Vec<PathBuf>,
    /// Whether the executable's directory is searched too.
    #[serde(default = "searched_by_default")]
    next_to_executable: bool,
}

fn searched_by_default() -> bool {
    true
}

/// Where plugins are looked for, in order.
#[derive(Clone, Debug, Default)]
pub struct PluginSearch {
    dirs: Vec<PathBuf>,
}

impl PluginSearch {
    /// A search of exactly these directories.
    pub fn new(dirs: Vec<PathBuf>) -> PluginSearch {
        PluginSearch { dirs }
    }

    /// The search a configuration asks for: the `[plugins] dirs` (relative to the
    /// configuration file's directory) and then, unless `next_to_executable = false`, the
    /// directory of the running executable. Without a configuration, only the latter.
    pub fn from_config(config: Option<&Config>) -> Result<PluginSearch> {
        let settings = match config.and_then(|c| c.plugins.as_ref()) {
            Some(table) => {
                PluginsConfig::deserialize(toml::Value::Table(table.clone())).map_err(|e| {
                    let message = format!("[plugins]: {}", e.to_string().trim());
                    Error::new(ErrorKind::InvalidConfig, message)
                })?
            }
            None => PluginsConfig {
                dirs: Vec::new(),
                next_to_executable: true,
            },
        };
        let base = config.map(|c| c.base_dir.clone()).unwrap_or_default();
        let mut dirs: Vec<PathBuf> = settings
            .dirs
            .iter()
            .map(|d| crate::config::resolve(&base, d))
            .collect();
        if settings.next_to_executable {
            dirs.extend(executable_dir());
        }
        Ok(PluginSearch { dirs })
    }

    /// The directories searched, in order.
    pub fn dirs(&self) -> &[PathBuf] {
        &self.dirs
    }

    /// The first `libkms_<name>.so` in the directories, whatever its state (a file that
    /// exists but cannot be loaded is found, so that loading it reports why).
    pub fn find(&self, name: &str) -> Option<PathBuf> {
        if !is_plugin_name(name) {
            return None;
        }
        let file = library_file_name(name);
        self.dirs
            .iter()
            .map(|dir| dir.join(&file))
            .find(|path| fs::symlink_metadata(path).is_ok())
    }

    /// Every `libkms_*.so` in the directories, sorted by file name; where two directories hold
    /// the same file name, the first directory's file wins, as in [`find`](Self::find).
    pub fn discover(&self) -> Vec<PathBuf> {
        let mut found: Vec<(String, PathBuf)> = Vec::new();
        for dir in &self.dirs {
            let Ok(entries) = fs::read_dir(dir) else {
                continue;
            };
            let mut here: Vec<(String, PathBuf)> = entries
                .flatten()
                .filter_map(|entry| {
                    let name = entry.file_name().to_str()?.to_string();
                    let stem = name.strip_prefix("libkms_")?.strip_suffix(".so")?;
                    is_plugin_name(stem).then(|| (name.clone(), entry.path()))
                })
                .collect();
            here.retain(|(name, _)| found.iter().all(|(seen, _)| seen != name));
            found.append(&mut here);
        }
        found.sort();
        found.into_iter().map(|(_, path)| path).collect()
    }
}

/// The functions of a loaded table, null-checked. Required functions are plain pointers.
#[derive(Clone, Copy)]
struct Functions {
    open: abi::OpenFn,
    init: Option<abi::InitFn>,
    get: abi::GetFn,
    create: abi::CreateFn,
    get_or_create: abi::CreateFn,
    list: Option<abi::ListFn>,
    delete_key: Option<abi::DeleteFn>,
    capabilities: abi::CapabilitiesFn,
    free_key: abi::FreeKeyFn,
    close: abi::CloseFn,
    last_error: abi::TextFn,
    get_version: Option<abi::GetVersionFn>,
    rotate: Option<abi::CreateFn>,
    display_name: Option<abi::TextFn>,
    import: Option<abi::ImportFn>,
}

/// A loaded plugin library: its checked table, ready to open providers.
#[derive(Clone)]
pub struct Plugin {
    inner: Arc<Loaded>,
}

struct Loaded {
    path: PathBuf,
    name: String,
    version: String,
    table_size: usize,
    functions: Functions,
}

impl fmt::Debug for Plugin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Plugin")
            .field("path", &self.inner.path)
            .field("name", &self.inner.name)
            .field("version", &self.inner.version)
            .field("table_size", &self.inner.table_size)
            .finish_non_exhaustive()
    }
}

fn plugin_error(path: &Path, message: impl fmt::Display) -> Error {
    Error::new(
        ErrorKind::Plugin,
        format!("plugin {}: {message}", path.display()),
    )
}

/// An error with its sources, as one line (libloading keeps `dlerror`'s text in the source).
fn with_sources(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(inner) = source {
        text.push_str(": ");
        text.push_str(&inner.to_string());
        source = inner.source();
    }
    text
}

/// Reads a field of the table if the plugin's table holds it; `pick` names the field (and so
/// its type) and is never called.
///
/// # Safety
/// `table` points to `size` readable bytes laid out as the start of a [`KmsProviderV1Table`].
unsafe fn read_field<T: Copy>(
    table: *const KmsProviderV1Table,
    size: usize,
    offset: usize,
    _pick: fn(&KmsProviderV1Table) -> &T,
) -> Option<T> {
    if offset + std::mem::size_of::<T>() > size {
        return None;
    }
    // SAFETY: the field lies within the `size` readable bytes, which the plugin wrote as this
    // C type (every bit pattern of an integer, a pointer or a nullable function pointer is a
    // valid `T`); `read_unaligned` assumes nothing of the plugin's alignment.
    Some(unsafe { table.cast::<u8>().add(offset).cast::<T>().read_unaligned() })
}

/// `read_field` for a named field.
macro_rules! field {
    ($table:expr, $size:expr, $field:ident) => {
        // SAFETY: forwarded: the caller holds a table of `$size` readable bytes.
        unsafe {
            read_field(
                $table,
                $size,
                ::std::mem::offset_of!(KmsProviderV1Table, $field),
                |t: &KmsProviderV1Table| &t.$field,
            )
        }
    };
}

/// The text of a NUL-terminated static string of the table.
///
/// # Safety
/// `ptr` is null or points to a NUL-terminated string.
unsafe fn table_text(ptr: *const c_char) -> Option<String> {
    if ptr.is_null() {
        return None;
    }
    // SAFETY: non-null and NUL-terminated per this function's contract.
    let text = unsafe { CStr::from_ptr(ptr) }.to_bytes();
    let text = std::str::from_utf8(text).ok()?;
    (!text.is_empty() && text.len() <= 64 && !text.chars().any(char::is_control))
        .then(|| text.to_string())
}

impl Plugin {
    /// Checks, loads and validates the plugin at `path`.
    pub fn load(path: &Path) -> Result<Plugin> {
        // 1. The file and its directory must be safe to run code from.
        let real = check_secure(path)?;

        // 2. dlopen. The library is leaked at once: it is never unloaded.
        // SAFETY: loading runs the plugin's initialisers. The file passed the ownership and mode
        // checks above, so it is as trusted as the kms binary itself; that is the contract.
        let library = unsafe {
            libloading::os::unix::Library::open(
                Some(real.as_os_str()),
                libloading::os::unix::RTLD_NOW | libloading::os::unix::RTLD_LOCAL,
            )
        }
        .map_err(|e| {
            let message = format!(
                "cannot load plugin {}: {}",
                path.display(),
                with_sources(&e)
            );
            Error::new(ErrorKind::Plugin, message)
        })?;
        let library: &'static libloading::os::unix::Library = Box::leak(Box::new(library));

        // 3. The entry symbol and the table it returns.
        // SAFETY: the symbol is declared by the ABI as `const KmsProviderV1Table *(void)`; a
        // plugin exporting the name with another type breaks the ABI contract.
        let entry: EntryFn = unsafe { library.get::<EntryFn>(ENTRY_SYMBOL) }
            .map(|symbol| *symbol)
            .map_err(|e| {
                plugin_error(
                    path,
                    format!(
                        "it has no {ENTRY_SYMBOL} symbol, so it is not a kms provider plugin ({})",
                        with_sources(&e)
                    ),
                )
            })?;
        // SAFETY: the entry function takes no arguments and returns a pointer to static data.
        let table = unsafe { entry() };
        if table.is_null() {
            return Err(plugin_error(
                path,
                format!("{ENTRY_SYMBOL} returned no table"),
            ));
        }

        // 4. The version and the size, before anything else is touched.
        // Every table starts with the two `uint32_t` fields, whatever its revision.
        let header = std::mem::offset_of!(KmsProviderV1Table, name);
        let version = field!(table, header, abi_version).unwrap_or_default();
        let size = field!(table, header, table_size).unwrap_or_default();
        if version != KMS_ABI_VERSION {
            let message = format!(
                "plugin {} speaks ABI version {version}, this kms speaks {KMS_ABI_VERSION}",
                path.display()
            );
            return Err(Error::new(ErrorKind::Plugin, message));
        }
        let size = size as usize;
        if size < abi::TABLE_SIZE_REVISION_1 {
            return Err(plugin_error(
                path,
                format!(
                    "its function table is too small: {size} bytes, ABI version 1 needs at least {}",
                    abi::TABLE_SIZE_REVISION_1
                ),
            ));
        }

        // 5. The fields, each read only if the plugin's table holds it.
        Plugin::from_table(path, table, size)
    }

    fn from_table(path: &Path, table: *const KmsProviderV1Table, size: usize) -> Result<Plugin> {
        let required = |name: &str| plugin_error(path, format!("its table lacks {name}"));
        let name = field!(table, size, name).unwrap_or(std::ptr::null());
        let version = field!(table, size, version).unwrap_or(std::ptr::null());
        // SAFETY: the ABI declares both as static NUL-terminated strings (or null).
        let name = unsafe { table_text(name) }
            .filter(|n| is_plugin_name(n))
            .ok_or_else(|| plugin_error(path, "its name is missing or not of [A-Za-z0-9_-]"))?;
        // SAFETY: as above.
        let version = unsafe { table_text(version) }
            .ok_or_else(|| plugin_error(path, "its version string is missing or not text"))?;

        let functions = Functions {
            open: field!(table, size, open)
                .flatten()
                .ok_or_else(|| required("open"))?,
            init: field!(table, size, init).flatten(),
            get: field!(table, size, get)
                .flatten()
                .ok_or_else(|| required("get"))?,
            create: field!(table, size, create)
                .flatten()
                .ok_or_else(|| required("create"))?,
            get_or_create: field!(table, size, get_or_create)
                .flatten()
                .ok_or_else(|| required("get_or_create"))?,
            list: field!(table, size, list).flatten(),
            delete_key: field!(table, size, delete_key).flatten(),
            capabilities: field!(table, size, capabilities)
                .flatten()
                .ok_or_else(|| required("capabilities"))?,
            free_key: field!(table, size, free_key)
                .flatten()
                .ok_or_else(|| required("free_key"))?,
            close: field!(table, size, close)
                .flatten()
                .ok_or_else(|| required("close"))?,
            last_error: field!(table, size, last_error)
                .flatten()
                .ok_or_else(|| required("last_error"))?,
            get_version: field!(table, size, get_version).flatten(),
            rotate: field!(table, size, rotate).flatten(),
            display_name: field!(table, size, display_name).flatten(),
            import: field!(table, size, import).flatten(),
        };
        Ok(Plugin {
            inner: Arc::new(Loaded {
                path: path.to_path_buf(),
                name,
                version,
                table_size: size,
                functions,
            }),
        })
    }

    /// The path it was loaded from, as given.
    pub fn path(&self) -> &Path {
        &self.inner.path
    }

    /// The provider name the plugin reports.
    pub fn name(&self) -> &str {
        &self.inner.name
    }

    /// The plugin's own version.
    pub fn version(&self) -> &str {
        &self.inner.version
    }

    /// The ABI major version (always [`KMS_ABI_VERSION`] for a loaded plugin).
    pub fn abi_version(&self) -> u32 {
        KMS_ABI_VERSION
    }

    /// The size of the plugin's table in bytes.
    pub fn table_size(&self) -> usize {
        self.inner.table_size
    }

    /// The newest revision of ABI version 1 the plugin's table covers fully (1, 2 or 3).
    pub fn revision(&self) -> u32 {
        match self.inner.table_size {
            size if size >= abi::TABLE_SIZE_REVISION_3 => 3,
            size if size >= abi::TABLE_SIZE_REVISION_2 => 2,
            _ => 1,
        }
    }

    /// Whether the plugin can initialise storage (`kms init`).
    pub fn has_init(&self) -> bool {
        self.inner.functions.init.is_some()
    }

    fn fallback_name(&self) -> String {
        format!("{} plugin ({})", self.inner.name, self.inner.path.display())
    }

    /// Opens a provider with `options` (the `[provider.options]` table).
    pub fn open(&self, context: &Context, options: &toml::Table) -> Result<Box<dyn KeyProvider>> {
        let fallback = self.fallback_name();
        let options = COptions::new(options).map_err(|e| e.with_backend(&fallback))?;
        let dir = c_path(&context.base_dir).map_err(|e| e.with_backend(&fallback))?;
        let mut buf = vec![0u8; KMS_MESSAGE_CAP];
        let mut message = KmsMessage {
            buf: buf.as_mut_ptr().cast(),
            cap: buf.len(),
            len: 0,
        };
        let mut handle: *mut c_void = std::ptr::null_mut();

        // SAFETY: the arguments are as the ABI describes: `options` holds `len()` entries whose
        // strings live in `options` until after the call, `dir` is NUL-terminated, `handle`
        // and `message` (over `buf`, `cap` bytes) are writable.
        let status = unsafe {
            (self.inner.functions.open)(
                options.as_ptr(),
                options.len(),
                dir.as_ptr(),
                &mut handle,
                &mut message,
            )
        };
        if status != KMS_OK {
            let text = plugin_text(&buf, message.len);
            return Err(self.error(status, "open", text).with_backend(&fallback));
        }
        Ok(Box::new(PluginProvider::new(self.clone(), handle)))
    }

    /// Initialises the provider's storage; returns the line describing what was made.
    pub fn init(&self, context: &Context, options: &toml::Table) -> Result<String> {
        let fallback = self.fallback_name();
        let Some(init) = self.inner.functions.init else {
            let message = format!("provider \"{}\" has nothing to initialise", self.name());
            return Err(Error::new(ErrorKind::Unsupported, message).with_backend(&fallback));
        };
        let options = COptions::new(options).map_err(|e| e.with_backend(&fallback))?;
        let dir = c_path(&context.base_dir).map_err(|e| e.with_backend(&fallback))?;
        let mut buf = vec![0u8; KMS_MESSAGE_CAP];
        let mut message = KmsMessage {
            buf: buf.as_mut_ptr().cast(),
            cap: buf.len(),
            len: 0,
        };
        // SAFETY: as in `open`.
        let status = unsafe { init(options.as_ptr(), options.len(), dir.as_ptr(), &mut message) };
        let text = plugin_text(&buf, message.len);
        if status != KMS_OK {
            return Err(self.error(status, "init", text).with_backend(&fallback));
        }
        Ok(text)
    }

    /// The error for a failed call: its kind from the status, its message from the plugin.
    fn error(&self, status: i32, operation: &str, text: String) -> Error {
        let kind = abi::kind_of(status);
        let mut message = if text.is_empty() {
            format!("{operation} failed with status {status} and no message")
        } else {
            text
        };
        if kind == ErrorKind::Plugin {
            message = format!("plugin {}: {message}", self.inner.path.display());
        }
        Error::new(kind, message)
    }
}

/// Turns at most [`KMS_MESSAGE_CAP`] bytes of plugin text into one safe line: an incomplete
/// UTF-8 sequence at the cut is dropped, invalid bytes become U+FFFD, control characters are
/// escaped, and a cut is said.
fn plugin_text(buf: &[u8], full_len: usize) -> String {
    let shown = without_cut_char(&buf[..full_len.min(buf.len()).min(KMS_MESSAGE_CAP)]);
    let mut text = String::with_capacity(shown.len());
    for c in String::from_utf8_lossy(shown).chars() {
        if c.is_control() {
            text.extend(c.escape_default());
        } else {
            text.push(c);
        }
    }
    if full_len > KMS_MESSAGE_CAP {
        text.push_str(&format!(" (cut from {full_len} bytes)"));
    }
    text
}

/// `bytes` without a multi-byte UTF-8 character cut short at its end.
fn without_cut_char(bytes: &[u8]) -> &[u8] {
    // The last character starts at the last byte that is not a continuation byte (10xxxxxx),
    // at most 3 bytes back.
    let tail = bytes.len().saturating_sub(4)..bytes.len();
    let Some(lead) = tail.rev().find(|&i| bytes[i] & 0xC0 != 0x80) else {
        return bytes;
    };
    let need = match bytes[lead] {
        b if b >= 0xF0 => 4,
        b if b >= 0xE0 => 3,
        b if b >= 0xC0 => 2,
        _ => 1,
    };
    if bytes.len() - lead < need {
        &bytes[..lead]
    } else {
        bytes
    }
}

/// `path` as a C string (empty for "the current directory").
fn c_path(path: &Path) -> Result<CString> {
    CString::new(path.as_os_str().as_bytes()).map_err(|_| {
        let message = format!(
            "the configuration directory {} holds a NUL byte",
            path.display()
        );
        Error::new(ErrorKind::InvalidConfig, message)
    })
}

/// The options table flattened for the ABI; the strings live as long as this value.
struct COptions {
    _strings: Vec<CString>,
    entries: Vec<KmsOption>,
}

impl COptions {
    fn new(options: &toml::Table) -> Result<COptions> {
        let mut strings = Vec::with_capacity(options.len() * 3);
        for (key, value) in options {
            let (tag, text) = abi::option_text(value);
            for part in [key.as_str(), tag, &text] {
                let part = CString::new(part).map_err(|_| {
                    let message = format!(
                        "option \"{}\" holds a NUL byte, which cannot cross the plugin boundary",
                        key.escape_debug()
                    );
                    Error::new(ErrorKind::InvalidConfig, message)
                })?;
                strings.push(part);
            }
        }
        // The `CString`s own their heap buffers, so these pointers stay valid while `strings`
        // lives, even after the vector itself moves into the struct.
        let entries = strings
            .chunks_exact(3)
            .map(|s| KmsOption {
                key: s[0].as_ptr(),
                tag: s[1].as_ptr(),
                value: s[2].as_ptr(),
            })
            .collect();
        Ok(COptions {
            _strings: strings,
            entries,
        })
    }

    fn as_ptr(&self) -> *const KmsOption {
        if self.entries.is_empty() {
            std::ptr::null()
        } else {
            self.entries.as_ptr()
        }
    }

    fn len(&self) -> usize {
        self.entries.len()
    }
}

/// Refuses a plugin file that someone other than root or this user could have written: the
/// file and its directory must be owned by root or the caller and not group- or world-writable.
/// Returns the real path, symbolic links resolved, which is what gets loaded.
fn check_secure(path: &Path) -> Result<PathBuf> {
    let shown = path.display();
    let real = fs::canonicalize(path).map_err(|e| {
        let kind = if e.kind() == std::io::ErrorKind::NotFound {
            ErrorKind::InvalidConfig
        } else {
            ErrorKind::Plugin
        };
        Error::new(kind, format!("cannot load plugin {shown}: {e}"))
    })?;
    let also = if real == path {
        String::new()
    } else {
        format!(" (really {})", real.display())
    };
    let inspect = |p: &Path| {
        fs::metadata(p).map_err(|e| {
            let message = format!("cannot inspect plugin {shown}{also}: {}: {e}", p.display());
            Error::new(ErrorKind::Plugin, message)
        })
    };

    let md = inspect(&real)?;
    if !md.is_file() {
        let message = format!("cannot load plugin {shown}{also}: it is not a regular file");
        return Err(Error::new(ErrorKind::Plugin, message));
    }
    let me = rustix::process::geteuid().as_raw();
    if let Some(reason) = unsafe_reason(&md, me) {
        let message = format!(
            "refusing plugin {shown}{also}: it {reason}; only root or this user (uid {me}) may \
             be able to change a plugin (try `chmod go-w {}`)",
            real.display()
        );
        return Err(Error::new(ErrorKind::Insecure, message));
    }

    let dir = real.parent().unwrap_or(Path::new("/"));
    let md = inspect(dir)?;
    if let Some(reason) = unsafe_reason(&md, me) {
        let message = format!(
            "refusing plugin {shown}{also}: its directory {} {reason}; others could replace the \
             plugin",
            dir.display()
        );
        return Err(Error::new(ErrorKind::Insecure, message));
    }
    Ok(real)
}

fn unsafe_reason(md: &fs::Metadata, me: u32) -> Option<String> {
    let mode = md.mode() & 0o7777;
    if md.uid() != 0 && md.uid() != me {
        Some(format!(
            "is owned by uid {}, neither root nor this user",
            md.uid()
        ))
    } else if mode & 0o002 != 0 {
        Some(format!("is writable by others (mode {mode:04o})"))
    } else if mode & 0o020 != 0 {
        Some(format!("is writable by its group (mode {mode:04o})"))
    } else {
        None
    }
}

/// A provider living in a plugin: every call goes through the plugin's table.
struct PluginProvider {
    plugin: Plugin,
    handle: Handle,
    display: String,
}

/// The plugin's opaque handle.
struct Handle(*mut c_void);

// SAFETY: the ABI requires every function of a plugin to be callable on one handle from any
// thread, concurrently; the host never touches what the handle points to.
unsafe impl Send for Handle {}
// SAFETY: as above.
unsafe impl Sync for Handle {}

/// The key id or prefix in a stack buffer followed by a NUL byte, as the ABI promises.
struct CId {
    buf: [u8; MAX_KEY_ID_LEN + 1],
    len: usize,
}

impl CId {
    fn new(text: &str) -> CId {
        let len = text.len().min(MAX_KEY_ID_LEN);
        let mut buf = [0u8; MAX_KEY_ID_LEN + 1];
        buf[..len].copy_from_slice(&text.as_bytes()[..len]);
        CId { buf, len }
    }

    fn ptr(&self) -> *const c_char {
        self.buf.as_ptr().cast()
    }
}

/// What `list` collects through the callback.
struct Listing {
    keys: Vec<KeyInfo>,
    error: Option<String>,
}

/// The host's list callback. It never unwinds: it only validates and pushes.
unsafe extern "C" fn list_entry(context: *mut c_void, info: *const KmsKeyInfo) -> i32 {
    // SAFETY: `context` is the `Listing` that `PluginProvider::list` passed for this call.
    let listing = unsafe { &mut *context.cast::<Listing>() };
    if info.is_null() {
        listing.error = Some("list passed a null entry".into());
        return 1;
    }
    // SAFETY: non-null; the plugin passes an entry valid during the callback.
    let info = unsafe { &*info };
    if info.id.is_null() || info.id_len > MAX_KEY_ID_LEN {
        listing.error = Some(format!("list passed an id of {} bytes", info.id_len));
        return 1;
    }
    // SAFETY: the plugin's id holds `id_len` readable bytes (at most 255, checked above).
    let raw = unsafe { std::slice::from_raw_parts(info.id.cast::<u8>(), info.id_len) };
    let id = match KeyId::from_bytes(raw) {
        Ok(id) => id,
        Err(e) => {
            listing.error = Some(format!("list passed a bad id: {}", e.message()));
            return 1;
        }
    };
    if info.key_len == 0 || info.key_len as usize > MAX_SECRET_LEN {
        listing.error = Some(format!(
            "list reported key \"{id}\" with {} bytes",
            info.key_len
        ));
        return 1;
    }
    listing.keys.push(KeyInfo {
        id,
        version: info.version,
        bytes: info.key_len,
        created: info.created,
    });
    KMS_OK
}

impl PluginProvider {
    fn new(plugin: Plugin, handle: *mut c_void) -> PluginProvider {
        let handle = Handle(handle);
        let display = plugin
            .inner
            .functions
            .display_name
            .map(|display_name| {
                let mut buf = vec![0u8; KMS_MESSAGE_CAP];
                // SAFETY: a live handle and `cap` writable bytes, as the ABI describes.
                let len = unsafe { display_name(handle.0, buf.as_mut_ptr().cast(), buf.len()) };
                plugin_text(&buf, len)
            })
            .filter(|name| !name.trim().is_empty())
            .unwrap_or_else(|| plugin.fallback_name());
        PluginProvider {
            plugin,
            handle,
            display,
        }
    }

    fn functions(&self) -> &Functions {
        &self.plugin.inner.functions
    }

    /// The error of a failed call, with the plugin's message.
    fn failure(&self, status: i32, operation: &str, id: Option<&KeyId>) -> Error {
        let mut buf = vec![0u8; KMS_MESSAGE_CAP];
        // SAFETY: a live handle and `cap` writable bytes, as the ABI describes.
        let len = unsafe {
            (self.functions().last_error)(self.handle.0, buf.as_mut_ptr().cast(), buf.len())
        };
        let error = self
            .plugin
            .error(status, operation, plugin_text(&buf, len))
            .with_backend(&self.display);
        match id {
            Some(id) => error.with_key_id(id),
            None => error,
        }
    }

    fn misbehaved(&self, id: &KeyId, message: String) -> Error {
        let message = format!("plugin {}: {message}", self.plugin.path().display());
        Error::new(ErrorKind::Plugin, message)
            .with_key_id(id)
            .with_backend(&self.display)
    }

    /// Turns the outcome of a call returning a key into a [`Key`], releasing the buffer.
    fn take_key(
        &self,
        status: i32,
        operation: &str,
        id: &KeyId,
        out: KmsKey,
        want: Option<KeyLen>,
    ) -> Result<Key> {
        // 1. The message first: freeing the buffer must not disturb it.
        let failure = (status != KMS_OK).then(|| self.failure(status, operation, Some(id)));

        // 2. Copy and release the buffer, whatever the status. A length beyond any key is
        //    not read: it cannot be a key, and may be garbage.
        let copied = if out.ptr.is_null() {
            None
        } else {
            let material = (out.len <= MAX_SECRET_LEN).then(|| {
                // SAFETY: the plugin returned `len` readable bytes at `ptr`, valid until
                // `free_key`; `len` is at most MAX_SECRET_LEN.
                SecretBytes::copy_from(unsafe { std::slice::from_raw_parts(out.ptr, out.len) })
            });
            // SAFETY: the buffer came from this plugin and handle, and is released once.
            unsafe { (self.functions().free_key)(self.handle.0, out.ptr, out.len) };
            Some((material, out.len))
        };
        if let Some(failure) = failure {
            return Err(failure);
        }

        // 3. A success must carry a key of a valid length and version.
        let Some((material, len)) = copied else {
            let message = format!("{operation} succeeded without returning a key");
            return Err(self.misbehaved(id, message));
        };
        let material = match material {
            Some(material) if (1..=MAX_SECRET_LEN).contains(&len) => material,
            _ => {
                let message = format!("{operation} returned a key of {len} bytes");
                return Err(self.misbehaved(id, message));
            }
        };
        if let Some(want) = want.filter(|w| w.bytes() != material.len()) {
            let message = format!(
                "{operation} was asked for {} bytes and returned {}",
                want.bytes(),
                material.len()
            );
            return Err(self.misbehaved(id, message));
        }
        if out.version == 0 {
            let message = format!("{operation} returned version 0");
            return Err(self.misbehaved(id, message));
        }
        Key::new(id.clone(), out.version, material)
    }

    fn key_call(
        &self,
        operation: &str,
        id: &KeyId,
        want: Option<KeyLen>,
        call: impl FnOnce(*mut c_void, &CId, *mut KmsKey) -> i32,
    ) -> Result<Key> {
        let c_id = CId::new(id.as_str());
        let mut out = KmsKey::EMPTY;
        let status = call(self.handle.0, &c_id, &mut out);
        self.take_key(status, operation, id, out, want)
    }
}

impl fmt::Display for PluginProvider {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.display)
    }
}

impl KeyProvider for PluginProvider {
    fn get(&self, id: &KeyId) -> Result<Key> {
        let get = self.functions().get;
        self.key_call("get", id, None, |handle, c_id, out| {
            // SAFETY: a live handle, the id's bytes followed by NUL, a writable key buffer.
            unsafe { get(handle, c_id.ptr(), c_id.len, out) }
        })
    }

    fn create(&self, id: &KeyId, spec: KeySpec) -> Result<Key> {
        let create = self.functions().create;
        self.key_call("create", id, Some(spec.len), |handle, c_id, out| {
            // SAFETY: as in `get`.
            unsafe { create(handle, c_id.ptr(), c_id.len, spec.len.bytes() as u32, out) }
        })
    }

    fn get_or_create(&self, id: &KeyId, spec: KeySpec) -> Result<Key> {
        let get_or_create = self.functions().get_or_create;
        self.key_call("get_or_create", id, None, |handle, c_id, out| {
            // SAFETY: as in `get`.
            unsafe { get_or_create(handle, c_id.ptr(), c_id.len, spec.len.bytes() as u32, out) }
        })
    }

    fn get_version(&self, id: &KeyId, version: u32) -> Result<Key> {
        let Some(get_version) = self.functions().get_version else {
            return Err(Error::unsupported("key versions")
                .with_key_id(id)
                .with_backend(&self.display));
        };
        self.key_call("get_version", id, None, |handle, c_id, out| {
            // SAFETY: as in `get`.
            unsafe { get_version(handle, c_id.ptr(), c_id.len, version, out) }
        })
    }

    fn rotate(&self, id: &KeyId, spec: KeySpec) -> Result<Key> {
        let Some(rotate) = self.functions().rotate else {
            return Err(Error::unsupported("key rotation")
                .with_key_id(id)
                .with_backend(&self.display));
        };
        self.key_call("rotate", id, Some(spec.len), |handle, c_id, out| {
            // SAFETY: as in `get`.
            unsafe { rotate(handle, c_id.ptr(), c_id.len, spec.len.bytes() as u32, out) }
        })
    }

    fn import(&self, id: &KeyId, secret: &SecretBytes) -> Result<Key> {
        let Some(import) = self.functions().import else {
            return Err(Error::unsupported("importing secrets")
                .with_key_id(id)
                .with_backend(&self.display));
        };
        let bytes = secret.expose_secret();
        self.key_call("import", id, None, |handle, c_id, out| {
            // SAFETY: as in `get`; `bytes` stays alive and readable during the call.
            unsafe {
                import(
                    handle,
                    c_id.ptr(),
                    c_id.len,
                    bytes.as_ptr(),
                    bytes.len(),
                    out,
                )
            }
        })
    }

    fn list(&self, prefix: &str) -> Result<Vec<KeyInfo>> {
        let Some(list) = self.functions().list else {
            return Err(Error::unsupported("listing keys").with_backend(&self.display));
        };
        crate::id::validate_prefix(prefix)?;
        let c_prefix = CId::new(prefix);
        let mut listing = Listing {
            keys: Vec::new(),
            error: None,
        };
        // SAFETY: a live handle, the prefix's bytes followed by NUL, the host's callback and,
        // as its context, the `Listing` it expects, which outlives the call.
        let status = unsafe {
            list(
                self.handle.0,
                c_prefix.ptr(),
                c_prefix.len,
                list_entry,
                (&raw mut listing).cast(),
            )
        };
        if let Some(message) = listing.error {
            let message = format!("plugin {}: {message}", self.plugin.path().display());
            return Err(Error::new(ErrorKind::Plugin, message).with_backend(&self.display));
        }
        if status != KMS_OK {
            return Err(self.failure(status, "list", None));
        }
        listing.keys.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(listing.keys)
    }

    fn delete(&self, id: &KeyId) -> Result<()> {
        let Some(delete_key) = self.functions().delete_key else {
            return Err(Error::unsupported("deleting keys")
                .with_key_id(id)
                .with_backend(&self.display));
        };
        let c_id = CId::new(id.as_str());
        // SAFETY: a live handle and the id's bytes followed by NUL.
        let status = unsafe { delete_key(self.handle.0, c_id.ptr(), c_id.len) };
        if status != KMS_OK {
            return Err(self.failure(status, "delete", Some(id)));
        }
        Ok(())
    }

    fn capabilities(&self) -> Capabilities {
        let functions = self.functions();
        // SAFETY: a live handle.
        let bits = unsafe { (functions.capabilities)(self.handle.0) };
        let mut caps = abi::capabilities_of(bits);
        // A capability whose functions the table lacks is not there.
        caps.list &= functions.list.is_some();
        caps.delete &= functions.delete_key.is_some();
        caps.versions &= functions.get_version.is_some() && functions.rotate.is_some();
        caps
    }
}

impl Drop for PluginProvider {
    fn drop(&mut self) {
        // SAFETY: the handle came from `open` and is closed once, after its last use.
        unsafe { (self.functions().close)(self.handle.0) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn library_names() {
        assert_eq!(library_file_name("file"), "libkms_file.so");
        assert_eq!(library_file_name("aws-kms"), "libkms_aws_kms.so");
        assert!(is_plugin_name("aws-kms"));
        for bad in ["", "a b", "../x", "x.so", &"n".repeat(65)] {
            assert!(!is_plugin_name(bad), "{bad:?}");
        }
        assert!(is_plugin_path("./libkms_x.so"));
        assert!(!is_plugin_path("file"));
    }

    #[test]
    fn plugin_text_is_bounded_and_safe() {
        assert_eq!(plugin_text(b"abc\0\0", 3), "abc");
        assert_eq!(plugin_text(b"a\nb", 3), "a\\nb");
        // A 3-byte character cut after its second byte is dropped.
        let euro = "ab\u{20ac}".as_bytes();
        assert_eq!(plugin_text(&euro[..4], 5), "ab");
        assert_eq!(plugin_text(euro, 5), "ab\u{20ac}");
        assert_eq!(plugin_text(b"a\xffb", 3), "a\u{fffd}b");
        let big = vec![b'x'; KMS_MESSAGE_CAP];
        let text = plugin_text(&big, 1 << 20);
        assert!(text.starts_with("xxx"));
        assert!(
            text.ends_with(" (cut from 1048576 bytes)"),
            "{}",
            &text[4000..]
        );
        assert!(text.len() < KMS_MESSAGE_CAP + 64);
        // A length beyond the buffer is not trusted.
        assert_eq!(plugin_text(b"ab", 1000), "ab");
    }

    #[test]
    fn options_cross_the_boundary_exactly() {
        let table: toml::Table = r#"
            dir = "keys"
            n = 42
            ratio = 2.5e-8
            on = false
            list = ["a", 1, [true]]
            nested = { deep = { x = 1979-05-27T07:32:00Z } }
        "#
        .parse()
        .unwrap();
        let options = COptions::new(&table).unwrap();
        // SAFETY: `options` holds `len()` entries whose strings live as long as it does.
        let rebuilt = unsafe { super::super::sdk::options_from_c(options.as_ptr(), options.len()) };
        assert_eq!(rebuilt.unwrap(), table);
    }

    #[test]
    fn options_flatten_with_nul_refused() {
        let table: toml::Table = "a = 1\nb = \"x\"".parse().unwrap();
        let options = COptions::new(&table).unwrap();
        assert_eq!(options.len(), 2);
        let mut table = toml::Table::new();
        table.insert("k".into(), toml::Value::String("a\0b".into()));
        let err = COptions::new(&table).err().unwrap();
        assert_eq!(err.kind(), ErrorKind::InvalidConfig);
    }

    #[test]
    fn plugins_section_is_strict() {
        let config = Config::parse(
            "[provider]\nname = \"x\"\n[plugins]\ndirz = []\n",
            PathBuf::from("/etc/kms"),
        )
        .unwrap();
        let err = PluginSearch::from_config(Some(&config)).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::InvalidConfig);
        assert!(err.message().contains("dirz"), "{err}");

        let config = Config::parse(
            "[provider]\nname = \"x\"\n[plugins]\ndirs = [\"p\", \"/abs\"]\n\
             next_to_executable = false\n",
            PathBuf::from("/etc/kms"),
        )
        .unwrap();
        let search = PluginSearch::from_config(Some(&config)).unwrap();
        assert_eq!(
            search.dirs(),
            [PathBuf::from("/etc/kms/p"), PathBuf::from("/abs")]
        );
        let search = PluginSearch::from_config(None).unwrap();
        assert_eq!(search.dirs(), [executable_dir().unwrap()]);
    }

    #[test]
    fn insecure_files_are_refused_before_loading() {
        use std::os::unix::fs::PermissionsExt;

        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("libkms_x.so");
        fs::write(&file, b"not a library").unwrap();
        for (mode, needle) in [(0o664, "by its group"), (0o646, "by others")] {
            fs::set_permissions(&file, fs::Permissions::from_mode(mode)).unwrap();
            let err = Plugin::load(&file).unwrap_err();
            assert_eq!(err.kind(), ErrorKind::Insecure, "{err}");
            assert!(err.message().contains(needle), "{err}");
            assert!(err.message().contains("libkms_x.so"), "{err}");
        }
        fs::set_permissions(&file, fs::Permissions::from_mode(0o644)).unwrap();
        fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o777)).unwrap();
        let err = Plugin::load(&file).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Insecure, "{err}");
        assert!(err.message().contains("its directory"), "{err}");

        fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o755)).unwrap();
        let err = Plugin::load(&file).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Plugin, "{err}");
        assert!(err.message().starts_with("cannot load plugin"), "{err}");

        let err = Plugin::load(&dir.path().join("libkms_none.so")).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::InvalidConfig, "{err}");
    }
}
