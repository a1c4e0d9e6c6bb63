//! Configuration errors are a product surface: each names the file, line and column, the field
//! path (`routes[3].match.path_prefix`) and what was expected. Loading collects all of them.

use std::fmt;

/// An error found while validating or compiling, located by its field path only. The loader
/// turns it into a [`ConfigError`] by looking the path up in the file's position index.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldError {
    /// Dotted path with list indexes, e.g. `routes[3].match.path_prefix`; empty for the root.
    pub path: String,
    pub message: String,
}

impl FieldError {
    pub fn new(path: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            path: path.into(),
            message: message.into(),
        }
    }
}

impl fmt::Display for FieldError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.path.is_empty() {
            f.write_str(&self.message)
        } else {
            write!(f, "{}: {}", self.path, self.message)
        }
    }
}

/// A located configuration error: `file:line:col: path: message`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct ConfigError {
    pub file: String,
    /// 1-based; 0 when the error has no place in the file (e.g. the file cannot be read).
    pub line: usize,
    /// 1-based.
    pub column: usize,
    pub path: String,
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file)?;
        if self.line > 0 {
            write!(f, ":{}:{}", self.line, self.column)?;
        }
        if !self.path.is_empty() {
            write!(f, ": {}", self.path)?;
        }
        write!(f, ": {}", self.message)
    }
}

/// Joins a parent path and a child key: `join("routes[3]", "match")` → `routes[3].match`.
pub fn join(parent: &str, key: &str) -> String {
    if parent.is_empty() {
        key.to_string()
    } else {
        format!("{parent}.{key}")
    }
}

/// Joins a parent path and a list index: `index("routes", 3)` → `routes[3]`.
pub fn index(parent: &str, i: usize) -> String {
    format!("{parent}[{i}]")
}

/// A regex compile error on one line: `regex` renders syntax errors as a multi-line caret
/// diagram, which would break the one-error-per-line output of `tollgate check`.
pub fn regex_message(e: &regex::Error) -> String {
    let text = e.to_string();
    let reason = text
        .lines()
        .rev()
        .find_map(|l| l.trim().strip_prefix("error: "))
        .map(str::to_string)
        .unwrap_or_else(|| text.split_whitespace().collect::<Vec<_>>().join(" "));
    format!("invalid regex: {reason}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn regex_errors_fit_on_one_line() {
        // Built at run time so the lint that checks regex literals does not reject the test.
        let pattern = String::from("(unclosed");
        let e = regex::Regex::new(&pattern).unwrap_err();
        assert_eq!(regex_message(&e), "invalid regex: unclosed group");
    }
}
