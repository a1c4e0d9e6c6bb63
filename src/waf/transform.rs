//! SecLang transformations (`t:`): byte-string functions applied to a value before the operator
//! sees it. They follow ModSecurity 3's definitions, since the Core Rule Set's regexes are
//! written against its output. Each returns `Cow::Borrowed` when it changes nothing, which is
//! the common case for clean input.

use std::borrow::Cow;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Transform {
    Lowercase,
    Uppercase,
    UrlDecode,
    UrlDecodeUni,
    HtmlEntityDecode,
    JsDecode,
    CssDecode,
    Utf8ToUnicode,
    RemoveNulls,
    ReplaceNulls,
    RemoveWhitespace,
    CompressWhitespace,
    CmdLine,
    ReplaceComments,
    RemoveComments,
    NormalizePath,
    NormalizePathWin,
    Length,
    Sha1,
    Md5,
    HexEncode,
    HexDecode,
    Base64Decode,
    Trim,
    TrimLeft,
    TrimRight,
    EscapeSeqDecode,
}

impl Transform {
    /// The transformation named `name` (`none` is handled by the caller), or None.
    pub fn parse(name: &str) -> Option<Transform> {
        use Transform::*;
        Some(match name.to_ascii_lowercase().as_str() {
            "lowercase" => Lowercase,
            "uppercase" => Uppercase,
            "urldecode" => UrlDecode,
            "urldecodeuni" => UrlDecodeUni,
            "htmlentitydecode" => HtmlEntityDecode,
            "jsdecode" => JsDecode,
            "cssdecode" => CssDecode,
            "utf8tounicode" => Utf8ToUnicode,
            "removenulls" => RemoveNulls,
            "replacenulls" => ReplaceNulls,
            "removewhitespace" => RemoveWhitespace,
            "compresswhitespace" => CompressWhitespace,
            "cmdline" => CmdLine,
            "replacecomments" => ReplaceComments,
            "removecomments" => RemoveComments,
            "normalisepath" | "normalizepath" => NormalizePath,
            "normalisepathwin" | "normalizepathwin" => NormalizePathWin,
            "length" => Length,
            "sha1" => Sha1,
            "md5" => Md5,
            "hexencode" => HexEncode,
            "hexdecode" => HexDecode,
            "base64decode" | "base64decodeext" => Base64Decode,
            "trim" => Trim,
            "trimleft" => TrimLeft,
            "trimright" => TrimRight,
            "escapeseqdecode" => EscapeSeqDecode,
            _ => return None,
        })
    }

    /// Bytes without which this transformation returns its input unchanged; None for those
    /// that always change it (`length`, `sha1`, ...). A value holding none of a chain's
    /// trigger bytes skips the chain (see `Cache::slot`). A superset is safe, a missing byte
    /// is not: the test `trigger_bytes_are_complete` checks each set against [`Transform::apply`].
    pub fn triggers(self) -> Option<ByteSet> {
        use Transform::*;
        let set = |f: fn(u8) -> bool| Some(ByteSet::of(f));
        match self {
            Lowercase => set(|b| b.is_ascii_uppercase()),
            Uppercase => set(|b| b.is_ascii_lowercase()),
            UrlDecode | UrlDecodeUni => set(|b| b == b'%' || b == b'+'),
            HtmlEntityDecode => set(|b| b == b'&'),
            JsDecode | CssDecode | EscapeSeqDecode => set(|b| b == b'\\'),
            Utf8ToUnicode => set(|b| b >= 0x80),
            RemoveNulls | ReplaceNulls => set(|b| b == 0),
            RemoveWhitespace | CompressWhitespace | Trim | TrimLeft | TrimRight => set(is_space),
            CmdLine => set(|b| {
                b.is_ascii_uppercase()
                    || matches!(
                        b,
                        b'"' | b'\'' | b'\\' | b'^' | b',' | b';' | b' ' | b'\t' | b'\r' | b'\n'
                    )
            }),
            ReplaceComments => set(|b| b == b'/' || b == b'*'),
            RemoveComments => set(|b| matches!(b, b'/' | b'-' | b'#')),
            NormalizePath => set(|b| b == b'/' || b == b'.'),
            NormalizePathWin => set(|b| matches!(b, b'/' | b'.' | b'\\')),
            Length | Sha1 | Md5 | HexEncode | HexDecode | Base64Decode => None,
        }
    }

