//! A small spanned YAML tree built from `saphyr-parser` events: every node knows its file, line
//! and column, duplicate keys are rejected, and typed accessors produce located errors.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use saphyr_parser::{Event, Parser, ScalarStyle, Span};

use super::error::{did_you_mean, Error};
use super::plan::Origin;

#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Value {
    Null,
    Bool(bool),
    Int(i64),
    Float(f64),
    Str(String),
    Seq(Vec<Node>),
    Map(Vec<(Node, Node)>),
}

#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Node {
    pub value: Value,
    /// The scalar as written (for plain scalars such as `0644`).
    pub raw: String,
    pub file: Arc<Path>,
    pub line: usize,
    pub column: usize,
}

impl Node {
    pub fn origin(&self) -> Origin {
        Origin {
            file: self.file.to_path_buf(),
            line: self.line,
            column: self.column,
        }
    }

    pub fn err(&self, field: &str, message: impl Into<String>) -> Error {
        Error::invalid(&self.origin(), field, message)
    }

    /// "a string", "a list", ... for messages.
    pub fn kind_name(&self) -> &'static str {
        match self.value {
            Value::Null => "nothing (null)",
            Value::Bool(_) => "a boolean",
            Value::Int(_) => "an integer",
            Value::Float(_) => "a number",
            Value::Str(_) => "a string",
            Value::Seq(_) => "a list",
            Value::Map(_) => "a mapping",
        }
    }

    fn expected(&self, field: &str, what: &str) -> Error {
        self.err(
            field,
            format!("expected {what}, found {}", self.kind_name()),
        )
    }

    /// A mapping whose keys are all strings, checked against `allowed`.
    pub fn map(&self, field: &str, allowed: &[&str]) -> Result<Map<'_>, Error> {
        let Value::Map(entries) = &self.value else {
            return Err(self.expected(field, "a mapping"));
        };
        let mut out = Vec::with_capacity(entries.len());
        for (k, v) in entries {
            let Value::Str(key) = &k.value else {
                return Err(k.err(
                    field,
                    format!("keys must be strings, found {}", k.kind_name()),
                ));
            };
            if !allowed.is_empty() && !allowed.contains(&key.as_str()) {
                return Err(k.err(
                    field,
                    format!(
                        "unknown key '{key}'{}; allowed keys: {}",
                        did_you_mean(key, allowed.iter().copied()),
                        allowed.join(", ")
                    ),
                ));
            }
            out.push((key.as_str(), k, v));
        }
        Ok(Map {
            node: self,
            field: field.to_string(),
            entries: out,
        })
    }

    pub fn seq(&self, field: &str) -> Result<&[Node], Error> {
        match &self.value {
            Value::Seq(items) => Ok(items),
            _ => Err(self.expected(field, "a list")),
        }
    }

    pub fn str(&self, field: &str) -> Result<&str, Error> {
        match &self.value {
            Value::Str(s) => Ok(s),
            _ => Err(self.expected(field, "a string")),
        }
    }

    /// A non-empty string.
    pub fn nonempty_str(&self, field: &str) -> Result<&str, Error> {
        let s = self.str(field)?;
        if s.trim().is_empty() {
            return Err(self.err(field, "must not be empty"));
        }
        Ok(s)
    }

    /// Any scalar (string, number, boolean) as a string.
    pub fn scalar_string(&self, field: &str) -> Result<String, Error> {
        match &self.value {
            Value::Str(s) => Ok(s.clone()),
            Value::Bool(_) | Value::Int(_) | Value::Float(_) => Ok(self.raw.clone()),
            _ => Err(self.expected(field, "a string, number or boolean")),
        }
    }

    pub fn bool(&self, field: &str) -> Result<bool, Error> {
        match &self.value {
            Value::Bool(b) => Ok(*b),
            _ => Err(self.expected(field, "true or false")),
        }
    }

    pub fn int(&self, field: &str) -> Result<i64, Error> {
        match &self.value {
            Value::Int(i) => Ok(*i),
            _ => Err(self.expected(field, "an integer")),
        }
    }
}

/// A checked mapping: keys are strings and all allowed.
pub(crate) struct Map<'a> {
    pub node: &'a Node,
    pub field: String,
    pub entries: Vec<(&'a str, &'a Node, &'a Node)>,
}

impl<'a> Map<'a> {
    pub fn get(&self, key: &str) -> Option<&'a Node> {
        self.entries
            .iter()
            .find(|(k, _, _)| *k == key)
            .map(|(_, _, v)| *v)
    }

    /// The field path of a key in this mapping.
    pub fn path(&self, key: &str) -> String {
        if self.field.is_empty() {
            key.to_string()
        } else {
            format!("{}.{key}", self.field)
        }
    }

    pub fn require(&self, key: &str, what: &str) -> Result<&'a Node, Error> {
        self.get(key).ok_or_else(|| {
            let msg = format!("missing '{key}' ({what})");
            self.node.err(&self.field, msg)
        })
    }

    pub fn keys(&self) -> impl Iterator<Item = &'a str> + '_ {
        self.entries.iter().map(|(k, _, _)| *k)
    }
}

