//! Golden files pin every format that crosses a process or machine boundary, each made
//! from fixed values (fixed keys, seeds, times and nonces; Ed25519 signing is
//! deterministic): the bundle (`bundle.rs`); the QUIC protocol's frames both ways, the
//! desired-state documents they carry, metric windows and chunk recipes (`protocol.rs`,
//! under `tests/data/golden/protocol-v1/`, named by the version in the ALPN); and what is
//! stored or handed over outside the protocol: feature snapshot headers and payloads,
//! enrollment tokens and the sealed files of `at_rest` (`stored.rs`).
//!
//! Each test encodes its fixed value and compares the bytes with the committed file, then
//! decodes the committed bytes and compares the result with the value. The committed
//! files are what the release that wrote them sends and stores: if a test fails, a format
//! changed. Either bump the format's version and keep reading the old one (the files of
//! the old version stay, as the previous version's agents' bytes), or, for a deliberate
//! change before any release, regenerate with
//! `FALAJ_BLESS=1 cargo test -p falaj-common --test it golden`.
//!
//! Binary formats are stored as hex text (`*.hex`): one `[label]` line per item, then its
//! bytes, 32 to a line, so that a change reads as a diff in review too.

mod bundle;
mod protocol;
mod stored;

use std::fmt::Write as _;
use std::path::PathBuf;

/// A golden file's path, relative to `tests/data/golden/`.
pub fn path(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/data/golden").join(name)
}

fn blessing() -> bool {
    std::env::var_os("FALAJ_BLESS").is_some()
}

fn read(name: &str) -> Vec<u8> {
    let path = path(name);
    std::fs::read(&path).unwrap_or_else(|e| {
        panic!("{}: {e} (FALAJ_BLESS=1 writes it from the fixed value)", path.display())
    })
}

/// Writes `bytes` to the golden file `name` under `FALAJ_BLESS=1`, else requires that the
/// committed file holds exactly them, failing with where and how they differ.
pub fn check(name: &str, bytes: &[u8]) {
    let path = path(name);
    if blessing() {
        std::fs::create_dir_all(path.parent().expect("under the golden directory")).unwrap();
        std::fs::write(&path, bytes).unwrap();
        return;
    }
    let expected = read(name);
    if let Some(difference) = difference(&expected, bytes) {
        panic!("{name}: the encoding changed (see golden/mod.rs's header)\n{difference}");
    }
}

/// One item of a hex file: its label and bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Item {
    /// What it is (`Hello`, `sealed file`, ...).
    pub label: String,
    /// Its bytes.
    pub bytes: Vec<u8>,
}

impl Item {
    /// An item.
    pub fn new(label: impl Into<String>, bytes: Vec<u8>) -> Self {
        Self { label: label.into(), bytes }
    }
}

/// `items` as a hex file under a `# `-comment `title`.
fn hex_file(title: &str, items: &[Item]) -> String {
    let mut out = String::new();
    for line in title.lines() {
        writeln!(out, "# {line}").unwrap();
    }
    for item in items {
        writeln!(out, "[{}]", item.label).unwrap();
        for line in item.bytes.chunks(32) {
            writeln!(out, "{}", hex::encode(line)).unwrap();
        }
    }
    out
}

/// The items of a hex file; panics (naming the line) on a malformed one.
fn parse_hex(name: &str, text: &str) -> Vec<Item> {
    let mut items: Vec<Item> = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        if let Some(label) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            items.push(Item::new(label, Vec::new()));
            continue;
        }
        let bytes =
            hex::decode(line).unwrap_or_else(|e| panic!("{name}:{}: not hex ({e}): {line}", n + 1));
        let item = items
            .last_mut()
            .unwrap_or_else(|| panic!("{name}:{}: bytes before any [label] line", n + 1));
        item.bytes.extend(bytes);
    }
    items
}

/// Pins `items` as the hex file `name` (see [`check`]) and returns the committed items,
/// for the caller to decode.
pub fn check_items(name: &str, title: &str, items: &[Item]) -> Vec<Item> {
    let text = hex_file(title, items);
    if blessing() {
        check(name, text.as_bytes());
        return items.to_vec();
    }
    let committed = parse_hex(name, &String::from_utf8_lossy(&read(name)));
    let labels = |items: &[Item]| items.iter().map(|i| i.label.clone()).collect::<Vec<_>>();
    assert_eq!(labels(&committed), labels(items), "{name}: the items changed");
    for (i, (old, new)) in committed.iter().zip(items).enumerate() {
        if let Some(difference) = difference(&old.bytes, &new.bytes) {
            panic!(
                "{name}: item {i} [{}]: the encoding changed (see golden/mod.rs's header)\n{difference}",
                old.label
            );
        }
    }
    // The bytes agree; so must the file (its title and layout).
    check(name, text.as_bytes());
    committed
}

/// The committed items of the hex file `name`.
pub fn items(name: &str) -> Vec<Item> {
    parse_hex(name, &String::from_utf8_lossy(&read(name)))
}

/// Where `actual` first departs from `expected`, with some bytes around it on both sides
/// (as text when both are text, else as hex); `None` when they are equal.
fn difference(expected: &[u8], actual: &[u8]) -> Option<String> {
    if expected == actual {
        return None;
    }
    let at = expected.iter().zip(actual).take_while(|(a, b)| a == b).count();
    let start = at.saturating_sub(24);
    let around = |bytes: &[u8]| {
        let piece = &bytes[start.min(bytes.len())..(at + 40).min(bytes.len())];
        match std::str::from_utf8(piece) {
            Ok(text) if !text.contains(|c: char| c.is_control() && c != '\n') => {
                format!("{text:?}")
            }
            _ => hex::encode(piece),
        }
    };
    Some(format!(
        "first difference at byte {at} (committed {} bytes, now {} bytes); from byte {start}:\n  committed: {}\n  now:       {}",
        expected.len(),
        actual.len(),
        around(expected),
        around(actual)
    ))
}

#[test]
fn a_difference_names_its_place() {
    assert_eq!(difference(b"abc", b"abc"), None);
    let text = difference(b"{\"version\":1}", b"{\"version\":2}").unwrap();
    assert!(text.contains("byte 11") && text.contains("\"{\\\"version\\\":2}\""), "{text}");
    let binary = difference(&[0, 1, 2], &[0, 1, 3, 4]).unwrap();
    assert!(binary.contains("committed 3 bytes, now 4") && binary.contains("00010304"), "{binary}");
    let items = [Item::new("a", vec![1; 40]), Item::new("b", Vec::new())];
    assert_eq!(parse_hex("t", &hex_file("title\nline", &items)), items);
}
