//! The control-plane addresses an agent may dial (one per replica of its region, or the
//! records of a name) and which one it dials next: a seeded-random one first, so that a
//! fleet spreads over the replicas, then the next one in the list after each failure. A
//! *round* is one failed attempt per address; the session backs off longer only after a
//! whole round failed, so a dead replica costs one quick try, not a growing wait.
//!
//! The list as the operator gives it (`enroll --control-plane a:7443,b:7443`) is parsed
//! and checked here; the agent stores it as that text, so a store written with one
//! address reads as a list of one.

use thiserror::Error;

use crate::random::SeededRng;

/// What separates the addresses of a list as text.
pub const SEPARATOR: char = ',';

/// Why a list of addresses is refused.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum AddressError {
    /// The list, or one of its entries, is empty.
    #[error(
        "an empty control-plane address in {0:?} (give host:port, several separated by commas)"
    )]
    Empty(String),
    /// An entry is not `host:port`.
    #[error("control-plane address {address:?}: {reason}")]
    Malformed {
        /// The entry.
        address: String,
        /// What is wrong with it.
        reason: &'static str,
    },
}

/// The entries of `text` (`host:port`, separated by commas, spaces around them ignored),
/// in order, each once. A host is a name, an IPv4 address or an IPv6 address in brackets.
pub fn parse_list(text: &str) -> Result<Vec<String>, AddressError> {
    let mut list: Vec<String> = Vec::new();
    for entry in text.split(SEPARATOR).map(str::trim) {
        if entry.is_empty() {
            return Err(AddressError::Empty(text.to_owned()));
        }
        check(entry)?;
        if !list.iter().any(|known| known == entry) {
            list.push(entry.to_owned());
        }
    }
    Ok(list)
}

/// `list` as text, as [`parse_list`] reads it.
pub fn join(list: &[String]) -> String {
    list.join(&SEPARATOR.to_string())
}

fn check(entry: &str) -> Result<(), AddressError> {
    let malformed = |reason| AddressError::Malformed { address: entry.to_owned(), reason };
    let (host, port) = entry.rsplit_once(':').ok_or_else(|| malformed("no port (host:port)"))?;
    match port.parse::<u16>() {
        Ok(0) => return Err(malformed("port 0 is not a port to dial")),
        Ok(_) => {}
        Err(_) => return Err(malformed("the port is not a number from 1 to 65535")),
    }
    if host.is_empty() || host == "[]" {
        return Err(malformed("no host"));
    }
    let bracketed = host.starts_with('[') && host.ends_with(']');
    if host.contains(':') && !bracketed {
        return Err(malformed("write an IPv6 address in brackets: [addr]:port"));
    }
    if host.contains(char::is_whitespace) || (!bracketed && host.contains(['[', ']'])) {
        return Err(malformed("not a host name or address"));
    }
    Ok(())
}

/// Where the agent stands in its list of addresses.
#[derive(Debug, Clone)]
pub struct Addresses {
    list: Vec<String>,
    current: usize,
    tried: usize,
    rng: SeededRng,
}

impl Addresses {
    /// `list` (an empty one is dialled as the empty address, which fails), starting at an
    /// entry drawn from `seed`.
    pub fn new(list: Vec<String>, seed: u64) -> Self {
        let list = if list.is_empty() { vec![String::new()] } else { list };
        // Not the backoff's stream: its waits stay what they were for the same seed.
        let mut rng = SeededRng::new(seed ^ 0x5eed_ad0d_7e55_0001);
        let current = rng.below(list.len());
        Self { list, current, tried: 0, rng }
    }

    /// The address to dial now.
    pub fn current(&self) -> &str {
        &self.list[self.current]
    }

    /// Every address, in the list's order.
    pub fn list(&self) -> &[String] {
        &self.list
    }