    pub fn apply<'a>(self, v: &'a [u8]) -> Cow<'a, [u8]> {
        use Transform::*;
        match self {
            Lowercase => {
                if v.iter().any(u8::is_ascii_uppercase) {
                    Cow::Owned(v.to_ascii_lowercase())
                } else {
                    Cow::Borrowed(v)
                }
            }
            Uppercase => {
                if v.iter().any(u8::is_ascii_lowercase) {
                    Cow::Owned(v.to_ascii_uppercase())
                } else {
                    Cow::Borrowed(v)
                }
            }
            UrlDecode => when(v, |b| b == b'%' || b == b'+', |v| url_decode(v, false)),
            UrlDecodeUni => when(v, |b| b == b'%' || b == b'+', |v| url_decode(v, true)),
            HtmlEntityDecode => when(v, |b| b == b'&', html_entity_decode),
            JsDecode => when(v, |b| b == b'\\', js_decode),
            CssDecode => when(v, |b| b == b'\\', css_decode),
            Utf8ToUnicode => when(v, |b| b >= 0x80, utf8_to_unicode),
            RemoveNulls => when(
                v,
                |b| b == 0,
                |v| v.iter().copied().filter(|&b| b != 0).collect(),
            ),
            ReplaceNulls => when(
                v,
                |b| b == 0,
                |v| v.iter().map(|&b| if b == 0 { b' ' } else { b }).collect(),
            ),
            RemoveWhitespace => when(v, is_space, |v| {
                v.iter().copied().filter(|&b| !is_space(b)).collect()
            }),
            CompressWhitespace => compress_whitespace(v),
            CmdLine => {
                if cmd_line_changes(v) {
                    Cow::Owned(cmd_line(v))
                } else {
                    Cow::Borrowed(v)
                }
            }
            ReplaceComments => when(v, |b| b == b'/' || b == b'*', replace_comments),
            RemoveComments => when(v, |b| matches!(b, b'/' | b'-' | b'#'), remove_comments),
            NormalizePath | NormalizePathWin => {
                let win = self == NormalizePathWin;
                if path_is_normal(v, win) {
                    Cow::Borrowed(v)
                } else {
                    Cow::Owned(normalize_path(v, win))
                }
            }
            Length => Cow::Owned(v.len().to_string().into_bytes()),
            Sha1 => {
                use sha1::Digest;
                Cow::Owned(sha1::Sha1::digest(v).to_vec())
            }
            Md5 => {
                use md5::Digest;
                Cow::Owned(md5::Md5::digest(v).to_vec())
            }
            HexEncode => {
                const HEX: &[u8; 16] = b"0123456789abcdef";
                let mut out = Vec::with_capacity(v.len() * 2);
                for &b in v {
                    out.push(HEX[(b >> 4) as usize]);
                    out.push(HEX[(b & 15) as usize]);
                }
                Cow::Owned(out)
            }
            HexDecode => Cow::Owned(
                v.chunks(2)
                    .filter(|c| c.len() == 2)
                    .filter_map(|c| Some(hex(c[0])? << 4 | hex(c[1])?))
                    .collect(),
            ),
            Base64Decode => {
                use base64::Engine;
                let trimmed: Vec<u8> = v
                    .iter()
                    .copied()
                    .filter(|b| b.is_ascii_alphanumeric() || matches!(b, b'+' | b'/'))
                    .collect();
                Cow::Owned(
                    base64::engine::general_purpose::STANDARD_NO_PAD
                        .decode(&trimmed)
                        .unwrap_or_default(),
                )
            }
            Trim => trim(v, true, true),
            TrimLeft => trim(v, true, false),
            TrimRight => trim(v, false, true),
            EscapeSeqDecode => when(v, |b| b == b'\\', escape_seq_decode),
        }
    }
}

