//! The C ABI of provider plugins, version 1: every type and constant that crosses the boundary.
//!
//! This module is the Rust twin of `include/kms_provider.h`; the two must agree field by field
//! (a test compiles the header and compares sizes, offsets and constants). Only C types cross:
//! integers, NUL-terminated strings, pointer-plus-length buffers, opaque handles and function
//! pointers. Every function pointer is an `Option` because a plugin may leave any field NULL; the
//! loader refuses a table whose required functions are NULL.
//!
//! # Evolution
//! The table only grows: a later revision of ABI version 1 appends fields at the end and never
//! moves, removes or retypes one. `table_size` tells the host how much of the table the plugin
//! knows; the host reads an appended field only when `table_size` covers it and otherwise treats
//! the function as absent (unsupported). Any incompatible change bumps [`KMS_ABI_VERSION`].

use std::ffi::{c_char, c_void};
use std::mem::{offset_of, size_of};

/// The ABI major version this kms speaks. A plugin reporting another version is refused.
pub const KMS_ABI_VERSION: u32 = 1;

/// The name of the one symbol a plugin exports.
pub const ENTRY_SYMBOL: &str = "kms_provider_entry";

/// Status of a call that succeeded.
pub const KMS_OK: i32 = 0;

/// Status of a call that failed with [`ErrorKind::Other`](crate::ErrorKind::Other), whose ABI
/// number (0) is taken by success. Every other kind crosses as its
/// [`number`](crate::ErrorKind::number); an unknown status reads as `Other`.
pub const KMS_STATUS_OTHER: i32 = -1;

/// Capability bit: `list` works.
pub const KMS_CAP_LIST: u32 = 1;
/// Capability bit: `delete_key` works.
pub const KMS_CAP_DELETE: u32 = 1 << 1;
/// Capability bit: `rotate` and `get_version` work.
pub const KMS_CAP_VERSIONS: u32 = 1 << 2;
/// Capability bit: keys survive the process.
pub const KMS_CAP_DURABLE: u32 = 1 << 3;

/// The most bytes of text the host reads from a plugin (an error message, a display name, the
/// line `init` prints). Longer text is cut on a UTF-8 boundary.
pub const KMS_MESSAGE_CAP: usize = 4096;

/// Option type tag: a TOML string; the value is the string itself.
pub const KMS_OPTION_STRING: &str = "string";
/// Option type tag: a TOML integer; the value is its decimal text (an `int64_t`).
pub const KMS_OPTION_INTEGER: &str = "integer";
/// Option type tag: a TOML float; the value is text `strtod` and Rust both read back exactly.
pub const KMS_OPTION_FLOAT: &str = "float";
/// Option type tag: a TOML boolean; the value is `true` or `false`.
pub const KMS_OPTION_BOOLEAN: &str = "boolean";
/// Option type tag: any other TOML value (array, table, date-time); the value is its TOML text.
pub const KMS_OPTION_TOML: &str = "toml";

/// One entry of `[provider.options]`: three NUL-terminated UTF-8 strings.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct KmsOption {
    /// The option's name.
    pub key: *const c_char,
    /// One of the `KMS_OPTION_*` tags.
    pub tag: *const c_char,
    /// The value as text, as the tag describes.
    pub value: *const c_char,
}

/// A key buffer handed from the plugin to the host. The host copies the bytes and then gives
/// the buffer back through `free_key`, which zeroizes and frees it.
#[repr(C)]
#[derive(Debug)]
pub struct KmsKey {
    /// The key bytes, allocated by the plugin.
    pub ptr: *mut u8,
    /// 16, 24 or 32.
    pub len: usize,
    /// The key's version, counted from 1.
    pub version: u32,
}

impl KmsKey {
    /// An empty key, as the host passes it in.
    pub const EMPTY: KmsKey = KmsKey {
        ptr: std::ptr::null_mut(),
        len: 0,
        version: 0,
    };
}

/// What `list` reports of one key. The id is valid only during the callback.
#[repr(C)]
#[derive(Debug)]
pub struct KmsKeyInfo {
    /// The key id bytes (not NUL-terminated).
    pub id: *const c_char,
    /// Their length.
    pub id_len: usize,
    /// The newest version.
    pub version: u32,
    /// The newest version's length in bytes: 16, 24 or 32 for keys, 1 to 1024 for imported
    /// secrets.
    pub key_len: u32,
    /// When the newest version was made, in seconds since the Unix epoch; 0 if unknown.
    pub created: u64,
}

