//! The KEK inside the token: [`TokenKek`] wraps and unwraps DEKs with `CKM_AES_KEY_WRAP_PAD`
//! (RFC 5649) under an AES-256 key object that never leaves the token.
//!
//! # Binding
//!
//! RFC 5649 has no associated data, so, as for the local KEK of `kms-core`, the binding of a
//! DEK to its key id and version travels inside the wrapped plaintext:
//!
//! ```text
//! wrapped = C_WrapKey(CKM_AES_KEY_WRAP_PAD, KEK, session object of value binding || dek)
//! binding = kms_core::wrap::binding(id, version)   (16 bytes)
//! ```
//!
//! The DEK enters the token as a short-lived session object (`CKA_TOKEN` false), which is
//! wrapped and destroyed at once. Unwrapping creates such an object from the blob, reads its
//! value and destroys it; the binding is then compared with the id and version being read, so
//! a blob moved to another id is [`ErrorKind::Corrupted`].

use std::fmt;
use std::sync::Arc;

use cryptoki::error::{Error as CkError, RvError};
use cryptoki::mechanism::Mechanism;
use cryptoki::object::{Attribute, AttributeType, KeyType, ObjectClass, ObjectHandle};
use cryptoki::session::Session;
use kms_core::wrap::{BINDING_LEN, KeyWrapper, binding, hex_prefix};
use kms_core::{Error, ErrorKind, KeyId, MAX_SECRET_LEN, Result, SecretBytes};
use sha2::{Digest, Sha256};
use zeroize::{Zeroize, Zeroizing};

use crate::token::{Token, ck_error};

/// Length of the token's AES key, in bytes.
pub const KEK_LEN: u64 = 32;

/// Length of the random `CKA_ID` given to a generated KEK.
const ID_LEN: usize = 16;

/// A KEK held by the token, found by its label.
pub struct TokenKek {
    token: Arc<Token>,
    label: String,
    fingerprint: Vec<u8>,
}

/// What a search for a key label found.
pub(crate) enum Found {
    Key(TokenKek),
    Missing,
}

fn key_template(label: &str) -> Vec<Attribute> {
    vec![
        Attribute::Class(ObjectClass::SECRET_KEY),
        Attribute::KeyType(KeyType::AES),
        Attribute::Label(label.as_bytes().to_vec()),
    ]
}

impl TokenKek {
    /// Finds the AES key labelled `label`; [`Found::Missing`] when the token has none.
    pub(crate) fn find(token: &Arc<Token>, label: &str) -> Result<Found> {
        let lease = token.session()?;
        let session = lease.session();
        let handles = session
            .find_objects(&key_template(label))
            .map_err(|e| ck_error(e, &format!("cannot search for key \"{label}\"")))?;
        let handle = match handles.as_slice() {
            [] => return Ok(Found::Missing),
            [one] => *one,
            many => {
                let message = format!(
                    "{} AES keys on token \"{}\" are labelled \"{label}\": a KEK label must be \
                     unique",
                    many.len(),
                    token.label()
                );
                return Err(Error::new(ErrorKind::InvalidConfig, message));
            }
        };
        let fingerprint = describe(session, token, label, handle)?;
        token.cache_handle(label, handle);
        Ok(Found::Key(TokenKek {
            token: token.clone(),
            label: label.to_string(),
            fingerprint,
        }))
    }

    /// Finds the key labelled `label`, which must exist: its absence is a configuration error
    /// (never "key not found", which would mean a DEK).
    pub(crate) fn require(token: &Arc<Token>, label: &str) -> Result<TokenKek> {
        match TokenKek::find(token, label)? {
            Found::Key(kek) => Ok(kek),
            Found::Missing => {
                let message = format!(
                    "the KEK \"{label}\" is missing: token \"{}\" holds no AES key with that \
                     label (was it deleted, or is this the wrong token?)",
                    token.label()
                );
                Err(Error::new(ErrorKind::InvalidConfig, message))
            }
        }
    }

