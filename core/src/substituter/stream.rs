//! The blocking half of a NAR download: body chunks from a bounded channel → decompress →
//! SHA-256 and byte count → unpack into the store's staging area → verify → commit.
//! One pass, no temporary NAR file.

use std::io::{self, Read};
use std::sync::Arc;

use bytes::{Buf, Bytes};
use tokio::sync::mpsc;
use url::Url;

use super::error::SubstituteError;
use crate::nix::hash::HashingReader;
use crate::nix::nar::{NarError, NarLimits};
use crate::nix::narinfo::Compression;
use crate::nix::NarInfo;
use crate::store::unpack::UnpackError;
use crate::store::{PathInfo, PathLock, Staging, Store, StoreError};

/// Chunks in flight between the network task and the unpacker.
pub(crate) const CHANNEL_CHUNKS: usize = 32;

/// A `Read` over chunks received from an async task. A closed channel is end of input;
/// an `Err` item is returned as a read error.
pub(crate) struct ChannelReader {
    rx: mpsc::Receiver<io::Result<Bytes>>,
    cur: Bytes,
}

impl ChannelReader {
    pub(crate) fn new(rx: mpsc::Receiver<io::Result<Bytes>>) -> Self {
        ChannelReader {
            rx,
            cur: Bytes::new(),
        }
    }
}

impl Read for ChannelReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        while self.cur.is_empty() {
            match self.rx.blocking_recv() {
                Some(Ok(b)) => self.cur = b,
                Some(Err(e)) => return Err(e),
                None => return Ok(0),
            }
        }
        let n = buf.len().min(self.cur.len());
        buf[..n].copy_from_slice(&self.cur[..n]);
        self.cur.advance(n);
        Ok(n)
    }
}

/// A decompressing reader for `compression`.
pub(crate) fn decoder<'a, R: Read + 'a>(
    compression: Compression,
    r: R,
) -> io::Result<Box<dyn Read + 'a>> {
    Ok(match compression {
        Compression::None => Box::new(r),
        Compression::Xz => Box::new(xz2::read::XzDecoder::new_multi_decoder(r)),
        Compression::Zstd => Box::new(zstd::stream::read::Decoder::new(r)?),
        Compression::Bzip2 => Box::new(bzip2::read::MultiBzDecoder::new(r)),
    })
}

/// Decompresses, hashes, unpacks and verifies the NAR read from `input` into a staging
/// area, ready to commit. Runs on a blocking thread, under the path's lock. On any error
/// nothing of the path is left in the store (the staging area is removed).
pub(crate) fn unpack_and_verify<R: Read>(
    store: &Store,
    lock: &Arc<PathLock>,
    info: &NarInfo,
    url: &Url,
    input: R,
    limits: &NarLimits,
) -> Result<(Staging, PathInfo), SubstituteError> {
    let path = lock.path();
    let store_err = |source: StoreError| SubstituteError::Store {
        path: path.clone(),
        source: Box::new(source),
    };
    let staging = store.stage(lock).map_err(store_err)?;
    let decompress_err = |source: io::Error| SubstituteError::Decompress {
        path: path.clone(),
        url: Box::new(url.clone()),
        compression: info.compression.as_str(),
        source,
    };
    let dec = decoder(info.compression, input).map_err(decompress_err)?;
    // Never read more than NarSize + 1 bytes: a NAR larger than announced is refused
    // without filling the disk first.
    let mut hashing = HashingReader::new(dec.take(info.nar_size.saturating_add(1)));
    let mut limits = limits.clone();
    limits.max_total_size = limits.max_total_size.min(info.nar_size);
    let unpacked = staging.unpack(&mut hashing, &limits);
    if let Err(e) = unpacked {
        // An invalid archive (not an I/O failure): read the rest, so that an altered NAR is
        // reported as a hash mismatch, and a short one as truncated, rather than as whatever
        // broke the parser.
        let drained = match &e {
            UnpackError::Nar(NarError::Io { .. }) => None,
            UnpackError::Nar(_) => Some(io::copy(&mut hashing, &mut io::sink()).map(|_| ())),
            _ => None,
        };
        let (got, size) = hashing.finish();
        return Err(classify(e, drained, got, size, info, &decompress_err));
    }
    let (got, size) = hashing.finish();
    if size != info.nar_size {
        return Err(SubstituteError::SizeMismatch {
            path: path.clone(),
            expected: info.nar_size,
            got: size,
        });
    }
    if got != info.nar_hash {
        return Err(SubstituteError::HashMismatch {
            path: path.clone(),
            expected: Box::new(info.nar_hash),
            got: Box::new(got),
        });
    }
    let mut references = info.references.clone();
    references.sort();
    references.dedup();
    let info = PathInfo {
        path: path.clone(),
        references,
        nar_hash: info.nar_hash,
        nar_size: info.nar_size,
        registration_time: 0,
    };
    Ok((staging, info))
}

/// Turns an unpack failure into the most useful error: a truncated stream, a decompression
/// failure, a hash or size mismatch (the archive was altered), or an invalid NAR that the
/// cache nevertheless signed. `drained` is the result of reading the stream to its end after
/// an archive error; `got` and `size` are the hash and size of everything read.
fn classify(
    e: UnpackError,
    drained: Option<io::Result<()>>,
    got: crate::nix::NarHash,
    size: u64,
    info: &NarInfo,
    decompress_err: &dyn Fn(io::Error) -> SubstituteError,
) -> SubstituteError {
    let path = &info.store_path;
    let truncated = || SubstituteError::Truncated { path: path.clone() };
    let eof = |e: &io::Error| e.kind() == io::ErrorKind::UnexpectedEof;
    match (e, drained) {
        (UnpackError::Nar(NarError::Io { source, .. }), _) => {
            if eof(&source) && size < info.nar_size {
                truncated()
            } else {
                decompress_err(source)
            }
        }
        (_, Some(Err(de))) if !eof(&de) => decompress_err(de),
        (_, Some(_)) if size < info.nar_size => truncated(),
        (_, Some(Ok(()))) if size > info.nar_size => SubstituteError::SizeMismatch {
            path: path.clone(),
            expected: info.nar_size,
            got: size,
        },
        (_, Some(Ok(()))) if got != info.nar_hash => SubstituteError::HashMismatch {
            path: path.clone(),
            expected: Box::new(info.nar_hash),
            got: Box::new(got),
        },
        (e, _) => SubstituteError::Unpack {
            path: path.clone(),
            source: Box::new(e),
        },
    }
}