/// A text buffer owned by the host, for `open` and `init`: the plugin copies at most `cap`
/// bytes of its message into `buf` and sets `len` to the message's full length.
#[repr(C)]
#[derive(Debug)]
pub struct KmsMessage {
    /// The host's buffer.
    pub buf: *mut c_char,
    /// Its capacity.
    pub cap: usize,
    /// Set by the plugin: the full length of the message, which may exceed `cap`.
    pub len: usize,
}

/// Called by the plugin once per listed key; returns 0 to go on. On any other value the plugin
/// stops listing and returns that value.
pub type KmsListCallback =
    unsafe extern "C" fn(context: *mut c_void, info: *const KmsKeyInfo) -> i32;

/// `open(options, n_options, config_dir, &handle, error)`.
pub type OpenFn = unsafe extern "C" fn(
    options: *const KmsOption,
    n_options: usize,
    config_dir: *const c_char,
    handle: *mut *mut c_void,
    error: *mut KmsMessage,
) -> i32;

/// `init(options, n_options, config_dir, message)`: the message is the line to print on
/// success, the error on failure.
pub type InitFn = unsafe extern "C" fn(
    options: *const KmsOption,
    n_options: usize,
    config_dir: *const c_char,
    message: *mut KmsMessage,
) -> i32;

/// `get(handle, id, id_len, &key)`. The id is followed by a NUL byte not counted in `id_len`.
pub type GetFn = unsafe extern "C" fn(
    handle: *mut c_void,
    id: *const c_char,
    id_len: usize,
    key: *mut KmsKey,
) -> i32;

/// `create`, `get_or_create` and `rotate`: `(handle, id, id_len, key_len, &key)` where
/// `key_len` is 16, 24 or 32.
pub type CreateFn = unsafe extern "C" fn(
    handle: *mut c_void,
    id: *const c_char,
    id_len: usize,
    key_len: u32,
    key: *mut KmsKey,
) -> i32;

/// `get_version(handle, id, id_len, version, &key)`.
pub type GetVersionFn = unsafe extern "C" fn(
    handle: *mut c_void,
    id: *const c_char,
    id_len: usize,
    version: u32,
    key: *mut KmsKey,
) -> i32;

/// `import(handle, id, id_len, secret, secret_len, &key)`: stores a secret of 1 to
/// [`crate::MAX_SECRET_LEN`] bytes as version 1, or `KMS_ERR_ALREADY_EXISTS`. The host owns
/// `secret`; the plugin copies it.
pub type ImportFn = unsafe extern "C" fn(
    handle: *mut c_void,
    id: *const c_char,
    id_len: usize,
    secret: *const u8,
    secret_len: usize,
    key: *mut KmsKey,
) -> i32;

/// `list(handle, prefix, prefix_len, callback, context)`.
pub type ListFn = unsafe extern "C" fn(
    handle: *mut c_void,
    prefix: *const c_char,
    prefix_len: usize,
    callback: KmsListCallback,
    context: *mut c_void,
) -> i32;

/// `delete_key(handle, id, id_len)`.
pub type DeleteFn =
    unsafe extern "C" fn(handle: *mut c_void, id: *const c_char, id_len: usize) -> i32;

/// `capabilities(handle)`: a mask of `KMS_CAP_*` bits.
pub type CapabilitiesFn = unsafe extern "C" fn(handle: *mut c_void) -> u32;

/// `free_key(handle, ptr, len)`: zeroizes and frees a buffer the plugin returned.
pub type FreeKeyFn = unsafe extern "C" fn(handle: *mut c_void, ptr: *mut u8, len: usize);

/// `close(handle)`.
pub type CloseFn = unsafe extern "C" fn(handle: *mut c_void);

/// `last_error(handle, buf, cap)` and `display_name(handle, buf, cap)`: copy at most `cap`
/// bytes of text into `buf` and return the text's full length.
pub type TextFn = unsafe extern "C" fn(handle: *mut c_void, buf: *mut c_char, cap: usize) -> usize;

/// The function table a plugin's `kms_provider_entry` returns, as of revision 3 of ABI
/// version 1. Fields after `last_error` were appended in revision 2, `import` in revision 3.
#[repr(C)]
#[derive(Debug)]
pub struct KmsProviderV1Table {
    /// [`KMS_ABI_VERSION`] as the plugin was built against.
    pub abi_version: u32,
    /// `sizeof` the table as the plugin knows it.
    pub table_size: u32,
    /// The provider's name, such as `file`: NUL-terminated, static.
    pub name: *const c_char,
    /// The plugin's own version, such as `0.1.0`: NUL-terminated, static.
    pub version: *const c_char,

