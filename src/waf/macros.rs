//! Macro expansion in operator arguments and actions: `%{tx.anomaly_score}`,
//! `%{REQUEST_HEADERS.host}`, `%{MATCHED_VAR}`, `%{rule.id}`. Parsed at load into parts; TX
//! names become slot numbers, so expanding one is an index, not a lookup.

use super::request::Var;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Part {
    Lit(Vec<u8>),
    /// A TX variable by slot.
    Tx(u16),
    /// Another variable, with its key lowercased (`REQUEST_HEADERS.host`).
    Var(Var, Option<String>),
    RuleId,
}

/// A string with macros.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Expand {
    pub parts: Vec<Part>,
}

impl Expand {
    /// `tx` interns a TX name into its slot.
    pub fn parse(s: &str, tx: &mut dyn FnMut(&str) -> u16) -> Result<Expand, String> {
        let mut parts = Vec::new();
        let mut rest = s;
        while let Some(at) = rest.find("%{") {
            if at > 0 {
                parts.push(Part::Lit(rest.as_bytes()[..at].to_vec()));
            }
            let Some(end) = rest[at..].find('}') else {
                return Err(format!("unterminated macro in `{s}`"));
            };
            let inner = &rest[at + 2..at + end];
            let (coll, key) = match inner.split_once(['.', ':']) {
                Some((c, k)) => (c, Some(k)),
                None => (inner, None),
            };
            let part = if coll.eq_ignore_ascii_case("tx") {
                Part::Tx(tx(&key.unwrap_or("").to_ascii_lowercase()))
            } else if coll.eq_ignore_ascii_case("rule") {
                match key.map(|k| k.to_ascii_lowercase()).as_deref() {
                    Some("id") => Part::RuleId,
                    _ => Part::Lit(Vec::new()),
                }
            } else {
                match Var::parse(coll) {
                    Some(v) => Part::Var(v, key.map(|k| k.to_ascii_lowercase())),
                    None => {
                        return Err(format!("unknown variable `{coll}` in macro `%{{{inner}}}`"))
                    }
                }
            };
            parts.push(part);
            rest = &rest[at + end + 1..];
        }
        if !rest.is_empty() {
            parts.push(Part::Lit(rest.as_bytes().to_vec()));
        }
        Ok(Expand { parts })
    }

    /// The text when there are no macros.
    pub fn literal(&self) -> Option<&[u8]> {
        match self.parts.as_slice() {
            [] => Some(b""),
            [Part::Lit(l)] => Some(l),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parts() {
        let mut names = Vec::new();
        let mut intern = |n: &str| {
            names.push(n.to_string());
            names.len() as u16 - 1
        };
        let e = Expand::parse(
            "a %{TX.Score} b %{REQUEST_HEADERS.Host}%{rule.id}",
            &mut intern,
        )
        .unwrap();
        assert_eq!(
            e.parts,
            vec![
                Part::Lit(b"a ".to_vec()),
                Part::Tx(0),
                Part::Lit(b" b ".to_vec()),
                Part::Var(Var::RequestHeaders, Some("host".into())),
                Part::RuleId,
            ]
        );
        assert!(Expand::parse("%{nope.x}", &mut intern).is_err());
        assert_eq!(
            Expand::parse("plain", &mut intern).unwrap().literal(),
            Some(&b"plain"[..])
        );
        assert_eq!(names, ["score"]);
    }
}