/// A set of byte values, as four 64-bit words.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ByteSet([u64; 4]);

impl ByteSet {
    pub fn of(f: fn(u8) -> bool) -> ByteSet {
        let mut s = ByteSet::default();
        for b in 0..=255u8 {
            if f(b) {
                s.insert(b);
            }
        }
        s
    }

    /// The bytes `v` holds.
    pub fn bytes_of(v: &[u8]) -> ByteSet {
        let mut s = ByteSet::default();
        for &b in v {
            s.insert(b);
        }
        s
    }

    pub fn insert(&mut self, b: u8) {
        self.0[(b >> 6) as usize] |= 1 << (b & 63);
    }

    pub fn union(self, o: ByteSet) -> ByteSet {
        ByteSet(std::array::from_fn(|i| self.0[i] | o.0[i]))
    }

    pub fn intersects(&self, o: &ByteSet) -> bool {
        (0..4).any(|i| self.0[i] & o.0[i] != 0)
    }
}

/// Runs `f` only when some byte may need it.
fn when<'a>(v: &'a [u8], need: impl Fn(u8) -> bool, f: impl Fn(&[u8]) -> Vec<u8>) -> Cow<'a, [u8]> {
    if v.iter().any(|&b| need(b)) {
        Cow::Owned(f(v))
    } else {
        Cow::Borrowed(v)
    }
}

/// Whitespace as ModSecurity counts it (C `isspace` plus the non-breaking space).
fn is_space(b: u8) -> bool {
    matches!(b, b' ' | b'\t' | b'\n' | b'\r' | 0x0b | 0x0c | 0xa0)
}

fn hex(b: u8) -> Option<u8> {
    (b as char).to_digit(16).map(|d| d as u8)
}

fn trim(v: &[u8], left: bool, right: bool) -> Cow<'_, [u8]> {
    let mut s = 0;
    let mut e = v.len();
    if left {
        while s < e && is_space(v[s]) {
            s += 1;
        }
    }
    if right {
        while e > s && is_space(v[e - 1]) {
            e -= 1;
        }
    }
    Cow::Borrowed(&v[s..e])
}

/// `%uHHHH` (with `uni`) keeps the low byte, except fullwidth ASCII (U+FF01..U+FF5E), which maps
/// to ASCII: ModSecurity's behaviour without a unicode map.
fn unicode_byte(code: u32) -> u8 {
    if (0xff01..=0xff5e).contains(&code) {
        (code - 0xfee0) as u8
    } else {
        (code & 0xff) as u8
    }
}

/// `%HH` and `+`; invalid escapes stay as they are.
pub fn url_decode(v: &[u8], uni: bool) -> Vec<u8> {
    let mut out = Vec::with_capacity(v.len());
    let mut i = 0;
    while i < v.len() {
        let b = v[i];
        if b == b'%' {
            if uni && i + 5 < v.len() && matches!(v[i + 1], b'u' | b'U') {
                let code = v[i + 2..i + 6]
                    .iter()
                    .try_fold(0u32, |acc, &c| hex(c).map(|d| acc << 4 | d as u32));
                if let Some(code) = code {
                    out.push(unicode_byte(code));
                    i += 6;
                    continue;
                }
            }
            if let (Some(h), Some(l)) = (
                v.get(i + 1).copied().and_then(hex),
                v.get(i + 2).copied().and_then(hex),
            ) {
                out.push(h << 4 | l);
                i += 3;
                continue;
            }
            out.push(b'%');
        } else if b == b'+' {
            out.push(b' ');
        } else {
            out.push(b);
        }
        i += 1;
    }
    out
}

