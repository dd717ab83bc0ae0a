//! Torrent names made safe the way libtorrent 2.0 makes them (`sanitize_append_path_element`
//! and `resolve_duplicate_filenames` in its `src/torrent_info.cpp`), so that every torrent
//! libtorrent opens, swarmfs opens too, with the same file paths: a `--data-dir` shared with
//! qBittorrent lines up, and no name is refused or can leave the torrent's root.
//!
//! One component (a name, or one element of a `path` list) is cleaned byte by byte:
//! - `.` and `..` are dropped, and so is anything that is nothing but filtered characters;
//! - an empty component becomes `_`;
//! - `/`, `\`, NUL and the Unicode direction overrides (U+202A..U+202E, U+200E, U+200F, which
//!   make `exe.avi` of `iva.exe`) are removed (NUL by a quirk of libtorrent's `strchr` test);
//! - control characters (below U+0020) and each invalid UTF-8 sequence become `_`;
//! - past 240 bytes the rest is cut, keeping an extension of up to 9 bytes.
//!
//! A path whose components were all dropped becomes `_`. Paths that then collide, compared
//! ASCII-case-insensitively with each other and with directories, get a counter before the
//! extension in file order: `bar.txt`, `bar.1.txt`, `bar.2.txt`.

use std::collections::HashMap;

/// Bytes of a component kept before its extension (libtorrent keeps names below 255 bytes).
const MAX_COMPONENT_BYTES: usize = 240;

/// An extension is a `.` within this many bytes of the end of the component.
const MAX_EXTENSION_SEARCH: usize = 10;

/// Code points that turn a name's writing direction, so what it shows is not what it is.
const DIRECTION_OVERRIDES: [u32; 7] = [0x202a, 0x202b, 0x202c, 0x202d, 0x202e, 0x200e, 0x200f];

/// What a path component becomes: `None` when it is dropped (`.`, `..`, or nothing left).
pub fn sanitize_component(element: &[u8]) -> Option<String> {
    if element == b"." {
        return None;
    }
    if element.is_empty() {
        return Some("_".into());
    }
    let mut out = Vec::with_capacity(element.len());
    // `added` counts output bytes (a replacement `_` as one), as libtorrent does.
    let mut added = 0;
    let mut dots = 0;
    let mut found_extension = false;
    let mut at = 0;
    while at < element.len() {
        let start = at;
        let (code_point, len) = next_code_point(&element[start..]);
        at = start + len;
        match code_point {
            Some(c) if is_removed(c) => continue,
            Some(c) if c >= 0x20 => {
                out.extend_from_slice(&element[start..at]);
                added += len;
                if c == u32::from(b'.') {
                    dots += 1;
                }
            }
            _ => {
                out.push(b'_');
                added += 1;
                continue;
            }
        }
        if added >= MAX_COMPONENT_BYTES && !found_extension {
            let after = element
                .len()
                .saturating_sub(MAX_EXTENSION_SEARCH)
                .max(start)
                + 1;
            match (after..element.len()).rev().find(|&j| element[j] == b'.') {
                Some(dot) => {
                    found_extension = true;
                    at = dot;
                }
                None => break,
            }
        }
    }
    if added == dots && added <= 2 {
        return None;
    }
    // Only whole valid sequences and `_` were copied, so this is UTF-8; lossy just in case.
    Some(String::from_utf8(out).unwrap_or_else(|e| String::from_utf8_lossy(e.as_bytes()).into()))
}

/// The components of a path that survive; `["_"]` when none does.
pub fn sanitize_path<'a>(elements: impl IntoIterator<Item = &'a [u8]>) -> Vec<String> {
    let path: Vec<String> = elements
        .into_iter()
        .filter_map(sanitize_component)
        .collect();
    if path.is_empty() {
        vec!["_".into()]
    } else {
        path
    }
}

fn is_removed(c: u32) -> bool {
    c == 0 || c == u32::from(b'/') || c == u32::from(b'\\') || DIRECTION_OVERRIDES.contains(&c)
}

