//! [`KmsKek`]: a [`KeyWrapper`] whose KEK is an AWS KMS key.

use std::sync::Arc;

use aws_sdk_kms::primitives::Blob;
use kms_core::wrap::KeyWrapper;
use kms_core::{Error, ErrorKind, KeyId, Result, SecretBytes};
use sha2::{Digest, Sha256};

use crate::client::Kms;

/// Encryption context entry naming the kms key id a DEK belongs to.
pub const CONTEXT_KEY_ID: &str = "kms:key-id";

/// Encryption context entry naming the version of that key.
pub const CONTEXT_VERSION: &str = "kms:version";

/// The largest DEK KMS `Encrypt` takes.
pub const MAX_PLAINTEXT: usize = 4096;

/// A KEK held by AWS KMS, known by its ARN.
///
/// `wrap` is KMS `Encrypt` of the DEK under the key, with the encryption context
/// `{"kms:key-id": id, "kms:version": version}`; `unwrap` is `Decrypt` with the same context and
/// the key's ARN, so a blob moved to another id or version is refused by KMS itself
/// (`InvalidCiphertextException`, reported as [`ErrorKind::Corrupted`]). The wrapped blob is
/// KMS's ciphertext blob, stored as it is.
#[derive(Clone, Debug)]
pub struct KmsKek {
    kms: Arc<Kms>,
    arn: String,
}

impl KmsKek {
    /// The KEK of the KMS key `arn`, reached through `kms`.
    pub fn new(kms: Arc<Kms>, arn: impl Into<String>) -> KmsKek {
        KmsKek {
            kms,
            arn: arn.into(),
        }
    }

    /// The KMS key's ARN.
    pub fn arn(&self) -> &str {
        &self.arn
    }

    /// Re-encrypts a blob made by `self` under `to`, inside KMS (`ReEncrypt`): the DEK never
    /// leaves KMS. The context stays the same, so the new blob is bound to the same id and
    /// version.
    pub fn re_encrypt(
        &self,
        to: &KmsKek,
        id: &KeyId,
        version: u32,
        wrapped: &[u8],
    ) -> Result<Vec<u8>> {
        let (k, v) = (id.as_str().to_string(), version.to_string());
        let request = self
            .kms
            .client()
            .re_encrypt()
            .ciphertext_blob(Blob::new(wrapped))
            .source_key_id(&self.arn)
            .source_encryption_context(CONTEXT_KEY_ID, &k)
            .source_encryption_context(CONTEXT_VERSION, &v)
            .destination_key_id(&to.arn)
            .destination_encryption_context(CONTEXT_KEY_ID, &k)
            .destination_encryption_context(CONTEXT_VERSION, &v)
            .send();
        let what = format!(
            "ReEncrypt of key \"{id}\" version {version} to KMS key {}",
            to.arn
        );
        let output = self
            .kms
            .call(&what, request)?
            .map_err(|e| self.kms.sdk_error(&what, &self.arn, e).with_key_id(id))?;
        match output.ciphertext_blob {
            Some(blob) => Ok(blob.into_inner()),
            None => Err(self.no_blob(&what, id)),
        }
    }

    fn no_blob(&self, what: &str, id: &KeyId) -> Error {
        let message = format!(
            "{what}: AWS KMS at {} answered without a blob",
            self.kms.location()
        );
        Error::new(ErrorKind::Other, message).with_key_id(id)
    }
}

/// The fingerprint of the KMS key `arn`: SHA-256 over a label and the ARN. It names the key,
/// not any secret (KMS keys never leave KMS).
pub fn fingerprint(arn: &str) -> Vec<u8> {
    Sha256::new()
        .chain_update(b"kms/aws-kms-kek/v1\0")
        .chain_update(arn.as_bytes())
        .finalize()
        .to_vec()
}

impl KeyWrapper for KmsKek {
    fn fingerprint(&self) -> Vec<u8> {
        fingerprint(&self.arn)
    }

    fn wrap(&self, id: &KeyId, version: u32, dek: &SecretBytes) -> Result<Vec<u8>> {
        if dek.is_empty() || dek.len() > MAX_PLAINTEXT {
            let message = format!("AWS KMS encrypts 1 to {MAX_PLAINTEXT} bytes");
            return Err(Error::new(ErrorKind::InvalidInput, message).with_key_id(id));
        }
        let request = self
            .kms
            .client()
            .encrypt()
            .key_id(&self.arn)
            .plaintext(Blob::new(dek.expose_secret()))
            .encryption_context(CONTEXT_KEY_ID, id.as_str())
            .encryption_context(CONTEXT_VERSION, version.to_string())
            .send();
        let what = format!("Encrypt of key \"{id}\" version {version}");
        let output = self
            .kms
            .call(&what, request)?
            .map_err(|e| self.kms.sdk_error(&what, &self.arn, e).with_key_id(id))?;
        match output.ciphertext_blob {
            Some(blob) => Ok(blob.into_inner()),
            None => Err(self.no_blob(&what, id)),
        }
    }

    fn unwrap(&self, id: &KeyId, version: u32, wrapped: &[u8]) -> Result<SecretBytes> {
        let request = self
            .kms
            .client()
            .decrypt()
            .key_id(&self.arn)
            .ciphertext_blob(Blob::new(wrapped))
            .encryption_context(CONTEXT_KEY_ID, id.as_str())
            .encryption_context(CONTEXT_VERSION, version.to_string())
            .send();
        let what = format!("Decrypt of key \"{id}\" version {version}");
        let mut output = self
            .kms
            .call(&what, request)?
            .map_err(|e| self.kms.sdk_error(&what, &self.arn, e).with_key_id(id))?;

        // The plaintext moves into a SecretBytes (zeroed on drop) without another copy.
        match output.plaintext.take() {
            Some(blob) => Ok(SecretBytes::new(blob.into_inner())),
            None => Err(self.no_blob(&what, id)),
        }
    }
}