/// `&#DDD;`, `&#xHH;` and `&quot; &amp; &lt; &gt; &nbsp;` (semicolon optional), like
/// ModSecurity; numeric entities keep their low byte.
fn html_entity_decode(v: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(v.len());
    let mut i = 0;
    while i < v.len() {
        if v[i] != b'&' {
            out.push(v[i]);
            i += 1;
            continue;
        }
        let rest = &v[i + 1..];
        if rest.first() == Some(&b'#') {
            let (radix, start) = match rest.get(1) {
                Some(b'x' | b'X') => (16, 2),
                _ => (10, 1),
            };
            let digits = rest[start..]
                .iter()
                .take_while(|b| (**b as char).is_digit(radix))
                .count();
            if digits > 0 {
                let s = std::str::from_utf8(&rest[start..start + digits]).unwrap_or("0");
                let code = u32::from_str_radix(s, radix).unwrap_or(0);
                out.push((code & 0xff) as u8);
                i += 1 + start + digits;
                if v.get(i) == Some(&b';') {
                    i += 1;
                }
                continue;
            }
        } else {
            let name_len = rest.iter().take_while(|b| b.is_ascii_alphabetic()).count();
            let decoded = match rest[..name_len].to_ascii_lowercase().as_slice() {
                b"quot" => Some(b'"'),
                b"amp" => Some(b'&'),
                b"lt" => Some(b'<'),
                b"gt" => Some(b'>'),
                b"nbsp" => Some(0xa0),
                _ => None,
            };
            if let Some(d) = decoded {
                out.push(d);
                i += 1 + name_len;
                if v.get(i) == Some(&b';') {
                    i += 1;
                }
                continue;
            }
        }
        out.push(b'&');
        i += 1;
    }
    out
}

/// JavaScript escapes: `\uHHHH`, `\xHH`, `\OOO`, `\n` and friends, `\c` → `c`.
fn js_decode(v: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(v.len());
    let mut i = 0;
    while i < v.len() {
        if v[i] != b'\\' || i + 1 >= v.len() {
            out.push(v[i]);
            i += 1;
            continue;
        }
        let n = v[i + 1];
        if (n == b'u' || n == b'U') && i + 5 < v.len() {
            if let Some(code) = v[i + 2..i + 6]
                .iter()
                .try_fold(0u32, |a, &c| hex(c).map(|d| a << 4 | d as u32))
            {
                out.push(unicode_byte(code));
                i += 6;
                continue;
            }
        }
        if (n == b'x' || n == b'X') && i + 3 < v.len() {
            if let (Some(h), Some(l)) = (hex(v[i + 2]), hex(v[i + 3])) {
                out.push(h << 4 | l);
                i += 4;
                continue;
            }
        }
        if (b'0'..=b'7').contains(&n) {
            let mut code = 0u32;
            let mut j = i + 1;
            while j < v.len() && j < i + 4 && (b'0'..=b'7').contains(&v[j]) {
                code = code * 8 + (v[j] - b'0') as u32;
                j += 1;
            }
            out.push((code & 0xff) as u8);
            i = j;
            continue;
        }
        out.push(match n {
            b'a' => 7,
            b'b' => 8,
            b'f' => 12,
            b'n' => b'\n',
            b'r' => b'\r',
            b't' => b'\t',
            b'v' => 11,
            other => other,
        });
        i += 2;
    }
    out
}

/// CSS 2 escapes: `\` + 1–6 hex digits (one optional whitespace after), or `\` + any character.
fn css_decode(v: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(v.len());
    let mut i = 0;
    while i < v.len() {
        if v[i] != b'\\' {
            out.push(v[i]);
            i += 1;
            continue;
        }
        if i + 1 >= v.len() {
            i += 1; // a trailing backslash is dropped
            continue;
        }
        let digits = v[i + 1..]
            .iter()
            .take(6)
            .take_while(|b| b.is_ascii_hexdigit())
            .count();
        if digits > 0 {
            let code = v[i + 1..i + 1 + digits]
                .iter()
                .fold(0u32, |a, &c| a << 4 | hex(c).unwrap_or(0) as u32);
            out.push(unicode_byte(code));
            i += 1 + digits;
            if i < v.len() && is_space(v[i]) {
                i += 1;
            }
        } else if v[i + 1] == b'\n' {
            i += 2; // an escaped newline is a line continuation
        } else {
            out.push(v[i + 1]);
            i += 2;
        }
    }
    out
}