    /// The attempt on the current address failed: the next one is current. True when
    /// this failure ends a round (each address failed once since the last success or
    /// the last round).
    pub fn failed(&mut self) -> bool {
        self.current = (self.current + 1) % self.list.len();
        self.tried += 1;
        if self.tried >= self.list.len() {
            self.tried = 0;
            true
        } else {
            false
        }
    }

    /// A session came up on the current address: it stays current, and a new round
    /// starts at the next failure.
    pub fn connected(&mut self) {
        self.tried = 0;
    }

    /// The list changed (a name resolved again): the current address stays current if it
    /// is still listed, else one drawn from the seed is; the round goes on.
    pub fn replace(&mut self, list: Vec<String>) {
        if list.is_empty() || list == self.list {
            return;
        }
        let current = self.current().to_owned();
        self.current = match list.iter().position(|a| *a == current) {
            Some(at) => at,
            None => self.rng.below(list.len()),
        };
        self.tried = self.tried.min(list.len() - 1);
        self.list = list;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check_list(text: &str, expected: Result<&[&str], &str>) {
        let got = parse_list(text).map_err(|e| e.to_string());
        match expected {
            Ok(list) => assert_eq!(got, Ok(list.iter().map(|s| (*s).to_owned()).collect())),
            Err(needle) => {
                let err = got.expect_err(text);
                assert!(err.contains(needle), "{text}: {err}");
            }
        }
    }

    #[test]
    fn lists_parse_in_order_each_address_once() {
        check_list("cp.example:7443", Ok(&["cp.example:7443"]));
        check_list("a:7443,b:7443", Ok(&["a:7443", "b:7443"]));
        check_list(" a:1 , 10.0.0.2:7443 ,[::1]:7443", Ok(&["a:1", "10.0.0.2:7443", "[::1]:7443"]));
        check_list("a:1,b:2,a:1", Ok(&["a:1", "b:2"]));
        check_list("", Err("empty"));
        check_list("a:1,,b:2", Err("empty"));
        check_list("a:1,", Err("empty"));
        check_list("a", Err("no port"));
        check_list("a:0", Err("port 0"));
        check_list("a:70000", Err("1 to 65535"));
        check_list(":7443", Err("no host"));
        check_list("::1:7443", Err("brackets"));
        check_list("a b:7443", Err("not a host"));
        let list = parse_list("a:1, b:2").unwrap();
        assert_eq!(parse_list(&join(&list)).unwrap(), list);
    }

    #[test]
    fn a_round_ends_after_each_address_failed_once() {
        let list: Vec<String> = ["a:1", "b:1", "c:1"].iter().map(|s| (*s).to_owned()).collect();
        let mut addresses = Addresses::new(list.clone(), 3);
        let first = addresses.current().to_owned();
        let mut seen = vec![first.clone()];
        assert!(!addresses.failed());
        seen.push(addresses.current().to_owned());
        assert!(!addresses.failed());
        seen.push(addresses.current().to_owned());
        assert!(addresses.failed(), "third failure of three addresses ends the round");
        assert_eq!(addresses.current(), first, "and the next round starts where this one did");
        seen.sort();
        assert_eq!(seen, list, "every address tried once in the round");

        // A success starts the count again.
        assert!(!addresses.failed());
        addresses.connected();
        assert!(!addresses.failed());
        assert!(!addresses.failed());
        assert!(addresses.failed());
    }

    #[test]
    fn a_new_list_keeps_the_current_address_when_it_is_still_there() {
        let mut addresses = Addresses::new(vec!["a:1".into(), "b:1".into()], 1);
        let current = addresses.current().to_owned();
        addresses.replace(vec!["c:1".into(), current.clone()]);
        assert_eq!(addresses.current(), current);
        addresses.replace(vec!["d:1".into(), "e:1".into()]);
        assert!(["d:1", "e:1"].contains(&addresses.current()));
        addresses.replace(Vec::new());
        assert_eq!(addresses.list().len(), 2, "an empty list changes nothing");
    }
}
