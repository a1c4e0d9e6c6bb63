//! Where each field of a YAML file sits, so that errors found long after parsing (a route naming
//! an unknown upstream, a regex that does not compile) can still say `file:line:col`.
//!
//! serde_yaml forgets positions once a value is parsed, so the file is read a second time with
//! yaml-rust2's event parser, which reports a mark for every node. That costs a few microseconds
//! per kilobyte at load time and nothing at request time.

use std::collections::HashMap;

use yaml_rust2::parser::{Event, MarkedEventReceiver, Parser};
use yaml_rust2::scanner::Marker;

use super::error::{index, join, ConfigError, FieldError};

/// 1-based line and column of a node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pos {
    pub line: usize,
    pub column: usize,
}

/// The text of one config file and the position of every node in it, by field path.
#[derive(Debug, Clone, Default)]
pub struct SourceMap {
    pub file: String,
    /// Position of each node's value, keyed by path (`routes[3].match.path_prefix`).
    values: HashMap<String, Pos>,
    /// Position of each mapping key, keyed by the path it introduces.
    keys: HashMap<String, Pos>,
}

impl SourceMap {
    /// Indexes `text`. A YAML syntax error is returned located at its line.
    pub fn build(file: &str, text: &str) -> Result<SourceMap, ConfigError> {
        let mut indexer = Indexer {
            map: SourceMap {
                file: file.to_string(),
                ..SourceMap::default()
            },
            stack: Vec::new(),
        };
        Parser::new_from_str(text)
            .load(&mut indexer, false)
            .map_err(|e| ConfigError {
                file: file.to_string(),
                line: e.marker().line(),
                column: e.marker().col() + 1,
                path: String::new(),
                message: format!("invalid YAML: {}", e.info()),
            })?;
        Ok(indexer.map)
    }

    /// Locates a field error: the node at its path, or the nearest ancestor that exists (a
    /// missing field is reported where its parent is).
    pub fn locate(&self, err: &FieldError) -> ConfigError {
        let pos = self.find(&err.path);
        ConfigError {
            file: self.file.clone(),
            line: pos.map_or(0, |p| p.line),
            column: pos.map_or(0, |p| p.column),
            path: err.path.clone(),
            message: err.message.clone(),
        }
    }

    /// Position of the key that introduces `path` (for "unknown field" errors), else its value.
    pub fn find_key(&self, path: &str) -> Option<Pos> {
        self.keys.get(path).copied().or_else(|| self.find(path))
    }

    fn find(&self, path: &str) -> Option<Pos> {
        let mut p = path;
        loop {
            if let Some(pos) = self.values.get(p) {
                return Some(*pos);
            }
            let cut = p.rfind(['.', '['])?;
            p = &p[..cut];
        }
    }
}

enum Frame {
    Map { path: String, key: Option<String> },
    Seq { path: String, next: usize },
}

struct Indexer {
    map: SourceMap,
    stack: Vec<Frame>,
}

impl Indexer {
    /// Path of a node that starts now, or `None` when the node is a mapping key.
    fn node_path(&mut self, mark: Marker, key_text: Option<&str>) -> Option<String> {
        let pos = Pos {
            line: mark.line(),
            column: mark.col() + 1,
        };
        match self.stack.last_mut() {
            None => Some(String::new()),
            Some(Frame::Seq { path, next }) => {
                let p = index(path, *next);
                *next += 1;
                Some(p)
            }
            Some(Frame::Map { path, key }) => match key.take() {
                Some(k) => Some(join(path, &k)),
                None => {
                    // This node is a key: remember its text and where it stands.
                    let k = key_text.unwrap_or("?").to_string();
                    self.map.keys.insert(join(path, &k), pos);
                    *key = Some(k);
                    None
                }
            },
        }
    }
}

impl MarkedEventReceiver for Indexer {
    fn on_event(&mut self, ev: Event, mark: Marker) {
        let pos = Pos {
            line: mark.line(),
            column: mark.col() + 1,
        };
        match ev {
            Event::Scalar(ref text, ..) => {
                if let Some(p) = self.node_path(mark, Some(text)) {
                    self.map.values.insert(p, pos);
                }
            }
            Event::Alias(_) => {
                if let Some(p) = self.node_path(mark, None) {
                    self.map.values.insert(p, pos);
                }
            }
            Event::MappingStart(..) => {
                if let Some(p) = self.node_path(mark, None) {
                    self.map.values.insert(p.clone(), pos);
                    self.stack.push(Frame::Map { path: p, key: None });
                } else {
                    // A complex (mapping) key: index it under a placeholder so nesting stays right.
                    self.stack.push(Frame::Map {
                        path: "?".into(),
                        key: None,
                    });
                }
            }
            Event::SequenceStart(..) => {
                let p = self.node_path(mark, None).unwrap_or_else(|| "?".into());
                self.map.values.insert(p.clone(), pos);
                self.stack.push(Frame::Seq { path: p, next: 0 });
            }
            Event::MappingEnd | Event::SequenceEnd => {
                self.stack.pop();
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DOC: &str = "\
listeners:
  - name: web
    address: \"0.0.0.0:8080\"
routes:
  - name: a
    match: { path_prefix: /api }
  - name: b
    match:
      hosts: [x.com, \"*.y.com\"]
";

    #[test]
    fn every_field_has_its_line() {
        let m = SourceMap::build("t.yaml", DOC).unwrap();
        let at = |p: &str| m.locate(&FieldError::new(p, "x"));
        assert_eq!(at("listeners[0].address").line, 3);
        assert_eq!(at("routes[0].match.path_prefix").line, 6);
        assert_eq!(at("routes[1].name").line, 7);
        assert_eq!(at("routes[1].match.hosts[1]").line, 9);
        let c = at("routes[1].match.hosts[1]").column;
        assert_eq!(&DOC.lines().nth(8).unwrap()[c - 1..c], "\"");
        // A missing field is reported where its parent stands.
        assert_eq!(at("routes[1].match.methods").line, 9);
        assert_eq!(m.find_key("routes[0].match").unwrap().line, 6);
    }

    #[test]
    fn syntax_errors_name_their_line() {
        let err = SourceMap::build("t.yaml", "a: 1\nb: [1, 2\nc: 3\n").unwrap_err();
        assert!(err.line >= 2, "{err}");
        assert!(err.to_string().starts_with("t.yaml:"), "{err}");
    }
}
