//! Reading a NAR: [`parse`] streams an archive into a [`NarVisitor`], validating names, order,
//! padding and [`NarLimits`] as it goes; [`read_tree`] builds a [`NarNode`] from it.

use std::io::{self, BufRead, BufReader, Read};

use super::{
    show, NarNode, NarPath, CLOSE, CONTENTS, DIRECTORY, ENTRY, EXECUTABLE, MAGIC, NAME, NODE, OPEN,
    REGULAR, SYMLINK, TARGET, TYPE,
};

/// Limits enforced while reading a NAR.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NarLimits {
    /// Most path components below the root (a file at `a/b/c` has depth 3).
    pub max_depth: usize,
    /// Longest entry name, in bytes.
    pub max_name_len: usize,
    /// Longest symlink target, in bytes.
    pub max_target_len: usize,
    /// Largest sum of regular file sizes, in bytes.
    pub max_total_size: u64,
    /// Most entries (files, directories and symlinks, the root included).
    pub max_entries: u64,
}

impl Default for NarLimits {
    fn default() -> Self {
        NarLimits {
            max_depth: 256,
            max_name_len: 255,
            max_target_len: 4095,
            max_total_size: 256 << 30,
            max_entries: 10_000_000,
        }
    }
}

/// Why a NAR was refused. Each error names the path inside the NAR.
#[derive(Debug, thiserror::Error)]
pub enum NarError {
    #[error("invalid NAR: does not start with {MAGIC:?}")]
    BadMagic,
    #[error("invalid NAR at {path}: truncated")]
    Truncated { path: NarPath },
    #[error("reading NAR at {path}: {source}")]
    Io { path: NarPath, source: io::Error },
    #[error("invalid NAR at {path}: expected {expected:?}, found {found:?}")]
    UnexpectedToken {
        path: NarPath,
        expected: &'static str,
        found: String,
    },
    #[error("invalid NAR at {path}: unknown node type {found:?}")]
    UnknownType { path: NarPath, found: String },
    #[error("invalid NAR at {path}: non-zero padding")]
    BadPadding { path: NarPath },
    #[error("invalid NAR at {path}: entry name {name:?} {reason}")]
    BadName {
        path: NarPath,
        name: String,
        reason: &'static str,
    },
    #[error("invalid NAR at {path}: entry name longer than {max} bytes")]
    NameTooLong { path: NarPath, max: usize },
    #[error("invalid NAR at {path}: entry {name:?} not sorted after {previous:?}")]
    NotSorted {
        path: NarPath,
        name: String,
        previous: String,
    },
    #[error("invalid NAR at {path}: duplicate entry {name:?}")]
    Duplicate { path: NarPath, name: String },
    #[error("invalid NAR at {path}: deeper than {max} levels")]
    TooDeep { path: NarPath, max: usize },
    #[error("invalid NAR at {path}: files larger than {max} bytes in total")]
    TooLarge { path: NarPath, max: u64 },
    #[error("invalid NAR at {path}: more than {max} entries")]
    TooManyEntries { path: NarPath, max: u64 },
    #[error("invalid NAR at {path}: symlink target {reason}")]
    BadSymlinkTarget { path: NarPath, reason: &'static str },
    #[error("invalid NAR: trailing data after the archive")]
    TrailingData,
}

impl NarError {
    /// The path inside the NAR the error is about (the root for archive-level errors).
    pub fn path(&self) -> NarPath {
        match self {
            NarError::BadMagic | NarError::TrailingData => NarPath::root(),
            NarError::Truncated { path }
            | NarError::Io { path, .. }
            | NarError::UnexpectedToken { path, .. }
            | NarError::UnknownType { path, .. }
            | NarError::BadPadding { path }
            | NarError::BadName { path, .. }
            | NarError::NameTooLong { path, .. }
            | NarError::NotSorted { path, .. }
            | NarError::Duplicate { path, .. }
            | NarError::TooDeep { path, .. }
            | NarError::TooLarge { path, .. }
            | NarError::TooManyEntries { path, .. }
            | NarError::BadSymlinkTarget { path, .. } => path.clone(),
        }
    }
}

/// Receives the entries of a NAR in archive order.
///
/// Paths are relative to the NAR root; the root itself is [`NarPath::root`]
/// and may be a directory, a regular file or a symlink. Names have been
/// validated (non-empty, no `/` or NUL, not `.`/`..`, sorted, unique) before
/// a callback sees them.
pub trait NarVisitor {
    /// The visitor's error; NAR format errors are converted into it.
    type Error: From<NarError>;
    /// A directory starts; its entries follow, then [`NarVisitor::end_directory`].
    fn directory(&mut self, path: &NarPath) -> Result<(), Self::Error>;
    /// All entries of the directory at `path` have been visited.
    fn end_directory(&mut self, path: &NarPath) -> Result<(), Self::Error>;
    /// A regular file of `size` bytes; `contents` yields exactly those bytes.
    /// Whatever the visitor leaves unread is skipped.
    fn file(
        &mut self,
        path: &NarPath,
        executable: bool,
        size: u64,
        contents: &mut dyn Read,
    ) -> Result<(), Self::Error>;
    /// A symlink to `target` (non-empty, no NUL; not interpreted).
    fn symlink(&mut self, path: &NarPath, target: &[u8]) -> Result<(), Self::Error>;
}

/// What a NAR contained.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct NarStats {
    pub files: u64,
    pub directories: u64,
    pub symlinks: u64,
    /// Sum of regular file sizes.
    pub file_bytes: u64,
    /// Size of the archive itself.
    pub nar_size: u64,
}

