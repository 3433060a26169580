//! The audit log's format: a hash chain of entries with signed checkpoints, written one
//! JSON object per line, and its offline verification.
//!
//! Each [`Entry`] records one state change or security event (who, from where, what, on
//! what, with what outcome) and the SHA-256 of the previous entry's line; an entry's own
//! hash is the SHA-256 of its line exactly as written. A [`Checkpoint`] signs (under its
//! own [`Context::AuditCheckpoint`], with the audit key) the sequence number and hash of
//! the entry it follows, so that an export can be checked from the file and the public
//! key alone: a changed byte breaks the chain at that entry, a removed or reordered line
//! breaks the sequence, and a truncated tail or a rewritten chain no longer matches a
//! signed head. An export that starts after pruned entries starts with the checkpoint of
//! the last entry pruned (its anchor).

use std::fmt;

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::keys::{Context, KeyId, PublicKey, Sha256, Signature, SigningKey};
use crate::time::Timestamp;

/// The `prev` of the first entry of a chain.
pub const GENESIS: Sha256 = Sha256([0; 32]);

/// How an action ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Outcome {
    /// Done.
    Success,
    /// Attempted and failed (a wrong password).
    Failure,
    /// Refused (a role below the route's, a bad bundle).
    Refused,
}

/// One audited action, as written (field order is the line's).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Entry {
    /// Its position in the chain, from 1.
    pub seq: u64,
    /// When.
    pub at: Timestamp,
    /// Who: `user:NAME`, `token:NAME`, `admin-token`, `agent:ID` or `system`.
    pub actor: String,
    /// From where (an address), when it came over the network.
    pub source: Option<String>,
    /// What (`deploy`, `bundle.push`, `login`...).
    pub action: String,
    /// On what.
    pub target: String,
    /// How it ended.
    pub outcome: Outcome,
    /// Anything else worth keeping (JSON).
    pub details: serde_json::Value,
    /// The SHA-256 of the previous entry's line ([`GENESIS`] for the first).
    pub prev: Sha256,
}

impl Entry {
    /// The entry's line (JSON, no newline): what is stored, exported and hashed.
    pub fn line(&self) -> String {
        serde_json::to_string(self).expect("entries always serialise")
    }
}

/// The hash that chains a line to the next entry.
pub fn hash(line: &str) -> Sha256 {
    Sha256::of(line.as_bytes())
}

/// What a checkpoint's signature covers.
#[derive(Serialize)]
struct Signed<'a> {
    seq: u64,
    head: &'a Sha256,
    at: Timestamp,
}

/// A signed statement that the chain's entry `seq` has hash `head`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Checkpoint {
    /// The entry it covers (and, through the chain, every entry before it).
    pub seq: u64,
    /// That entry's hash.
    pub head: Sha256,
    /// When it was signed.
    pub at: Timestamp,
    /// The audit key's id.
    pub key: KeyId,
    /// The signature.
    pub signature: Signature,
}

impl Checkpoint {
    fn message(seq: u64, head: &Sha256, at: Timestamp) -> Vec<u8> {
        serde_json::to_vec(&Signed { seq, head, at }).expect("checkpoints always serialise")
    }

    /// Signs that entry `seq` has hash `head`.
    pub fn sign(seq: u64, head: Sha256, at: Timestamp, key: &SigningKey) -> Self {
        let signature = key.sign(Context::AuditCheckpoint, &Self::message(seq, &head, at));
        Self { seq, head, at, key: key.public().id(), signature }
    }

    /// Whether one of `keys` signed it.
    pub fn verify(&self, keys: &[PublicKey]) -> Result<(), CheckpointProblem> {
        let key = keys.iter().find(|k| k.id() == self.key).ok_or(CheckpointProblem::UnknownKey)?;
        let message = Self::message(self.seq, &self.head, self.at);
        if key.verify(Context::AuditCheckpoint, &message, &self.signature) {
            Ok(())
        } else {
            Err(CheckpointProblem::BadSignature)
        }
    }

    /// Its line in an export.
    pub fn line(&self) -> String {
        serde_json::to_string(&Record::Checkpoint(self.clone()))
            .expect("checkpoints always serialise")
    }
}

/// A line of an export that is not an entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase", deny_unknown_fields)]
enum Record {
    Checkpoint(Checkpoint),
}

/// Why a checkpoint does not hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CheckpointProblem {
    /// Signed by a key not given.
    UnknownKey,
    /// The signature does not verify (content changed, or another key's).
    BadSignature,
    /// It names an entry other than the one it follows, or another hash.
    WrongHead,
}

