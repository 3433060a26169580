//! Fuzzing on stable Rust: a seeded, deterministic mutator over a seed corpus, and a runner
//! that feeds a fixed number of mutated inputs to a fuzz target's body. Test support,
//! compiled only with the `fuzzing` feature (the crates' fuzz tests and the cargo-fuzz
//! binaries in `fuzz/` turn it on); no daemon links it.
//!
//! The bodies in [`targets`] are shared: the cargo-fuzz binaries call them with
//! libFuzzer's inputs, the stable tests with [`Campaign`]'s. A body panics on a bug (the
//! decoder panicked, or a property such as round-trip stability failed) and returns
//! whether the decoder accepted the input; accepted mutants become parents of later
//! mutants, the one piece of feedback this fuzzer has without coverage.
//!
//! Unlike the rest of this crate, [`Campaign`] reads files (the seed corpus) and the
//! environment (`FALAJ_FUZZ_ITERATIONS`, `FALAJ_FUZZ_SEED`): it is the harness, not a
//! rule the daemons follow.

pub mod seeds;
pub mod targets;

use std::fmt::Write as _;
use std::path::Path;

use crate::random::SeededRng;

/// Integers that make decoders take edge paths: lengths of 0 and 1, signed and unsigned
/// limits, sizes past any frame.
const INTERESTING: [u64; 14] = [
    0,
    1,
    0x7f,
    0x80,
    0xff,
    0x100,
    0x7fff,
    0xffff,
    0x0100_0000,
    0x7fff_ffff,
    0xffff_ffff,
    0x1_0000_0000,
    i64::MAX as u64,
    u64::MAX,
];

/// Tokens of the text formats decoded here (JSON, TOML, CSV, the filter language), for
/// mutations that keep inputs close to parsing.
const TOKENS: [&str; 30] = [
    "\"",
    "{",
    "}",
    "[",
    "]",
    ",",
    ":",
    "=",
    "\n",
    "null",
    "true",
    "-1",
    "0",
    "1e999",
    "-9223372036854775809",
    "18446744073709551616",
    "\"\\u0000\"",
    "\\ud800",
    "[[",
    "]]",
    "NaN",
    "inf",
    "''",
    "\"\"",
    "-0.0",
    "1.5",
    "#",
    "\r\n",
    "==",
    "\u{202e}",
];

/// Largest input a mutation makes; larger parents are cut.
pub const MAX_INPUT: usize = 256 << 10;

/// A seeded mutator: the same seed and parents give the same mutants on every platform.
#[derive(Debug, Clone)]
pub struct Mutator {
    rng: SeededRng,
}

impl Mutator {
    /// A mutator seeded with `seed`.
    pub fn new(seed: u64) -> Self {
        Self { rng: SeededRng::new(seed) }
    }

    fn below(&mut self, n: usize) -> usize {
        if n == 0 { 0 } else { self.rng.below(n) }
    }

    fn byte(&mut self) -> u8 {
        self.below(256) as u8
    }

    fn interesting(&mut self) -> u64 {
        let v = INTERESTING[self.below(INTERESTING.len())];
        // Around the value as often as at it: off-by-one edges.
        match self.below(4) {
            0 => v.wrapping_sub(1),
            1 => v.wrapping_add(1),
            _ => v,
        }
    }

    /// A mutant of `input`: one to four stacked mutations (bit flips, interesting bytes,
    /// byte inserts and deletes, duplicated ranges, splices with `others`, length fields
    /// rewritten as big- or little-endian integers or LEB128 varints, truncation, and
    /// text tokens), at most [`MAX_INPUT`] bytes.
    pub fn mutate(&mut self, input: &[u8], others: &[Vec<u8>]) -> Vec<u8> {
        let mut out = input[..input.len().min(MAX_INPUT)].to_vec();
        for _ in 0..=self.below(4) {
            self.once(&mut out, others);
        }
        out.truncate(MAX_INPUT);
        out
    }

