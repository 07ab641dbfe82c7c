//! Request path normalization, shared by the proxy (which matches policies on the normalized
//! path and forwards that same path to the application) and `sigil inspect policy --path`.
//!
//! The modes are Istio's `meshConfig.pathNormalization`:
//! - `NONE`: the path is matched and forwarded as received;
//! - `BASE` (default): RFC 3986 normalization as Envoy's `normalize_path` does it: percent-
//!   encoded unreserved characters (`A-Z a-z 0-9 - . _ ~`) are decoded, other escapes get
//!   upper-case hex digits, `\` becomes `/`, and dot segments are removed (section 5.2.4);
//! - `MERGE_SLASHES`: BASE, then runs of `/` become one;
//! - `DECODE_AND_MERGE_SLASHES`: `%2F` and `%5C` are decoded to `/` first, then MERGE_SLASHES.
//!
//! Where sigil is stricter than Istio, and why (each answered 400 by the proxy):
//! - `%00` and a `%` not followed by two hex digits, in every mode (Istio rejects `%00` too);
//! - except in NONE, escapes whose bytes are not UTF-8 (overlong forms such as `%C0%AE` for `.`,
//!   truncated sequences): lenient decoders turn them into characters policies never saw;
//! - in BASE and MERGE_SLASHES, `%2F` and `%5C` (Envoy's `REJECT_REQUEST` for escaped slashes):
//!   Istio forwards them, and an application that decodes them serves a path no policy matched;
//! - except in NONE, a `;` (path parameters): Tomcat and Spring serve `/admin;x` as `/admin`,
//!   which a policy on `/admin` would not have matched.
//!
//! Paths stay case-sensitive (RFC 3986): `/ADMIN` is not `/admin`. Behind an application that
//! ignores case, write policies for every spelling or allow-list with ALLOW policies instead.
//! Escapes are decoded once (`%252F` stays `%252F`).

use std::fmt;

/// How request paths are normalized before matching and forwarding.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, clap::ValueEnum, serde::Serialize)]
#[value(rename_all = "SCREAMING_SNAKE_CASE")]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum PathNormalization {
    /// As received (only `%00` and invalid escapes are refused).
    None,
    /// RFC 3986: decode unreserved escapes, `\` to `/`, remove dot segments.
    #[default]
    Base,
    /// BASE, then merge runs of slashes.
    MergeSlashes,
    /// Decode `%2F` and `%5C`, then MERGE_SLASHES.
    DecodeAndMergeSlashes,
}

impl PathNormalization {
    pub fn as_str(self) -> &'static str {
        match self {
            PathNormalization::None => "NONE",
            PathNormalization::Base => "BASE",
            PathNormalization::MergeSlashes => "MERGE_SLASHES",
            PathNormalization::DecodeAndMergeSlashes => "DECODE_AND_MERGE_SLASHES",
        }
    }
}

impl fmt::Display for PathNormalization {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why a path is refused (the proxy answers 400).
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum PathError {
    #[error("the path contains an encoded NUL (%00)")]
    EncodedNul,
    #[error("the path contains a % not followed by two hex digits")]
    InvalidEscape,
    #[error("the path's percent-escapes are not UTF-8 (overlong or truncated sequences)")]
    NotUtf8,
    #[error(
        "the path contains an encoded slash or backslash (%2F, %5C), accepted only with DECODE_AND_MERGE_SLASHES"
    )]
    EncodedSlash,
    #[error("the path contains a `;` parameter, which applications read differently")]
    Parameter,
    #[error("the path does not start with /")]
    NotAbsolute,
}

/// The path (without its query string) normalized by `mode`. `*` (OPTIONS) and the empty path
/// (CONNECT) are returned as they are.
pub fn normalize(path: &str, mode: PathNormalization) -> Result<String, PathError> {
    check_escapes(path, mode)?;
    if mode == PathNormalization::None || path.is_empty() || path == "*" {
        return Ok(path.to_owned());
    }
    if !path.starts_with('/') && !path.starts_with('\\') {
        return Err(PathError::NotAbsolute);
    }
    let decoded = decode(path, mode)?;
    let without_dots = remove_dot_segments(&decoded);
    Ok(match mode {
        PathNormalization::MergeSlashes | PathNormalization::DecodeAndMergeSlashes => {
            merge_slashes(&without_dots)
        }
        PathNormalization::None | PathNormalization::Base => without_dots,
    })
}

fn hex(byte: u8) -> Option<u8> {
    (byte as char).to_digit(16).map(|d| d as u8)
}