    /// Generates an AES-256 KEK in the token: a token object, sensitive, never extractable,
    /// usable only to wrap and unwrap.
    pub(crate) fn generate(token: &Arc<Token>, label: &str) -> Result<TokenKek> {
        let mut id = [0u8; ID_LEN];
        getrandom::fill(&mut id)
            .map_err(|e| Error::new(ErrorKind::Other, format!("no randomness: {e}")))?;
        let template = vec![
            Attribute::Class(ObjectClass::SECRET_KEY),
            Attribute::KeyType(KeyType::AES),
            Attribute::ValueLen(KEK_LEN.into()),
            Attribute::Label(label.as_bytes().to_vec()),
            Attribute::Id(id.to_vec()),
            Attribute::Token(true),
            Attribute::Private(true),
            Attribute::Sensitive(true),
            Attribute::Extractable(false),
            Attribute::Modifiable(false),
            Attribute::Wrap(true),
            Attribute::Unwrap(true),
            Attribute::Encrypt(false),
            Attribute::Decrypt(false),
            Attribute::Sign(false),
            Attribute::Verify(false),
            Attribute::Derive(false),
        ];
        {
            let lease = token.session()?;
            lease
                .session()
                .generate_key(&Mechanism::AesKeyGen, &template)
                .map_err(|e| ck_error(e, &format!("cannot generate key \"{label}\"")))?;
        }
        TokenKek::require(token, label)
    }

    /// The key's label.
    pub fn label(&self) -> &str {
        &self.label
    }

    /// Unwraps `wrapped` in the token and reads the value back, without judging it.
    fn unwrap_raw(
        &self,
        wrapped: &[u8],
        doing: &str,
    ) -> Result<std::result::Result<Option<Zeroizing<Vec<u8>>>, CkError>> {
        self.with_key(
            |session, key| {
                let object = session.unwrap_key(
                    &Mechanism::AesKeyWrapPad,
                    key,
                    wrapped,
                    &session_secret(None),
                )?;
                let value = session.get_attributes(object, &[AttributeType::Value]);
                let destroyed = session.destroy_object(object);
                let mut value = value?;
                destroyed?;
                let plain = value.iter_mut().find_map(|a| match a {
                    Attribute::Value(v) => Some(Zeroizing::new(std::mem::take(v))),
                    _ => None,
                });
                scrub(&mut value);
                Ok(plain)
            },
            doing,
        )
    }

    /// Whether the token still wraps and unwraps with this key: a random canary makes the
    /// round trip.
    fn token_works(&self, doing: &str) -> bool {
        let Ok(canary) = SecretBytes::random(32) else {
            return false;
        };
        let Ok(id) = KeyId::new("kms-pkcs11/canary") else {
            return false;
        };
        let Ok(wrapped) = self.wrap(&id, 0, &canary) else {
            return false;
        };
        match self.unwrap_raw(&wrapped, doing) {
            Ok(Ok(Some(plain))) => {
                plain.len() == BINDING_LEN + canary.len()
                    && plain[BINDING_LEN..] == *canary.expose_secret()
            }
            _ => false,
        }
    }

    fn handle(&self, session: &Session) -> Result<ObjectHandle> {
        if let Some(handle) = self.token.cached_handle(&self.label) {
            return Ok(handle);
        }
        let handles = session
            .find_objects(&key_template(&self.label))
            .map_err(|e| ck_error(e, &format!("cannot search for key \"{}\"", self.label)))?;
        match handles.as_slice() {
            [one] => {
                self.token.cache_handle(&self.label, *one);
                Ok(*one)
            }
            _ => {
                let message = format!(
                    "the KEK \"{}\" is no longer a single key of token \"{}\"",
                    self.label,
                    self.token.label()
                );
                Err(Error::new(ErrorKind::InvalidConfig, message))
            }
        }
    }