const TOKEN_MAX: u64 = 64;

struct Input<R> {
    r: BufReader<R>,
    pos: u64,
}

fn read_err(path: &NarPath, e: io::Error) -> NarError {
    if e.kind() == io::ErrorKind::UnexpectedEof {
        NarError::Truncated { path: path.clone() }
    } else {
        NarError::Io {
            path: path.clone(),
            source: e,
        }
    }
}

impl<R: Read> Input<R> {
    fn exact(&mut self, buf: &mut [u8], path: &NarPath) -> Result<(), NarError> {
        self.r.read_exact(buf).map_err(|e| read_err(path, e))?;
        self.pos += buf.len() as u64;
        Ok(())
    }

    fn u64(&mut self, path: &NarPath) -> Result<u64, NarError> {
        let mut b = [0u8; 8];
        self.exact(&mut b, path)?;
        Ok(u64::from_le_bytes(b))
    }

    fn padding(&mut self, len: u64, path: &NarPath) -> Result<(), NarError> {
        let pad = ((8 - len % 8) % 8) as usize;
        let mut b = [0u8; 8];
        self.exact(&mut b[..pad], path)?;
        if b[..pad].iter().any(|&x| x != 0) {
            return Err(NarError::BadPadding { path: path.clone() });
        }
        Ok(())
    }

    /// Reads a string of at most `max` bytes; `Err(Ok(len))` when longer
    /// (nothing of it consumed beyond the length).
    fn string(&mut self, max: u64, path: &NarPath) -> Result<Result<Vec<u8>, u64>, NarError> {
        let len = self.u64(path)?;
        if len > max {
            return Ok(Err(len));
        }
        let mut v = vec![0u8; len as usize];
        self.exact(&mut v, path)?;
        self.padding(len, path)?;
        Ok(Ok(v))
    }

    fn token(&mut self, path: &NarPath, expected: &'static str) -> Result<Vec<u8>, NarError> {
        match self.string(TOKEN_MAX, path)? {
            Ok(v) => Ok(v),
            Err(len) => Err(NarError::UnexpectedToken {
                path: path.clone(),
                expected,
                found: format!("<{len}-byte string>"),
            }),
        }
    }

    fn expect(&mut self, tok: &'static str, path: &NarPath) -> Result<(), NarError> {
        let got = self.token(path, tok)?;
        if got != tok.as_bytes() {
            return Err(NarError::UnexpectedToken {
                path: path.clone(),
                expected: tok,
                found: show(&got),
            });
        }
        Ok(())
    }
}

