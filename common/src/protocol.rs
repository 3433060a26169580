//! The messages between agents and the control plane over QUIC, and their framing.
//!
//! Two ALPN protocols share the control plane's one UDP port:
//! - [`ALPN_ENROLL`]: no client certificate; one bidirectional stream carrying one
//!   [`EnrollRequest`] and one [`EnrollResponse`].
//! - [`ALPN_AGENT`]: mutual TLS with the agent's certificate. The agent opens a session
//!   stream ([`AgentMessage`] up, [`ControlMessage`] down) and, for transfers, further
//!   streams that each carry one [`FetchRequest`] answered by a [`ChunkHeader`] and the raw
//!   bytes of each chunk in turn.
//!
//! Every message is a frame: a 4-byte big-endian length, then the message in postcard.

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::desired::SignedDesired;
use crate::finetune::JobReport;
use crate::keys::Sha256;
use crate::metrics::MetricsWindow;
use crate::rollout::RolloutReport;
use crate::time::Timestamp;

/// ALPN of enrollment connections.
pub const ALPN_ENROLL: &[u8] = b"falaj-enroll/1";
/// ALPN of enrolled agents' connections.
pub const ALPN_AGENT: &[u8] = b"falaj-agent/1";
/// The name in the control plane's certificate that agents verify (trust is anchored in
/// the CA pinned at enrollment, not in DNS).
pub const SERVER_NAME: &str = "control.falaj";
/// Largest frame accepted on agents' sessions and fetch streams.
pub const MAX_FRAME: usize = 16 << 20;
/// Largest enrollment request or response: a token, a CSR, a certificate chain and the
/// trust root fit in a few KiB.
pub const MAX_ENROLL_FRAME: usize = 64 << 10;
/// Most chunks one fetch request may ask for.
pub const MAX_CHUNKS_PER_FETCH: usize = 4096;
/// Most metric windows in one [`AgentMessage::Windows`].
pub const MAX_WINDOWS_PER_BATCH: usize = 256;
/// Most audit lines in one [`AgentMessage::Audit`].
pub const MAX_AUDIT_PER_BATCH: usize = 256;

/// Enrollment: the token, and a CSR for a key pair that never leaves the agent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EnrollRequest {
    /// The token's text.
    pub token: String,
    /// A PKCS#10 certificate signing request (DER).
    #[serde(with = "serde_bytes")]
    pub csr_der: Vec<u8>,
    /// The agent's host name, for the fleet view.
    pub hostname: String,
    /// The agent's version.
    pub agent_version: String,
}

/// What an enrolled agent receives.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Enrollment {
    /// The agent's identity, as the control plane names it.
    pub agent_id: String,
    /// Its region.
    pub region: String,
    /// Its group.
    pub group: String,
    /// Its certificate (DER), signed by the CA.
    #[serde(with = "serde_bytes")]
    pub certificate_der: Vec<u8>,
    /// When the certificate expires.
    pub certificate_expires: Timestamp,
    /// The CA certificate (DER).
    #[serde(with = "serde_bytes")]
    pub ca_der: Vec<u8>,
    /// The trust root (`root.json`) whose keys sign bundles and desired state.
    #[serde(with = "serde_bytes")]
    pub trust_root: Vec<u8>,
}

/// The answer to an enrollment.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum EnrollResponse {
    /// Enrolled.
    Enrolled(Enrollment),
    /// Refused, with the reason.
    Refused(String),
}

/// A bundle an agent holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HeldBundle {
    /// The model.
    pub name: String,
    /// The version.
    pub version: u64,
    /// Its manifest's SHA-256.
    pub manifest_sha256: Sha256,
    /// Whether it is the served version of its name.
    pub active: bool,
    /// Whether the control plane manages it (installed from desired state, not imported).
    pub managed: bool,
    /// The engine serving it (`tract-cpu`, `wgpu-gpu`), when it is loaded.
    #[serde(default)]
    pub engine: Option<String>,
}

/// An inference engine an agent can serve models on.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EngineReport {
    /// The engine's name, as in model metadata (`tract-cpu`, `wgpu-gpu`).
    pub name: String,
    /// What it runs on: the GPU adapter's name, or the CPU's architecture and threads.
    pub device: String,
}

