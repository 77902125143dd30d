//! Nix's base-32 encoding ("nixbase32").
//!
//! The alphabet omits `e`, `o`, `u` and `t`, and the bits are taken from the
//! end of the input: the first character encodes the last 5-bit group.

/// The 32 characters, in digit order.
pub const ALPHABET: &[u8; 32] = b"0123456789abcdfghijklmnpqrsvwxyz";

/// Why a string is not valid nixbase32.
#[derive(Debug, thiserror::Error, PartialEq, Eq, Clone)]
pub enum Base32Error {
    #[error("invalid nixbase32 character {character:?} at position {position}")]
    InvalidCharacter { character: char, position: usize },
    #[error("invalid nixbase32 length {len}")]
    InvalidLength { len: usize },
    #[error("nixbase32 string {input:?} has non-zero padding bits")]
    NonZeroPadding { input: String },
}

/// Length of the encoding of `n` bytes.
pub const fn encoded_len(n: usize) -> usize {
    if n == 0 {
        0
    } else {
        (n * 8 - 1) / 5 + 1
    }
}

/// Number of bytes a valid encoding of `len` characters decodes to.
pub const fn decoded_len(len: usize) -> usize {
    len * 5 / 8
}

fn digit(c: u8) -> Option<u8> {
    ALPHABET.iter().position(|&a| a == c).map(|p| p as u8)
}

/// Encodes bytes as nixbase32.
pub fn encode(bytes: &[u8]) -> String {
    let len = encoded_len(bytes.len());
    let mut out = String::with_capacity(len);
    for n in (0..len).rev() {
        let bit = n * 5;
        let i = bit / 8;
        let j = bit % 8;
        let low = bytes[i] as u16 >> j;
        let high = if i + 1 < bytes.len() {
            (bytes[i + 1] as u16) << (8 - j)
        } else {
            0
        };
        out.push(ALPHABET[((low | high) & 0x1f) as usize] as char);
    }
    out
}

/// Decodes nixbase32 into bytes.
pub fn decode(s: &str) -> Result<Vec<u8>, Base32Error> {
    let input = s.as_bytes();
    let n = decoded_len(input.len());
    if encoded_len(n) != input.len() {
        return Err(Base32Error::InvalidLength { len: input.len() });
    }
    let mut out = vec![0u8; n];
    for (pos, &c) in input.iter().enumerate() {
        let d = digit(c).ok_or_else(|| Base32Error::InvalidCharacter {
            character: s[pos..].chars().next().unwrap_or('?'),
            position: pos,
        })? as u16;
        let bit = (input.len() - 1 - pos) * 5;
        let i = bit / 8;
        let j = bit % 8;
        let v = d << j;
        out[i] |= (v & 0xff) as u8;
        let carry = (v >> 8) as u8;
        if i + 1 < n {
            out[i + 1] |= carry;
        } else if carry != 0 {
            return Err(Base32Error::NonZeroPadding {
                input: s.to_owned(),
            });
        }
    }
    Ok(out)
}

/// Decodes nixbase32 into exactly `N` bytes.
pub fn decode_array<const N: usize>(s: &str) -> Result<[u8; N], Base32Error> {
    if s.len() != encoded_len(N) {
        return Err(Base32Error::InvalidLength { len: s.len() });
    }
    let v = decode(s)?;
    let mut out = [0u8; N];
    out.copy_from_slice(&v);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lengths() {
        assert_eq!(encoded_len(20), 32);
        assert_eq!(encoded_len(32), 52);
        assert_eq!(encoded_len(0), 0);
        assert_eq!(encoded_len(1), 2);
    }

    #[test]
    fn known_values() {
        // `nix-hash --type sha256 --to-base32` of the SHA-256 of the empty string
        // (e3b0c442...b855).
        let empty = [
            0xe3, 0xb0, 0xc4, 0x42, 0x98, 0xfc, 0x1c, 0x14, 0x9a, 0xfb, 0xf4, 0xc8, 0x99, 0x6f,
            0xb9, 0x24, 0x27, 0xae, 0x41, 0xe4, 0x64, 0x9b, 0x93, 0x4c, 0xa4, 0x95, 0x99, 0x1b,
            0x78, 0x52, 0xb8, 0x55,
        ];
        assert_eq!(
            encode(&empty),
            "0mdqa9w1p6cmli6976v4wi0sw9r4p5prkj7lzfd1877wk11c9c73"
        );
        assert_eq!(decode_array::<32>(&encode(&empty)).unwrap(), empty);
        assert_eq!(encode(&[0x1f]), "0z");
        assert_eq!(encode(&[]), "");
    }

    #[test]
    fn round_trip_all_lengths() {
        for len in 0..40usize {
            let bytes: Vec<u8> = (0..len).map(|i| (i * 37 + 11) as u8 ^ 0xa5).collect();
            let s = encode(&bytes);
            assert_eq!(s.len(), encoded_len(len));
            assert_eq!(decode(&s).unwrap(), bytes, "len {len}");
        }
    }

    #[test]
    fn errors() {
        assert_eq!(
            decode("0e"),
            Err(Base32Error::InvalidCharacter {
                character: 'e',
                position: 1
            })
        );
        assert_eq!(decode("000"), Err(Base32Error::InvalidLength { len: 3 }));
        // One byte takes two characters; the first carries 3 bits only.
        assert!(matches!(
            decode("z0"),
            Err(Base32Error::NonZeroPadding { .. })
        ));
        assert_eq!(decode("7z").unwrap(), vec![0xff]);
        assert!(decode_array::<20>("00").is_err());
    }
}
