//! The Rust SDK: exports a [`KeyProvider`] as a plugin through [`export_provider!`].
//!
//! The macro generates `kms_provider_entry` and a static table whose functions are the
//! `extern "C"` functions of this module. Each of them:
//!
//! - checks its pointers and turns the C arguments into kms types (a key id is validated
//!   again, so a plugin never sees an id the host would refuse);
//! - calls the provider inside [`std::panic::catch_unwind`], so a panic becomes an error of
//!   kind [`ErrorKind::Plugin`] (`plugin panicked in get: ...`) and the host keeps running;
//! - returns 0 or the error's status, keeping the message for `last_error` in a thread-local
//!   slot (the host asks for it on the same thread, right after the failed call).
//!
//! Key buffers are copied out of the [`Key`] into a fresh allocation that `free_key` zeroizes
//! before freeing it.
//!
//! [`export_provider!`]: crate::export_provider

use std::any::Any;
use std::cell::RefCell;
use std::ffi::{CStr, c_char, c_void};
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::PathBuf;

use zeroize::Zeroize;

use super::abi::{
    self, KMS_ABI_VERSION, KMS_OK, KmsKey, KmsKeyInfo, KmsListCallback, KmsMessage, KmsOption,
    KmsProviderV1Table,
};
use crate::config::{self, Context};
use crate::error::{Error, ErrorKind, Result};
use crate::id::KeyId;
use crate::provider::KeyProvider;
use crate::secret::{Key, KeyLen, KeySpec};

/// What a plugin handle points to.
struct Handle {
    provider: Box<dyn KeyProvider>,
}

thread_local! {
    /// The message of the last failed call on this thread.
    static LAST_ERROR: RefCell<String> = const { RefCell::new(String::new()) };
}

fn set_last_error(message: &str) {
    // During thread teardown the slot may be gone; the message is then lost, not the process.
    let _ = LAST_ERROR.try_with(|slot| {
        let mut slot = slot.borrow_mut();
        slot.clear();
        slot.push_str(message);
    });
}

fn panic_text(payload: &(dyn Any + Send)) -> &str {
    if let Some(text) = payload.downcast_ref::<&str>() {
        text
    } else if let Some(text) = payload.downcast_ref::<String>() {
        text
    } else {
        "a panic without a message"
    }
}

fn panicked(operation: &str, payload: &(dyn Any + Send)) -> Error {
    let message = format!("plugin panicked in {operation}: {}", panic_text(payload));
    Error::new(ErrorKind::Plugin, message)
}

/// Runs one call of the provider: a panic becomes an error, an error becomes a status.
fn guard(operation: &'static str, call: impl FnOnce() -> Result<()>) -> i32 {
    let error = match catch_unwind(AssertUnwindSafe(call)) {
        Ok(Ok(())) => return KMS_OK,
        Ok(Err(error)) => error,
        Err(payload) => panicked(operation, payload.as_ref()),
    };
    set_last_error(error.message());
    abi::status_of(error.kind())
}

fn plugin_error(message: &str) -> Error {
    Error::new(ErrorKind::Plugin, message.to_string())
}

/// The provider behind `handle`.
///
/// # Safety
/// `handle` is null or a pointer returned by [`open`] and not yet closed.
unsafe fn provider<'a>(handle: *mut c_void) -> Result<&'a dyn KeyProvider> {
    let handle = handle.cast::<Handle>();
    if handle.is_null() {
        return Err(plugin_error("the host passed a null handle"));
    }
    // SAFETY: per this function's contract, a non-null handle is a live `Handle` made by
    // `open`; the host never uses it after `close`.
    Ok(unsafe { (*handle).provider.as_ref() })
}

/// The bytes at `ptr`, `len`.
///
/// # Safety
/// `ptr` is null or points to `len` readable bytes that stay valid for `'a`.
unsafe fn bytes<'a>(ptr: *const c_char, len: usize, what: &str) -> Result<&'a [u8]> {
    if ptr.is_null() {
        return Err(plugin_error(&format!("the host passed a null {what}")));
    }
    // SAFETY: non-null, and per this function's contract `len` bytes are readable.
    Ok(unsafe { std::slice::from_raw_parts(ptr.cast::<u8>(), len) })
}