    /// Revision 1. Required.
    pub open: Option<OpenFn>,
    /// Revision 1. May be NULL: the provider has nothing to initialise.
    pub init: Option<InitFn>,
    /// Revision 1. Required.
    pub get: Option<GetFn>,
    /// Revision 1. Required.
    pub create: Option<CreateFn>,
    /// Revision 1. Required.
    pub get_or_create: Option<CreateFn>,
    /// Revision 1. May be NULL: listing is unsupported.
    pub list: Option<ListFn>,
    /// Revision 1. May be NULL: deleting is unsupported.
    pub delete_key: Option<DeleteFn>,
    /// Revision 1. Required.
    pub capabilities: Option<CapabilitiesFn>,
    /// Revision 1. Required.
    pub free_key: Option<FreeKeyFn>,
    /// Revision 1. Required.
    pub close: Option<CloseFn>,
    /// Revision 1. Required.
    pub last_error: Option<TextFn>,

    /// Revision 2. May be NULL: versions are unsupported.
    pub get_version: Option<GetVersionFn>,
    /// Revision 2. May be NULL: versions are unsupported.
    pub rotate: Option<CreateFn>,
    /// Revision 2. May be NULL: the host names the provider `<name> plugin (<path>)`.
    pub display_name: Option<TextFn>,

    /// Revision 3. May be NULL: importing secrets is unsupported.
    pub import: Option<ImportFn>,
}

// SAFETY: a table is immutable static data: integers, pointers to static NUL-terminated strings
// and function pointers. Nothing in it is ever written after the plugin built it, so sharing it
// between threads is sound.
unsafe impl Sync for KmsProviderV1Table {}

/// The size of the revision 1 table: the smallest table the host accepts.
pub const TABLE_SIZE_REVISION_1: usize = offset_of!(KmsProviderV1Table, get_version);

/// The size of a revision 2 table.
pub const TABLE_SIZE_REVISION_2: usize = offset_of!(KmsProviderV1Table, import);

/// The size of the current (revision 3) table.
pub const TABLE_SIZE_REVISION_3: usize = size_of::<KmsProviderV1Table>();

/// The signature of `kms_provider_entry`.
pub type EntryFn = unsafe extern "C" fn() -> *const KmsProviderV1Table;

/// The status a plugin returns for an error of `kind`.
pub fn status_of(kind: crate::ErrorKind) -> i32 {
    match kind {
        crate::ErrorKind::Other => KMS_STATUS_OTHER,
        other => other.number() as i32,
    }
}

/// The error kind of a non-zero status; unknown statuses are `Other`.
pub fn kind_of(status: i32) -> crate::ErrorKind {
    u32::try_from(status)
        .map(crate::ErrorKind::from_number)
        .unwrap_or(crate::ErrorKind::Other)
}

/// Capability bits of `caps`.
pub fn capability_bits(caps: crate::Capabilities) -> u32 {
    let mut bits = 0;
    for (on, bit) in [
        (caps.list, KMS_CAP_LIST),
        (caps.delete, KMS_CAP_DELETE),
        (caps.versions, KMS_CAP_VERSIONS),
        (caps.durable, KMS_CAP_DURABLE),
    ] {
        if on {
            bits |= bit;
        }
    }
    bits
}

/// The capabilities `bits` describe; unknown bits are ignored.
pub fn capabilities_of(bits: u32) -> crate::Capabilities {
    let mut caps = crate::Capabilities::NONE;
    caps.list = bits & KMS_CAP_LIST != 0;
    caps.delete = bits & KMS_CAP_DELETE != 0;
    caps.versions = bits & KMS_CAP_VERSIONS != 0;
    caps.durable = bits & KMS_CAP_DURABLE != 0;
    caps
}

/// The type tag and text an option value crosses the boundary as.
pub fn option_text(value: &toml::Value) -> (&'static str, String) {
    match value {
        toml::Value::String(s) => (KMS_OPTION_STRING, s.clone()),
        toml::Value::Integer(i) => (KMS_OPTION_INTEGER, i.to_string()),
        // Debug prints the shortest text that reads back to the same f64 (`inf`, `NaN` included).
        toml::Value::Float(f) => (KMS_OPTION_FLOAT, format!("{f:?}")),
        toml::Value::Boolean(b) => (KMS_OPTION_BOOLEAN, b.to_string()),
        other => (KMS_OPTION_TOML, other.to_string()),
    }
}