/// The contents of one file, as handed to [`NarVisitor::file`].
struct Contents<'a, R> {
    input: &'a mut Input<R>,
    remaining: u64,
    failure: Option<io::Error>,
}

impl<R: Read> Read for Contents<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.remaining == 0 || buf.is_empty() {
            return Ok(0);
        }
        let want = buf
            .len()
            .min(self.remaining.min(usize::MAX as u64) as usize);
        let n = loop {
            match self.input.r.read(&mut buf[..want]) {
                Ok(n) => break n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    let kind = e.kind();
                    let msg = e.to_string();
                    self.failure = Some(e);
                    return Err(io::Error::new(kind, msg));
                }
            }
        };
        if n == 0 {
            self.failure = Some(io::ErrorKind::UnexpectedEof.into());
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "NAR truncated inside a file",
            ));
        }
        self.remaining -= n as u64;
        self.input.pos += n as u64;
        Ok(n)
    }
}

fn check_name(name: &[u8]) -> Result<(), &'static str> {
    if name.is_empty() {
        Err("is empty")
    } else if name == b"." || name == b".." {
        Err("is . or ..")
    } else if name.contains(&b'/') {
        Err("contains '/'")
    } else if name.contains(&0) {
        Err("contains NUL")
    } else {
        Ok(())
    }
}

struct Parser<'l, R> {
    input: Input<R>,
    limits: &'l NarLimits,
    path: NarPath,
    /// Previous entry name of each open directory.
    prev: Vec<Option<Vec<u8>>>,
    stats: NarStats,
    entries: u64,
}