/// # Safety
/// As for [`bytes`].
unsafe fn key_id(ptr: *const c_char, len: usize) -> Result<KeyId> {
    // SAFETY: forwarded contract.
    KeyId::from_bytes(unsafe { bytes(ptr, len, "key id") }?)
}

fn key_spec(key_len: u32) -> Result<KeySpec> {
    let len = KeyLen::from_bytes(key_len as usize).ok_or_else(|| {
        let message = format!("a key has 16, 24 or 32 bytes, not {key_len}");
        Error::new(ErrorKind::InvalidInput, message)
    })?;
    Ok(KeySpec::new(len))
}

/// Hands `key` to the host in a fresh buffer that [`free_key`] releases.
///
/// # Safety
/// `out` is null or points to a writable [`KmsKey`].
unsafe fn put_key(out: *mut KmsKey, key: &Key) -> Result<()> {
    if out.is_null() {
        return Err(plugin_error("the host passed a null key buffer"));
    }
    let buffer: Box<[u8]> = key.expose_secret().into();
    let len = buffer.len();
    let ptr = Box::into_raw(buffer).cast::<u8>();
    // SAFETY: `out` is non-null and writable per this function's contract.
    unsafe {
        out.write(KmsKey {
            ptr,
            len,
            version: key.version(),
        });
    }
    Ok(())
}

/// Copies `text` into a host buffer of `cap` bytes and returns its full length.
///
/// # Safety
/// `buf` is null or points to `cap` writable bytes.
unsafe fn copy_text(text: &str, buf: *mut c_char, cap: usize) -> usize {
    if !buf.is_null() {
        let n = text.len().min(cap);
        // SAFETY: `n <= cap` bytes are writable at `buf`, and `text` cannot overlap a buffer
        // the host owns.
        unsafe { std::ptr::copy_nonoverlapping(text.as_ptr(), buf.cast::<u8>(), n) };
    }
    text.len()
}

/// Writes `text` into a [`KmsMessage`].
///
/// # Safety
/// `message` is null or points to a [`KmsMessage`] whose `buf` holds `cap` writable bytes.
unsafe fn put_message(message: *mut KmsMessage, text: &str) {
    if message.is_null() {
        return;
    }
    // SAFETY: non-null and valid per this function's contract.
    let message = unsafe { &mut *message };
    // SAFETY: `buf` holds `cap` writable bytes per this function's contract.
    message.len = unsafe { copy_text(text, message.buf, message.cap) };
}

/// The C string at `ptr` as UTF-8.
///
/// # Safety
/// `ptr` is null or a NUL-terminated string valid for `'a`.
unsafe fn c_text<'a>(ptr: *const c_char, what: &str) -> Result<&'a str> {
    if ptr.is_null() {
        return Err(plugin_error(&format!("the host passed a null {what}")));
    }
    // SAFETY: non-null and NUL-terminated per this function's contract.
    let text = unsafe { CStr::from_ptr(ptr) };
    text.to_str().map_err(|_| {
        let message = format!("the {what} is not UTF-8");
        Error::new(ErrorKind::InvalidConfig, message)
    })
}

/// Rebuilds the options table from the array the host passed.
///
/// # Safety
/// `options` is null with `n` 0, or points to `n` [`KmsOption`]s whose strings are
/// NUL-terminated and valid during the call.
pub(super) unsafe fn options_from_c(options: *const KmsOption, n: usize) -> Result<toml::Table> {
    let mut table = toml::Table::new();
    if n == 0 {
        return Ok(table);
    }
    if options.is_null() {
        return Err(plugin_error("the host passed a null options array"));
    }
    // SAFETY: non-null and `n` entries long per this function's contract.
    let entries = unsafe { std::slice::from_raw_parts(options, n) };
    for entry in entries {
        // SAFETY: each string is NUL-terminated and valid per this function's contract.
        let (key, tag, text) = unsafe {
            (
                c_text(entry.key, "option name")?,
                c_text(entry.tag, "option type tag")?,
                c_text(entry.value, "option value")?,
            )
        };
        table.insert(key.to_string(), abi::option_value(key, tag, text)?);
    }
    Ok(table)
}