    fn once(&mut self, out: &mut Vec<u8>, others: &[Vec<u8>]) {
        let at = self.below(out.len() + 1);
        match self.below(11) {
            0 if !out.is_empty() => {
                let i = self.below(out.len());
                out[i] ^= 1 << self.below(8);
            }
            1 if !out.is_empty() => {
                let i = self.below(out.len());
                out[i] = [0, 0xff, 0x7f, 0x80, b'0', b'9', b'"', 0x01][self.below(8)];
            }
            2 => {
                let n = 1 + self.below(8);
                let bytes: Vec<u8> = (0..n).map(|_| self.byte()).collect();
                out.splice(at..at, bytes);
            }
            3 if at < out.len() => {
                let end = at + 1 + self.below((out.len() - at).min(64));
                out.drain(at..end.min(out.len()));
            }
            4 if at < out.len() => {
                let end = (at + 1 + self.below(64)).min(out.len());
                let piece = out[at..end].to_vec();
                let to = self.below(out.len() + 1);
                out.splice(to..to, piece);
            }
            5 if !others.is_empty() => {
                let other = self.below(others.len());
                self.splice(out, &others[other]);
            }
            6 => self.length_field(out, at),
            7 => out.truncate(at),
            8 => self.number_text(out),
            _ => {
                let token = TOKENS[self.below(TOKENS.len())].as_bytes();
                out.splice(at..at, token.iter().copied());
            }
        }
    }

    /// Replaces a range of `out` with a range of `other` (or appends `other`'s tail).
    fn splice(&mut self, out: &mut Vec<u8>, other: &[u8]) {
        if other.is_empty() {
            return;
        }
        let from = self.below(other.len());
        let to = (from + 1 + self.below(other.len() - from)).min(other.len());
        let at = self.below(out.len() + 1);
        let end = (at + self.below(to - from + 1)).min(out.len());
        out.splice(at..end, other[from..to].iter().copied());
    }

    /// Overwrites bytes at `at` with an interesting integer: 1, 2, 4 or 8 bytes in either
    /// byte order, or a LEB128 varint (postcard's lengths).
    fn length_field(&mut self, out: &mut Vec<u8>, at: usize) {
        let value = self.interesting();
        let bytes: Vec<u8> = match self.below(5) {
            0 => vec![value as u8],
            1 => (value as u16).to_be_bytes().to_vec(),
            2 => (value as u32).to_be_bytes().to_vec(),
            3 => {
                let width = [2, 4, 8][self.below(3)];
                value.to_le_bytes()[..width].to_vec()
            }
            _ => varint(value),
        };
        let end = (at + bytes.len()).min(out.len());
        out.splice(at..end, bytes);
    }

    /// Replaces a run of ASCII digits with an interesting number, or inserts one.
    fn number_text(&mut self, out: &mut Vec<u8>) {
        let digits: Vec<usize> = (0..out.len()).filter(|&i| out[i].is_ascii_digit()).collect();
        let number = match self.below(3) {
            0 => format!("-{}", self.interesting()),
            _ => self.interesting().to_string(),
        };
        if digits.is_empty() {
            let at = self.below(out.len() + 1);
            out.splice(at..at, number.into_bytes());
            return;
        }
        let start = digits[self.below(digits.len())];
        let end = (start..out.len()).find(|&i| !out[i].is_ascii_digit()).unwrap_or(out.len());
        out.splice(start..end, number.into_bytes());
    }
}

/// `value` as a LEB128 varint.
fn varint(mut value: u64) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let byte = (value & 0x7f) as u8;
        value >>= 7;
        if value == 0 {
            out.push(byte);
            return out;
        }
        out.push(byte | 0x80);
    }
}

/// Measures the most bytes held at once on this thread while a closure runs. The test
/// binaries pass `allocation_counter::measure(..).bytes_max`; `common` installs no
/// allocator of its own.
pub type PeakBytes = fn(&mut dyn FnMut()) -> u64;