/// UTF-8 sequences become `%uHHHH` (what ModSecurity's utf8toUnicode writes); invalid bytes stay.
fn utf8_to_unicode(v: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(v.len() + 8);
    for chunk in v.utf8_chunks() {
        for c in chunk.valid().chars() {
            if c.is_ascii() {
                out.push(c as u8);
            } else {
                let code = c as u32;
                out.extend_from_slice(format!("%u{:04x}", code & 0xffff).as_bytes());
            }
        }
        out.extend_from_slice(chunk.invalid());
    }
    out
}

fn compress_whitespace(v: &[u8]) -> Cow<'_, [u8]> {
    let needs = v.windows(2).any(|w| is_space(w[0]) && is_space(w[1]))
        || v.iter().any(|&b| is_space(b) && b != b' ');
    if !needs {
        return Cow::Borrowed(v);
    }
    let mut out = Vec::with_capacity(v.len());
    let mut in_space = false;
    for &b in v {
        if is_space(b) {
            if !in_space {
                out.push(b' ');
            }
            in_space = true;
        } else {
            out.push(b);
            in_space = false;
        }
    }
    Cow::Owned(out)
}

/// Whether [`cmd_line`] would change `v`; most values it leaves alone, and the cache keeps
/// one copy of a value no transformation changed.
fn cmd_line_changes(v: &[u8]) -> bool {
    v.iter().enumerate().any(|(i, &b)| match b {
        b'"' | b'\'' | b'\\' | b'^' | b',' | b';' | b'\t' | b'\r' | b'\n' => true,
        b' ' => matches!(v.get(i + 1), Some(b' ' | b'/' | b'(')),
        _ => b.is_ascii_uppercase(),
    })
}

/// Windows and Unix command-line evasions: drop `\ " ' ^`, `,` and `;` become spaces, spaces
/// collapse and go before `/` and `(`, all lowercased.
fn cmd_line(v: &[u8]) -> Vec<u8> {
    let mut out: Vec<u8> = Vec::with_capacity(v.len());
    let mut space = false;
    for &b in v {
        match b {
            b'"' | b'\'' | b'\\' | b'^' => {}
            b' ' | b',' | b';' | b'\t' | b'\r' | b'\n' => {
                if !space {
                    out.push(b' ');
                    space = true;
                }
            }
            b'/' | b'(' => {
                if space {
                    out.pop();
                }
                space = false;
                out.push(b);
            }
            _ => {
                out.push(b.to_ascii_lowercase());
                space = false;
            }
        }
    }
    out
}

/// C-style comments become one space; an unterminated comment runs to the end.
fn replace_comments(v: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(v.len());
    let mut i = 0;
    while i < v.len() {
        if v[i] == b'/' && v.get(i + 1) == Some(&b'*') {
            let end = v[i + 2..].windows(2).position(|w| w == b"*/");
            out.push(b' ');
            match end {
                Some(p) => i += 2 + p + 2,
                None => return out,
            }
        } else if v[i] == b'*' && v.get(i + 1) == Some(&b'/') {
            out.push(b' ');
            i += 2;
        } else {
            out.push(v[i]);
            i += 1;
        }
    }
    out
}

/// Removes `/* */`, `<!-- -->`, and `--` or `#` up to the end.
fn remove_comments(v: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(v.len());
    let mut i = 0;
    while i < v.len() {
        let rest = &v[i..];
        if rest.starts_with(b"/*") {
            match rest[2..].windows(2).position(|w| w == b"*/") {
                Some(p) => i += 2 + p + 2,
                None => break,
            }
        } else if rest.starts_with(b"<!--") {
            match rest[4..].windows(3).position(|w| w == b"-->") {
                Some(p) => i += 4 + p + 3,
                None => break,
            }
        } else if rest.starts_with(b"--") || rest[0] == b'#' {
            break;
        } else {
            out.push(v[i]);
            i += 1;
        }
    }
    out
}