impl<R: Read> Parser<'_, R> {
    fn count_entry(&mut self) -> Result<(), NarError> {
        self.entries += 1;
        if self.entries > self.limits.max_entries {
            return Err(NarError::TooManyEntries {
                path: self.path.clone(),
                max: self.limits.max_entries,
            });
        }
        Ok(())
    }

    /// Reads a node at `self.path`. A directory is only opened (returns true);
    /// anything else is read through its closing `)`.
    fn node<V: NarVisitor>(&mut self, v: &mut V) -> Result<bool, V::Error> {
        let path = &self.path;
        self.input.expect(OPEN, path)?;
        self.input.expect(TYPE, path)?;
        let ty = self.input.token(path, "regular, symlink or directory")?;
        self.count_entry()?;
        let path = &self.path;
        match ty.as_slice() {
            t if t == REGULAR.as_bytes() => {
                let mut tok = self.input.token(path, CONTENTS)?;
                let mut executable = false;
                if tok == EXECUTABLE.as_bytes() {
                    self.input.expect("", path)?;
                    executable = true;
                    tok = self.input.token(path, CONTENTS)?;
                }
                if tok != CONTENTS.as_bytes() {
                    return Err(NarError::UnexpectedToken {
                        path: path.clone(),
                        expected: CONTENTS,
                        found: show(&tok),
                    }
                    .into());
                }
                let size = self.input.u64(path)?;
                let total = self.stats.file_bytes.checked_add(size);
                if total.is_none_or(|t| t > self.limits.max_total_size) {
                    return Err(NarError::TooLarge {
                        path: path.clone(),
                        max: self.limits.max_total_size,
                    }
                    .into());
                }
                let mut c = Contents {
                    input: &mut self.input,
                    remaining: size,
                    failure: None,
                };
                let r = v.file(path, executable, size, &mut c);
                if let Some(e) = c.failure.take() {
                    return Err(read_err(path, e).into());
                }
                r?;
                io::copy(&mut c, &mut io::sink()).map_err(|e| read_err(path, e))?;
                self.input.padding(size, path)?;
                self.input.expect(CLOSE, path)?;
                self.stats.files += 1;
                self.stats.file_bytes += size;
                Ok(false)
            }
            t if t == SYMLINK.as_bytes() => {
                self.input.expect(TARGET, path)?;
                let max = self.limits.max_target_len as u64;
                let target =
                    self.input
                        .string(max, path)?
                        .map_err(|_| NarError::BadSymlinkTarget {
                            path: path.clone(),
                            reason: "too long",
                        })?;
                let bad = |reason| NarError::BadSymlinkTarget {
                    path: path.clone(),
                    reason,
                };
                if target.is_empty() {
                    return Err(bad("is empty").into());
                }
                if target.contains(&0) {
                    return Err(bad("contains NUL").into());
                }
                v.symlink(path, &target)?;
                self.input.expect(CLOSE, path)?;
                self.stats.symlinks += 1;
                Ok(false)
            }
            t if t == DIRECTORY.as_bytes() => {
                v.directory(path)?;
                self.prev.push(None);
                self.stats.directories += 1;
                Ok(true)
            }
            other => Err(NarError::UnknownType {
                path: path.clone(),
                found: show(other),
            }
            .into()),
        }
    }

    fn entry_name(&mut self) -> Result<Vec<u8>, NarError> {
        let path = &self.path;
        self.input.expect(OPEN, path)?;
        self.input.expect(NAME, path)?;
        let name = self
            .input
            .string(self.limits.max_name_len as u64, path)?
            .map_err(|_| NarError::NameTooLong {
                path: path.clone(),
                max: self.limits.max_name_len,
            })?;
        check_name(&name).map_err(|reason| NarError::BadName {
            path: path.clone(),
            name: show(&name),
            reason,
        })?;
        let prev = self.prev.last_mut().expect("inside a directory");
        if let Some(p) = prev.as_ref() {
            if name == *p {
                return Err(NarError::Duplicate {
                    path: path.clone(),
                    name: show(&name),
                });
            }
            if name < *p {
                return Err(NarError::NotSorted {
                    path: path.clone(),
                    name: show(&name),
                    previous: show(p),
                });
            }
        }
        *prev = Some(name.clone());
        if self.path.depth() + 1 > self.limits.max_depth {
            return Err(NarError::TooDeep {
                path: path.clone(),
                max: self.limits.max_depth,
            });
        }
        self.input.expect(NODE, path)?;
        Ok(name)
    }

    fn run<V: NarVisitor>(&mut self, v: &mut V) -> Result<(), V::Error> {
        let root = NarPath::root();
        match self.input.token(&root, MAGIC) {
            Ok(m) if m == MAGIC.as_bytes() => {}
            Ok(_) | Err(NarError::UnexpectedToken { .. } | NarError::Truncated { .. }) => {
                return Err(NarError::BadMagic.into())
            }
            Err(e) => return Err(e.into()),
        }
        self.node(v)?;
        while !self.prev.is_empty() {
            let tok = self.input.token(&self.path, "entry or )")?;
            match tok.as_slice() {
                t if t == CLOSE.as_bytes() => {
                    v.end_directory(&self.path)?;
                    self.prev.pop();
                    if !self.prev.is_empty() {
                        self.path.pop();
                        self.input.expect(CLOSE, &self.path)?;
                    }
                }
                t if t == ENTRY.as_bytes() => {
                    let name = self.entry_name()?;
                    self.path.push(name);
                    if !self.node(v)? {
                        self.path.pop();
                        self.input.expect(CLOSE, &self.path)?;
                    }
                }
                other => {
                    return Err(NarError::UnexpectedToken {
                        path: self.path.clone(),
                        expected: "entry or )",
                        found: show(other),
                    }
                    .into())
                }
            }
        }
        // Nothing may follow the archive.
        let buf = loop {
            match self.input.r.fill_buf() {
                Ok(b) => break b,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(read_err(&root, e).into()),
            }
        };
        if !buf.is_empty() {
            return Err(NarError::TrailingData.into());
        }
        Ok(())
    }
}