/// One target's run: its seeds, then `iterations` mutants of them.
#[derive(Debug)]
pub struct Campaign {
    name: String,
    seeds: Vec<Vec<u8>>,
    iterations: u64,
    seed: u64,
    memory: Option<(PeakBytes, u64)>,
}

/// Mutants kept as parents (those the decoder accepted), at most.
const MAX_PARENTS: usize = 512;

impl Campaign {
    /// A campaign for target `name` that runs `iterations` mutants (in CI), or as many as
    /// `FALAJ_FUZZ_ITERATIONS` says (for a longer run on a bench), from the seed
    /// `FALAJ_FUZZ_SEED` (default 0) mixed with the target's name.
    pub fn new(name: &str, iterations: u64) -> Self {
        let env = |key: &str| std::env::var(key).ok().and_then(|v| v.trim().parse::<u64>().ok());
        Self {
            name: name.to_owned(),
            seeds: Vec::new(),
            iterations: env("FALAJ_FUZZ_ITERATIONS").unwrap_or(iterations),
            seed: env("FALAJ_FUZZ_SEED").unwrap_or(0),
            memory: None,
        }
    }

    /// Adds a seed input.
    #[must_use]
    pub fn seed(mut self, input: impl Into<Vec<u8>>) -> Self {
        self.seeds.push(input.into());
        self
    }

    /// Adds every file of `dir` (sorted by name) as a seed; a missing folder adds none.
    #[must_use]
    pub fn corpus(mut self, dir: &Path) -> Self {
        let Ok(entries) = std::fs::read_dir(dir) else { return self };
        let mut paths: Vec<_> = entries.filter_map(|e| Some(e.ok()?.path())).collect();
        paths.sort();
        for path in paths.into_iter().filter(|p| p.is_file()) {
            let bytes = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            self.seeds.push(bytes);
        }
        self
    }

    /// Fails an input whose run held more than `base + 64 × its length` bytes at once on
    /// the running thread, as measured by `peak`: no decoder allocates what a length
    /// field declares before the bytes are there.
    #[must_use]
    pub fn memory(mut self, peak: PeakBytes, base: u64) -> Self {
        self.memory = Some((peak, base));
        self
    }

    /// Adds the committed corpus in `dir` and the `generated` seeds, each of which
    /// `body` must accept (the project's own encoders made them); under `FALAJ_BLESS=1`
    /// the generated seeds are written to `dir` first, as `gen-N`.
    #[must_use]
    pub fn committed(self, dir: &Path, generated: &[Vec<u8>], body: fn(&[u8]) -> bool) -> Self {
        if std::env::var_os("FALAJ_BLESS").is_some() {
            std::fs::create_dir_all(dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
            for (i, seed) in generated.iter().enumerate() {
                let path = dir.join(format!("gen-{i}"));
                std::fs::write(&path, seed).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            }
        }
        for (i, seed) in generated.iter().enumerate() {
            assert!(body(seed), "{}: generated seed {i} was refused", self.name);
        }
        self.corpus(dir).seeds(generated.iter().cloned())
    }

    /// Adds seed inputs.
    #[must_use]
    pub fn seeds(mut self, inputs: impl IntoIterator<Item = Vec<u8>>) -> Self {
        self.seeds.extend(inputs);
        self
    }

    /// Runs `body` on every seed, then on the mutants. A panic in `body` fails the run
    /// (it is not caught: an abort would not be either), after the input, its length,
    /// the seed and the iteration are printed. Returns how many inputs were accepted.
    pub fn run(self, mut body: impl FnMut(&[u8]) -> bool) -> u64 {
        assert!(!self.seeds.is_empty(), "fuzz target {} has no seeds", self.name);
        let seed = self.seed ^ fnv1a(self.name.as_bytes());
        let mut mutator = Mutator::new(seed);
        let mut parents = self.seeds.clone();
        let mut accepted = 0;
        let total = self.seeds.len() as u64 + self.iterations;
        let started = std::time::Instant::now();
        for iteration in 0..total {
            let given = usize::try_from(iteration).ok().and_then(|i| self.seeds.get(i));
            let input = if let Some(given) = given {
                given.clone()
            } else {
                let parent = &parents[mutator.below(parents.len())];
                mutator.mutate(parent, &parents)
            };
            let guard = Reporter { campaign: &self, iteration, input: &input };
            let ok = match self.memory {
                Some((peak, base)) => {
                    let mut ok = false;
                    let held = peak(&mut || ok = body(&input));
                    let limit = base + 64 * input.len() as u64;
                    assert!(held <= limit, "held {held} bytes at once, over the {limit} allowed");
                    ok
                }
                None => body(&input),
            };
            drop(guard);
            if ok {
                accepted += 1;
                if iteration >= self.seeds.len() as u64 {
                    if parents.len() < MAX_PARENTS {
                        parents.push(input);
                    } else {
                        let i = self.seeds.len() + mutator.below(MAX_PARENTS - self.seeds.len());
                        parents[i] = input;
                    }
                }
            }
        }
        eprintln!(
            "fuzz target {}: {total} inputs ({} seeds), {accepted} accepted, in {:.2?}",
            self.name,
            self.seeds.len(),
            started.elapsed()
        );
        accepted
    }
}

/// Prints the failing input when a body panics (on drop while unwinding).
struct Reporter<'a> {
    campaign: &'a Campaign,
    iteration: u64,
    input: &'a [u8],
}