/// Every `%` opens two hex digits, never `%00`; outside NONE the escapes' bytes are UTF-8.
fn check_escapes(path: &str, mode: PathNormalization) -> Result<(), PathError> {
    let bytes = path.as_bytes();
    let mut decoded = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let (Some(high), Some(low)) = (
                bytes.get(i + 1).copied().and_then(hex),
                bytes.get(i + 2).copied().and_then(hex),
            ) else {
                return Err(PathError::InvalidEscape);
            };
            let byte = high << 4 | low;
            if byte == 0 {
                return Err(PathError::EncodedNul);
            }
            decoded.push(byte);
            i += 3;
        } else {
            decoded.push(bytes[i]);
            i += 1;
        }
    }
    if mode != PathNormalization::None && std::str::from_utf8(&decoded).is_err() {
        return Err(PathError::NotUtf8);
    }
    Ok(())
}

/// Decodes unreserved escapes (and, in DECODE_AND_MERGE_SLASHES, `%2F`/`%5C`), upper-cases the
/// hex of the others, turns `\` into `/` and refuses `;`. Escapes are known valid here.
fn decode(path: &str, mode: PathNormalization) -> Result<String, PathError> {
    let bytes = path.as_bytes();
    let mut out = String::with_capacity(path.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' => {
                let byte = hex(bytes[i + 1]).unwrap_or(0) << 4 | hex(bytes[i + 2]).unwrap_or(0);
                i += 3;
                match byte {
                    b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                        out.push(byte as char)
                    }
                    b'/' | b'\\' if mode == PathNormalization::DecodeAndMergeSlashes => {
                        out.push('/')
                    }
                    b'/' | b'\\' => return Err(PathError::EncodedSlash),
                    _ => {
                        use fmt::Write;
                        let _ = write!(out, "%{byte:02X}");
                    }
                }
            }
            b'\\' => {
                out.push('/');
                i += 1;
            }
            b';' => return Err(PathError::Parameter),
            _ => {
                // Whole characters: the path is a &str, so copy up to the next ASCII byte.
                let start = i;
                i += 1;
                while i < bytes.len() && !bytes[i].is_ascii() {
                    i += 1;
                }
                out.push_str(&path[start..i]);
            }
        }
    }
    Ok(out)
}

/// RFC 3986 section 5.2.4 for an absolute path: `.` segments go, `..` takes the segment before
/// it (never above the root); a path ending in `.` or `..` keeps its trailing `/`. Empty
/// segments are kept (merging them is MERGE_SLASHES' business).
fn remove_dot_segments(path: &str) -> String {
    let mut kept: Vec<&str> = Vec::new();
    let mut trailing_slash = false;
    for segment in path[1..].split('/') {
        trailing_slash = false;
        match segment {
            "." => trailing_slash = true,
            ".." => {
                kept.pop();
                trailing_slash = true;
            }
            _ => kept.push(segment),
        }
    }
    let mut out = String::with_capacity(path.len());
    for segment in &kept {
        out.push('/');
        out.push_str(segment);
    }
    if trailing_slash || out.is_empty() {
        out.push('/');
    }
    out
}

fn merge_slashes(path: &str) -> String {
    let mut out = String::with_capacity(path.len());
    for c in path.chars() {
        if !(c == '/' && out.ends_with('/')) {
            out.push(c);
        }
    }
    out
}

/// The request target as the application receives it: the path normalized, the query string
/// (everything from the first `?`) untouched.
pub fn normalize_target(target: &str, mode: PathNormalization) -> Result<String, PathError> {
    let (path, query) = match target.find('?') {
        Some(at) => target.split_at(at),
        None => (target, ""),
    };
    let mut normalized = normalize(path, mode)?;
    normalized.push_str(query);
    Ok(normalized)
}

/// One row of the normalization table ([`TABLE`]).
#[derive(Clone, Debug)]
pub struct TableCase {
    pub mode: PathNormalization,
    /// The request target as a client sends it.
    pub target: &'static str,
    /// What the application receives; None when the proxy answers 400.
    pub forwarded: Option<&'static str>,
    /// `ALLOW default`, `DENY demo/deny-admin` or `400`, under `tests/fixtures/deny-admin.yaml`.
    pub verdict: String,
}

/// The normalization table, one case a line (see its header): the unit tests here, the proxy's
/// end-to-end tests and `sigil inspect policy`'s all check it, so they cannot drift apart.
pub const TABLE: &str = include_str!("path/cases.txt");

/// The rows of [`TABLE`].
pub fn table() -> Vec<TableCase> {
    use clap::ValueEnum;
    TABLE
        .lines()
        .filter(|line| !line.trim().is_empty() && !line.starts_with('#'))
        .map(|line| {
            let mut fields = line.split_whitespace();
            let mut next = || fields.next().unwrap_or_default();
            let mode = PathNormalization::from_str(next(), false).unwrap_or_default();
            let target = next();
            let forwarded = Some(next()).filter(|f| *f != "-");
            let verdict = fields.collect::<Vec<_>>().join(" ");
            TableCase {
                mode,
                target,
                forwarded,
                verdict,
            }
        })
        .collect()
}

#[cfg(test)]
mod tests;
