//! The blocking half of a NAR download: body chunks from a bounded channel → decompress →
//! SHA-256 and byte count → unpack into the store's staging area → verify → commit.
//! One pass, no temporary NAR file; the first error (decompression, archive, size) ends the
//! pass without reading the rest of the stream.
//!
//! A NAR of at least [`decode::HANDOVER_MIN_NAR_SIZE`] bytes is decompressed on a second
//! thread when a core is spare ([`decode`]), so that its decoding overlaps with the hashing
//! and unpacking of what was decoded before.

use std::io::{self, Read};
use std::sync::Arc;

use bytes::{Buf, Bytes};
use tokio::sync::mpsc;
use url::Url;

use super::decode;
use super::error::SubstituteError;
use crate::nix::hash::{HashingReader, NarHash};
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

/// The most compressed bytes read for a NAR of `nar_size` bytes: half as much again and
/// 1 MiB, far above what xz, zstd or bzip2 produce even for incompressible data. Bounded by
/// the signed NarSize (not the unsigned FileSize), so a cache cannot make a download consume
/// unbounded input that decompresses to little (padding, zstd skippable frames).
pub(crate) fn compressed_limit(nar_size: u64) -> u64 {
    nar_size
        .saturating_add(nar_size / 2)
        .saturating_add(1 << 20)
}

/// A `Read` that fails with `InvalidData` once its input goes on past `limit` bytes.
pub(crate) struct CappedReader<R> {
    inner: R,
    left: u64,
    limit: u64,
}

impl<R: Read> CappedReader<R> {
    pub(crate) fn new(inner: R, limit: u64) -> Self {
        CappedReader {
            inner,
            left: limit,
            limit,
        }
    }
}

impl<R: Read> Read for CappedReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        if self.left == 0 {
            // At the limit: fine if the input ends here, an error if it goes on.
            let mut probe = [0u8; 1];
            return match self.inner.read(&mut probe)? {
                0 => Ok(0),
                _ => Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("the compressed NAR is larger than {} bytes", self.limit),
                )),
            };
        }
        let max = buf
            .len()
            .min(usize::try_from(self.left).unwrap_or(usize::MAX));
        let n = self.inner.read(&mut buf[..max])?;
        self.left -= n as u64;
        Ok(n)
    }
}

/// A `Read` that remembers whether its input has ended (a read into a non-empty buffer
/// returned nothing, or a decompressor found its input cut short), so that an archive cut
/// short is told from a malformed one.
pub(crate) struct EndReader<R> {
    inner: R,
    ended: bool,
}

impl<R> EndReader<R> {
    pub(crate) fn new(inner: R) -> Self {
        EndReader {
            inner,
            ended: false,
        }
    }
}

impl<R: Read> Read for EndReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let r = self.inner.read(buf);
        self.ended |= match &r {
            Ok(n) => *n == 0 && !buf.is_empty(),
            Err(e) => e.kind() == io::ErrorKind::UnexpectedEof,
        };
        r
    }
}

/// Decompresses, hashes, unpacks and verifies the NAR read from `input` into a staging
/// area, ready to commit. Runs on a blocking thread, under the path's lock. On any error
/// nothing of the path is left in the store (the staging area is removed).
pub(crate) fn unpack_and_verify<R: Read + Send>(
    store: &Store,
    lock: &Arc<PathLock>,
    info: &NarInfo,
    url: &Url,
    input: R,
    limits: &NarLimits,
    cores: &decode::Cores,
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
    let input = CappedReader::new(input, compressed_limit(info.nar_size));
    let dec = decode::decoder(info.compression, input).map_err(decompress_err)?;
    // Never read more than NarSize + 1 bytes: a NAR larger than announced is refused
    // without filling the disk first.
    let nar = dec.take(info.nar_size.saturating_add(1));
    let mut limits = limits.clone();
    limits.max_total_size = limits.max_total_size.min(info.nar_size);
    let unpack = |nar: &mut dyn Read| -> Result<(NarHash, u64), SubstituteError> {
        let mut hashing = HashingReader::new(EndReader::new(nar));
        if let Err(e) = staging.unpack(&mut hashing, &limits) {
            // Stop at the first error: the rest of the stream is not read (a hostile cache
            // could otherwise keep the download, and the path's lock, busy up to the signed
            // NarSize).
            let ended = hashing.get_ref().ended;
            let (_, size) = hashing.finish();
            return Err(classify(e, ended, size, info, &decompress_err));
        }
        Ok(hashing.finish())
    };
    let handover =
        info.compression != Compression::None && info.nar_size >= decode::HANDOVER_MIN_NAR_SIZE;
    let (got, size) = decode::decode_and_unpack(nar, cores, handover, unpack).map_err(|e| {
        SubstituteError::Task {
            path: path.clone(),
            message: e.to_string(),
        }
    })??;
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
/// failure, a NAR larger than its signed NarSize, or an invalid archive. `size` is the number
/// of NAR bytes read when the unpacker stopped; `ended` whether the stream had ended then.
fn classify(
    e: UnpackError,
    ended: bool,
    size: u64,
    info: &NarInfo,
    decompress_err: &dyn Fn(io::Error) -> SubstituteError,
) -> SubstituteError {
    let path = &info.store_path;
    let truncated = || SubstituteError::Truncated { path: path.clone() };
    match e {
        UnpackError::Nar(NarError::Io { source, .. }) => {
            if source.kind() == io::ErrorKind::UnexpectedEof && size < info.nar_size {
                truncated()
            } else {
                decompress_err(source)
            }
        }
        UnpackError::Nar(_) if ended && size < info.nar_size => truncated(),
        _ if size > info.nar_size => SubstituteError::SizeMismatch {
            path: path.clone(),
            expected: info.nar_size,
            got: size,
        },
        e => SubstituteError::Unpack {
            path: path.clone(),
            source: Box::new(e),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn capped_reader_allows_the_limit_and_refuses_more() {
        let mut out = Vec::new();
        CappedReader::new(&[7u8; 10][..], 10)
            .read_to_end(&mut out)
            .unwrap();
        assert_eq!(out, [7u8; 10]);
        let mut out = Vec::new();
        let e = CappedReader::new(&[7u8; 11][..], 10)
            .read_to_end(&mut out)
            .unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidData);
        assert_eq!(e.to_string(), "the compressed NAR is larger than 10 bytes");
        assert_eq!(out.len(), 10);
    }

    #[test]
    fn the_limit_leaves_room_for_incompressible_data() {
        assert_eq!(compressed_limit(0), 1 << 20);
        assert_eq!(compressed_limit(1000), 1500 + (1 << 20));
        assert_eq!(compressed_limit(u64::MAX), u64::MAX);
    }
}
