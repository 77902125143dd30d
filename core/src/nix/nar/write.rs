//! Writing a NAR: [`write()`] serialises a [`NarNode`], [`write_string`] one token.

use std::io::{self, Write};

use super::{
    NarNode, CLOSE, CONTENTS, DIRECTORY, ENTRY, EXECUTABLE, MAGIC, NAME, NODE, OPEN, REGULAR,
    SYMLINK, TARGET, TYPE,
};

/// Writes one NAR string: length, bytes, zero padding.
pub fn write_string<W: Write>(w: &mut W, s: &[u8]) -> io::Result<()> {
    w.write_all(&(s.len() as u64).to_le_bytes())?;
    w.write_all(s)?;
    w.write_all(&[0u8; 8][..(8 - s.len() % 8) % 8])
}

/// Writes `node` as a complete NAR (magic included).
pub fn write<W: Write>(w: &mut W, node: &NarNode) -> io::Result<()> {
    write_string(w, MAGIC.as_bytes())?;
    write_node(w, node)
}

fn write_node<W: Write>(w: &mut W, node: &NarNode) -> io::Result<()> {
    write_string(w, OPEN.as_bytes())?;
    write_string(w, TYPE.as_bytes())?;
    match node {
        NarNode::File {
            executable,
            contents,
        } => {
            write_string(w, REGULAR.as_bytes())?;
            if *executable {
                write_string(w, EXECUTABLE.as_bytes())?;
                write_string(w, b"")?;
            }
            write_string(w, CONTENTS.as_bytes())?;
            write_string(w, contents)?;
        }
        NarNode::Symlink { target } => {
            write_string(w, SYMLINK.as_bytes())?;
            write_string(w, TARGET.as_bytes())?;
            write_string(w, target)?;
        }
        NarNode::Directory(entries) => {
            write_string(w, DIRECTORY.as_bytes())?;
            for (name, child) in entries {
                write_string(w, ENTRY.as_bytes())?;
                write_string(w, OPEN.as_bytes())?;
                write_string(w, NAME.as_bytes())?;
                write_string(w, name)?;
                write_string(w, NODE.as_bytes())?;
                write_node(w, child)?;
                write_string(w, CLOSE.as_bytes())?;
            }
        }
    }
    write_string(w, CLOSE.as_bytes())
}

impl NarNode {
    /// The serialised archive.
    pub fn to_nar(&self) -> Vec<u8> {
        let mut v = Vec::new();
        write(&mut v, self).expect("writing to a Vec cannot fail");
        v
    }
}

#[cfg(test)]
mod tests {
    use super::super::read::{parse, read_tree, NarLimits, NarStats, TreeBuilder};
    use super::super::tests::sample;
    use super::*;

    #[test]
    fn round_trip() {
        let t = sample();
        let nar = t.to_nar();
        let back = read_tree(&nar[..], &NarLimits::default()).unwrap();
        assert_eq!(back, t);
        assert_eq!(back.to_nar(), nar);
        let mut b = TreeBuilder::default();
        let stats = parse(&nar[..], &mut b, &NarLimits::default()).unwrap();
        assert_eq!(
            stats,
            NarStats {
                files: 2,
                directories: 4,
                symlinks: 1,
                file_bytes: 31,
                nar_size: nar.len() as u64
            }
        );
    }

    #[test]
    fn strings_are_length_prefixed_and_padded_to_eight_bytes() {
        for (s, len) in [
            (&b""[..], 8),
            (b"(", 16),
            (b"12345678", 16),
            (b"123456789", 24),
        ] {
            let mut out = Vec::new();
            write_string(&mut out, s).unwrap();
            assert_eq!(out.len(), len, "{s:?}");
            assert_eq!(out[..8], (s.len() as u64).to_le_bytes());
            assert_eq!(&out[8..8 + s.len()], s);
            assert!(out[8 + s.len()..].iter().all(|&b| b == 0));
        }
    }

    #[test]
    fn writes_what_nix_wrote_byte_for_byte() {
        // Archives made by `nix-store --dump` (core/tests/data/README.md).
        for nar in [
            &include_bytes!("../../../tests/data/golden-tree.nar")[..],
            &include_bytes!("../../../tests/data/golden-ref.nar")[..],
            &include_bytes!("../../../tests/data/single-file.nar")[..],
            &include_bytes!("../../../tests/data/single-symlink.nar")[..],
        ] {
            let tree = read_tree(nar, &NarLimits::default()).unwrap();
            let mut out = Vec::new();
            write(&mut out, &tree).unwrap();
            assert_eq!(out, nar);
        }
    }
}