/// The option value a type tag and its text stand for: the inverse of [`option_text`].
pub fn option_value(key: &str, tag: &str, text: &str) -> crate::Result<toml::Value> {
    let bad = |what: &str| {
        crate::Error::new(
            crate::ErrorKind::InvalidConfig,
            format!(
                "option \"{}\" crossed the plugin boundary as {what}",
                key.escape_debug()
            ),
        )
    };
    let value = match tag {
        KMS_OPTION_STRING => toml::Value::String(text.to_string()),
        KMS_OPTION_INTEGER => toml::Value::Integer(text.parse().map_err(|_| bad("a bad integer"))?),
        KMS_OPTION_FLOAT => toml::Value::Float(text.parse().map_err(|_| bad("a bad float"))?),
        KMS_OPTION_BOOLEAN => match text {
            "true" => toml::Value::Boolean(true),
            "false" => toml::Value::Boolean(false),
            _ => return Err(bad("a bad boolean")),
        },
        KMS_OPTION_TOML => text
            .parse::<toml::Value>()
            .map_err(|_| bad("bad TOML text"))?,
        _ => return Err(bad("an unknown type tag")),
    };
    Ok(value)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Capabilities, ErrorKind};

    #[test]
    fn options_round_trip_exactly() {
        let text = r#"
            dir = "keys/a \"quoted\" dir"
            empty = ""
            count = -9223372036854775808
            big = 9223372036854775807
            ratio = 0.1
            tiny = 1e-300
            huge = 1.7976931348623157e308
            neg_zero = -0.0
            inf = -inf
            yes = true
            no = false
            list = [1, "two", [3.5, false], { four = 4 }]
            table = { a = "x", b = { c = [] } }
            when = 1979-05-27T07:32:00Z
            day = 1979-05-27
        "#;
        let table: toml::Table = text.parse().unwrap();
        for (key, value) in &table {
            let (tag, text) = option_text(value);
            let back = option_value(key, tag, &text).unwrap();
            assert_eq!(&back, value, "{key} crossed as {tag} {text:?}");
            if let (toml::Value::Float(a), toml::Value::Float(b)) = (value, &back) {
                assert_eq!(a.to_bits(), b.to_bits(), "{key}");
            }
        }
        let (tag, text) = option_text(&toml::Value::Float(f64::NAN));
        assert!(
            option_value("n", tag, &text)
                .unwrap()
                .as_float()
                .unwrap()
                .is_nan()
        );
    }

    #[test]
    fn bad_option_text_is_invalid_config() {
        for (tag, text) in [
            ("integer", "1.5"),
            ("float", "x"),
            ("boolean", "yes"),
            ("toml", "[1,"),
            ("blob", "1"),
        ] {
            let err = option_value("k", tag, text).unwrap_err();
            assert_eq!(err.kind(), ErrorKind::InvalidConfig, "{tag}");
            assert!(err.message().contains("\"k\""), "{err}");
        }
    }

    #[test]
    fn statuses_round_trip_every_kind() {
        for kind in ErrorKind::ALL {
            let status = status_of(kind);
            assert_ne!(status, KMS_OK, "{kind} would read as success");
            assert_eq!(kind_of(status), kind);
        }
        assert_eq!(kind_of(12_345), ErrorKind::Other);
        assert_eq!(kind_of(-7), ErrorKind::Other);
    }

    #[test]
    fn capability_bits_round_trip() {
        for caps in [Capabilities::ALL, Capabilities::NONE] {
            assert_eq!(capabilities_of(capability_bits(caps)), caps);
        }
        assert_eq!(capabilities_of(1 << 30), Capabilities::NONE);
    }

    #[test]
    #[cfg(target_pointer_width = "64")]
    fn revision_sizes_on_lp64() {
        assert_eq!(TABLE_SIZE_REVISION_1, 8 + 2 * 8 + 11 * 8);
        assert_eq!(TABLE_SIZE_REVISION_2, TABLE_SIZE_REVISION_1 + 3 * 8);
        assert_eq!(TABLE_SIZE_REVISION_3, TABLE_SIZE_REVISION_2 + 8);
    }
}