/// An agent's actual state, as it reports it.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ActualState {
    /// The version of the last desired-state document applied, if any.
    pub desired_version: Option<u64>,
    /// What it holds.
    pub bundles: Vec<HeldBundle>,
    /// Reconciliation problems, newest last, then the installed versions that failed to
    /// load (a sealed file that fails its tags, say), one line each.
    pub errors: Vec<String>,
    /// Whether every active model is loaded and serving (the agent's health).
    pub ready: bool,
    /// The agent's software version.
    pub agent_version: String,
    /// The fine-tune jobs its current document orders, and where each stands.
    pub jobs: Vec<JobReport>,
    /// The rollouts of its current document: the step in force, and any it rolled back.
    pub rollouts: Vec<RolloutReport>,
    /// The engines it can serve on (the CPU always; a GPU where one opened).
    #[serde(default)]
    pub engines: Vec<EngineReport>,
    /// The version of the trust root it verifies against.
    #[serde(default)]
    pub trust_version: u64,
}

/// Agent to control plane, on the session stream.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum AgentMessage {
    /// First message: who is here and what it holds.
    Hello(ActualState),
    /// After each reconciliation, and as a heartbeat.
    Report(ActualState),
    /// A request for a new certificate for a new key pair.
    Renew {
        /// The CSR (DER).
        #[serde(with = "serde_bytes")]
        csr_der: Vec<u8>,
    },
    /// Closed metric windows from the agent's outbox, oldest first; at most
    /// [`MAX_WINDOWS_PER_BATCH`]. Answered by [`ControlMessage::Ack`] once stored.
    Windows(Vec<SequencedWindow>),
    /// Lines of the agent's audit chain not yet acknowledged, in order; at most
    /// [`MAX_AUDIT_PER_BATCH`]. Answered by [`ControlMessage::AuditAck`] once stored.
    Audit(Vec<String>),
}

/// A metric window with its per-agent sequence number: the control plane stores each
/// (agent, sequence) once, however often it is sent.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SequencedWindow {
    /// The agent's sequence number for it, from 1, never reused.
    pub seq: u64,
    /// The window.
    pub window: MetricsWindow,
}

/// Control plane to agent, on the session stream.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ControlMessage {
    /// The current desired state.
    Desired(SignedDesired),
    /// A renewed certificate.
    Renewed {
        /// The certificate (DER).
        #[serde(with = "serde_bytes")]
        certificate_der: Vec<u8>,
        /// When it expires.
        expires: Timestamp,
    },
    /// A refused request, with the reason.
    Refused(String),
    /// These windows are committed (or were already): the agent may delete them.
    Ack {
        /// Their sequence numbers.
        seqs: Vec<u64>,
    },
    /// The agent's audit chain is stored up to this entry.
    AuditAck {
        /// The last entry stored.
        seq: u64,
    },
    /// Every version of the region's trust root after the first, oldest first (sent when
    /// a session starts, before any document signed under them): the agent takes those
    /// that follow the one it holds ([`crate::trust::TrustRoot::follow`]).
    TrustRoots(Vec<String>),
}

/// A request for content-addressed blobs (chunks and recipes), on a stream of its own.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FetchRequest {
    /// The blobs, by SHA-256.
    pub hashes: Vec<Sha256>,
}

/// Precedes each blob's bytes in a fetch response.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChunkHeader {
    /// The blob asked for.
    pub sha256: Sha256,
    /// Its size, or `None` if the control plane does not hold it (no bytes follow).
    pub size: Option<u32>,
}

/// Why a frame was refused.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum FrameError {
    /// The length prefix is over the reader's limit.
    #[error("frame of {len} bytes is larger than the {max} allowed")]
    TooLarge {
        /// The length announced.
        len: usize,
        /// The largest the reader accepts.
        max: usize,
    },
    /// The frame does not decode as the expected message.
    #[error("frame does not decode: {0}")]
    Malformed(String),
}

