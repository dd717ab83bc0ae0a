//! What serde_bencode lacks: a bounded bencode reader that keeps the exact bytes of every value
//! (the info-hash is the SHA-1 of the `info` dictionary as it stands in the file), and a small
//! deterministic writer (dictionary keys sorted by raw bytes, as BEP 3 requires).
//!
//! Bounds: a string's length prefix is checked against the remaining input before anything is
//! sliced, nesting is limited to [`MAX_DEPTH`], and every list or dictionary element takes at
//! least two input bytes, so memory use is linear in the input size.

use std::collections::BTreeMap;

/// Deepest nesting of lists and dictionaries accepted. Torrents need about 5.
pub const MAX_DEPTH: usize = 64;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BencodeError {
    #[error("input ends early (at byte {0})")]
    UnexpectedEnd(usize),
    #[error("unexpected byte {byte:#04x} at byte {offset}")]
    UnexpectedByte { offset: usize, byte: u8 },
    #[error("string at byte {offset} claims {length} bytes but only {remaining} remain")]
    LengthPastEnd {
        offset: usize,
        length: u64,
        remaining: usize,
    },
    #[error("malformed integer at byte {0}")]
    BadInteger(usize),
    #[error("integer at byte {0} does not fit in 64 bits")]
    IntegerOverflow(usize),
    #[error("nesting deeper than {MAX_DEPTH} levels at byte {0}")]
    TooDeep(usize),
    #[error("trailing data after the end of the value (at byte {0})")]
    TrailingData(usize),
}

/// A decoded value borrowing from the input.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Value<'a> {
    Int(i64),
    Bytes(&'a [u8]),
    List(Vec<Node<'a>>),
    /// Entries in input order (duplicates are rejected while decoding).
    Dict(Vec<(&'a [u8], Node<'a>)>),
}

/// A value and the exact input bytes it was decoded from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Node<'a> {
    pub value: Value<'a>,
    pub raw: &'a [u8],
}

impl<'a> Node<'a> {
    pub fn as_int(&self) -> Option<i64> {
        match self.value {
            Value::Int(i) => Some(i),
            _ => None,
        }
    }
    pub fn as_bytes(&self) -> Option<&'a [u8]> {
        match self.value {
            Value::Bytes(b) => Some(b),
            _ => None,
        }
    }
    pub fn as_list(&self) -> Option<&[Node<'a>]> {
        match &self.value {
            Value::List(l) => Some(l),
            _ => None,
        }
    }
    pub fn as_dict(&self) -> Option<&[(&'a [u8], Node<'a>)]> {
        match &self.value {
            Value::Dict(d) => Some(d),
            _ => None,
        }
    }
    /// The value of `key` if this is a dictionary that has it.
    pub fn get(&self, key: &str) -> Option<&Node<'a>> {
        self.as_dict()?
            .iter()
            .find(|(k, _)| *k == key.as_bytes())
            .map(|(_, v)| v)
    }
    /// A short name for the kind of value, for error messages.
    pub fn kind(&self) -> &'static str {
        match self.value {
            Value::Int(_) => "integer",
            Value::Bytes(_) => "string",
            Value::List(_) => "list",
            Value::Dict(_) => "dictionary",
        }
    }
}

/// Decodes exactly one value that must span the whole input.
pub fn decode(input: &[u8]) -> Result<Node<'_>, BencodeError> {
    let (node, used) = decode_prefix(input)?;
    if used != input.len() {
        return Err(BencodeError::TrailingData(used));
    }
    Ok(node)
}

/// Decodes one value at the start of `input`; returns it and the number of bytes it took
/// (BEP 9 `ut_metadata` messages carry raw data after the dictionary).
pub fn decode_prefix(input: &[u8]) -> Result<(Node<'_>, usize), BencodeError> {
    let mut reader = Reader { input, pos: 0 };
    let node = reader.value(0)?;
    Ok((node, reader.pos))
}

