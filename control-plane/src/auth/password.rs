//! Passwords: Argon2id hashes as PHC strings with OWASP's parameters (19 MiB, two
//! passes, one lane), salts from the system's secure random source, and the one-time
//! passwords `user add` prints. Hashing takes tens of milliseconds of CPU on purpose:
//! callers run it on the blocking pool, never on an async worker.

use std::sync::LazyLock;

use argon2::password_hash::{self, PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use argon2::{Algorithm, Argon2, Params, Version};
use thiserror::Error;

/// OWASP's minimum for Argon2id: memory in KiB, passes, lanes.
pub const PARAMS: (u32, u32, u32) = (19 * 1024, 2, 1);

/// A stored hash that cannot be read, or hashing that failed.
#[derive(Debug, Error)]
#[error("password hash: {0}")]
pub struct HashError(password_hash::Error);

fn argon2() -> Argon2<'static> {
    let (m, t, p) = PARAMS;
    let params = Params::new(m, t, p, None).expect("OWASP's Argon2 parameters are valid");
    Argon2::new(Algorithm::Argon2id, Version::V0x13, params)
}

/// Hashes `password` with a fresh salt; the PHC string to store.
pub fn hash(password: &str) -> Result<String, HashError> {
    let salt = SaltString::encode_b64(&crate::secrets::random::<16>()).map_err(HashError)?;
    argon2().hash_password(password.as_bytes(), &salt).map(|h| h.to_string()).map_err(HashError)
}

/// Whether `password` matches the stored PHC string `stored` (with the parameters it
/// names, so raising them later keeps old hashes working).
pub fn verify(password: &str, stored: &str) -> Result<bool, HashError> {
    let parsed = PasswordHash::new(stored).map_err(HashError)?;
    match argon2().verify_password(password.as_bytes(), &parsed) {
        Ok(()) => Ok(true),
        Err(password_hash::Error::Password) => Ok(false),
        Err(e) => Err(HashError(e)),
    }
}

/// A hash of a password nobody knows, verified against when the user does not exist,
/// so an unknown name costs as much time as a wrong password.
pub fn decoy() -> &'static str {
    static DECOY: LazyLock<String> = LazyLock::new(|| {
        hash(&crate::secrets::random_hex::<16>()).expect("hashing a random password works")
    });
    &DECOY
}

/// A random password to print once: 24 characters (120 bits) from an alphabet without
/// look-alikes, in groups of four.
pub fn generate() -> String {
    const ALPHABET: &[u8; 32] = b"abcdefghijkmnpqrstuvwxyz23456789";
    let bytes = crate::secrets::random::<24>();
    let chars: Vec<char> = bytes.iter().map(|b| ALPHABET[usize::from(b & 31)] as char).collect();
    chars.chunks(4).map(|c| c.iter().collect::<String>()).collect::<Vec<_>>().join("-")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hashes_are_argon2id_with_owasp_parameters_and_verify() {
        let stored = hash("correct horse battery").unwrap();
        assert!(stored.starts_with("$argon2id$v=19$m=19456,t=2,p=1$"), "{stored}");
        assert!(verify("correct horse battery", &stored).unwrap());
        assert!(!verify("correct horse batterx", &stored).unwrap());
        assert_ne!(hash("correct horse battery").unwrap(), stored, "salted");
        assert!(verify("x", "not a phc string").is_err());
        assert!(!verify("anything at all", decoy()).unwrap());
    }

    #[test]
    fn generated_passwords_are_long_and_differ() {
        let (a, b) = (generate(), generate());
        assert_ne!(a, b);
        assert_eq!(a.len(), 29, "{a}");
        assert!(crate::auth::rules::check_password(&a).is_ok());
    }
}