/// libtorrent's UTF-8 reader: `(code point, bytes taken)`, `None` for an invalid sequence. Its
/// length is the one the lead byte announces (a bad lead byte takes 1, a truncated sequence the
/// rest), which decides how many bytes one `_` replaces.
fn next_code_point(bytes: &[u8]) -> (Option<u32>, usize) {
    let Some(&lead) = bytes.first() else {
        return (None, 0);
    };
    let len = match lead {
        0x00..=0x7f => return (Some(u32::from(lead)), 1),
        0xc0..=0xdf => 2,
        0xe0..=0xef => 3,
        0xf0..=0xf7 => 4,
        0xf8..=0xfb => 5,
        _ => return (None, 1),
    };
    if len > bytes.len() {
        return (None, bytes.len());
    }
    if len > 4 {
        return (None, len);
    }
    let mut c = u32::from(lead) & (0x7f >> len);
    for &b in &bytes[1..len] {
        if b & 0xc0 != 0x80 {
            return (None, len);
        }
        c = (c << 6) | u32::from(b & 0x3f);
    }
    let shortest = match len {
        2 => 0x80,
        3 => 0x800,
        _ => 0x1_0000,
    };
    if c < shortest || c > 0x10_ffff || (0xd800..=0xdfff).contains(&c) {
        return (None, len);
    }
    (Some(c), len)
}

/// Renames, in order, every path that equals an earlier file's or a directory's (ASCII case
/// ignored) to the first free `base.N.ext`. `pad_lengths[i]` is `Some(length)` for a pad file:
/// pads of the same length may share a path. Returns the indexes of the renamed paths.
pub fn resolve_duplicates(paths: &mut [Vec<String>], pad_lengths: &[Option<u64>]) -> Vec<usize> {
    enum Taken {
        Dir,
        File(usize),
    }
    let key = |p: &[String]| p.join("/").to_ascii_lowercase();
    let mut taken: HashMap<String, Taken> = HashMap::new();
    for path in paths.iter() {
        for end in 1..path.len() {
            taken.insert(key(&path[..end]), Taken::Dir);
        }
    }
    // The counter to try next per colliding path, so N copies of a name cost N tries, not N^2
    // (a counter that was taken once stays taken, so the result is the same).
    let mut next_counter: HashMap<String, u64> = HashMap::new();
    let mut renamed = Vec::new();
    for (i, path) in paths.iter_mut().enumerate() {
        let wanted = key(path);
        let pad = pad_lengths.get(i).copied().flatten();
        match taken.get(&wanted) {
            None => {
                taken.insert(wanted, Taken::File(i));
                continue;
            }
            Some(Taken::File(j))
                if pad.is_some() && pad_lengths.get(*j).copied().flatten() == pad =>
            {
                continue
            }
            Some(_) => {}
        }
        let Some(last) = path.last().cloned() else {
            continue;
        };
        let (base, extension) = last
            .rfind('.')
            .map_or((last.as_str(), ""), |d| last.split_at(d));
        let counter = next_counter.entry(wanted).or_insert(1);
        let mut candidate = path.clone();
        loop {
            if let Some(end) = candidate.last_mut() {
                *end = format!("{base}.{counter}{extension}");
            }
            *counter += 1;
            if let std::collections::hash_map::Entry::Vacant(free) = taken.entry(key(&candidate)) {
                free.insert(Taken::File(i));
                break;
            }
        }
        *path = candidate;
        renamed.push(i);
    }
    renamed
}

#[cfg(test)]
mod tests {
    use super::*;

    fn component(bytes: &[u8]) -> Option<String> {
        sanitize_component(bytes)
    }

    #[test]
    fn relative_references_and_empty_leftovers_are_dropped() {
        for dropped in [
            &b"\0"[..],
            b".",
            b"..",
            b"/",
            b"\\\\",
            b"/..",
            b"../",
            b"./.",
            "\u{202e}".as_bytes(),
        ] {
            assert_eq!(
                component(dropped),
                None,
                "{:?}",
                String::from_utf8_lossy(dropped)
            );
        }
        assert_eq!(component(b"..."), Some("...".into()));
        assert_eq!(component(b".x"), Some(".x".into()));
        assert_eq!(component(b" a "), Some(" a ".into()));
    }

    #[test]
    fn empty_becomes_underscore_and_separators_are_removed() {
        assert_eq!(component(b""), Some("_".into()));
        assert_eq!(component(b"a/b"), Some("ab".into()));
        assert_eq!(component(b"a\\b"), Some("ab".into()));
        assert_eq!(component(b"/etc"), Some("etc".into()));
        assert_eq!(
            component("x\u{202e}y\u{200f}".as_bytes()),
            Some("xy".into())
        );
    }