/// Reads a whole NAR from `reader`, calling `visitor` for each entry, and
/// checks that nothing follows it.
pub fn parse<R: Read, V: NarVisitor>(
    reader: R,
    visitor: &mut V,
    limits: &NarLimits,
) -> Result<NarStats, V::Error> {
    let mut p = Parser {
        input: Input {
            r: BufReader::with_capacity(64 * 1024, reader),
            pos: 0,
        },
        limits,
        path: NarPath::root(),
        prev: Vec::new(),
        stats: NarStats::default(),
        entries: 0,
    };
    p.run(visitor)?;
    p.stats.nar_size = p.input.pos;
    Ok(p.stats)
}

/// A visitor that builds the [`NarNode`] tree (buffers file contents: for
/// tests and small archives only).
#[derive(Default)]
pub(super) struct TreeBuilder {
    stack: Vec<Vec<(Vec<u8>, NarNode)>>,
    root: Option<NarNode>,
}

impl TreeBuilder {
    fn add(&mut self, path: &NarPath, node: NarNode) {
        match (self.stack.last_mut(), path.name()) {
            (Some(entries), Some(name)) => entries.push((name.to_vec(), node)),
            _ => self.root = Some(node),
        }
    }
}

impl NarVisitor for TreeBuilder {
    type Error = NarError;
    fn directory(&mut self, _: &NarPath) -> Result<(), NarError> {
        self.stack.push(Vec::new());
        Ok(())
    }
    fn end_directory(&mut self, path: &NarPath) -> Result<(), NarError> {
        let entries = self.stack.pop().unwrap_or_default();
        self.add(path, NarNode::Directory(entries));
        Ok(())
    }
    fn file(
        &mut self,
        path: &NarPath,
        executable: bool,
        _size: u64,
        contents: &mut dyn Read,
    ) -> Result<(), NarError> {
        let mut buf = Vec::new();
        contents
            .read_to_end(&mut buf)
            .map_err(|e| read_err(path, e))?;
        self.add(
            path,
            NarNode::File {
                executable,
                contents: buf,
            },
        );
        Ok(())
    }
    fn symlink(&mut self, path: &NarPath, target: &[u8]) -> Result<(), NarError> {
        self.add(path, NarNode::symlink(target));
        Ok(())
    }
}

/// Reads a whole NAR into memory, validating it like [`parse`].
pub fn read_tree<R: Read>(reader: R, limits: &NarLimits) -> Result<NarNode, NarError> {
    let mut b = TreeBuilder::default();
    parse(reader, &mut b, limits)?;
    b.root.ok_or(NarError::Truncated {
        path: NarPath::root(),
    })
}

#[cfg(test)]
mod tests {
    use super::super::tests::sample;
    use super::super::write_string;
    use super::*;

    #[test]
    fn single_file_and_symlink_roots() {
        for t in [
            NarNode::file("x"),
            NarNode::executable(""),
            NarNode::symlink("/etc/passwd"),
        ] {
            let nar = t.to_nar();
            assert_eq!(read_tree(&nar[..], &NarLimits::default()).unwrap(), t);
        }
    }

    fn err(t: &NarNode) -> NarError {
        read_tree(&t.to_nar()[..], &NarLimits::default()).unwrap_err()
    }

    #[test]
    fn rejects_bad_names() {
        for (name, reason) in [
            (&b".."[..], "is . or .."),
            (b".", "is . or .."),
            (b"", "is empty"),
            (b"a/b", "contains '/'"),
            (b"a\0b", "contains NUL"),
        ] {
            let t = NarNode::dir([("sub", NarNode::dir([(name, NarNode::file("x"))]))]);
            let e = err(&t);
            assert!(
                matches!(&e, NarError::BadName { reason: r, .. } if *r == reason),
                "{e}"
            );
            assert!(
                e.to_string()
                    .starts_with("invalid NAR at /sub: entry name "),
                "{e}"
            );
        }
        let long = NarNode::dir([(vec![b'a'; 256], NarNode::file("x"))]);
        assert!(matches!(err(&long), NarError::NameTooLong { max: 255, .. }));
        let ok = NarNode::dir([(vec![b'a'; 255], NarNode::file("x"))]);
        assert!(read_tree(&ok.to_nar()[..], &NarLimits::default()).is_ok());
    }

