//! Decompressing NARs ([`decoder`], the one place that picks a library per compression), and
//! handing a big NAR's decoding to a thread of its own when a core is idle, so that decoding
//! one NAR overlaps with hashing and unpacking it (`decode_and_unpack`).
//!
//! A download's NAR is decoded on the thread that hashes and unpacks it, until a core is
//! spare (`Cores`: fewer threads work on NARs than there are cores, as at the end of a
//! pull, or when a closure has one big NAR); then, for a NAR of at least
//! `HANDOVER_MIN_NAR_SIZE` bytes, the decoder moves to a second thread and sends the decoded
//! NAR in chunks over a bounded channel. So the threads working on NARs never outnumber
//! the cores because of this: more NARs in work than cores (downloads in flight, for the
//! network's sake) keep one thread each.
//!
//! Memory is bounded: at most `DECODED_CHUNKS` chunks of `DECODED_CHUNK` bytes wait in
//! the channel (512 KiB), plus the chunk each thread holds, so at most 640 KiB of decoded
//! NAR per download on top of the decoder's own window. Errors travel down the channel in
//! order, after the bytes decoded before them; when the reading side stops (an archive
//! error, a size or hash mismatch), the decoder's next send fails and it stops reading
//! its input too; both threads have ended when `decode_and_unpack` returns.

use std::io::{self, Read};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender};
use std::thread::{Scope, ScopedJoinHandle};

use crate::nix::narinfo::Compression;

/// Decoded bytes per chunk handed from the decoder to the unpacker.
pub(crate) const DECODED_CHUNK: usize = 64 << 10;

/// Decoded chunks waiting between the decoder and the unpacker.
pub(crate) const DECODED_CHUNKS: usize = 8;

/// The least NarSize worth a decoding thread of its own: a smaller NAR is over before a
/// second thread would matter (and many small NARs are decoded in parallel with each other).
pub(crate) const HANDOVER_MIN_NAR_SIZE: u64 = 1 << 20;

/// A decompressing reader for `compression`. xz is liblzma's single-threaded stream decoder
/// (multi-block streams are decoded block after block on one thread), over concatenated
/// streams as `xz -d` reads them.
pub fn decoder<'a, R: Read + Send + 'a>(
    compression: Compression,
    r: R,
) -> io::Result<Box<dyn Read + Send + 'a>> {
    Ok(match compression {
        Compression::None => Box::new(r),
        Compression::Xz => Box::new(xz2::read::XzDecoder::new_multi_decoder(r)),
        Compression::Zstd => Box::new(zstd::stream::read::Decoder::new(r)?),
        Compression::Bzip2 => Box::new(bzip2::read::MultiBzDecoder::new(r)),
    })
}

/// The threads working on NARs, against the cores: a NAR's own thread counts always
/// ([`Cores::worker`]); a second, decoding thread only takes a spare core ([`Cores::spare`]).
#[derive(Debug)]
pub(crate) struct Cores {
    cores: usize,
    busy: AtomicUsize,
}

/// One thread counted in [`Cores`] until dropped.
#[derive(Debug)]
pub(crate) struct Slot<'a>(&'a Cores);

impl Drop for Slot<'_> {
    fn drop(&mut self) {
        self.0.busy.fetch_sub(1, Ordering::SeqCst);
    }
}

impl Cores {
    /// `cores` cores (at least one).
    pub(crate) fn new(cores: usize) -> Self {
        Cores {
            cores: cores.max(1),
            busy: AtomicUsize::new(0),
        }
    }

    /// The threads working on NARs now.
    pub(crate) fn busy(&self) -> usize {
        self.busy.load(Ordering::SeqCst)
    }

    /// Counts a NAR's own thread.
    pub(crate) fn worker(&self) -> Slot<'_> {
        self.busy.fetch_add(1, Ordering::SeqCst);
        Slot(self)
    }

    /// A slot for one more thread, if fewer threads than cores work on NARs.
    pub(crate) fn spare(&self) -> Option<Slot<'_>> {
        self.busy
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |b| {
                (b < self.cores).then_some(b + 1)
            })
            .ok()
            .map(|_| Slot(self))
    }
}

/// Runs `unpack` on the calling thread (counted in `cores`) over the NAR `decoded` yields.
/// With `handover`, the decoding moves to a second thread as soon as `cores` has a spare
/// core. Returns what `unpack` returned once every thread has ended; `unpack` must not keep
/// its reader (once it returns, a decoder on its own thread stops at its next send).
pub(crate) fn decode_and_unpack<D, T>(
    decoded: D,
    cores: &Cores,
    handover: bool,
    unpack: impl FnOnce(&mut dyn Read) -> T,
) -> Result<T, PipelineError>
where
    D: Read + Send,
{
    let _worker = cores.worker();
    std::thread::scope(|scope| {
        let mut reader = Handover {
            scope,
            cores,
            state: State::Inline(decoded),
            handover,
            until_check: 0,
        };
        let out = unpack(&mut reader);
        reader.finish()?;
        Ok(out)
    })
}