/// How many values (scalars, lists and mappings) a document may hold once its aliases are
/// expanded. A recipe has a few hundred; the "billion laughs" (10 aliases × 9 levels) has 10⁹.
pub(crate) const MAX_VALUES: usize = 100_000;
/// How many bytes of scalars a document may hold once its aliases are expanded.
pub(crate) const MAX_EXPANDED_BYTES: usize = 16 * 1024 * 1024;
/// How deeply lists and mappings may nest (a recipe needs about 6 levels).
pub(crate) const MAX_DEPTH: usize = 64;

/// Parse one YAML document. An empty document is `Null`.
///
/// Hostile input is refused with a located error, never with unbounded memory or a crash:
/// aliases are expanded only up to [`MAX_VALUES`] values and [`MAX_EXPANDED_BYTES`] bytes,
/// nesting stops at [`MAX_DEPTH`], and a NUL character in a value is refused (no shell, file
/// or C string carries it).
pub(crate) fn parse(text: &str, file: &Path) -> Result<Node, Error> {
    let file: Arc<Path> = Arc::from(file);
    let mut builder = Builder {
        file: file.clone(),
        stack: Vec::new(),
        anchors: HashMap::new(),
        root: None,
        docs: 0,
        values: 0,
        bytes: 0,
    };
    let mut parser = Parser::new_from_str(text);
    for ev in &mut parser {
        let (ev, span) = ev.map_err(|e| Error::Syntax {
            origin: Origin {
                file: file.to_path_buf(),
                line: e.marker().line(),
                column: e.marker().col() + 1,
            },
            message: e.info().to_string(),
        })?;
        builder.event(ev, span)?;
    }
    Ok(builder.root.unwrap_or(Node {
        value: Value::Null,
        raw: String::new(),
        file,
        line: 1,
        column: 1,
    }))
}

/// The size of a subtree once expanded: values and scalar bytes.
#[derive(Debug, Clone, Copy, Default)]
struct Size {
    values: usize,
    bytes: usize,
}

impl Size {
    fn add(&mut self, other: Size) {
        self.values = self.values.saturating_add(other.values);
        self.bytes = self.bytes.saturating_add(other.bytes);
    }
}

enum Frame {
    /// The list node, its anchor, and its size so far.
    Seq(Node, usize, Size),
    /// The mapping node, its anchor, its size so far, and a pending key.
    Map(Node, usize, Size, Option<Node>),
}

struct Builder {
    file: Arc<Path>,
    stack: Vec<Frame>,
    /// Anchored nodes with their expanded size.
    anchors: HashMap<usize, (Node, Size)>,
    root: Option<Node>,
    docs: usize,
    /// Values and scalar bytes of the whole document so far, aliases expanded.
    values: usize,
    bytes: usize,
}

impl Builder {
    fn node(&self, value: Value, raw: String, span: Span) -> Node {
        Node {
            value,
            raw,
            file: self.file.clone(),
            line: span.start.line(),
            column: span.start.col() + 1,
        }
    }

