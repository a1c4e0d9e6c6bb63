//! The SecLang reader: files → directives with their file and line, nothing interpreted yet.
//!
//! SecLang (ModSecurity's rule language) is line-oriented: a directive name and
//! whitespace-separated arguments, double-quoted when they contain spaces, lines continued with a
//! trailing backslash. Inside double quotes `\"` is a quote and every other backslash stays, so
//! regexes reach the compiler as written. Action lists are comma-separated `name:value` pairs
//! whose values may be single-quoted.

use std::path::{Path, PathBuf};

/// One directive and where it starts.
#[derive(Debug, Clone, PartialEq)]
pub struct Directive {
    pub file: PathBuf,
    pub line: usize,
    pub name: String,
    pub args: Vec<String>,
}

/// A syntax error: `file:line: message`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SyntaxError {
    pub file: PathBuf,
    pub line: usize,
    pub message: String,
}

impl std::fmt::Display for SyntaxError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}: {}", self.file.display(), self.line, self.message)
    }
}

/// Splits a file's text into directives.
pub fn parse(file: &Path, text: &str) -> Result<Vec<Directive>, SyntaxError> {
    let mut out = Vec::new();
    let mut logical = String::new();
    let mut start = 0;
    for (i, raw) in text.lines().enumerate() {
        let line = raw.trim_end_matches('\r');
        if logical.is_empty() {
            start = i + 1;
            let t = line.trim_start();
            if t.is_empty() || t.starts_with('#') {
                continue;
            }
        }
        if let Some(head) = line.strip_suffix('\\') {
            logical.push_str(head);
            continue;
        }
        logical.push_str(line);
        let text = std::mem::take(&mut logical);
        let err = |message: String| SyntaxError {
            file: file.to_path_buf(),
            line: start,
            message,
        };
        let mut words = split_words(&text).map_err(err)?;
        if words.is_empty() {
            continue;
        }
        let name = words.remove(0);
        out.push(Directive {
            file: file.to_path_buf(),
            line: start,
            name,
            args: words,
        });
    }
    if !logical.trim().is_empty() {
        return Err(SyntaxError {
            file: file.to_path_buf(),
            line: start,
            message: "the file ends inside a continued line (trailing `\\`)".into(),
        });
    }
    Ok(out)
}

/// Whitespace-separated words; double quotes group, `\"` inside them is a quote.
fn split_words(s: &str) -> Result<Vec<String>, String> {
    let mut out = Vec::new();
    let mut chars = s.chars().peekable();
    loop {
        while chars.peek().is_some_and(|c| c.is_whitespace()) {
            chars.next();
        }
        let Some(&first) = chars.peek() else {
            return Ok(out);
        };
        let mut word = String::new();
        if first == '"' {
            chars.next();
            let mut closed = false;
            while let Some(c) = chars.next() {
                match c {
                    '\\' => match chars.next() {
                        Some('"') => word.push('"'),
                        Some(n) => {
                            word.push('\\');
                            word.push(n);
                        }
                        None => word.push('\\'),
                    },
                    '"' => {
                        closed = true;
                        break;
                    }
                    c => word.push(c),
                }
            }
            if !closed {
                return Err(format!(
                    "unterminated double quote in `{}`",
                    truncate(s.trim(), 60)
                ));
            }
        } else {
            while let Some(&c) = chars.peek() {
                if c.is_whitespace() {
                    break;
                }
                word.push(c);
                chars.next();
            }
        }
        out.push(word);
    }
}

/// One action of an action list: `id:942100`, `t:lowercase`, `setvar:'tx.a=+1'`, `chain`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RawAction {
    pub name: String,
    pub value: Option<String>,
}

/// Splits `"id:1,phase:2,msg:'a, b',t:none"`; commas inside single quotes do not split.
pub fn split_actions(s: &str) -> Result<Vec<RawAction>, String> {
    let mut out = Vec::new();
    let mut chars = s.chars().peekable();
    loop {
        while chars.peek().is_some_and(|c| c.is_whitespace() || *c == ',') {
            chars.next();
        }
        if chars.peek().is_none() {
            return Ok(out);
        }
        let mut name = String::new();
        while let Some(&c) = chars.peek() {
            if c == ':' || c == ',' {
                break;
            }
            name.push(c);
            chars.next();
        }
        let name = name.trim().to_ascii_lowercase();
        let mut value = None;
        if chars.peek() == Some(&':') {
            chars.next();
            while chars.peek().is_some_and(|c| *c == ' ' || *c == '\t') {
                chars.next();
            }
            let mut v = String::new();
            if chars.peek() == Some(&'\'') {
                chars.next();
                let mut closed = false;
                while let Some(c) = chars.next() {
                    match c {
                        '\\' if chars.peek() == Some(&'\'') => {
                            chars.next();
                            v.push('\'');
                        }
                        '\'' => {
                            closed = true;
                            break;
                        }
                        c => v.push(c),
                    }
                }
                if !closed {
                    return Err(format!("action `{name}`: unterminated single quote"));
                }
                // Whatever follows the quote up to the next comma is not part of the value.
                while chars.peek().is_some_and(|c| *c != ',') {
                    chars.next();
                }
            } else {
                while let Some(&c) = chars.peek() {
                    if c == ',' {
                        break;
                    }
                    v.push(c);
                    chars.next();
                }
                v = v.trim_end().to_string();
            }
            value = Some(v);
        }
        if name.is_empty() {
            return Err("an action without a name".into());
        }
        out.push(RawAction { name, value });
    }
}