struct Reader<'a> {
    input: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn peek(&self) -> Result<u8, BencodeError> {
        self.input
            .get(self.pos)
            .copied()
            .ok_or(BencodeError::UnexpectedEnd(self.pos))
    }

    fn value(&mut self, depth: usize) -> Result<Node<'a>, BencodeError> {
        let start = self.pos;
        let value = match self.peek()? {
            b'i' => {
                self.pos += 1;
                Value::Int(self.integer(b'e')?)
            }
            b'0'..=b'9' => Value::Bytes(self.bytes()?),
            b'l' => {
                if depth >= MAX_DEPTH {
                    return Err(BencodeError::TooDeep(start));
                }
                self.pos += 1;
                let mut items = Vec::new();
                while self.peek()? != b'e' {
                    items.push(self.value(depth + 1)?);
                }
                self.pos += 1;
                Value::List(items)
            }
            b'd' => {
                if depth >= MAX_DEPTH {
                    return Err(BencodeError::TooDeep(start));
                }
                self.pos += 1;
                let mut entries: Vec<(&'a [u8], Node<'a>)> = Vec::new();
                let mut sorted = true;
                loop {
                    let b = self.peek()?;
                    if b == b'e' {
                        break;
                    }
                    if !b.is_ascii_digit() {
                        return Err(BencodeError::UnexpectedByte {
                            offset: self.pos,
                            byte: b,
                        });
                    }
                    let key = self.bytes()?;
                    if let Some((last, _)) = entries.last() {
                        sorted &= *last < key;
                    }
                    let value = self.value(depth + 1)?;
                    entries.push((key, value));
                }
                self.pos += 1;
                // Unsorted dictionaries occur in the wild and are accepted. So are duplicate
                // keys, as libtorrent accepts them: the first one counts, as in libtorrent's
                // lookups, and the later ones are dropped here so that every reader agrees.
                // (`raw` still spans them: an info-hash is of the bytes as sent.)
                if !sorted {
                    let mut seen = std::collections::HashSet::with_capacity(entries.len());
                    entries.retain(|(k, _)| seen.insert(*k));
                }
                Value::Dict(entries)
            }
            byte => {
                return Err(BencodeError::UnexpectedByte {
                    offset: start,
                    byte,
                })
            }
        };
        Ok(Node {
            value,
            raw: &self.input[start..self.pos],
        })
    }

    /// Reads digits (with an optional leading `-`) up to `end`, which is consumed.
    fn integer(&mut self, end: u8) -> Result<i64, BencodeError> {
        let start = self.pos;
        let negative = self.peek()? == b'-';
        if negative {
            self.pos += 1;
        }
        let mut value: i64 = 0;
        let mut digits = 0usize;
        loop {
            let b = self.peek()?;
            if b == end {
                break;
            }
            if !b.is_ascii_digit() {
                return Err(BencodeError::UnexpectedByte {
                    offset: self.pos,
                    byte: b,
                });
            }
            let d = (b - b'0') as i64;
            value = value
                .checked_mul(10)
                .and_then(|v| {
                    if negative {
                        v.checked_sub(d)
                    } else {
                        v.checked_add(d)
                    }
                })
                .ok_or(BencodeError::IntegerOverflow(start))?;
            digits += 1;
            self.pos += 1;
        }
        if digits == 0 || (negative && value == 0) {
            return Err(BencodeError::BadInteger(start));
        }
        self.pos += 1;
        Ok(value)
    }

    fn bytes(&mut self) -> Result<&'a [u8], BencodeError> {
        let start = self.pos;
        let length = self.integer(b':')?;
        let length = u64::try_from(length).map_err(|_| BencodeError::BadInteger(start))?;
        let remaining = self.input.len() - self.pos;
        if length > remaining as u64 {
            return Err(BencodeError::LengthPastEnd {
                offset: start,
                length,
                remaining,
            });
        }
        let end = self.pos + length as usize;
        let bytes = &self.input[self.pos..end];
        self.pos = end;
        Ok(bytes)
    }
}

/// An owned value for writing. Dictionaries are `BTreeMap`s, so keys come out sorted by their
/// raw bytes and the same value always encodes to the same bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Owned {
    Int(i64),
    Bytes(Vec<u8>),
    List(Vec<Owned>),
    Dict(BTreeMap<Vec<u8>, Owned>),
}

impl Owned {
    pub fn str(s: &str) -> Owned {
        Owned::Bytes(s.as_bytes().to_vec())
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::new();
        self.encode_into(&mut out);
        out
    }

    pub fn encode_into(&self, out: &mut Vec<u8>) {
        match self {
            Owned::Int(i) => {
                out.push(b'i');
                out.extend_from_slice(i.to_string().as_bytes());
                out.push(b'e');
            }
            Owned::Bytes(b) => encode_bytes(b, out),
            Owned::List(items) => {
                out.push(b'l');
                for item in items {
                    item.encode_into(out);
                }
                out.push(b'e');
            }
            Owned::Dict(entries) => {
                out.push(b'd');
                for (k, v) in entries {
                    encode_bytes(k, out);
                    v.encode_into(out);
                }
                out.push(b'e');
            }
        }
    }
}

fn encode_bytes(b: &[u8], out: &mut Vec<u8>) {
    out.extend_from_slice(b.len().to_string().as_bytes());
    out.push(b':');
    out.extend_from_slice(b);
}

