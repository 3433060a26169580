//! A connection's small writes held until its task's turn ends, so that what h2 writes in
//! one turn leaves in one write: a ModelInfer answer's HEADERS, DATA and trailers in one
//! segment rather than two.
//!
//! h2 writes a DATA frame of 256 bytes or more without copying it (its payload chained
//! after the frame head), and cannot queue another frame behind one so chained: it flushes
//! the socket first. An answer of that size (the sample model's at batch 64, about 1.4 KiB)
//! left in two writes, HEADERS and DATA, then the trailers, and the client read twice a
//! call, mostly waking in between (`strace -f` of `benches/grpc.rs`: three `writev` a call
//! with the client's, against REST's two; the client's second read the trailers' 10
//! bytes). [`Coalesced`] takes h2's
//! writes into a buffer while they are small, treats h2's flushes as done, and the
//! connection's task writes the buffer once it has nothing left to do ([`Flush`], after
//! each poll of the connection and its calls). Writes that would take the buffer past
//! [`HOLD`] go out at once, behind what is held, in one vectored write; a shutdown writes
//! what is held first.
//!
//! Reads the other way: h2 reads into what is left of its buffer's capacity, often less
//! than a call (a third of the sample model's 2,147-byte calls at batch 64 were read in
//! two `recvfrom`, 1,798 then 349 bytes). A read into less than [`READ`] bytes reads up to
//! [`READ`] into a buffer of the connection's and is served from it; a larger one reads
//! straight into h2's buffer.

use std::io::{self, IoSlice};
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// The most bytes held for the end of a turn: a DATA frame of the default 16 KiB frame size
/// goes out at once rather than copied.
pub(super) const HOLD: usize = 16 << 10;

/// The bytes a read from the socket asks for when h2 asks for fewer: 16 KiB and a frame
/// head, so a small call (its HEADERS and a DATA frame) comes in one read. h2 asks for
/// more once it knows a larger frame is coming, and then reads straight into its buffer.
pub(super) const READ: usize = (16 << 10) + 9;

/// The connection's I/O as h2 sees it ([`pair`]).
pub(super) struct Coalesced<IO> {
    shared: Arc<Mutex<Held<IO>>>,
}

/// The connection's task's handle on the held bytes: [`Flush::poll_flush`] writes them.
pub(super) struct Flush<IO> {
    shared: Arc<Mutex<Held<IO>>>,
}

struct Held<IO> {
    io: IO,
    /// Bytes written by h2, not yet to the socket; `out[sent..]` is still to go.
    out: Vec<u8>,
    sent: usize,
    /// Bytes read from the socket, not yet by h2: `read[taken..filled]`. Allocated at the
    /// first read that needs it.
    read: Box<[u8]>,
    taken: usize,
    filled: usize,
}

/// `io` for h2 to write through, and the task's handle to write what it holds.
pub(super) fn pair<IO>(io: IO) -> (Coalesced<IO>, Flush<IO>) {
    let shared = Arc::new(Mutex::new(Held {
        io,
        out: Vec::new(),
        sent: 0,
        read: Box::default(),
        taken: 0,
        filled: 0,
    }));
    (Coalesced { shared: Arc::clone(&shared) }, Flush { shared })
}

/// The held state. Both handles are used from the connection's one task, one after the
/// other, so the lock is never contended; a panic while it was held (a bug) leaves bytes
/// that are still whole, so a poisoned lock is taken as it is.
fn lock<IO>(shared: &Mutex<Held<IO>>) -> MutexGuard<'_, Held<IO>> {
    shared.lock().unwrap_or_else(PoisonError::into_inner)
}

impl<IO: AsyncRead + Unpin> Held<IO> {
    fn poll_read(&mut self, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        if self.taken == self.filled {
            if buf.remaining() >= READ {
                return Pin::new(&mut self.io).poll_read(cx, buf);
            }
            if self.read.is_empty() {
                self.read = vec![0; READ].into_boxed_slice();
            }
            let mut into = ReadBuf::new(&mut self.read);
            std::task::ready!(Pin::new(&mut self.io).poll_read(cx, &mut into))?;
            (self.taken, self.filled) = (0, into.filled().len());
        }
        let n = buf.remaining().min(self.filled - self.taken);
        buf.put_slice(&self.read[self.taken..self.taken + n]);
        self.taken += n;
        Poll::Ready(Ok(()))
    }
}

impl<IO: AsyncWrite + Unpin> Held<IO> {
    /// Writes what is held until it is all out.
    fn poll_out(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.sent < self.out.len() {
            let n =
                std::task::ready!(Pin::new(&mut self.io).poll_write(cx, &self.out[self.sent..]))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.sent += n;
        }
        self.out.clear();
        self.sent = 0;
        Poll::Ready(Ok(()))
    }