/// Resolves `.` and `..` segments and repeated slashes; `win` first turns `\` into `/`.
/// Whether [`normalize_path`] would leave `v` as it is: no `.` or `..` segment, no empty
/// segment but a leading or trailing `/`, and (Windows) no backslash.
fn path_is_normal(v: &[u8], win: bool) -> bool {
    if win && v.contains(&b'\\') {
        return false;
    }
    let n = v.split(|&b| b == b'/').count();
    v.split(|&b| b == b'/')
        .enumerate()
        .all(|(i, seg)| match seg {
            b"." | b".." => false,
            b"" => i == 0 || i == n - 1,
            _ => true,
        })
}

fn normalize_path(v: &[u8], win: bool) -> Vec<u8> {
    let owned: Vec<u8> = if win {
        v.iter()
            .map(|&b| if b == b'\\' { b'/' } else { b })
            .collect()
    } else {
        v.to_vec()
    };
    let absolute = owned.first() == Some(&b'/');
    let trailing = owned.last() == Some(&b'/') || owned.ends_with(b"/.") || owned.ends_with(b"/..");
    let mut parts: Vec<&[u8]> = Vec::new();
    for seg in owned.split(|&b| b == b'/') {
        match seg {
            b"" | b"." => {}
            b".." => {
                if parts.last().is_some_and(|p| *p != b"..") {
                    parts.pop();
                } else if !absolute {
                    parts.push(seg);
                }
            }
            s => parts.push(s),
        }
    }
    let mut out = Vec::with_capacity(owned.len());
    if absolute {
        out.push(b'/');
    }
    for (i, p) in parts.iter().enumerate() {
        if i > 0 {
            out.push(b'/');
        }
        out.extend_from_slice(p);
    }
    if trailing && !parts.is_empty() {
        out.push(b'/');
    }
    out
}

/// ANSI C escapes: `\n \t ... \xHH \OOO`.
fn escape_seq_decode(v: &[u8]) -> Vec<u8> {
    js_decode(v)
}

#[cfg(test)]
mod tests {
    use super::Transform::*;
    use super::*;

    #[test]
    fn fast_paths_agree_with_the_full_transformations() {
        let samples = [
            "",
            "/",
            "//",
            "a",
            "a/",
            "/a",
            "/a/b",
            "a//b",
            "/a/./b",
            "/a/../b",
            "./a",
            "../a",
            "a/.",
            "a/..",
            ".",
            "..",
            "/.",
            "a\\b",
            "\\",
            "x y",
            "x  y",
            "x /y",
            "x (y",
            " x",
            "x ",
            "A",
            "a,b",
            "a;b",
            "a\tb",
            "a'b",
            "a^b",
            "shoes",
            "text/html,*/*;q=0.8",
            "Mozilla/5.0 (X11; Linux x86_64)",
            "gzip, deflate, br",
        ];
        for s in samples {
            // The fast path may send an unchanged value the long way, never the reverse.
            let v = s.as_bytes();
            if !cmd_line_changes(v) {
                assert_eq!(cmd_line(v), v, "cmdLine {s:?}");
            }
            for win in [false, true] {
                if path_is_normal(v, win) {
                    assert_eq!(normalize_path(v, win), v, "normalizePath(win {win}) {s:?}");
                }
            }
        }
        // And it does take the common values.
        assert!(!cmd_line_changes(b"shoes") && !cmd_line_changes(b"x y/z"));
        assert!(path_is_normal(b"/a/b/", false) && path_is_normal(b"text/html", true));
    }