/// A variable of a rule's target list: `ARGS`, `!REQUEST_COOKIES:/__utm/`, `&TX:foo`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RawVariable {
    pub collection: String,
    pub selector: Option<RawSelector>,
    /// `!`: removes the entries it names from the rule's targets.
    pub exclude: bool,
    /// `&`: the number of entries instead of their values.
    pub count: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RawSelector {
    Key(String),
    /// `/regex/`
    Regex(String),
}

/// Splits `REQUEST_COOKIES|!REQUEST_COOKIES:/__utm/|ARGS:'a b'` on `|` outside selectors.
pub fn split_variables(s: &str) -> Result<Vec<RawVariable>, String> {
    let mut out = Vec::new();
    let b: Vec<char> = s.chars().collect();
    let mut i = 0;
    while i < b.len() {
        while i < b.len() && (b[i] == '|' || b[i].is_whitespace()) {
            i += 1;
        }
        if i >= b.len() {
            break;
        }
        let mut exclude = false;
        let mut count = false;
        loop {
            match b.get(i) {
                Some('!') => exclude = true,
                Some('&') => count = true,
                _ => break,
            }
            i += 1;
        }
        let mut collection = String::new();
        while i < b.len() && b[i] != ':' && b[i] != '|' && !b[i].is_whitespace() {
            collection.push(b[i]);
            i += 1;
        }
        if collection.is_empty() {
            return Err(format!("an empty variable name in `{s}`"));
        }
        let mut selector = None;
        if b.get(i) == Some(&':') {
            i += 1;
            match b.get(i) {
                // `XML:/*` is an XPath expression, not a regex.
                Some('/') if !collection.eq_ignore_ascii_case("xml") => {
                    i += 1;
                    let mut re = String::new();
                    let mut closed = false;
                    while i < b.len() {
                        match b[i] {
                            '\\' if i + 1 < b.len() => {
                                re.push('\\');
                                re.push(b[i + 1]);
                                i += 2;
                                continue;
                            }
                            '/' => {
                                closed = true;
                                i += 1;
                                break;
                            }
                            c => re.push(c),
                        }
                        i += 1;
                    }
                    if !closed {
                        return Err(format!("variable `{collection}`: unterminated /regex/"));
                    }
                    selector = Some(RawSelector::Regex(re));
                }
                Some('\'') => {
                    i += 1;
                    let mut key = String::new();
                    while i < b.len() && b[i] != '\'' {
                        key.push(b[i]);
                        i += 1;
                    }
                    i += 1;
                    selector = Some(RawSelector::Key(key));
                }
                _ => {
                    let mut key = String::new();
                    while i < b.len() && b[i] != '|' {
                        key.push(b[i]);
                        i += 1;
                    }
                    selector = Some(RawSelector::Key(key.trim().to_string()));
                }
            }
        }
        out.push(RawVariable {
            collection: collection.to_ascii_uppercase(),
            selector,
            exclude,
            count,
        });
    }
    Ok(out)
}

pub fn truncate(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn continued_lines_quotes_and_comments() {
        let text = "# comment\nSecRule ARGS \"@rx a\\\"b\\\\c\" \\\n    \"id:1,\\\n    phase:2\"\n\nSecMarker END\n";
        let d = parse(Path::new("x.conf"), text).unwrap();
        assert_eq!(d.len(), 2);
        assert_eq!(d[0].line, 2);
        assert_eq!(d[0].args, vec!["ARGS", "@rx a\"b\\\\c", "id:1,    phase:2"]);
        assert_eq!(d[1].name, "SecMarker");
        assert_eq!(d[1].line, 6);
    }

    #[test]
    fn unterminated_quote_names_the_line() {
        let e = parse(Path::new("x.conf"), "\nSecRule ARGS \"@rx a\n").unwrap_err();
        assert_eq!(e.line, 2);
        assert!(e.message.contains("unterminated"), "{e}");
    }

    #[test]
    fn actions_with_quoted_values() {
        let a = split_actions("id:1, msg:'a, b',t:none,setvar:'tx.x=+%{tx.y}',chain").unwrap();
        let names: Vec<_> = a.iter().map(|a| a.name.as_str()).collect();
        assert_eq!(names, ["id", "msg", "t", "setvar", "chain"]);
        assert_eq!(a[1].value.as_deref(), Some("a, b"));
        assert_eq!(a[3].value.as_deref(), Some("tx.x=+%{tx.y}"));
        assert_eq!(a[4].value, None);
    }

    #[test]
    fn variables_with_regex_selectors_containing_pipes() {
        let v = split_variables("REQUEST_COOKIES|!REQUEST_COOKIES:/__utm|x/|&TX:a|ARGS:b").unwrap();
        assert_eq!(v.len(), 4);
        assert_eq!(v[1].selector, Some(RawSelector::Regex("__utm|x".into())));
        assert!(v[1].exclude);
        assert!(v[2].count);
        assert_eq!(v[3].selector, Some(RawSelector::Key("b".into())));
    }
}