    #[test]
    fn control_characters_and_invalid_utf8_become_underscores() {
        let cases: &[(&[u8], &str)] = &[
            (b"\x01x", "_x"),
            (b"a\0b", "ab"),
            (b".\x01", "._"),
            (b"\x01", "_"),
            (b"a\x7fb", "a\x7fb"),
            (b"x\xffy", "x_y"),
            (b"x\xe3\x81y", "x_"), // the bad sequence takes the byte it announced
            (b"a\xed\xa0\x80b", "a_b"), // surrogate
            (b"a\xc0\xafb", "a_b"), // overlong
            (b"a\xf8\x88\x80\x80\x80b", "a_b"),
            (b"ab\xf0\x9f", "ab_"),
            (b"a\xf0\x9fb", "a_"),
            ("ünï 名前 🎉".as_bytes(), "ünï 名前 🎉"),
        ];
        for (input, expected) in cases {
            assert_eq!(component(input).as_deref(), Some(*expected), "{input:?}");
        }
    }

    #[test]
    fn long_components_are_cut_keeping_the_extension() {
        let cut = |s: String| component(s.as_bytes()).unwrap();
        assert_eq!(cut("a".repeat(300) + ".txt"), "a".repeat(240) + ".txt");
        assert_eq!(cut("a".repeat(300)), "a".repeat(240));
        assert_eq!(cut("é".repeat(200) + ".mkv"), "é".repeat(120) + ".mkv");
        assert_eq!(cut("a".repeat(238) + "é.x"), "a".repeat(238) + "é.x");
        // An "extension" further than 9 bytes from the end is not one.
        assert_eq!(cut("a".repeat(250) + ".averylongext"), "a".repeat(240));
        assert_eq!(
            cut("a".repeat(235) + ".b.c.d.e.f"),
            "a".repeat(235) + ".b.c..f"
        );
    }

    #[test]
    fn paths_keep_surviving_components_or_become_underscore() {
        let path = |parts: &[&str]| sanitize_path(parts.iter().map(|p| p.as_bytes()));
        assert_eq!(path(&["..", "etc", "passwd"]), ["etc", "passwd"]);
        assert_eq!(path(&[".", "a"]), ["a"]);
        assert_eq!(path(&["", "b"]), ["_", "b"]);
        assert_eq!(path(&["a", ".."]), ["a"]);
        assert_eq!(path(&[".", ".."]), ["_"]);
        assert_eq!(path(&["/"]), ["_"]);
    }

    fn resolved(paths: &[&str], pads: &[Option<u64>]) -> (Vec<String>, Vec<usize>) {
        let mut paths: Vec<Vec<String>> = paths
            .iter()
            .map(|p| p.split('/').map(String::from).collect())
            .collect();
        let mut pad_lengths = pads.to_vec();
        pad_lengths.resize(paths.len(), None);
        let renamed = resolve_duplicates(&mut paths, &pad_lengths);
        (paths.iter().map(|p| p.join("/")).collect(), renamed)
    }

    #[test]
    fn duplicates_get_a_counter_before_the_extension() {
        let cases: &[(&[&str], &[&str], &[usize])] = &[
            (
                &["bar.txt", "bar.txt", "bar.txt"],
                &["bar.txt", "bar.1.txt", "bar.2.txt"],
                &[1, 2],
            ),
            (&["bar", "bar"], &["bar", "bar.1"], &[1]),
            (&["A.txt", "a.txt"], &["A.txt", "a.1.txt"], &[1]),
            (&["a", "a/b"], &["a.1", "a/b"], &[0]),
            (&["a/b", "a"], &["a/b", "a.1"], &[1]),
            (&["D/x", "d"], &["D/x", "d.1"], &[1]),
            (&["D/x", "d/y"], &["D/x", "d/y"], &[]),
            (
                &["a.txt", "a.txt", "a.1.txt"],
                &["a.txt", "a.1.txt", "a.1.1.txt"],
                &[1, 2],
            ),
            (&[".x", ".x"], &[".x", ".1.x"], &[1]),
            (&["d.e/f", "d.e/f"], &["d.e/f", "d.e/f.1"], &[1]),
        ];
        for (input, expected, renamed) in cases {
            let (paths, which) = resolved(input, &[]);
            assert_eq!(paths, *expected, "{input:?}");
            assert_eq!(which, *renamed, "{input:?}");
        }
    }

    #[test]
    fn pads_of_one_length_may_share_a_path() {
        let (paths, renamed) = resolved(
            &[".pad/5", ".pad/5", ".pad/5", "x"],
            &[Some(5), Some(5), Some(6), None],
        );
        assert_eq!(paths, [".pad/5", ".pad/5", ".pad/5.1", "x"]);
        assert_eq!(renamed, [2]);
    }

    #[test]
    fn many_copies_of_one_name_resolve_in_linear_tries() {
        let input = vec!["same.bin"; 20_000];
        let (paths, renamed) = resolved(&input, &[]);
        assert_eq!(renamed.len(), 19_999);
        assert_eq!(paths[19_999], "same.19999.bin");
    }
}