    /// Takes `bufs`: held when they fit, else written behind what is held.
    fn poll_take(&mut self, cx: &mut Context<'_>, bufs: &[IoSlice<'_>]) -> Poll<io::Result<usize>> {
        let len: usize = bufs.iter().map(|b| b.len()).sum();
        if self.out.len() - self.sent + len <= HOLD {
            if self.sent > 0 {
                self.out.drain(..self.sent);
                self.sent = 0;
            }
            for buf in bufs {
                self.out.extend_from_slice(buf);
            }
            return Poll::Ready(Ok(len));
        }
        loop {
            let held = self.out.len() - self.sent;
            if held == 0 {
                self.out.clear();
                self.sent = 0;
                return Pin::new(&mut self.io).poll_write_vectored(cx, bufs);
            }
            // What is held, then as many of `bufs` as fit in one call.
            let mut slices = [IoSlice::new(&[]); 16];
            slices[0] = IoSlice::new(&self.out[self.sent..]);
            let mut count = 1;
            for buf in bufs.iter().filter(|b| !b.is_empty()).take(slices.len() - 1) {
                slices[count] = *buf;
                count += 1;
            }
            let n = std::task::ready!(
                Pin::new(&mut self.io).poll_write_vectored(cx, &slices[..count])
            )?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            if n < held {
                self.sent += n;
                continue;
            }
            self.out.clear();
            self.sent = 0;
            if n > held {
                return Poll::Ready(Ok(n - held));
            }
            // Exactly what was held: `bufs` go next, without holding them.
        }
    }
}

impl<IO: AsyncWrite + Unpin> Flush<IO> {
    /// Writes what h2 wrote since the last call; ready once it is all out.
    pub(super) fn poll_flush(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let mut held = lock(&self.shared);
        if held.out.is_empty() {
            return Poll::Ready(Ok(()));
        }
        std::task::ready!(held.poll_out(cx))?;
        Pin::new(&mut held.io).poll_flush(cx)
    }
}