/// Builds a dictionary from `(key, value)` pairs.
pub fn dict<I: IntoIterator<Item = (&'static str, Owned)>>(entries: I) -> Owned {
    Owned::Dict(
        entries
            .into_iter()
            .map(|(k, v)| (k.as_bytes().to_vec(), v))
            .collect(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_all_kinds_with_raw_spans() {
        let input = b"d1:ai-12e1:bl3:xyzi0ee1:cd1:d0:ee";
        let node = decode(input).unwrap();
        assert_eq!(node.get("a").unwrap().as_int(), Some(-12));
        let list = node.get("b").unwrap();
        assert_eq!(list.raw, b"l3:xyzi0ee");
        assert_eq!(list.as_list().unwrap()[0].as_bytes(), Some(&b"xyz"[..]));
        assert_eq!(node.get("c").unwrap().raw, b"d1:d0:e");
        assert_eq!(
            node.get("c").unwrap().get("d").unwrap().as_bytes(),
            Some(&b""[..])
        );
        assert!(node.get("zz").is_none());
    }

    #[test]
    fn rejects_malformed_input() {
        use BencodeError::*;
        type Check = fn(&BencodeError) -> bool;
        let cases: &[(&[u8], Check)] = &[
            (b"", |e| matches!(e, UnexpectedEnd(0))),
            (b"i12", |e| matches!(e, UnexpectedEnd(_))),
            (b"ie", |e| matches!(e, BadInteger(_))),
            (b"i-e", |e| matches!(e, BadInteger(_))),
            (b"i-0e", |e| matches!(e, BadInteger(_))),
            (b"i1x2e", |e| matches!(e, UnexpectedByte { byte: b'x', .. })),
            (b"i99999999999999999999e", |e| {
                matches!(e, IntegerOverflow(_))
            }),
            (b"99999999999999999999:a", |e| {
                matches!(e, IntegerOverflow(_))
            }),
            (b"5:abc", |e| {
                matches!(
                    e,
                    LengthPastEnd {
                        length: 5,
                        remaining: 3,
                        ..
                    }
                )
            }),
            (b"9223372036854775807:", |e| {
                matches!(e, LengthPastEnd { .. })
            }),
            (b"-1:a", |e| matches!(e, UnexpectedByte { .. })),
            (b"l", |e| matches!(e, UnexpectedEnd(1))),
            (b"di1ei2ee", |e| {
                matches!(e, UnexpectedByte { byte: b'i', .. })
            }),
            (b"i1ei2e", |e| matches!(e, TrailingData(3))),
            (b"x", |e| matches!(e, UnexpectedByte { byte: b'x', .. })),
        ];
        for (input, check) in cases {
            let err = decode(input).unwrap_err();
            assert!(
                check(&err),
                "{:?}: got {err:?}",
                String::from_utf8_lossy(input)
            );
        }
    }

    #[test]
    fn limits_nesting() {
        let deep = |n: usize| {
            let mut v = vec![b'l'; n];
            v.extend(std::iter::repeat_n(b'e', n));
            v
        };
        assert!(decode(&deep(MAX_DEPTH)).is_ok());
        assert!(matches!(
            decode(&deep(MAX_DEPTH + 1)),
            Err(BencodeError::TooDeep(_))
        ));
        assert!(matches!(
            decode(&deep(100_000)),
            Err(BencodeError::TooDeep(_))
        ));
    }

    #[test]
    fn a_duplicate_key_keeps_its_first_value_as_in_libtorrent() {
        for input in [&b"d1:ai1e1:ai2ee"[..], b"d1:bi1e1:ai2e1:bi3ee"] {
            let node = decode(input).unwrap();
            let Value::Dict(entries) = &node.value else {
                panic!("a dictionary")
            };
            let keys: Vec<&[u8]> = entries.iter().map(|(k, _)| *k).collect();
            let mut unique = keys.clone();
            unique.sort_unstable();
            unique.dedup();
            assert_eq!(keys.len(), unique.len(), "one entry per key");
            assert_eq!(node.raw, input, "the raw span keeps every byte");
        }
        let node = decode(b"d1:bi1e1:ai2e1:bi3ee").unwrap();
        assert!(matches!(node.get("b").unwrap().value, Value::Int(1)));
    }

    #[test]
    fn accepts_unsorted_keys_and_prefixes() {
        let node = decode(b"d1:bi1e1:ai2ee").unwrap();
        assert_eq!(node.get("a").unwrap().as_int(), Some(2));
        let (node, used) = decode_prefix(b"d1:ai1eeRAW").unwrap();
        assert_eq!(used, 8);
        assert_eq!(node.raw, b"d1:ai1ee");
    }

    #[test]
    fn encodes_sorted_and_round_trips() {
        let value = dict([
            ("zeta", Owned::Int(-3)),
            ("alpha", Owned::List(vec![Owned::str("x"), Owned::Int(0)])),
        ]);
        let bytes = value.encode();
        assert_eq!(bytes, b"d5:alphal1:xi0ee4:zetai-3ee");
        assert_eq!(decode(&bytes).unwrap().raw, &bytes[..]);
    }
}