/// Encodes `message` as a frame (length prefix included).
pub fn encode<T: Serialize>(message: &T) -> Vec<u8> {
    let body = postcard::to_stdvec(message).expect("protocol messages always encode");
    let mut frame = Vec::with_capacity(4 + body.len());
    frame.extend_from_slice(&(body.len() as u32).to_be_bytes());
    frame.extend_from_slice(&body);
    frame
}

/// The body length announced by a frame's 4-byte prefix, refused over [`MAX_FRAME`].
pub fn frame_len(prefix: [u8; 4]) -> Result<usize, FrameError> {
    frame_len_within(prefix, MAX_FRAME)
}

/// The body length announced by a frame's 4-byte prefix, refused over `max`.
pub fn frame_len_within(prefix: [u8; 4], max: usize) -> Result<usize, FrameError> {
    let len = u32::from_be_bytes(prefix) as usize;
    if len > max {
        return Err(FrameError::TooLarge { len, max });
    }
    Ok(len)
}

/// Decodes a frame's body.
pub fn decode<T: DeserializeOwned>(body: &[u8]) -> Result<T, FrameError> {
    postcard::from_bytes(body).map_err(|e| FrameError::Malformed(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A finished regression job: its metrics have no accuracy, which a skipped field
    /// would make undecodable in postcard.
    fn job_report() -> JobReport {
        use crate::finetune::{
            EpochStats, Gate, HeadWeights, Hyperparameters, JobState, Lineage, Metrics, Objective,
        };
        let (before, after) =
            (Metrics { loss: 2.0, accuracy: None }, Metrics { loss: 1.0, accuracy: None });
        JobReport {
            id: "tune-1".into(),
            state: JobState::Succeeded,
            detail: Some("improved".into()),
            derived: Some("fault.ft1".into()),
            lineage: Some(Lineage {
                parent: "fault".into(),
                parent_version: 2,
                parent_manifest_sha256: Sha256([4; 32]),
                data_sha256: Sha256([5; 32]),
                train_rows: 8,
                held_out_rows: 2,
                objective: Objective::MeanSquaredError,
                hyperparameters: Hyperparameters::default(),
                engine: "cpu".into(),
                before,
                after,
                best_epoch: 1,
                epochs: vec![EpochStats { epoch: 1, train_loss: 1.5, validation: after }],
                gate: Gate::default().judge(&before, &after),
            }),
            weights: Some(HeadWeights {
                inputs: 1,
                outputs: 1,
                weights: vec![0.5],
                bias: vec![0.0],
            }),
        }
    }

    #[test]
    fn frames_round_trip() {
        let message = AgentMessage::Hello(ActualState {
            desired_version: Some(3),
            bundles: vec![HeldBundle {
                name: "fault".into(),
                version: 2,
                manifest_sha256: Sha256([4; 32]),
                active: true,
                managed: true,
                engine: Some("wgpu-gpu".into()),
            }],
            errors: vec!["disk full".into()],
            agent_version: "0.1.0".into(),
            ready: true,
            jobs: vec![job_report()],
            rollouts: vec![RolloutReport {
                id: "ro-1".into(),
                step: Some(2),
                rolled_back: true,
                reason: Some("error_rate<0.02 failed".into()),
                at: Some(Timestamp::from_unix(1_800_000_000)),
            }],
            engines: vec![EngineReport { name: "wgpu-gpu".into(), device: "NVIDIA H200".into() }],
            trust_version: 3,
        });
        let frame = encode(&message);
        let len = frame_len(frame[..4].try_into().unwrap()).unwrap();
        assert_eq!(len, frame.len() - 4);
        assert_eq!(decode::<AgentMessage>(&frame[4..]).unwrap(), message);
        let header = ChunkHeader { sha256: Sha256([1; 32]), size: Some(5) };
        assert_eq!(decode::<ChunkHeader>(&encode(&header)[4..]).unwrap(), header);
    }

    #[test]
    fn oversized_and_garbage_frames_are_refused() {
        let len = u32::MAX as usize;
        assert_eq!(
            frame_len(u32::MAX.to_be_bytes()),
            Err(FrameError::TooLarge { len, max: MAX_FRAME })
        );
        let prefix = (MAX_ENROLL_FRAME as u32 + 1).to_be_bytes();
        assert_eq!(
            frame_len_within(prefix, MAX_ENROLL_FRAME),
            Err(FrameError::TooLarge { len: MAX_ENROLL_FRAME + 1, max: MAX_ENROLL_FRAME })
        );
        assert_eq!(frame_len(prefix), Ok(MAX_ENROLL_FRAME + 1));
        assert!(matches!(
            decode::<AgentMessage>(&[0xff, 0xff, 0xff]),
            Err(FrameError::Malformed(_))
        ));
    }
}

/// Reading and writing frames on async streams.
///
/// A frame's body is read in chunks of at most [`io::READ_CHUNK`] bytes into a buffer that
/// grows as bytes arrive: a peer that announces a large frame and sends part of it holds
/// about what it sent (at most twice that, plus one chunk), not what it announced.
#[cfg(feature = "tokio")]
pub mod io {
    use std::sync::atomic::{AtomicU64, Ordering};

    use serde::Serialize;
    use serde::de::DeserializeOwned;
    use thiserror::Error;
    use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

    use super::{FrameError, MAX_FRAME, decode, encode, frame_len_within};

    /// The most bytes a frame's buffer grows by per read.
    pub const READ_CHUNK: usize = 64 << 10;

    /// Why a frame could not be read or written.
    #[derive(Debug, Error)]
    pub enum FrameIoError {
        /// The stream failed.
        #[error("stream: {0}")]
        Io(#[from] std::io::Error),
        /// The frame was refused.
        #[error(transparent)]
        Frame(#[from] FrameError),
    }

    /// Reads one frame of at most [`MAX_FRAME`] bytes; `None` at a clean end of stream
    /// (before any byte of a frame).
    pub async fn read_frame<T: DeserializeOwned>(
        stream: &mut (impl AsyncRead + Unpin),
    ) -> Result<Option<T>, FrameIoError> {
        read_frame_within(stream, MAX_FRAME, &AtomicU64::new(0)).await
    }

    /// Reads one frame of at most `max` bytes (refused as soon as its prefix announces
    /// more); `None` at a clean end of stream. While it reads, `held` counts the bytes its
    /// buffer holds (capacity, not length); they are subtracted again when it returns or
    /// is dropped, so a caller that shares one counter among readers sees their total.
    pub async fn read_frame_within<T: DeserializeOwned>(
        stream: &mut (impl AsyncRead + Unpin),
        max: usize,
        held: &AtomicU64,
    ) -> Result<Option<T>, FrameIoError> {
        let mut prefix = [0u8; 4];
        let mut got = 0;
        while got < 4 {
            let n = stream.read(&mut prefix[got..]).await?;
            if n == 0 {
                if got == 0 {
                    return Ok(None);
                }
                return Err(std::io::Error::from(std::io::ErrorKind::UnexpectedEof).into());
            }
            got += n;
        }
        let len = frame_len_within(prefix, max)?;
        let mut body =
            FrameBuffer { bytes: Vec::with_capacity(len.min(READ_CHUNK)), counted: 0, held };
        body.count();
        while body.bytes.len() < len {
            let start = body.bytes.len();
            let want = (len - start).min(READ_CHUNK);
            body.bytes.resize(start + want, 0);
            body.count();
            let n = stream.read(&mut body.bytes[start..]).await?;
            body.bytes.truncate(start + n);
            if n == 0 {
                return Err(std::io::Error::from(std::io::ErrorKind::UnexpectedEof).into());
            }
        }
        Ok(Some(decode(&body.bytes)?))
    }

    /// A frame's buffer, whose capacity is counted in `held` until it is dropped.
    struct FrameBuffer<'a> {
        bytes: Vec<u8>,
        counted: u64,
        held: &'a AtomicU64,
    }

    impl FrameBuffer<'_> {
        fn count(&mut self) {
            let capacity = self.bytes.capacity() as u64;
            if capacity > self.counted {
                self.held.fetch_add(capacity - self.counted, Ordering::Relaxed);
                self.counted = capacity;
            }
        }
    }

    impl Drop for FrameBuffer<'_> {
        fn drop(&mut self) {
            self.held.fetch_sub(self.counted, Ordering::Relaxed);
        }
    }

    /// Writes one frame.
    pub async fn write_frame<T: Serialize>(
        stream: &mut (impl AsyncWrite + Unpin),
        message: &T,
    ) -> Result<(), FrameIoError> {
        stream.write_all(&encode(message)).await?;
        Ok(())
    }

    #[cfg(test)]
    mod tests {
        use std::pin::Pin;
        use std::sync::Arc;
        use std::task::{Context, Poll};

        use tokio::io::ReadBuf;

        use super::*;
        use crate::protocol::{EnrollRequest, MAX_ENROLL_FRAME};

        /// Hands out `data` in pieces of `piece` bytes, then ends; on every read checks
        /// that the reader holds at most twice what it was given plus one chunk.
        struct Trickle {
            data: Vec<u8>,
            at: usize,
            piece: usize,
            held: Arc<AtomicU64>,
            peak: u64,
        }

        impl AsyncRead for Trickle {
            fn poll_read(
                mut self: Pin<&mut Self>,
                _: &mut Context<'_>,
                buf: &mut ReadBuf<'_>,
            ) -> Poll<std::io::Result<()>> {
                let held = self.held.load(Ordering::Relaxed);
                assert!(
                    held <= 2 * self.at as u64 + READ_CHUNK as u64,
                    "{held} bytes held after {} received",
                    self.at
                );
                self.peak = self.peak.max(held);
                let n = self.piece.min(self.data.len() - self.at).min(buf.remaining());
                let at = self.at;
                buf.put_slice(&self.data[at..at + n]);
                self.at += n;
                Poll::Ready(Ok(()))
            }
        }

        fn trickle(data: Vec<u8>, piece: usize) -> Trickle {
            Trickle { data, at: 0, piece, held: Arc::new(AtomicU64::new(0)), peak: 0 }
        }

        #[tokio::test]
        async fn a_partly_sent_frame_holds_what_arrived_not_what_was_announced() {
            // 15 MiB announced, 6 MiB sent, then the stream ends.
            let mut data = (15u32 << 20).to_be_bytes().to_vec();
            data.resize(4 + (6 << 20), 7);
            let mut stream = trickle(data, 100_000);
            let held = Arc::clone(&stream.held);
            let read = read_frame_within::<Vec<u8>>(&mut stream, MAX_FRAME, &held).await;
            assert!(
                matches!(read, Err(FrameIoError::Io(e)) if e.kind() == std::io::ErrorKind::UnexpectedEof)
            );
            assert!(stream.peak >= 6 << 20 && stream.peak <= (12 << 20) + READ_CHUNK as u64);
            assert_eq!(held.load(Ordering::Relaxed), 0, "released when the read ends");
        }

        #[tokio::test]
        async fn an_oversized_announcement_is_refused_before_any_body_is_read() {
            let mut data = (15u32 << 20).to_be_bytes().to_vec();
            data.resize(4 + 1000, 7);
            let mut stream = trickle(data, 4);
            let held = Arc::clone(&stream.held);
            let read = read_frame_within::<EnrollRequest>(&mut stream, MAX_ENROLL_FRAME, &held);
            match read.await {
                Err(FrameIoError::Frame(FrameError::TooLarge { len, max })) => {
                    assert_eq!((len, max), (15 << 20, MAX_ENROLL_FRAME));
                }
                other => panic!("expected a refusal, got {other:?}"),
            }
            assert_eq!(stream.at, 4, "nothing past the prefix was read");
            assert_eq!(stream.peak, 0);
        }

        #[tokio::test]
        async fn frames_within_the_limit_round_trip_in_small_pieces() {
            let request = EnrollRequest {
                token: "t".into(),
                csr_der: vec![9; 3000],
                hostname: "h".into(),
                agent_version: "0".into(),
            };
            let mut stream = trickle(encode(&request), 7);
            let held = Arc::clone(&stream.held);
            let read = read_frame_within::<EnrollRequest>(&mut stream, MAX_ENROLL_FRAME, &held);
            assert_eq!(read.await.unwrap(), Some(request));
            assert_eq!(held.load(Ordering::Relaxed), 0);
            assert!(read_frame::<EnrollRequest>(&mut stream).await.unwrap().is_none());
        }
    }
}