/// Why the decoding thread could not do its part.
#[derive(Debug, thiserror::Error)]
pub enum PipelineError {
    #[error("cannot start the decoding thread: {source}")]
    Spawn {
        #[source]
        source: io::Error,
    },
    #[error("the decoding thread panicked")]
    Panicked,
}

/// Where the decoding happens.
enum State<'scope, D> {
    /// On the unpacking thread.
    Inline(D),
    /// On its own thread, sending chunks.
    Handed(DecodedReader, ScopedJoinHandle<'scope, ()>),
    /// Failed to hand over: the decoder is gone.
    Gone,
}

/// A `Read` over the decoded NAR that hands the decoder over to a thread of its own once
/// a core is spare.
struct Handover<'scope, 'env, D> {
    scope: &'scope Scope<'scope, 'env>,
    cores: &'env Cores,
    state: State<'scope, D>,
    handover: bool,
    /// Decoded bytes to read inline before looking for a spare core again.
    until_check: usize,
}

impl<'scope, 'env, D: Read + Send + 'env> Handover<'scope, 'env, D> {
    /// Moves the decoder to a thread of its own if a core is spare.
    fn try_hand_over(&mut self) -> io::Result<()> {
        let Some(slot) = self.cores.spare() else {
            return Ok(());
        };
        let State::Inline(decoder) = std::mem::replace(&mut self.state, State::Gone) else {
            return Ok(());
        };
        let (tx, rx) = sync_channel(DECODED_CHUNKS);
        let handle = std::thread::Builder::new()
            .name("nar-decode".into())
            .spawn_scoped(self.scope, move || {
                let _slot = slot;
                decode_into(decoder, &tx)
            })
            .map_err(|source| io::Error::other(PipelineError::Spawn { source }))?;
        tracing::debug!(
            busy = self.cores.busy(),
            cores = self.cores.cores,
            "decoding on a thread of its own"
        );
        self.state = State::Handed(DecodedReader::new(rx), handle);
        Ok(())
    }

    /// Ends the decoding thread, if any: it stops at its next send, the reader being gone.
    fn finish(self) -> Result<(), PipelineError> {
        match self.state {
            State::Handed(reader, handle) => {
                drop(reader);
                handle.join().map_err(|_| PipelineError::Panicked)
            }
            State::Inline(_) | State::Gone => Ok(()),
        }
    }
}

impl<'scope, 'env, D: Read + Send + 'env> Read for Handover<'scope, 'env, D> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.handover && self.until_check == 0 && matches!(self.state, State::Inline(_)) {
            self.until_check = DECODED_CHUNK;
            self.try_hand_over()?;
        }
        match &mut self.state {
            State::Inline(decoder) => {
                let n = decoder.read(buf)?;
                self.until_check = self.until_check.saturating_sub(n);
                Ok(n)
            }
            State::Handed(reader, _) => reader.read(buf),
            State::Gone => Err(io::Error::other("the decoder is gone")),
        }
    }
}

/// Reads `input` to its end or first error, sending full chunks (the last one may be
/// short), then the error if any. Stops as soon as the receiver is gone.
fn decode_into<D: Read>(mut input: D, tx: &SyncSender<io::Result<Vec<u8>>>) {
    loop {
        let mut chunk = vec![0u8; DECODED_CHUNK];
        let mut filled = 0;
        let mut failure = None;
        while filled < chunk.len() {
            match input.read(&mut chunk[filled..]) {
                Ok(0) => break,
                Ok(n) => filled += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    failure = Some(e);
                    break;
                }
            }
        }
        let end = filled < chunk.len();
        chunk.truncate(filled);
        if filled > 0 && tx.send(Ok(chunk)).is_err() {
            return;
        }
        if let Some(e) = failure {
            let _ = tx.send(Err(e));
            return;
        }
        if end {
            return;
        }
    }
}

/// A `Read` over the decoded chunks: a closed channel is the end of the NAR, an `Err` item a
/// read error (of the same kind the decoder met).
pub(crate) struct DecodedReader {
    rx: Receiver<io::Result<Vec<u8>>>,
    cur: Vec<u8>,
    pos: usize,
}

impl DecodedReader {
    fn new(rx: Receiver<io::Result<Vec<u8>>>) -> Self {
        DecodedReader {
            rx,
            cur: Vec::new(),
            pos: 0,
        }
    }
}