impl fmt::Display for CheckpointProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::UnknownKey => "it is signed by a key that is not the audit key given",
            Self::BadSignature => "its signature does not verify",
            Self::WrongHead => "it does not match the entry before it",
        })
    }
}

/// Why an export does not verify: the first problem, by line (from 1).
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum VerifyError {
    /// A line that is neither an entry nor a checkpoint.
    #[error("line {line}: not an audit entry or checkpoint: {problem}")]
    Malformed {
        /// The line.
        line: usize,
        /// The parser's complaint.
        problem: String,
    },
    /// An entry out of sequence: a line removed, repeated or moved.
    #[error(
        "line {line}: entry {seq} follows entry {previous} (an entry is missing, repeated or moved)"
    )]
    Order {
        /// The line.
        line: usize,
        /// Its sequence number.
        seq: u64,
        /// The previous entry's.
        previous: u64,
    },
    /// An entry whose content changed: the next entry records another hash for it.
    #[error("line {line}: entry {seq} was changed (entry {next} records another hash for it)")]
    Changed {
        /// The changed entry's line.
        line: usize,
        /// Its sequence number.
        seq: u64,
        /// The entry that records its hash.
        next: u64,
    },
    /// The first entry does not start a chain or follow the anchor.
    #[error("line {line}: entry {seq} does not follow {after}")]
    Start {
        /// The line.
        line: usize,
        /// Its sequence number.
        seq: u64,
        /// What it should follow.
        after: String,
    },
    /// A checkpoint that does not hold.
    #[error("line {line}: the checkpoint of entry {seq} does not verify: {problem}")]
    Checkpoint {
        /// The line.
        line: usize,
        /// The entry it covers.
        seq: u64,
        /// Why.
        problem: CheckpointProblem,
    },
    /// Entries after the last checkpoint: nothing signed covers them.
    #[error(
        "entries {first} to {last} are not covered by a signed checkpoint (the export may be truncated or extended)"
    )]
    Unsigned {
        /// The first uncovered entry.
        first: u64,
        /// The last.
        last: u64,
    },
    /// No entry and no checkpoint.
    #[error("the export is empty")]
    Empty,
}

/// What a verified export holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verified {
    /// Entries checked.
    pub entries: u64,
    /// The first and last entries' sequence numbers.
    pub first: Option<u64>,
    /// The last.
    pub last: Option<u64>,
    /// Checkpoints checked.
    pub checkpoints: u64,
}

/// Verifies an export, line by line, against the audit `keys`: every entry follows the
/// one before it (sequence and hash), every checkpoint is signed and matches the entry
/// it follows, and the last entry is covered by a checkpoint.
pub fn verify<'a>(
    lines: impl IntoIterator<Item = &'a str>,
    keys: &[PublicKey],
) -> Result<Verified, VerifyError> {
    // The last entry seen (line, seq, hash of its line), or the anchor (line 0).
    let mut last: Option<(usize, u64, Sha256)> = None;
    let mut verified = Verified { entries: 0, first: None, last: None, checkpoints: 0 };
    let mut covered = 0;
    for (index, text) in lines.into_iter().enumerate() {
        let line = index + 1;
        if text.trim().is_empty() {
            continue;
        }
        if text.starts_with("{\"checkpoint\"") {
            let Record::Checkpoint(cp) = serde_json::from_str(text)
                .map_err(|e| VerifyError::Malformed { line, problem: e.to_string() })?;
            let fail = |problem| VerifyError::Checkpoint { line, seq: cp.seq, problem };
            cp.verify(keys).map_err(fail)?;
            match last {
                // An anchor: the entries before it were pruned.
                None => last = Some((0, cp.seq, cp.head)),
                Some((_, seq, head)) if seq == cp.seq && head == cp.head => {}
                Some(_) => return Err(fail(CheckpointProblem::WrongHead)),
            }
            verified.checkpoints += 1;
            covered = cp.seq;
            continue;
        }
        let entry: Entry = serde_json::from_str(text)
            .map_err(|e| VerifyError::Malformed { line, problem: e.to_string() })?;
        match last {
            None if entry.seq != 1 || entry.prev != GENESIS => {
                return Err(VerifyError::Start {
                    line,
                    seq: entry.seq,
                    after: "the start of the chain (entry 1, or a signed anchor)".into(),
                });
            }
            None => {}
            Some((at, seq, head)) => {
                if entry.seq != seq + 1 {
                    return Err(VerifyError::Order { line, seq: entry.seq, previous: seq });
                }
                if entry.prev != head {
                    return Err(if at == 0 {
                        VerifyError::Start {
                            line,
                            seq: entry.seq,
                            after: format!("the anchor of entry {seq}"),
                        }
                    } else {
                        VerifyError::Changed { line: at, seq, next: entry.seq }
                    });
                }
            }
        }
        last = Some((line, entry.seq, hash(text)));
        verified.entries += 1;
        verified.first.get_or_insert(entry.seq);
        verified.last = Some(entry.seq);
    }
    match (verified.last, last) {
        (_, None) => Err(VerifyError::Empty),
        (Some(last), _) if last > covered => Err(VerifyError::Unsigned {
            first: covered.max(verified.first.unwrap_or(1) - 1) + 1,
            last,
        }),
        _ => Ok(verified),
    }
}