    #[test]
    fn rejects_unsorted_and_duplicates() {
        let t = NarNode::dir([("b", NarNode::file("")), ("a", NarNode::file(""))]);
        assert_eq!(
            err(&t).to_string(),
            "invalid NAR at /: entry \"a\" not sorted after \"b\""
        );
        let t = NarNode::dir([
            ("a", NarNode::symlink("/tmp")),
            ("a", NarNode::dir([("x", NarNode::file(""))])),
        ]);
        assert_eq!(
            err(&t).to_string(),
            "invalid NAR at /: duplicate entry \"a\""
        );
    }

    #[test]
    fn rejects_bad_symlinks() {
        let t = NarNode::dir([("l", NarNode::symlink(""))]);
        assert_eq!(
            err(&t).to_string(),
            "invalid NAR at /l: symlink target is empty"
        );
        let t = NarNode::symlink(b"a\0b".to_vec());
        assert!(matches!(err(&t), NarError::BadSymlinkTarget { .. }));
        let t = NarNode::symlink(vec![b'a'; 4096]);
        assert!(matches!(
            err(&t),
            NarError::BadSymlinkTarget {
                reason: "too long",
                ..
            }
        ));
        assert!(read_tree(
            &NarNode::symlink(vec![b'a'; 4095]).to_nar()[..],
            &NarLimits::default()
        )
        .is_ok());
    }

    #[test]
    fn limits() {
        let mut t = NarNode::file("x");
        for _ in 0..5 {
            t = NarNode::dir([("d", t)]);
        }
        let lim = NarLimits {
            max_depth: 4,
            ..NarLimits::default()
        };
        let e = read_tree(&t.to_nar()[..], &lim).unwrap_err();
        assert_eq!(
            e.to_string(),
            "invalid NAR at /d/d/d/d: deeper than 4 levels"
        );
        let lim = NarLimits {
            max_depth: 5,
            ..NarLimits::default()
        };
        assert!(read_tree(&t.to_nar()[..], &lim).is_ok());

        let lim = NarLimits {
            max_total_size: 30,
            ..NarLimits::default()
        };
        let e = read_tree(&sample().to_nar()[..], &lim).unwrap_err();
        assert!(matches!(e, NarError::TooLarge { .. }), "{e}");
        assert_eq!(e.path().to_string(), "/share/data");
        let lim = NarLimits {
            max_entries: 6,
            ..NarLimits::default()
        };
        assert!(matches!(
            read_tree(&sample().to_nar()[..], &lim),
            Err(NarError::TooManyEntries { .. })
        ));
        let lim = NarLimits {
            max_entries: 7,
            ..NarLimits::default()
        };
        assert!(read_tree(&sample().to_nar()[..], &lim).is_ok());
    }

