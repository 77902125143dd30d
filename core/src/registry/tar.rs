//! The regular files of a tar archive, read from memory: the ustar and POSIX (pax) subset that
//! GNU tar writes for the empty image's archive. Enough for a trusted, tiny archive; anything
//! else (links, GNU long names, sparse files) is refused rather than guessed at.

use thiserror::Error;

const BLOCK: usize = 512;

/// A regular file of the archive.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// Its path as stored, without a leading `./`.
    pub path: String,
    pub data: Vec<u8>,
}

#[derive(Debug, Error, PartialEq, Eq)]
pub enum TarError {
    #[error("tar archive truncated at byte {offset}")]
    Truncated { offset: usize },
    #[error("tar header at byte {offset} has a bad checksum")]
    Checksum { offset: usize },
    #[error("tar header at byte {offset} has a bad {field} field")]
    Field { offset: usize, field: &'static str },
    #[error("tar entry {path:?} has type {kind:?}, only regular files and directories are read")]
    Unsupported { path: String, kind: char },
}

/// The regular files of `bytes`, in archive order.
pub fn entries(bytes: &[u8]) -> Result<Vec<Entry>, TarError> {
    let mut out = Vec::new();
    let mut offset = 0;
    let mut pax_path: Option<String> = None;
    loop {
        let header = bytes
            .get(offset..offset + BLOCK)
            .ok_or(TarError::Truncated { offset })?;
        if header.iter().all(|b| *b == 0) {
            return Ok(out);
        }
        check_sum(header, offset)?;
        let size = octal(&header[124..136]).ok_or(TarError::Field {
            offset,
            field: "size",
        })?;
        let size = usize::try_from(size).map_err(|_| TarError::Field {
            offset,
            field: "size",
        })?;
        let start = offset + BLOCK;
        let data = start
            .checked_add(size)
            .and_then(|end| bytes.get(start..end))
            .ok_or(TarError::Truncated { offset: start })?;
        let path = pax_path.take().unwrap_or_else(|| header_path(header));
        let path = path.trim_start_matches("./").to_owned();
        match header[156] {
            b'0' | 0 => out.push(Entry {
                path,
                data: data.to_vec(),
            }),
            b'5' => {}
            b'x' => pax_path = pax_value(data, "path"),
            b'g' => {}
            kind => {
                return Err(TarError::Unsupported {
                    path,
                    kind: kind as char,
                })
            }
        }
        offset = start + size.div_ceil(BLOCK) * BLOCK;
    }
}

fn check_sum(header: &[u8], offset: usize) -> Result<(), TarError> {
    let want = octal(&header[148..156]).ok_or(TarError::Field {
        offset,
        field: "checksum",
    })?;
    let got: u64 = header
        .iter()
        .enumerate()
        .map(|(i, b)| {
            if (148..156).contains(&i) {
                32
            } else {
                u64::from(*b)
            }
        })
        .sum();
    if got == want {
        Ok(())
    } else {
        Err(TarError::Checksum { offset })
    }
}

/// A NUL- or space-terminated octal number.
fn octal(field: &[u8]) -> Option<u64> {
    let text = std::str::from_utf8(field).ok()?;
    let digits = text.trim_matches(|c: char| c == '\0' || c == ' ');
    if digits.is_empty() {
        return Some(0);
    }
    u64::from_str_radix(digits, 8).ok()
}

fn c_string(field: &[u8]) -> String {
    let end = field.iter().position(|b| *b == 0).unwrap_or(field.len());
    String::from_utf8_lossy(&field[..end]).into_owned()
}

/// `prefix/name` of a ustar header (just `name` for an old-style one).
fn header_path(header: &[u8]) -> String {
    let name = c_string(&header[0..100]);
    let prefix = if &header[257..262] == b"ustar" {
        c_string(&header[345..500])
    } else {
        String::new()
    };
    if prefix.is_empty() {
        name
    } else {
        format!("{prefix}/{name}")
    }
}

/// The value of `key` in pax extended-header records (`LEN key=value\n`).
fn pax_value(data: &[u8], key: &str) -> Option<String> {
    let text = std::str::from_utf8(data).ok()?;
    text.lines()
        .filter_map(|record| record.split_once(' ').map(|(_, kv)| kv))
        .filter_map(|kv| kv.split_once('='))
        .find(|(k, _)| *k == key)
        .map(|(_, v)| v.to_owned())
}

#[cfg(test)]
mod tests {
    use super::super::testing::member;
    use super::*;

    #[test]
    fn reads_files_skips_directories_and_honours_pax_paths() {
        let mut tar = member("blobs/", b"", b'5');
        tar.extend(member("index.json", b"{}", b'0'));
        tar.extend(member("PaxHeaders/x", b"20 path=long/name\n", b'x'));
        tar.extend(member("short", b"abc", b'0'));
        tar.extend(vec![0u8; 2 * BLOCK]);
        let got = entries(&tar).unwrap();
        assert_eq!(
            got,
            vec![
                Entry {
                    path: "index.json".into(),
                    data: b"{}".to_vec()
                },
                Entry {
                    path: "long/name".into(),
                    data: b"abc".to_vec()
                },
            ]
        );
    }

    #[test]
    fn refuses_truncated_archives_bad_checksums_and_links() {
        let tar = member("a", b"abc", b'0');
        assert_eq!(
            entries(&tar[..BLOCK + 1]),
            Err(TarError::Truncated { offset: BLOCK })
        );
        let mut bad = tar.clone();
        bad[0] = b'b';
        assert_eq!(entries(&bad), Err(TarError::Checksum { offset: 0 }));
        let link = member("l", b"", b'2');
        assert!(matches!(
            entries(&link),
            Err(TarError::Unsupported { kind: '2', .. })
        ));
    }
}