    fn event(&mut self, ev: Event<'_>, span: Span) -> Result<(), Error> {
        match ev {
            Event::DocumentStart(_) => {
                self.docs += 1;
                if self.docs > 1 {
                    let n = self.node(Value::Null, String::new(), span);
                    return Err(Error::Syntax {
                        origin: n.origin(),
                        message: "more than one YAML document in the file; remove the extra '---'"
                            .into(),
                    });
                }
            }
            Event::Scalar(s, style, anchor, tag) => {
                if let Some(at) = s.find('\0') {
                    let mut n = self.node(Value::Null, String::new(), span);
                    if !s[..at].contains('\n') {
                        n.column += s[..at].chars().count();
                    }
                    return Err(Error::Syntax {
                        origin: n.origin(),
                        message: "a NUL character (\\0) in a value; recipes and var files are text"
                            .into(),
                    });
                }
                let value = if style == ScalarStyle::Plain && tag.is_none() {
                    resolve_plain(&s)
                } else {
                    Value::Str(s.to_string())
                };
                let node = self.node(value, s.to_string(), span);
                let size = Size {
                    values: 1,
                    bytes: s.len(),
                };
                self.count(size, &node)?;
                if anchor > 0 {
                    self.anchors.insert(anchor, (node.clone(), size));
                }
                self.push(node, size)?;
            }
            Event::Alias(id) => {
                let at = self.node(Value::Null, String::new(), span);
                let Some(size) = self.anchors.get(&id).map(|(_, size)| *size) else {
                    return Err(Error::Syntax {
                        origin: at.origin(),
                        message: "unknown alias".into(),
                    });
                };
                // Counted before it is copied: an alias bomb stops here, not after the copy.
                self.count(size, &at)?;
                let Some(mut node) = self.anchors.get(&id).map(|(n, _)| n.clone()) else {
                    return Ok(());
                };
                node.line = at.line;
                node.column = at.column;
                self.push(node, size)?;
            }
            Event::SequenceStart(anchor, _) | Event::MappingStart(anchor, _) => {
                let is_seq = matches!(ev, Event::SequenceStart(..));
                let n = if is_seq {
                    self.node(Value::Seq(Vec::new()), String::new(), span)
                } else {
                    self.node(Value::Map(Vec::new()), String::new(), span)
                };
                if self.stack.len() >= MAX_DEPTH {
                    return Err(Error::Syntax {
                        origin: n.origin(),
                        message: format!(
                            "lists and mappings nested more than {MAX_DEPTH} levels deep; a recipe needs far fewer"
                        ),
                    });
                }
                let size = Size {
                    values: 1,
                    bytes: 0,
                };
                self.count(size, &n)?;
                self.stack.push(if is_seq {
                    Frame::Seq(n, anchor, size)
                } else {
                    Frame::Map(n, anchor, size, None)
                });
            }
            Event::SequenceEnd | Event::MappingEnd => {
                let (node, anchor, size) = match self.stack.pop() {
                    Some(Frame::Seq(n, a, s)) | Some(Frame::Map(n, a, s, _)) => (n, a, s),
                    None => return Ok(()),
                };
                if anchor > 0 {
                    self.anchors.insert(anchor, (node.clone(), size));
                }
                self.push(node, size)?;
            }
            Event::StreamStart | Event::StreamEnd | Event::DocumentEnd | Event::Nothing => {}
        }
        Ok(())
    }

    /// Adds `size` to the document's total; refuses a document that grows past the limits.
    fn count(&mut self, size: Size, at: &Node) -> Result<(), Error> {
        self.values = self.values.saturating_add(size.values);
        self.bytes = self.bytes.saturating_add(size.bytes);
        if self.values > MAX_VALUES || self.bytes > MAX_EXPANDED_BYTES {
            return Err(Error::Syntax {
                origin: at.origin(),
                message: format!(
                    "the document expands to more than {MAX_VALUES} values or {} MiB (aliases \
                     repeating anchors, a \"billion laughs\"?); a recipe or var file is far smaller",
                    MAX_EXPANDED_BYTES / (1024 * 1024)
                ),
            });
        }
        Ok(())
    }

    fn push(&mut self, node: Node, size: Size) -> Result<(), Error> {
        match self.stack.last_mut() {
            None => self.root = Some(node),
            Some(Frame::Seq(seq, _, total)) => {
                total.add(size);
                if let Value::Seq(items) = &mut seq.value {
                    items.push(node);
                }
            }
            Some(Frame::Map(map, _, total, pending)) => {
                total.add(size);
                let key = pending.take();
                match key {
                    None => {
                        if let Value::Map(entries) = &map.value {
                            if let Some((first, _)) =
                                entries.iter().find(|(k, _)| k.value == node.value)
                            {
                                let what = match &node.value {
                                    Value::Str(s) => format!("'{s}'"),
                                    _ => format!("'{}'", node.raw),
                                };
                                return Err(node.err(
                                    "",
                                    format!(
                                        "duplicate key {what} (first written at line {})",
                                        first.line
                                    ),
                                ));
                            }
                        }
                        *pending = Some(node);
                    }
                    Some(key) => {
                        if let Value::Map(entries) = &mut map.value {
                            entries.push((key, node));
                        }
                    }
                }
            }
        }
        Ok(())
    }
}