impl Drop for Reporter<'_> {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            return;
        }
        let c = self.campaign;
        let what = if self.iteration < c.seeds.len() as u64 { "seed" } else { "mutant" };
        let mut hex = String::with_capacity(self.input.len() * 2);
        for b in self.input {
            let _ = write!(hex, "{b:02x}");
        }
        eprintln!(
            "fuzz target {} failed on {what} {} of {} bytes (FALAJ_FUZZ_SEED={}, \
             FALAJ_FUZZ_ITERATIONS={}); the input, in hex (save it with `xxd -r -p` under \
             fuzz/seeds/{}/ as a regression):\n{hex}",
            c.name,
            self.iteration,
            self.input.len(),
            c.seed,
            c.iterations,
            c.name,
        );
    }
}

/// FNV-1a, to mix a target's name into its seed.
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes
        .iter()
        .fold(0xcbf2_9ce4_8422_2325, |h, &b| (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_same_seed_makes_the_same_mutants() {
        let parents = vec![b"{\"a\": [1, 2, 3]}".to_vec(), vec![0, 1, 2, 3, 4, 5]];
        let run = |seed| {
            let mut m = Mutator::new(seed);
            (0..200).map(|i| m.mutate(&parents[i % 2], &parents)).collect::<Vec<_>>()
        };
        assert_eq!(run(1), run(1));
        assert_ne!(run(1), run(2));
        assert!(run(1).iter().all(|m| m.len() <= MAX_INPUT));
        assert!(run(3).iter().filter(|m| **m != parents[0] && **m != parents[1]).count() > 150);
    }

    #[test]
    fn varints_are_leb128() {
        assert_eq!(varint(0), [0]);
        assert_eq!(varint(300), [0xac, 0x02]);
        assert_eq!(varint(u64::MAX).len(), 10);
    }

    #[test]
    fn a_campaign_runs_its_seeds_then_its_mutants_and_counts_what_was_accepted() {
        let mut seen = Vec::new();
        let accepted = Campaign::new("unit", 50).seed(b"seed".to_vec()).run(|input| {
            seen.push(input.to_vec());
            input.starts_with(b"s")
        });
        assert!(!seen.is_empty());
        assert_eq!(seen[0], b"seed");
        assert!(accepted >= 1 && accepted <= seen.len() as u64);
    }
}
