//! Which desired-state documents are taken and in what order they are applied.
//!
//! A document must verify against the trust root, name this agent and region, be unexpired
//! and carry a version above the last one accepted ([`SignedDesired::verify`]); it counts as
//! accepted only once the driver has recorded it. The very bytes accepted last, sent again
//! (every session starts with the current document), are applied again, since
//! reconciliation is idempotent; any other document of that version, or a lower one, is
//! refused. One document is applied at a time and the latest accepted wins: documents
//! accepted while one is applied replace each other, and only the last is applied next.

use std::collections::VecDeque;
use std::time::SystemTime;

use crate::desired::{DesiredError, DesiredState, Expectation, SignedDesired};
use crate::trust::TrustRoot;

/// What the acceptance rules decided for one document.
#[derive(Debug, Clone, PartialEq)]
pub enum Verdict {
    /// New and valid: record it, then apply it.
    Record(DesiredState, Vec<u8>),
    /// The accepted document sent again: apply it again, nothing to record.
    Again(DesiredState),
    /// Refused, with the reason.
    Refused(String),
}

/// The documents of one agent: the last accepted, the one being recorded, the one being
/// applied and the next to apply.
#[derive(Debug, Clone, Default)]
pub struct Documents {
    agent: String,
    region: String,
    accepted: Option<(u64, Vec<u8>)>,
    recording: Option<(DesiredState, Vec<u8>)>,
    /// Documents that arrived while one was being recorded, in order.
    held: VecDeque<(SignedDesired, Result<TrustRoot, String>)>,
    applying: Option<DesiredState>,
    next: Option<DesiredState>,
}

impl Documents {
    /// For `agent` in `region`, whose last accepted document (version and exact bytes)
    /// the driver read from its store.
    pub fn new(agent: String, region: String, accepted: Option<(u64, Vec<u8>)>) -> Self {
        Self { agent, region, accepted, ..Self::default() }
    }

    /// The version of the last document recorded as accepted.
    pub fn accepted(&self) -> Option<u64> {
        self.accepted.as_ref().map(|(v, _)| *v)
    }

    /// Whether a document is being recorded (later ones wait for it).
    pub fn recording(&self) -> bool {
        self.recording.is_some()
    }

    /// Keeps a document that arrived during a recording, to judge after it.
    pub fn hold(&mut self, signed: SignedDesired, trust: Result<TrustRoot, String>) {
        self.held.push_back((signed, trust));
    }

    /// The next held document, once no recording is under way.
    pub fn take_held(&mut self) -> Option<(SignedDesired, Result<TrustRoot, String>)> {
        if self.recording.is_some() { None } else { self.held.pop_front() }
    }

    /// Judges `signed` against `trust` at `wall`.
    pub fn judge(
        &mut self,
        signed: &SignedDesired,
        trust: Result<&TrustRoot, &str>,
        wall: SystemTime,
    ) -> Verdict {
        let trust = match trust {
            Ok(trust) => trust,
            Err(e) => return Verdict::Refused(e.to_owned()),
        };
        let expect = Expectation {
            agent: &self.agent,
            region: &self.region,
            accepted: self.accepted(),
            now: wall,
        };
        match signed.verify(trust, &expect) {
            Ok(doc) => {
                self.recording = Some((doc.clone(), signed.document.clone()));
                Verdict::Record(doc, signed.document.clone())
            }
            Err(DesiredError::Stale { version, accepted })
                if version == accepted
                    && self.accepted.as_ref().is_some_and(|(_, b)| *b == signed.document) =>
            {
                // Authentic: these are the bytes that verified when they were accepted.
                match serde_json::from_slice::<DesiredState>(&signed.document) {
                    Ok(doc) => Verdict::Again(doc),
                    Err(e) => Verdict::Refused(e.to_string()),
                }
            }
            Err(e) => Verdict::Refused(e.to_string()),
        }
    }

    /// The document being recorded was written (`true`) or not; returns it when written.
    pub fn recorded(&mut self, ok: bool) -> Option<DesiredState> {
        let (doc, bytes) = self.recording.take()?;
        if !ok {
            return None;
        }
        self.accepted = Some((doc.version, bytes));
        Some(doc)
    }

    /// Queues `doc` for applying; returns it if it should be applied now (nothing else is
    /// being applied).
    pub fn queue(&mut self, doc: DesiredState) -> Option<DesiredState> {
        if self.applying.is_some() {
            self.next = Some(doc);
            None
        } else {
            self.applying = Some(doc.clone());
            Some(doc)
        }
    }

    /// The document being applied finished; returns it and the next one to apply, if any.
    pub fn applied(&mut self) -> (Option<DesiredState>, Option<DesiredState>) {
        let done = self.applying.take();
        let next = self.next.take();
        if let Some(next) = &next {
            self.applying = Some(next.clone());
        }
        (done, next)
    }

    /// The document being applied, if any.
    pub fn applying(&self) -> Option<&DesiredState> {
        self.applying.as_ref()
    }

    /// The session ended: its apply is abandoned (the next session's first document
    /// starts it again); held documents are kept.
    pub fn reset(&mut self) {
        self.applying = None;
        self.next = None;
    }
}