impl Read for DecodedReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        while self.pos == self.cur.len() {
            match self.rx.recv() {
                Ok(Ok(chunk)) => {
                    self.cur = chunk;
                    self.pos = 0;
                }
                Ok(Err(e)) => return Err(e),
                Err(_) => return Ok(0),
            }
        }
        let n = buf.len().min(self.cur.len() - self.pos);
        buf[..n].copy_from_slice(&self.cur[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    /// A reader of `len` bytes that counts how many it has given, and then fails if
    /// `fail` is set.
    struct Source {
        left: usize,
        given: Arc<AtomicUsize>,
        fail: Option<io::ErrorKind>,
    }

    impl Read for Source {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            if self.left == 0 {
                return match self.fail {
                    Some(kind) => Err(io::Error::new(kind, "broken stream")),
                    None => Ok(0),
                };
            }
            // Odd sizes, so chunks are filled from several reads.
            let n = buf.len().min(self.left).min(10_007);
            for (i, b) in buf[..n].iter_mut().enumerate() {
                *b = ((self.given.load(Ordering::SeqCst) + i) % 251) as u8;
            }
            self.left -= n;
            self.given.fetch_add(n, Ordering::SeqCst);
            Ok(n)
        }
    }

    fn source(len: usize, fail: Option<io::ErrorKind>) -> (Source, Arc<AtomicUsize>) {
        let given = Arc::new(AtomicUsize::new(0));
        let s = Source {
            left: len,
            given: given.clone(),
            fail,
        };
        (s, given)
    }

    /// Reads everything through `decode_and_unpack` on `cores` cores, one of them taken by
    /// another NAR if `other`; returns the bytes, the result, and the most threads seen
    /// working on NARs while reading.
    fn read_all(src: Source, cores: usize, other: bool) -> (Vec<u8>, io::Result<()>, usize) {
        let cores = Cores::new(cores);
        let _other = other.then(|| cores.worker());
        let mut busy = 0;
        let (v, r) = decode_and_unpack(src, &cores, true, |r| {
            let mut v = Vec::new();
            let mut buf = vec![0u8; 4096];
            let res = loop {
                match r.read(&mut buf) {
                    Ok(0) => break Ok(()),
                    Ok(n) => v.extend_from_slice(&buf[..n]),
                    Err(e) => break Err(e),
                }
                busy = busy.max(cores.busy());
            };
            (v, res)
        })
        .unwrap();
        assert_eq!(cores.busy(), usize::from(other), "threads still counted");
        (v, r, busy)
    }

    #[test]
    fn a_spare_core_takes_the_decoding_and_every_byte_arrives_in_order() {
        let len = DECODED_CHUNK * (DECODED_CHUNKS * 3) + 123;
        for (cores, other, threads) in [(2, false, 2), (1, false, 1), (2, true, 2), (3, true, 3)] {
            let (src, _) = source(len, None);
            let (out, r, busy) = read_all(src, cores, other);
            r.unwrap();
            assert_eq!(out.len(), len);
            assert!(out.iter().enumerate().all(|(i, b)| *b == (i % 251) as u8));
            // This NAR's thread, its decoder if a core was spare, and the other NAR's.
            assert_eq!(busy, threads, "{cores} cores, other NAR: {other}");
        }
    }

    #[test]
    fn an_error_arrives_after_the_bytes_before_it_with_its_kind() {
        for cores in [1, 2] {
            let len = DECODED_CHUNK * 2 + 5;
            let (src, _) = source(len, Some(io::ErrorKind::UnexpectedEof));
            let (out, r, _) = read_all(src, cores, false);
            let e = r.unwrap_err();
            assert_eq!(out.len(), len);
            assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof);
            assert_eq!(e.to_string(), "broken stream");
        }
    }

    #[test]
    fn a_reader_that_stops_early_stops_the_decoder_within_the_bound() {
        // 64 MiB to decode; the reader takes a byte past the first check and gives up.
        let (src, given) = source(64 << 20, None);
        let cores = Cores::new(2);
        decode_and_unpack(src, &cores, true, |r| {
            let mut b = vec![0u8; DECODED_CHUNK + 1];
            r.read_exact(&mut b).unwrap();
            assert_eq!(cores.busy(), 2);
        })
        .unwrap();
        assert_eq!(cores.busy(), 0);
        // Read inline before the hand-over (at most one chunk and one read), then the
        // channel's chunks, the one being sent and the one being filled.
        let bound = 2 * DECODED_CHUNK + DECODED_CHUNK * (DECODED_CHUNKS + 2);
        let read = given.load(Ordering::SeqCst);
        assert!(read <= bound, "{read} bytes decoded, bound {bound}");
    }

    #[test]
    fn a_panicking_decoder_is_an_error_not_a_hang() {
        struct Panics;
        impl Read for Panics {
            fn read(&mut self, _: &mut [u8]) -> io::Result<usize> {
                panic!("decoder bug")
            }
        }
        let cores = Cores::new(2);
        let e = decode_and_unpack(Panics, &cores, true, |r| {
            let mut v = Vec::new();
            r.read_to_end(&mut v).map(|_| v.len())
        })
        .unwrap_err();
        assert_eq!(e.to_string(), "the decoding thread panicked");
        assert_eq!(cores.busy(), 0);
    }
}