impl fmt::Display for Verified {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let seq = |s: Option<u64>| s.map_or_else(|| "-".to_owned(), |s| s.to_string());
        write!(
            f,
            "{} entries ({} to {}) and {} checkpoints verify",
            self.entries,
            seq(self.first),
            seq(self.last),
            self.checkpoints
        )
    }
}

/// An export's lines: each entry's line (in sequence order) followed by the checkpoints
/// of that entry, preceded by the checkpoint of the entry before the first (the anchor,
/// when earlier entries were pruned). `checkpoints` are (sequence number, line).
pub fn assemble(
    entries: impl IntoIterator<Item = (u64, String)>,
    mut checkpoints: Vec<(u64, String)>,
) -> Vec<String> {
    checkpoints.sort_by_key(|(seq, _)| std::cmp::Reverse(*seq));
    let mut lines = Vec::new();
    for (seq, line) in entries {
        if lines.is_empty() {
            while checkpoints.last().is_some_and(|(s, _)| *s < seq) {
                let (s, anchor) = checkpoints.pop().expect("checked");
                if s + 1 == seq {
                    lines.push(anchor);
                }
            }
        }
        lines.push(line);
        while checkpoints.last().is_some_and(|(s, _)| *s <= seq) {
            let (s, checkpoint) = checkpoints.pop().expect("checked");
            if s == seq {
                lines.push(checkpoint);
            }
        }
    }
    lines
}

/// Appends entries to a chain: numbers them and links each to the one before.
#[derive(Debug, Clone)]
pub struct Chain {
    /// The last entry's sequence number (0 before the first).
    pub seq: u64,
    /// The last entry's hash ([`GENESIS`] before the first).
    pub head: Sha256,
}

impl Chain {
    /// A chain whose last entry is `seq` with hash `head`.
    pub fn at(seq: u64, head: Sha256) -> Self {
        Self { seq, head }
    }