    /// Runs `f` with a session and the KEK's handle; a stale handle (the object was replaced)
    /// is looked up again once.
    fn with_key<T>(
        &self,
        mut f: impl FnMut(&Session, ObjectHandle) -> std::result::Result<T, CkError>,
        doing: &str,
    ) -> Result<std::result::Result<T, CkError>> {
        for attempt in 0..2 {
            let lease = self.token.session()?;
            let key = self.handle(lease.session())?;
            match f(lease.session(), key) {
                Err(CkError::Pkcs11(
                    RvError::ObjectHandleInvalid
                    | RvError::KeyHandleInvalid
                    | RvError::WrappingKeyHandleInvalid
                    | RvError::UnwrappingKeyHandleInvalid,
                    _,
                )) if attempt == 0 => {
                    self.token.forget_handle(&self.label);
                }
                Err(CkError::Pkcs11(
                    RvError::SessionHandleInvalid | RvError::SessionClosed | RvError::DeviceError,
                    _,
                )) => {
                    lease.discard();
                    return Err(Error::new(
                        ErrorKind::Unavailable,
                        format!(
                            "{doing}: the session to token \"{}\" broke",
                            self.token.label()
                        ),
                    ));
                }
                other => return Ok(other),
            }
        }
        let message = format!(
            "{doing}: the handle of KEK \"{}\" keeps changing",
            self.label
        );
        Err(Error::new(ErrorKind::Unavailable, message))
    }
}

/// Reads what identifies a key without revealing it, checks that it is fit to be a KEK, and
/// returns its fingerprint:
/// `SHA-256("kms/pkcs11-kek/v1" 0 label 0 CKA_ID 0 CKA_CHECK_VALUE)`.
fn describe(session: &Session, token: &Token, label: &str, key: ObjectHandle) -> Result<Vec<u8>> {
    let wanted = [
        AttributeType::ValueLen,
        AttributeType::Id,
        AttributeType::CheckValue,
        AttributeType::Wrap,
        AttributeType::Unwrap,
        AttributeType::Extractable,
        AttributeType::Sensitive,
    ];
    let attributes = session
        .get_attributes(key, &wanted)
        .map_err(|e| ck_error(e, &format!("cannot read the attributes of key \"{label}\"")))?;
    let (mut len, mut id, mut check) = (0u64, Vec::new(), Vec::new());
    let (mut wrap, mut unwrap, mut extractable, mut sensitive) = (false, false, true, false);
    for attribute in attributes {
        match attribute {
            Attribute::ValueLen(v) => len = u64::from(v),
            Attribute::Id(v) => id = v,
            Attribute::CheckValue(v) => check = v,
            Attribute::Wrap(v) => wrap = v,
            Attribute::Unwrap(v) => unwrap = v,
            Attribute::Extractable(v) => extractable = v,
            Attribute::Sensitive(v) => sensitive = v,
            _ => {}
        }
    }
    let unfit = |why: &str| {
        let message = format!(
            "key \"{label}\" of token \"{}\" cannot be a KEK: {why}",
            token.label()
        );
        Err(Error::new(ErrorKind::InvalidConfig, message))
    };
    if len != KEK_LEN {
        return unfit(&format!("it has {len} bytes, not 32 (AES-256)"));
    }
    if !wrap || !unwrap {
        return unfit("it lacks CKA_WRAP or CKA_UNWRAP");
    }
    if extractable || !sensitive {
        return unfit("it is extractable or not sensitive, so it could leave the token");
    }
    let digest = Sha256::new()
        .chain_update(b"kms/pkcs11-kek/v1\0")
        .chain_update(label.as_bytes())
        .chain_update([0])
        .chain_update(&id)
        .chain_update([0])
        .chain_update(&check)
        .finalize();
    Ok(digest.to_vec())
}

/// Whether an unwrap failure says "this blob is not one of this key's", as opposed to a failing
/// token.
fn blob_refused(rv: RvError) -> bool {
    matches!(
        rv,
        RvError::WrappedKeyInvalid
            | RvError::WrappedKeyLenRange
            | RvError::EncryptedDataInvalid
            | RvError::EncryptedDataLenRange
            | RvError::DataInvalid
            | RvError::DataLenRange
            | RvError::AttributeValueInvalid
            | RvError::TemplateInconsistent
    )
}

fn session_secret(value: Option<Vec<u8>>) -> Vec<Attribute> {
    let mut template = vec![
        Attribute::Class(ObjectClass::SECRET_KEY),
        Attribute::KeyType(KeyType::GENERIC_SECRET),
        Attribute::Token(false),
        Attribute::Private(true),
        Attribute::Sensitive(false),
        Attribute::Extractable(true),
    ];
    if let Some(value) = value {
        template.push(Attribute::Value(value));
    }
    template
}