    #[test]
    fn rejects_framing_errors() {
        let nar = sample().to_nar();
        // Every strict prefix is truncated (or, for the empty prefix, lacks the magic).
        for cut in 0..nar.len() {
            let e = read_tree(&nar[..cut], &NarLimits::default()).unwrap_err();
            assert!(
                matches!(e, NarError::Truncated { .. } | NarError::BadMagic),
                "cut {cut}: {e}"
            );
        }
        let mut trailing = nar.clone();
        trailing.extend_from_slice(b"garbage!");
        assert!(matches!(
            read_tree(&trailing[..], &NarLimits::default()),
            Err(NarError::TrailingData)
        ));
        let mut trailing = nar.clone();
        trailing.push(0);
        assert!(matches!(
            read_tree(&trailing[..], &NarLimits::default()),
            Err(NarError::TrailingData)
        ));

        let mut bad_magic = nar.clone();
        bad_magic[8] = b'N';
        assert!(matches!(
            read_tree(&bad_magic[..], &NarLimits::default()),
            Err(NarError::BadMagic)
        ));

        // Padding after the 13-byte magic lives at bytes 21..24.
        let mut bad_pad = nar.clone();
        bad_pad[22] = 1;
        assert!(matches!(
            read_tree(&bad_pad[..], &NarLimits::default()),
            Err(NarError::BadPadding { .. })
        ));
        // Padding after file contents.
        let t = NarNode::file("abc");
        let mut n = t.to_nar();
        let len = n.len();
        // ... "abc" 00000 | 8-byte len of ")" | ")" + 7 pad
        n[len - 16 - 1] = 0xff;
        let e = read_tree(&n[..], &NarLimits::default()).unwrap_err();
        assert!(matches!(e, NarError::BadPadding { .. }), "{e}");

        let mut w = Vec::new();
        write_string(&mut w, MAGIC.as_bytes()).unwrap();
        for t in ["(", "type", "fifo", ")"] {
            write_string(&mut w, t.as_bytes()).unwrap();
        }
        assert_eq!(
            read_tree(&w[..], &NarLimits::default())
                .unwrap_err()
                .to_string(),
            "invalid NAR at /: unknown node type \"fifo\""
        );
        let mut w = Vec::new();
        write_string(&mut w, MAGIC.as_bytes()).unwrap();
        write_string(&mut w, b"(").unwrap();
        w.extend_from_slice(&u64::MAX.to_le_bytes());
        assert!(matches!(
            read_tree(&w[..], &NarLimits::default()),
            Err(NarError::UnexpectedToken { .. })
        ));
    }

    #[test]
    fn huge_declared_sizes_are_not_allocated() {
        // A file claiming 2^60 bytes, then EOF: reported as truncated (or too
        // large), never allocated.
        let mut w = Vec::new();
        write_string(&mut w, MAGIC.as_bytes()).unwrap();
        for t in ["(", "type", "regular", "contents"] {
            write_string(&mut w, t.as_bytes()).unwrap();
        }
        w.extend_from_slice(&(1u64 << 60).to_le_bytes());
        w.extend_from_slice(&[1u8; 100]);
        let lim = NarLimits {
            max_total_size: u64::MAX,
            ..NarLimits::default()
        };
        let e = parse(&w[..], &mut Lazy, &lim).unwrap_err();
        assert!(matches!(e, NarError::Truncated { .. }), "{e}");
        let e = read_tree(&w[..], &NarLimits::default()).unwrap_err();
        assert!(matches!(e, NarError::TooLarge { .. }), "{e}");
        // A name claiming 2^60 bytes.
        let mut w = Vec::new();
        write_string(&mut w, MAGIC.as_bytes()).unwrap();
        for t in ["(", "type", "directory", "entry", "(", "name"] {
            write_string(&mut w, t.as_bytes()).unwrap();
        }
        w.extend_from_slice(&(1u64 << 60).to_le_bytes());
        assert!(matches!(
            read_tree(&w[..], &NarLimits::default()),
            Err(NarError::NameTooLong { .. })
        ));
    }