/// The context for `open` and `init`.
///
/// # Safety
/// `config_dir` is null or a NUL-terminated string valid during the call.
unsafe fn context_from_c(config_dir: *const c_char) -> Result<Context> {
    use std::os::unix::ffi::OsStrExt;

    let base_dir = if config_dir.is_null() {
        PathBuf::new()
    } else {
        // SAFETY: non-null and NUL-terminated per this function's contract.
        let raw = unsafe { CStr::from_ptr(config_dir) };
        PathBuf::from(std::ffi::OsStr::from_bytes(raw.to_bytes()))
    };
    Ok(Context { base_dir })
}

/// The default provider name: the crate name without its `kms_` prefix (the library file is
/// `libkms_<name>.so`). `crate_name` ends in a NUL byte, and so does the result.
#[doc(hidden)]
pub const fn default_name(crate_name: &'static str) -> &'static [u8] {
    let bytes = crate_name.as_bytes();
    match bytes {
        [b'k', b'm', b's', b'_', 1..=255, ..] => bytes.split_at(4).1,
        _ => bytes,
    }
}

/// Builds the static table of a plugin. `name` and `version` end in a NUL byte.
#[doc(hidden)]
pub const fn table(
    name: &'static [u8],
    version: &'static [u8],
    open: abi::OpenFn,
    init: Option<abi::InitFn>,
) -> KmsProviderV1Table {
    assert!(
        matches!(name, [_, .., 0]),
        "the plugin name must end in NUL"
    );
    assert!(matches!(version, [_, .., 0]), "the version must end in NUL");
    KmsProviderV1Table {
        abi_version: KMS_ABI_VERSION,
        table_size: abi::TABLE_SIZE_REVISION_3 as u32,
        name: name.as_ptr().cast(),
        version: version.as_ptr().cast(),
        open: Some(open),
        init,
        get: Some(get),
        create: Some(create),
        get_or_create: Some(get_or_create),
        list: Some(list),
        delete_key: Some(delete_key),
        capabilities: Some(capabilities),
        free_key: Some(free_key),
        close: Some(close),
        last_error: Some(last_error),
        get_version: Some(get_version),
        rotate: Some(rotate),
        display_name: Some(display_name),
        import: Some(import),
    }
}

/// The table's `open`, around the provider's [`config::OpenFn`].
///
/// # Safety
/// The arguments are as the ABI describes: `options` holds `n_options` entries, `config_dir`
/// is NUL-terminated, `handle` and `error` are writable. Null pointers are refused.
#[doc(hidden)]
pub unsafe fn open(
    open_fn: config::OpenFn,
    options: *const KmsOption,
    n_options: usize,
    config_dir: *const c_char,
    handle: *mut *mut c_void,
    error: *mut KmsMessage,
) -> i32 {
    let opened = catch_unwind(AssertUnwindSafe(|| {
        if handle.is_null() {
            return Err(plugin_error("the host passed a null handle pointer"));
        }
        // SAFETY: forwarded contract of this function.
        let (options, context) = unsafe {
            (
                options_from_c(options, n_options)?,
                context_from_c(config_dir)?,
            )
        };
        let provider = open_fn(&context, &options)?;
        Ok(Box::into_raw(Box::new(Handle { provider })))
    }));
    let failure = match opened {
        Ok(Ok(opened)) => {
            // SAFETY: checked non-null above, writable per this function's contract.
            unsafe { handle.write(opened.cast()) };
            return KMS_OK;
        }
        Ok(Err(e)) => e,
        Err(payload) => panicked("open", payload.as_ref()),
    };
    // SAFETY: forwarded contract of this function.
    unsafe { put_message(error, failure.message()) };
    abi::status_of(failure.kind())
}

/// The table's `init`, around the provider's [`config::InitFn`].
///
/// # Safety
/// As for [`open`].
#[doc(hidden)]
pub unsafe fn init(
    init_fn: Option<config::InitFn>,
    options: *const KmsOption,
    n_options: usize,
    config_dir: *const c_char,
    message: *mut KmsMessage,
) -> i32 {
    let done = catch_unwind(AssertUnwindSafe(|| {
        let init_fn = init_fn.ok_or_else(|| {
            Error::new(
                ErrorKind::Unsupported,
                "this provider has nothing to initialise",
            )
        })?;
        // SAFETY: forwarded contract of this function.
        let (options, context) = unsafe {
            (
                options_from_c(options, n_options)?,
                context_from_c(config_dir)?,
            )
        };
        init_fn(&context, &options)
    }));
    let (status, text) = match done {
        Ok(Ok(line)) => (KMS_OK, line),
        Ok(Err(e)) => (abi::status_of(e.kind()), e.message().to_string()),
        Err(payload) => {
            let e = panicked("init", payload.as_ref());
            (abi::status_of(e.kind()), e.message().to_string())
        }
    };
    // SAFETY: forwarded contract of this function.
    unsafe { put_message(message, &text) };
    status
}

unsafe extern "C" fn get(
    handle: *mut c_void,
    id: *const c_char,
    id_len: usize,
    key: *mut KmsKey,
) -> i32 {
    guard("get", || {
        // SAFETY: the host passes a live handle, `id_len` readable bytes at `id` and a writable
        // key buffer, as the ABI requires; null pointers are refused inside.
        unsafe {
            let found = provider(handle)?.get(&key_id(id, id_len)?)?;
            put_key(key, &found)
        }
    })
}

unsafe extern "C" fn get_version(
    handle: *mut c_void,
    id: *const c_char,
    id_len: usize,
    version: u32,
    key: *mut KmsKey,
) -> i32 {
    guard("get_version", || {
        // SAFETY: as in `get`.
        unsafe {
            let found = provider(handle)?.get_version(&key_id(id, id_len)?, version)?;
            put_key(key, &found)
        }
    })
}

unsafe extern "C" fn create(
    handle: *mut c_void,
    id: *const c_char,
    id_len: usize,
    key_len: u32,
    key: *mut KmsKey,
) -> i32 {
    guard("create", || {
        // SAFETY: as in `get`.
        unsafe {
            let made = provider(handle)?.create(&key_id(id, id_len)?, key_spec(key_len)?)?;
            put_key(key, &made)
        }
    })
}

unsafe extern "C" fn get_or_create(
    handle: *mut c_void,
    id: *const c_char,
    id_len: usize,
    key_len: u32,
    key: *mut KmsKey,
) -> i32 {
    guard("get_or_create", || {
        // SAFETY: as in `get`.
        unsafe {
            let spec = key_spec(key_len)?;
            let found = provider(handle)?.get_or_create(&key_id(id, id_len)?, spec)?;
            put_key(key, &found)
        }
    })
}

unsafe extern "C" fn rotate(
    handle: *mut c_void,
    id: *const c_char,
    id_len: usize,
    key_len: u32,
    key: *mut KmsKey,
) -> i32 {
    guard("rotate", || {
        // SAFETY: as in `get`.
        unsafe {
            let made = provider(handle)?.rotate(&key_id(id, id_len)?, key_spec(key_len)?)?;
            put_key(key, &made)
        }
    })
}

unsafe extern "C" fn import(
    handle: *mut c_void,
    id: *const c_char,
    id_len: usize,
    secret: *const u8,
    secret_len: usize,
    key: *mut KmsKey,
) -> i32 {
    guard("import", || {
        // SAFETY: as in `get`; the host passes `secret_len` readable bytes at `secret`.
        unsafe {
            let id = key_id(id, id_len)?;
            if secret.is_null() || secret_len == 0 || secret_len > crate::MAX_SECRET_LEN {
                let message = format!("a secret has 1 to {} bytes", crate::MAX_SECRET_LEN);
                return Err(Error::new(ErrorKind::InvalidInput, message));
            }
            let material =
                crate::SecretBytes::copy_from(std::slice::from_raw_parts(secret, secret_len));
            let made = provider(handle)?.import(&id, &material)?;
            put_key(key, &made)
        }
    })
}

unsafe extern "C" fn list(
    handle: *mut c_void,
    prefix: *const c_char,
    prefix_len: usize,
    callback: KmsListCallback,
    context: *mut c_void,
) -> i32 {
    let mut stopped = KMS_OK;
    let status = guard("list", || {
        // SAFETY: the host passes a live handle and `prefix_len` readable bytes at `prefix`.
        let (provider, prefix) =
            unsafe { (provider(handle)?, bytes(prefix, prefix_len, "prefix")?) };
        let prefix = std::str::from_utf8(prefix)
            .map_err(|_| Error::new(ErrorKind::InvalidKeyId, "the listing prefix is not UTF-8"))?;
        crate::id::validate_prefix(prefix)?;
        for entry in provider.list(prefix)? {
            let id = entry.id.as_str();
            let info = KmsKeyInfo {
                id: id.as_ptr().cast(),
                id_len: id.len(),
                version: entry.version,
                key_len: entry.bytes,
                created: entry.created,
            };
            // SAFETY: the host's callback takes its own context and an entry that lives across
            // the call, as the ABI describes.
            let answer = unsafe { callback(context, &info) };
            if answer != KMS_OK {
                stopped = answer;
                break;
            }
        }
        Ok(())
    });
    if stopped != KMS_OK { stopped } else { status }
}

unsafe extern "C" fn delete_key(handle: *mut c_void, id: *const c_char, id_len: usize) -> i32 {
    guard("delete", || {
        // SAFETY: as in `get`.
        unsafe { provider(handle)?.delete(&key_id(id, id_len)?) }
    })
}

unsafe extern "C" fn capabilities(handle: *mut c_void) -> u32 {
    catch_unwind(AssertUnwindSafe(|| {
        // SAFETY: the host passes a live handle.
        unsafe { provider(handle) }.map(|p| abi::capability_bits(p.capabilities()))
    }))
    .ok()
    .and_then(Result::ok)
    .unwrap_or(0)
}

unsafe extern "C" fn free_key(_handle: *mut c_void, ptr: *mut u8, len: usize) {
    if ptr.is_null() {
        return;
    }
    // SAFETY: the host hands back, once, a buffer `put_key` made with `Box<[u8]>` of `len`
    // bytes, so rebuilding the box takes back its ownership.
    let mut buffer = unsafe { Box::from_raw(std::ptr::slice_from_raw_parts_mut(ptr, len)) };
    buffer.zeroize();
}

unsafe extern "C" fn close(handle: *mut c_void) {
    if handle.is_null() {
        return;
    }
    // SAFETY: the host closes each handle `open` returned exactly once and uses it no more.
    let handle = unsafe { Box::from_raw(handle.cast::<Handle>()) };
    // A panic in the provider's destructor must not cross into the host.
    let _ = catch_unwind(AssertUnwindSafe(move || drop(handle)));
}

unsafe extern "C" fn last_error(_handle: *mut c_void, buf: *mut c_char, cap: usize) -> usize {
    LAST_ERROR
        .try_with(|slot| {
            // SAFETY: the host passes `cap` writable bytes at `buf`.
            unsafe { copy_text(&slot.borrow(), buf, cap) }
        })
        .unwrap_or(0)
}

unsafe extern "C" fn display_name(handle: *mut c_void, buf: *mut c_char, cap: usize) -> usize {
    let name = catch_unwind(AssertUnwindSafe(|| {
        // SAFETY: the host passes a live handle.
        unsafe { provider(handle) }.map(|p| p.to_string())
    }));
    match name {
        // SAFETY: the host passes `cap` writable bytes at `buf`.
        Ok(Ok(name)) => unsafe { copy_text(&name, buf, cap) },
        _ => 0,
    }
}

/// Exports a [`KeyProvider`](crate::KeyProvider) as a kms plugin.
///
/// Invoke it once, at the root of a `cdylib` crate whose library is named `kms_<name>` (so that
/// the file is `libkms_<name>.so`), with the function that opens the provider from its options:
///
/// ```text
/// kms_core::export_provider!(open);                          // name from the crate: kms_<name>
/// kms_core::export_provider!(open, init = init);             // with `kms init` support
/// kms_core::export_provider!(open, init = init, name = "x"); // an explicit provider name
/// ```
///
/// `open` is a [`config::OpenFn`](crate::config::OpenFn) and `init` an
/// [`config::InitFn`](crate::config::InitFn). The macro generates the `kms_provider_entry`
/// symbol and a static table of revision 2 of ABI version 1, whose version string is the
/// crate's `CARGO_PKG_VERSION`. Every call is wrapped in `catch_unwind`, so build the plugin
/// with `panic = "unwind"` (the default). The generated code holds `unsafe` blocks and an
/// `#[unsafe(no_mangle)]` symbol under `#[allow(unsafe_code)]`: a plugin crate may `deny`
/// unsafe code, but not `forbid` it.
///
/// A complete plugin (the `lib.rs` of a `cdylib` crate; `docs/plugin-guide.md` has its
/// `Cargo.toml` and walks through it):
///
/// ```
/// use std::collections::BTreeMap;
/// use std::fmt;
/// use std::sync::{Mutex, PoisonError};
///
/// use kms_core::config::Context;
/// use kms_core::toml::Table;
/// use kms_core::{Error, ErrorKind, Key, KeyId, KeyProvider, KeySpec, Result, SecretBytes};
///
/// /// Keys in memory, under a label from the options.
/// struct Memory {
///     label: String,
///     keys: Mutex<BTreeMap<KeyId, SecretBytes>>,
/// }
///
/// impl fmt::Display for Memory {
///     fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
///         write!(f, "memory provider ({})", self.label)
///     }
/// }
///
/// impl KeyProvider for Memory {
///     fn get(&self, id: &KeyId) -> Result<Key> {
///         let keys = self.keys.lock().unwrap_or_else(PoisonError::into_inner);
///         match keys.get(id) {
///             Some(material) => Key::new(id.clone(), 1, material.clone()),
///             None => Err(Error::not_found(id)),
///         }
///     }
///
///     fn create(&self, id: &KeyId, spec: KeySpec) -> Result<Key> {
///         let mut keys = self.keys.lock().unwrap_or_else(PoisonError::into_inner);
///         if keys.contains_key(id) {
///             return Err(Error::already_exists(id));
///         }
///         let material = SecretBytes::random(spec.len.bytes())?;
///         keys.insert(id.clone(), material.clone());
///         Key::new(id.clone(), 1, material)
///     }
///
///     // get_or_create: the trait's default is correct, since create is exclusive. list,
///     // delete, rotate and get_version: unsupported by default, and capabilities() says so.
/// }
///
/// /// Builds the provider from `[provider.options]`; unknown options are errors.
/// fn open(_context: &Context, options: &Table) -> Result<Box<dyn KeyProvider>> {
///     let mut label = "default".to_string();
///     for (key, value) in options {
///         match (key.as_str(), value.as_str()) {
///             ("label", Some(text)) => label = text.to_string(),
///             _ => {
///                 let message = format!("options of provider \"memory\": bad option \"{key}\"");
///                 return Err(Error::new(ErrorKind::InvalidConfig, message));
///             }
///         }
///     }
///     let keys = Mutex::default();
///     Ok(Box::new(Memory { label, keys }))
/// }
///
/// kms_core::export_provider!(open, name = "memory");
/// # fn main() {}
/// ```
#[macro_export]
macro_rules! export_provider {
    ($open:expr $(, init = $init:expr)? $(, name = $name:literal)? $(,)?) => {
        #[allow(unsafe_code)]
        const _: () = {
            use ::std::ffi::{c_char, c_void};
            use $crate::plugin::abi::{KmsMessage, KmsOption, KmsProviderV1Table};

            const __KMS_SDK_OPEN: $crate::config::OpenFn = $open;
            const __KMS_SDK_INIT: ::core::option::Option<$crate::config::InitFn> =
                $crate::__kms_sdk_init!($($init)?);

            unsafe extern "C" fn __kms_sdk_open_entry(
                options: *const KmsOption,
                n_options: usize,
                config_dir: *const c_char,
                handle: *mut *mut c_void,
                error: *mut KmsMessage,
            ) -> i32 {
                // SAFETY: the host passes the arguments the ABI describes; `open` refuses nulls.
                unsafe {
                    $crate::plugin::sdk::open(
                        __KMS_SDK_OPEN, options, n_options, config_dir, handle, error,
                    )
                }
            }

            unsafe extern "C" fn __kms_sdk_init_entry(
                options: *const KmsOption,
                n_options: usize,
                config_dir: *const c_char,
                message: *mut KmsMessage,
            ) -> i32 {
                // SAFETY: the host passes the arguments the ABI describes; `init` refuses nulls.
                unsafe {
                    $crate::plugin::sdk::init(
                        __KMS_SDK_INIT, options, n_options, config_dir, message,
                    )
                }
            }

            static __KMS_SDK_TABLE: KmsProviderV1Table = $crate::plugin::sdk::table(
                $crate::__kms_sdk_name!($($name)?),
                ::core::concat!(::core::env!("CARGO_PKG_VERSION"), "\0").as_bytes(),
                __kms_sdk_open_entry,
                match __KMS_SDK_INIT {
                    ::core::option::Option::Some(_) => ::core::option::Option::Some(
                        __kms_sdk_init_entry as $crate::plugin::abi::InitFn,
                    ),
                    ::core::option::Option::None => ::core::option::Option::None,
                },
            );

            #[unsafe(no_mangle)]
            pub extern "C" fn kms_provider_entry() -> *const KmsProviderV1Table {
                &__KMS_SDK_TABLE
            }
        };
    };
}

/// Exports a provider that has a registry entry ([`Registered`](crate::config::Registered)) as a
/// plugin: its `open` and, when it has one, its `init`. This is all the thin `cdylib` crate of
/// a shipped provider holds (`kms-file/plugin`, `providers/openbao/plugin`, ...):
///
/// ```ignore
/// kms_core::export_registered!(kms_file::registered);
/// kms_core::export_registered!(kms_aws_kms::registered, name = "aws-kms");
/// ```
#[macro_export]
macro_rules! export_registered {
    ($registered:path $(, name = $name:literal)? $(,)?) => {
        fn __kms_registered_open(
            context: &$crate::config::Context,
            options: &$crate::toml::Table,
        ) -> $crate::Result<::std::boxed::Box<dyn $crate::KeyProvider>> {
            ($registered().open)(context, options)
        }

        fn __kms_registered_init(
            context: &$crate::config::Context,
            options: &$crate::toml::Table,
        ) -> $crate::Result<::std::string::String> {
            match $registered().init {
                ::core::option::Option::Some(init) => init(context, options),
                ::core::option::Option::None => {
                    ::core::result::Result::Err($crate::Error::unsupported("initialising storage"))
                }
            }
        }

        $crate::export_provider!(
            __kms_registered_open,
            init = __kms_registered_init
            $(, name = $name)?
        );
    };
}

#[doc(hidden)]
#[macro_export]
macro_rules! __kms_sdk_init {
    () => {
        ::core::option::Option::None
    };
    ($init:expr) => {
        ::core::option::Option::Some($init)
    };
}

#[doc(hidden)]
#[macro_export]
macro_rules! __kms_sdk_name {
    () => {
        $crate::plugin::sdk::default_name(::core::concat!(::core::env!("CARGO_CRATE_NAME"), "\0"))
    };
    ($name:literal) => {
        ::core::concat!($name, "\0").as_bytes()
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_names_drop_the_kms_prefix() {
        assert_eq!(default_name("kms_file\0"), b"file\0");
        assert_eq!(default_name("kms_\0"), b"kms_\0");
        assert_eq!(default_name("vault\0"), b"vault\0");
    }

    #[test]
    fn panics_become_plugin_errors() {
        let status = guard("get", || panic!("boom at {}", 42));
        assert_eq!(abi::kind_of(status), ErrorKind::Plugin);
        let message = LAST_ERROR.with(|m| m.borrow().clone());
        assert_eq!(message, "plugin panicked in get: boom at 42");
        assert_eq!(guard("get", || Ok(())), KMS_OK);
    }

    #[test]
    fn text_is_copied_up_to_the_capacity() {
        let mut buf = [0u8; 4];
        // SAFETY: `buf` has 4 writable bytes.
        let len = unsafe { copy_text("abcdefgh", buf.as_mut_ptr().cast(), buf.len()) };
        assert_eq!((len, &buf), (8, b"abcd"));
    }
}