fn scrub(template: &mut [Attribute]) {
    for attribute in template {
        if let Attribute::Value(v) = attribute {
            v.zeroize();
        }
    }
}

impl KeyWrapper for TokenKek {
    fn fingerprint(&self) -> Vec<u8> {
        self.fingerprint.clone()
    }

    fn wrap(&self, id: &KeyId, version: u32, dek: &SecretBytes) -> Result<Vec<u8>> {
        if dek.is_empty() || dek.len() > MAX_SECRET_LEN {
            let message = format!("a key to wrap has 1 to {MAX_SECRET_LEN} bytes");
            return Err(Error::new(ErrorKind::InvalidInput, message));
        }
        let doing = format!("cannot wrap key \"{id}\" with KEK \"{}\"", self.label);

        // 1. The plaintext: the binding, then the key.
        let mut plain = Zeroizing::new(Vec::with_capacity(BINDING_LEN + dek.len()));
        plain.extend_from_slice(&binding(id, version));
        plain.extend_from_slice(dek.expose_secret());

        // 2. Into the token as a session object, wrapped, destroyed.
        let result = self.with_key(
            |session, key| {
                let mut template = session_secret(Some(plain.to_vec()));
                let object = session.create_object(&template);
                scrub(&mut template);
                let object = object?;
                let wrapped = session.wrap_key(&Mechanism::AesKeyWrapPad, key, object);
                let destroyed = session.destroy_object(object);
                let wrapped = wrapped?;
                destroyed?;
                Ok(wrapped)
            },
            &doing,
        )?;
        result.map_err(|e| ck_error(e, &doing).with_key_id(id))
    }

    fn unwrap(&self, id: &KeyId, version: u32, wrapped: &[u8]) -> Result<SecretBytes> {
        let corrupted = |why: &str| {
            let message = format!("wrapped key \"{id}\" version {version} {why}");
            Error::new(ErrorKind::Corrupted, message).with_key_id(id)
        };
        let max = kms_core::wrap::wrapped_len(MAX_SECRET_LEN);
        if wrapped.len() < 24 || wrapped.len() > max || !wrapped.len().is_multiple_of(8) {
            let why = format!("has an impossible length of {} bytes", wrapped.len());
            return Err(corrupted(&why));
        }
        let doing = format!("cannot unwrap key \"{id}\" with KEK \"{}\"", self.label);

        // 1. Unwrapped inside the token into a session object; its value read, the object
        //    destroyed.
        let plain = match self.unwrap_raw(wrapped, &doing)? {
            Ok(Some(plain)) => plain,
            Ok(None) => {
                let message = format!("{doing}: the token did not return the unwrapped value");
                return Err(Error::new(ErrorKind::Other, message).with_key_id(id));
            }
            Err(CkError::Pkcs11(rv, _)) if blob_refused(rv) => {
                return Err(corrupted(
                    "fails its integrity check (altered, or wrapped by another key)",
                ));
            }
            // Some tokens (SoftHSM2 among them) answer a failed RFC 5649 integrity check with
            // CKR_GENERAL_ERROR, which is also what a failing device says: a round trip of a
            // random canary through the same key tells the two apart.
            Err(CkError::Pkcs11(RvError::GeneralError | RvError::FunctionFailed, _))
                if self.token_works(&doing) =>
            {
                return Err(corrupted(
                    "fails its integrity check (altered, or wrapped by another key)",
                ));
            }
            Err(e) => return Err(ck_error(e, &doing).with_key_id(id)),
        };

        // 2. The binding must be this id's and version's.
        if plain.len() <= BINDING_LEN {
            return Err(corrupted("is too short to hold a key"));
        }
        let (bound, dek) = plain.split_at(BINDING_LEN);
        let expected = binding(id, version);
        let differs = bound
            .iter()
            .zip(expected.iter())
            .fold(0u8, |acc, (a, b)| acc | (a ^ b));
        if differs != 0 {
            return Err(corrupted("belongs to another key id or version"));
        }
        Ok(SecretBytes::copy_from(dek))
    }
}

impl fmt::Debug for TokenKek {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TokenKek")
            .field("token", &self.token.label())
            .field("label", &self.label)
            .field("fingerprint", &hex_prefix(&self.fingerprint))
            .finish()
    }
}