    /// A reader yielding a NAR with one large file, generated on the fly.
    struct Generated {
        head: Vec<u8>,
        body: u64,
        tail: Vec<u8>,
        pos: u64,
    }
    impl Read for Generated {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            let (h, b) = (self.head.len() as u64, self.body);
            let total = h + b + self.tail.len() as u64;
            if self.pos >= total {
                return Ok(0);
            }
            let n = if self.pos < h {
                let s = &self.head[self.pos as usize..];
                let n = s.len().min(buf.len());
                buf[..n].copy_from_slice(&s[..n]);
                n
            } else if self.pos < h + b {
                let n = ((h + b - self.pos) as usize).min(buf.len());
                buf[..n].fill(b'z');
                n
            } else {
                let s = &self.tail[(self.pos - h - b) as usize..];
                let n = s.len().min(buf.len());
                buf[..n].copy_from_slice(&s[..n]);
                n
            };
            self.pos += n as u64;
            Ok(n)
        }
    }

    struct Counter(u64, usize);
    impl NarVisitor for Counter {
        type Error = NarError;
        fn directory(&mut self, _: &NarPath) -> Result<(), NarError> {
            Ok(())
        }
        fn end_directory(&mut self, _: &NarPath) -> Result<(), NarError> {
            Ok(())
        }
        fn file(&mut self, _: &NarPath, _: bool, _: u64, c: &mut dyn Read) -> Result<(), NarError> {
            let mut buf = vec![0u8; 1 << 16];
            loop {
                let n = c.read(&mut buf).unwrap();
                if n == 0 {
                    return Ok(());
                }
                self.0 += n as u64;
                self.1 = self.1.max(n);
            }
        }
        fn symlink(&mut self, _: &NarPath, _: &[u8]) -> Result<(), NarError> {
            Ok(())
        }
    }

    #[test]
    fn file_contents_are_streamed() {
        // 1 GiB of contents flows through in reads of at most the visitor's buffer.
        let size: u64 = 1 << 30;
        let mut head = Vec::new();
        write_string(&mut head, MAGIC.as_bytes()).unwrap();
        for t in ["(", "type", "regular", "contents"] {
            write_string(&mut head, t.as_bytes()).unwrap();
        }
        head.extend_from_slice(&size.to_le_bytes());
        let mut tail = Vec::new();
        write_string(&mut tail, b")").unwrap();
        let r = Generated {
            head,
            body: size,
            tail,
            pos: 0,
        };
        let mut c = Counter(0, 0);
        let stats = parse(r, &mut c, &NarLimits::default()).unwrap();
        assert_eq!(c.0, size);
        assert!(c.1 <= 1 << 16);
        assert_eq!(stats.file_bytes, size);
        assert_eq!(stats.nar_size, size + 112);
    }

    struct Lazy;
    impl NarVisitor for Lazy {
        type Error = NarError;
        fn directory(&mut self, _: &NarPath) -> Result<(), NarError> {
            Ok(())
        }
        fn end_directory(&mut self, _: &NarPath) -> Result<(), NarError> {
            Ok(())
        }
        fn file(&mut self, _: &NarPath, _: bool, _: u64, c: &mut dyn Read) -> Result<(), NarError> {
            let mut b = [0u8; 1];
            let _ = c.read(&mut b);
            Ok(())
        }
        fn symlink(&mut self, _: &NarPath, _: &[u8]) -> Result<(), NarError> {
            Ok(())
        }
    }

    #[test]
    fn unread_contents_are_skipped_and_truncation_inside_file_is_reported() {
        let nar = sample().to_nar();
        assert!(parse(&nar[..], &mut Lazy, &NarLimits::default()).is_ok());
        let t = NarNode::dir([("f", NarNode::file(vec![1u8; 1000]))]);
        let nar = t.to_nar();
        let e = parse(&nar[..500], &mut Lazy, &NarLimits::default()).unwrap_err();
        assert_eq!(e.to_string(), "invalid NAR at /f: truncated");
        let e = read_tree(&nar[..500], &NarLimits::default()).unwrap_err();
        assert_eq!(e.to_string(), "invalid NAR at /f: truncated");
    }

    #[test]
    fn reads_what_nix_wrote() {
        // Archives made by `nix-store --dump` (core/tests/data/README.md).
        for (nar, files, directories, symlinks) in [
            (
                &include_bytes!("../../../tests/data/golden-tree.nar")[..],
                7,
                7,
                3,
            ),
            (
                &include_bytes!("../../../tests/data/golden-ref.nar")[..],
                1,
                1,
                1,
            ),
            (
                &include_bytes!("../../../tests/data/single-file.nar")[..],
                1,
                0,
                0,
            ),
            (
                &include_bytes!("../../../tests/data/single-symlink.nar")[..],
                0,
                0,
                1,
            ),
        ] {
            let stats = parse(nar, &mut TreeBuilder::default(), &NarLimits::default()).unwrap();
            assert_eq!(
                (
                    stats.files,
                    stats.directories,
                    stats.symlinks,
                    stats.nar_size
                ),
                (files, directories, symlinks, nar.len() as u64)
            );
        }
    }
}