    /// The next entry and its line; the chain moves on to it.
    #[allow(clippy::too_many_arguments)]
    pub fn append(
        &mut self,
        at: Timestamp,
        actor: &str,
        source: Option<&str>,
        action: &str,
        target: &str,
        outcome: Outcome,
        details: serde_json::Value,
    ) -> (Entry, String) {
        let entry = Entry {
            seq: self.seq + 1,
            at,
            actor: actor.to_owned(),
            source: source.map(str::to_owned),
            action: action.to_owned(),
            target: target.to_owned(),
            outcome,
            details,
            prev: self.head,
        };
        let line = entry.line();
        self.seq = entry.seq;
        self.head = hash(&line);
        (entry, line)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::tests::key;

    /// An export of `n` entries with a checkpoint after every fourth and at the end.
    fn export(n: u64, signer: &SigningKey) -> Vec<String> {
        let mut chain = Chain::at(0, GENESIS);
        let mut lines = Vec::new();
        for i in 1..=n {
            let details = serde_json::json!({"version": i, "note": "x"});
            let (_, line) = chain.append(
                Timestamp::from_unix(1_800_000_000 + i),
                "user:alice",
                Some("127.0.0.1"),
                "deploy",
                "fault@1 to edge",
                Outcome::Success,
                details,
            );
            lines.push(line);
            if i % 4 == 0 || i == n {
                lines.push(
                    Checkpoint::sign(i, chain.head, Timestamp::from_unix(1_800_000_100), signer)
                        .line(),
                );
            }
        }
        lines
    }

    fn check(lines: &[String], keys: &[PublicKey]) -> Result<Verified, VerifyError> {
        verify(lines.iter().map(String::as_str), keys)
    }

    #[test]
    fn an_untouched_export_verifies() {
        let signer = key();
        let lines = export(10, &signer);
        let v = check(&lines, &[signer.public()]).unwrap();
        assert_eq!((v.entries, v.first, v.last, v.checkpoints), (10, Some(1), Some(10), 3));
    }

    #[test]
    fn every_tampering_is_named_at_its_entry() {
        let signer = key();
        let keys = [signer.public()];
        let lines = export(10, &signer);
        // Line numbers: entries 1-4 on lines 1-4, checkpoint 5, entries 5-8 on 6-9, ...
        let mut changed = lines.clone();
        changed[5] = changed[5].replace("alice", "alicf");
        assert_eq!(check(&changed, &keys), Err(VerifyError::Changed { line: 6, seq: 5, next: 6 }));

        let mut removed = lines.clone();
        removed.remove(6);
        assert_eq!(
            check(&removed, &keys),
            Err(VerifyError::Order { line: 7, seq: 7, previous: 5 })
        );

        let mut swapped = lines.clone();
        swapped.swap(6, 7);
        assert_eq!(
            check(&swapped, &keys),
            Err(VerifyError::Order { line: 7, seq: 7, previous: 5 })
        );

        // The last entry changed: only the checkpoint after it covers it.
        let mut last = lines.clone();
        let at = last.len() - 2;
        last[at] = last[at].replace("edge", "edgf");
        assert!(matches!(
            check(&last, &keys),
            Err(VerifyError::Checkpoint { seq: 10, problem: CheckpointProblem::WrongHead, .. })
        ));

        // The chain rewritten from entry 5 on and re-signed with another key.
        let forger = key();
        let mut rewritten = lines[..5].to_vec();
        let mut chain = Chain::at(4, hash(&lines[3]));
        let (_, line) = chain.append(
            Timestamp::from_unix(1),
            "user:mallory",
            None,
            "deploy",
            "x",
            Outcome::Success,
            serde_json::Value::Null,
        );
        rewritten.push(line);
        rewritten.push(Checkpoint::sign(5, chain.head, Timestamp::from_unix(2), &forger).line());
        assert!(matches!(
            check(&rewritten, &keys),
            Err(VerifyError::Checkpoint {
                line: 7,
                seq: 5,
                problem: CheckpointProblem::UnknownKey
            })
        ));
        // With both keys given, the forger's checkpoint verifies but the first one does not
        // match: the honest chain is still anchored.
        let mut resigned = lines.clone();
        let cp: serde_json::Value = serde_json::from_str(&resigned[4]).unwrap();
        let seq = cp["checkpoint"]["seq"].as_u64().unwrap();
        let head: Sha256 = cp["checkpoint"]["head"].as_str().unwrap().parse().unwrap();
        resigned[4] = Checkpoint::sign(seq, head, Timestamp::from_unix(3), &forger).line();
        assert!(matches!(
            check(&resigned, &keys),
            Err(VerifyError::Checkpoint { line: 5, problem: CheckpointProblem::UnknownKey, .. })
        ));
        let mut edited = lines.clone();
        edited[4] = edited[4].replace("\"seq\":4", "\"seq\":3");
        assert!(matches!(
            check(&edited, &keys),
            Err(VerifyError::Checkpoint { line: 5, problem: CheckpointProblem::BadSignature, .. })
        ));

        // Truncated after the last checkpoint's entries: the tail is unsigned.
        let mut truncated = lines.clone();
        truncated.pop();
        assert_eq!(check(&truncated, &keys), Err(VerifyError::Unsigned { first: 9, last: 10 }));
        assert_eq!(
            check(&["garbage".into()], &keys).unwrap_err().to_string().split(':').next(),
            Some("line 1")
        );
        assert_eq!(check(&[], &keys), Err(VerifyError::Empty));
    }

    #[test]
    fn assembled_exports_put_checkpoints_after_their_entries_and_the_anchor_first() {
        let signer = key();
        let lines = export(10, &signer);
        let (mut entries, mut checkpoints) = (Vec::new(), Vec::new());
        let mut seq = 0;
        for line in &lines {
            if line.starts_with("{\"checkpoint\"") {
                checkpoints.push((seq, line.clone()));
            } else {
                seq += 1;
                entries.push((seq, line.clone()));
            }
        }
        checkpoints.reverse();
        assert_eq!(assemble(entries.clone(), checkpoints.clone()), lines);
        // Entries 1-4 pruned: their checkpoint anchors the rest.
        assert_eq!(assemble(entries[4..].to_vec(), checkpoints), lines[4..]);
    }

    #[test]
    fn an_export_after_pruning_starts_at_its_anchor() {
        let signer = key();
        let lines = export(10, &signer);
        // Entries 1-4 pruned: the export starts with their checkpoint.
        let pruned = lines[4..].to_vec();
        let v = check(&pruned, &[signer.public()]).unwrap();
        assert_eq!((v.entries, v.first, v.last), (6, Some(5), Some(10)));
        // Without its anchor the rest does not start a chain.
        assert!(matches!(
            check(&lines[5..], &[signer.public()]),
            Err(VerifyError::Start { line: 1, seq: 5, .. })
        ));
    }
}
