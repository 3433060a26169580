//! Random identifiers, tokens and serial numbers, from the system's secure random source.

use ring::rand::{SecureRandom, SystemRandom};

/// `N` random bytes.
pub fn random<const N: usize>() -> [u8; N] {
    let mut bytes = [0u8; N];
    // The system random source failing is not something the control plane can work around.
    SystemRandom::new().fill(&mut bytes).expect("the system random source works");
    bytes
}

/// `N` random bytes as lowercase hex.
pub fn random_hex<const N: usize>() -> String {
    hex::encode(random::<N>())
}

#[cfg(test)]
mod tests {
    #[test]
    fn draws_differ() {
        assert_ne!(super::random::<16>(), super::random::<16>());
        assert_eq!(super::random_hex::<6>().len(), 12);
    }
}
