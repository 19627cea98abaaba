//! Passphrase-based key derivation: PBKDF2-HMAC-SHA256 (RFC 8018) with stored parameters.
//!
//! The parameters in force are stored with the data they protect, so that changing the
//! defaults never strands an old store, and they are bounds-checked before any work is done, so
//! that an edited store cannot make kms spin for hours or derive from zero iterations.

use zeroize::Zeroizing;

use crate::error::{Error, ErrorKind, Result};
use crate::secret::SecretBytes;

/// The iteration count for new stores (OWASP's 2023 advice for PBKDF2-HMAC-SHA256).
pub const DEFAULT_ITERATIONS: u32 = 600_000;

/// The smallest iteration count accepted from a store or a configuration.
pub const MIN_ITERATIONS: u32 = 1_000;

/// The largest iteration count accepted (about a minute of work on a 2020s core).
pub const MAX_ITERATIONS: u32 = 100_000_000;

/// Length of the random salt of new parameters.
pub const SALT_LEN: usize = 16;

/// The PBKDF2 parameters of one derivation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KdfParams {
    /// The iteration count.
    pub iterations: u32,
    /// The salt (not secret).
    pub salt: Vec<u8>,
}

impl KdfParams {
    /// Fresh parameters with a random salt.
    pub fn generate(iterations: u32) -> Result<KdfParams> {
        let salt = SecretBytes::random(SALT_LEN)?.expose_secret().to_vec();
        let params = KdfParams { iterations, salt };
        params.validate()?;
        Ok(params)
    }

    /// Checks the parameters against the accepted bounds.
    pub fn validate(&self) -> Result<()> {
        if !(MIN_ITERATIONS..=MAX_ITERATIONS).contains(&self.iterations) {
            let message = format!(
                "invalid KDF parameters: {} iterations is outside {MIN_ITERATIONS}..={MAX_ITERATIONS}",
                self.iterations
            );
            return Err(Error::new(ErrorKind::Corrupted, message));
        }
        if !(8..=64).contains(&self.salt.len()) {
            let message = format!(
                "invalid KDF parameters: a {}-byte salt (8 to 64 expected)",
                self.salt.len()
            );
            return Err(Error::new(ErrorKind::Corrupted, message));
        }
        Ok(())
    }

    /// Derives `len` bytes from `passphrase` after validating the parameters.
    pub fn derive(&self, passphrase: &[u8], len: usize) -> Result<SecretBytes> {
        self.validate()?;
        Ok(pbkdf2_sha256(passphrase, &self.salt, self.iterations, len))
    }
}

/// PBKDF2-HMAC-SHA256 without bounds: `len` bytes from `passphrase` and `salt`.
pub fn pbkdf2_sha256(passphrase: &[u8], salt: &[u8], iterations: u32, len: usize) -> SecretBytes {
    let mut out = Zeroizing::new(vec![0u8; len]);
    pbkdf2::pbkdf2_hmac::<sha2::Sha256>(passphrase, salt, iterations, &mut out);
    SecretBytes::copy_from(&out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bounds_are_enforced_before_work() {
        for iterations in [0, 1, 999, MAX_ITERATIONS + 1, u32::MAX] {
            let params = KdfParams {
                iterations,
                salt: vec![0; 16],
            };
            let err = params.derive(b"pw", 32).unwrap_err();
            assert_eq!(err.kind(), ErrorKind::Corrupted);
            assert!(
                err.to_string().starts_with("invalid KDF parameters"),
                "{err}"
            );
        }
        let params = KdfParams {
            iterations: 1000,
            salt: vec![],
        };
        assert!(params.derive(b"pw", 32).is_err());
    }

    #[test]
    fn generated_salts_differ() {
        let a = KdfParams::generate(DEFAULT_ITERATIONS).unwrap();
        let b = KdfParams::generate(DEFAULT_ITERATIONS).unwrap();
        assert_ne!(a.salt, b.salt);
    }
}