impl<IO: AsyncRead + Unpin> AsyncRead for Coalesced<IO> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        lock(&self.shared).poll_read(cx, buf)
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for Coalesced<IO> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        lock(&self.shared).poll_take(cx, &[IoSlice::new(buf)])
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        lock(&self.shared).poll_take(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    /// Done as far as h2 is concerned: the task writes what is held at the end of its turn.
    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let mut held = lock(&self.shared);
        std::task::ready!(held.poll_out(cx))?;
        Pin::new(&mut held.io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A socket that records each write call and takes at most `take` bytes of each (all
    /// when `None`), or none (pending) when `full`.
    /// What it reads: the chunks in `arriving`, one a read call, counted in `reads`.
    #[derive(Default)]
    struct Socket {
        writes: Vec<Vec<u8>>,
        take: Option<usize>,
        full: bool,
        shut: bool,
        arriving: std::collections::VecDeque<Vec<u8>>,
        reads: usize,
    }

    impl AsyncRead for Socket {
        fn poll_read(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
            buf: &mut ReadBuf<'_>,
        ) -> Poll<io::Result<()>> {
            self.reads += 1;
            let Some(mut chunk) = self.arriving.pop_front() else { return Poll::Pending };
            let n = buf.remaining().min(chunk.len());
            buf.put_slice(&chunk[..n]);
            if n < chunk.len() {
                self.arriving.push_front(chunk.split_off(n));
            }
            Poll::Ready(Ok(()))
        }
    }

    impl AsyncWrite for Socket {
        fn poll_write(
            self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<io::Result<usize>> {
            self.poll_write_vectored(cx, &[IoSlice::new(buf)])
        }

        fn poll_write_vectored(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
            bufs: &[IoSlice<'_>],
        ) -> Poll<io::Result<usize>> {
            if self.full {
                return Poll::Pending;
            }
            let all: Vec<u8> = bufs.iter().flat_map(|b| b.iter().copied()).collect();
            let n = self.take.map_or(all.len(), |t| t.min(all.len()));
            self.writes.push(all[..n].to_vec());
            Poll::Ready(Ok(n))
        }

        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }

        fn poll_shutdown(mut self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            self.shut = true;
            Poll::Ready(Ok(()))
        }
    }

    fn cx() -> Context<'static> {
        Context::from_waker(std::task::Waker::noop())
    }

    /// Writes `bufs` as h2 does: again until all of it is taken.
    fn write(io: &mut Coalesced<Socket>, mut bytes: &[u8]) {
        while !bytes.is_empty() {
            match Pin::new(&mut *io).poll_write(&mut cx(), bytes) {
                Poll::Ready(Ok(n)) => {
                    assert!(n > 0, "a write took nothing");
                    bytes = &bytes[n..];
                }
                other => panic!("write: {other:?}"),
            }
        }
        assert!(Pin::new(&mut *io).poll_flush(&mut cx()).is_ready());
    }

    fn writes(flush: &Flush<Socket>) -> Vec<Vec<u8>> {
        std::mem::take(&mut lock(&flush.shared).io.writes)
    }

    /// Reads into `capacity` bytes at a time until the socket has nothing more.
    fn read_all(io: &mut Coalesced<Socket>, capacity: usize) -> Vec<u8> {
        let mut all = Vec::new();
        loop {
            let mut space = vec![0; capacity];
            let mut buf = ReadBuf::new(&mut space);
            match Pin::new(&mut *io).poll_read(&mut cx(), &mut buf) {
                Poll::Ready(Ok(())) if buf.filled().is_empty() => return all,
                Poll::Ready(Ok(())) => all.extend(buf.filled()),
                Poll::Ready(Err(err)) => panic!("read: {err}"),
                Poll::Pending => return all,
            }
        }
    }

    #[test]
    fn small_reads_are_served_from_one_socket_read() {
        let call: Vec<u8> = (0..2147u32).map(|i| (i % 253) as u8).collect();
        let socket = Socket { arriving: [call.clone()].into(), ..Socket::default() };
        let (mut io, flush) = pair(socket);
        assert_eq!(read_all(&mut io, 1798), call);
        assert_eq!(lock(&flush.shared).io.reads, 2, "one read for the call, one to find it empty");
    }

    #[test]
    fn large_reads_go_straight_to_the_caller() {
        let large = vec![5u8; 3 * READ];
        let socket = Socket { arriving: [large.clone()].into(), ..Socket::default() };
        let (mut io, flush) = pair(socket);
        assert_eq!(read_all(&mut io, READ), large);
        assert_eq!(lock(&flush.shared).io.reads, 4);
        assert!(lock(&flush.shared).read.is_empty(), "no buffer of its own needed");
    }

    #[test]
    fn small_writes_of_a_turn_leave_in_one_write() {
        let (mut io, flush) = pair(Socket::default());
        write(&mut io, b"headers");
        write(&mut io, &[7; 1400]);
        write(&mut io, b"trailers");
        assert!(writes(&flush).is_empty(), "nothing written before the turn ends");
        assert!(flush.poll_flush(&mut cx()).is_ready());
        let mut expected = b"headers".to_vec();
        expected.extend([7; 1400]);
        expected.extend(b"trailers");
        assert_eq!(writes(&flush), vec![expected]);
        assert!(flush.poll_flush(&mut cx()).is_ready());
        assert!(writes(&flush).is_empty(), "an empty turn writes nothing");
    }

    #[test]
    fn a_large_write_goes_out_behind_what_is_held() {
        let (mut io, flush) = pair(Socket::default());
        write(&mut io, b"head");
        let large = vec![9u8; HOLD + 1];
        write(&mut io, &large);
        let mut expected = b"head".to_vec();
        expected.extend(&large);
        assert_eq!(writes(&flush), vec![expected], "one write, in order");
        assert!(flush.poll_flush(&mut cx()).is_ready());
        assert!(writes(&flush).is_empty());
    }

    #[test]
    fn partial_writes_keep_the_order() {
        let (mut io, flush) = pair(Socket { take: Some(1000), ..Socket::default() });
        let first: Vec<u8> = (0..3000u32).map(|i| (i % 251) as u8).collect();
        let large: Vec<u8> = (0..HOLD as u32 + 500).map(|i| (i % 241) as u8).collect();
        write(&mut io, &first);
        write(&mut io, &large);
        write(&mut io, b"tail");
        while !lock(&flush.shared).out.is_empty() {
            assert!(flush.poll_flush(&mut cx()).is_ready());
        }
        let sent: Vec<u8> = writes(&flush).concat();
        let mut expected = first;
        expected.extend(&large);
        expected.extend(b"tail");
        assert_eq!(sent, expected);
    }

    #[test]
    fn a_full_socket_keeps_the_bytes_and_a_shutdown_writes_them_first() {
        let (mut io, flush) = pair(Socket { full: true, ..Socket::default() });
        write(&mut io, b"goaway");
        assert!(flush.poll_flush(&mut cx()).is_pending());
        assert!(
            Pin::new(&mut io).poll_write(&mut cx(), &vec![1u8; HOLD]).is_pending(),
            "no more is held past the limit while the socket is full"
        );
        lock(&flush.shared).io.full = false;
        assert!(Pin::new(&mut io).poll_shutdown(&mut cx()).is_ready());
        let held = lock(&flush.shared);
        assert_eq!(held.io.writes, vec![b"goaway".to_vec()]);
        assert!(held.io.shut);
    }
}