/// YAML 1.2 core schema resolution of a plain scalar.
fn resolve_plain(s: &str) -> Value {
    match s {
        "" | "~" | "null" | "Null" | "NULL" => return Value::Null,
        "true" | "True" | "TRUE" => return Value::Bool(true),
        "false" | "False" | "FALSE" => return Value::Bool(false),
        _ => {}
    }
    let digits = s.strip_prefix(['+', '-']).unwrap_or(s);
    if !digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit()) {
        if let Ok(i) = s.parse::<i64>() {
            return Value::Int(i);
        }
    }
    if let Some(oct) = s.strip_prefix("0o") {
        if let Ok(i) = i64::from_str_radix(oct, 8) {
            return Value::Int(i);
        }
    }
    if let Some(hex) = s.strip_prefix("0x") {
        if let Ok(i) = i64::from_str_radix(hex, 16) {
            return Value::Int(i);
        }
    }
    let looks_float = s.bytes().any(|b| b.is_ascii_digit())
        && s.bytes()
            .all(|b| b.is_ascii_digit() || matches!(b, b'.' | b'e' | b'E' | b'+' | b'-'));
    if looks_float {
        if let Ok(f) = s.parse::<f64>() {
            return Value::Float(f);
        }
    }
    match s {
        ".inf" | ".Inf" | ".INF" | "+.inf" => Value::Float(f64::INFINITY),
        "-.inf" | "-.Inf" | "-.INF" => Value::Float(f64::NEG_INFINITY),
        ".nan" | ".NaN" | ".NAN" => Value::Float(f64::NAN),
        _ => Value::Str(s.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> Result<Node, Error> {
        parse(s, Path::new("t.yaml"))
    }

    #[test]
    fn spans_and_types() {
        let n = p("a: 1\nb:\n  - x\n  - 'y'\nc: true\nd: 0644\n").unwrap();
        let m = n.map("", &[]).unwrap();
        let b = m.get("b").unwrap();
        assert_eq!((b.line, b.column), (3, 3));
        let items = b.seq("b").unwrap();
        assert_eq!(items[1].value, Value::Str("y".into()));
        assert_eq!((items[1].line, items[1].column), (4, 5));
        assert_eq!(m.get("c").unwrap().value, Value::Bool(true));
        assert_eq!(m.get("d").unwrap().raw, "0644");
        assert_eq!(m.get("a").unwrap().value, Value::Int(1));
    }

    #[test]
    fn duplicate_keys_rejected() {
        let e = p("a: 1\nb: 2\na: 3\n").unwrap_err().to_string();
        assert_eq!(e, "t.yaml:3:1: duplicate key 'a' (first written at line 1)");
    }

    #[test]
    fn syntax_error_located() {
        let e = p("a: [1, 2\nb: 3\n").unwrap_err();
        assert!(e.location().is_some());
        assert!(e.to_string().starts_with("t.yaml:"), "{e}");
    }

    /// 10 aliases × 9 levels: 10⁹ strings once expanded.
    fn billion_laughs() -> String {
        let mut doc = String::from("a: &a [\"lol\",\"lol\",\"lol\",\"lol\",\"lol\",\"lol\",\"lol\",\"lol\",\"lol\",\"lol\"]\n");
        let names = ["a", "b", "c", "d", "e", "f", "g", "h", "i"];
        for w in names.windows(2) {
            let refs = vec![format!("*{}", w[0]); 10].join(",");
            doc.push_str(&format!("{}: &{} [{refs}]\n", w[1], w[1]));
        }
        doc
    }

    #[test]
    fn alias_expansion_is_bounded() {
        let e = p(&billion_laughs()).unwrap_err().to_string();
        assert!(
            e.starts_with("t.yaml:") && e.contains("expands to more than 100000 values"),
            "{e}"
        );
        // Aliases used the way people use them still work.
        let n = p("base: &b { x: 1 }\nuse: *b\n").unwrap();
        let m = n.map("", &[]).unwrap();
        assert_eq!(
            m.get("use")
                .unwrap()
                .map("", &[])
                .unwrap()
                .get("x")
                .unwrap()
                .value,
            Value::Int(1)
        );
        // A big scalar repeated: bounded by bytes, not only by count.
        let big = "x".repeat(1024 * 1024);
        let doc = format!("a: &a \"{big}\"\nb: [{}]\n", vec!["*a"; 20].join(","));
        let e = p(&doc).unwrap_err().to_string();
        assert!(e.contains("MiB"), "{e}");
    }

    #[test]
    fn deep_nesting_and_nul_are_refused() {
        let deep = format!("{}{}", "[".repeat(200), "]".repeat(200));
        let e = p(&deep).unwrap_err().to_string();
        assert!(e.contains("nested more than 64 levels"), "{e}");
        let block: String = (0..100)
            .map(|i| format!("{}k:\n", "  ".repeat(i)))
            .collect();
        let e = p(&block).unwrap_err().to_string();
        assert!(e.contains("nested more than 64 levels"), "{e}");
        let e = p("a: \"x\\0y\"\n").unwrap_err().to_string();
        assert!(e.starts_with("t.yaml:1:") && e.contains("NUL"), "{e}");
    }

    #[test]
    fn unknown_key_suggests() {
        let n = p("retry: 3\n").unwrap();
        let e = n
            .map("steps[0]", &["name", "retries"])
            .err()
            .unwrap()
            .to_string();
        assert_eq!(
            e,
            "t.yaml:1:1: steps[0]: unknown key 'retry' (did you mean 'retries'?); allowed keys: name, retries"
        );
    }
}