    #[test]
    fn trigger_bytes_are_complete() {
        use Transform::*;
        let all = [
            Lowercase,
            Uppercase,
            UrlDecode,
            UrlDecodeUni,
            HtmlEntityDecode,
            JsDecode,
            CssDecode,
            Utf8ToUnicode,
            RemoveNulls,
            ReplaceNulls,
            RemoveWhitespace,
            CompressWhitespace,
            CmdLine,
            ReplaceComments,
            RemoveComments,
            NormalizePath,
            NormalizePathWin,
            Length,
            Sha1,
            Md5,
            HexEncode,
            HexDecode,
            Base64Decode,
            Trim,
            TrimLeft,
            TrimRight,
            EscapeSeqDecode,
        ];
        // The same strings every run.
        let mut next = crate::waf::tests::xorshift(0x9e37_79b9_7f4a_7c15u64);
        // The bytes the transformations care about are drawn more often than the rest.
        let pool = b"%+&\\/*.-#<>!;,'\"^ \t\r\n\0uUxX0123456789aAfFzZ\xa0\xc3\xa9\xff";
        for tr in all {
            let Some(triggers) = tr.triggers() else {
                continue;
            };
            let mut tried = 0;
            for _ in 0..300_000 {
                if tried == 3000 {
                    break;
                }
                let len = (next() % 14) as usize;
                let v: Vec<u8> = (0..len)
                    .map(|_| match next() % 3 {
                        0 => (next() % 256) as u8,
                        _ => pool[(next() % pool.len() as u64) as usize],
                    })
                    .collect();
                if ByteSet::bytes_of(&v).intersects(&triggers) {
                    continue;
                }
                tried += 1;
                assert_eq!(tr.apply(&v).as_ref(), v.as_slice(), "{tr:?} changed {v:?}");
            }
            assert_eq!(
                tried, 3000,
                "{tr:?}: too few strings without its trigger bytes"
            );
        }
    }

    fn t(tr: Transform, s: &str) -> String {
        String::from_utf8_lossy(&tr.apply(s.as_bytes())).into_owned()
    }

    #[test]
    fn decoders() {
        assert_eq!(t(UrlDecodeUni, "a%27+b%u0027%uff1c%zz%"), "a' b'<%zz%");
        assert_eq!(t(UrlDecode, "%3Cscript%3E"), "<script>");
        assert_eq!(
            t(HtmlEntityDecode, "&lt;a&#x41;&#66;&quot&amp;x&foo;"),
            "<aAB\"&x&foo;"
        );
        assert_eq!(t(JsDecode, "\\x3cs\\u0063\\141\\n"), "<sca\n");
        assert_eq!(t(CssDecode, "\\3c \\73 cript"), "<script");
        assert_eq!(t(Utf8ToUnicode, "a\u{2019}"), "a%u2019");
    }

    #[test]
    fn whitespace_comments_paths_and_cmdline() {
        assert_eq!(t(CompressWhitespace, "a \t\n b"), "a b");
        assert_eq!(t(RemoveWhitespace, "a b\tc"), "abc");
        assert_eq!(t(RemoveNulls, "a\0b"), "ab");
        assert_eq!(t(ReplaceComments, "un/**/ion/*x"), "un ion ");
        assert_eq!(
            t(NormalizePath, "/a/./b/../../../etc//passwd"),
            "/etc/passwd"
        );
        assert_eq!(t(NormalizePathWin, "..\\..\\win.ini"), "../../win.ini");
        assert_eq!(
            t(CmdLine, "C^at \"/etc/pa'sswd\"; W\\hoami"),
            "cat/etc/passwd whoami"
        );
        assert_eq!(t(Length, "abcd"), "4");
        assert_eq!(t(Lowercase, "SeLeCt"), "select");
    }

    #[test]
    fn clean_input_is_borrowed() {
        for tr in [
            UrlDecodeUni,
            HtmlEntityDecode,
            JsDecode,
            CssDecode,
            RemoveNulls,
            Lowercase,
        ] {
            assert!(
                matches!(tr.apply(b"plain text"), Cow::Borrowed(_)),
                "{tr:?}"
            );
        }
    }
}
