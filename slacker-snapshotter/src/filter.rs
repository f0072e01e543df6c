//! containerd's filter syntax, as `Walk` receives it.
//!
//! A request carries several filter strings: a snapshot matches if it matches **any** of
//! them. Inside one string, selectors separated by `,` must **all** match. A selector
//! is a field path (`name`, `parent`, `kind`, `labels.<key>`; a part may be quoted
//! with `"`), optionally followed by an operator (`==`, `!=`, `~=` for a regular
//! expression) and a value (quoted or bare). A field path alone tests presence.
//!
//! ```
//! use slacker_snapshotter::filter::Filters;
//! let f = Filters::parse(&["kind==active,labels.\"containerd.io/gc.root\"".to_owned()]).unwrap();
//! let labels = [("containerd.io/gc.root".to_owned(), "x".to_owned())].into();
//! assert!(f.matches(&|field: &[String]| match field[0].as_str() {
//!     "kind" => Some("active".to_owned()),
//!     "labels" => field.get(1).and_then(|k| labels_get(&labels, k)),
//!     _ => None,
//! }));
//! # fn labels_get(l: &std::collections::BTreeMap<String, String>, k: &str) -> Option<String> { l.get(k).cloned() }
//! ```

use regex_lite::Regex;

/// A parse error, with the offending text.
#[derive(Debug, thiserror::Error)]
#[error("filter {input:?}: {message}")]
pub struct FilterError {
    input: String,
    message: String,
}

#[derive(Debug)]
enum Op {
    Present,
    Equal(String),
    NotEqual(String),
    Matches(Regex),
}

#[derive(Debug)]
struct Selector {
    field: Vec<String>,
    op: Op,
}

/// Parsed filters: any of the conjunctions.
#[derive(Debug, Default)]
pub struct Filters {
    any: Vec<Vec<Selector>>,
}

struct Lexer<'a> {
    s: &'a [u8],
    i: usize,
}

impl Lexer<'_> {
    fn peek(&self) -> Option<u8> {
        self.s.get(self.i).copied()
    }
    fn skip_ws(&mut self) {
        while self.peek().is_some_and(|c| c == b' ' || c == b'\t') {
            self.i += 1;
        }
    }
    fn quoted(&mut self) -> Result<String, String> {
        let quote = self.s[self.i];
        self.i += 1;
        let mut out = Vec::new();
        loop {
            match self.peek() {
                None => return Err("unterminated quoted string".into()),
                Some(c) if c == quote => {
                    self.i += 1;
                    break;
                }
                Some(b'\\') => {
                    self.i += 1;
                    let c = self.peek().ok_or("dangling escape")?;
                    self.i += 1;
                    out.push(match c {
                        b'n' => b'\n',
                        b't' => b'\t',
                        other => other,
                    });
                }
                Some(c) => {
                    out.push(c);
                    self.i += 1;
                }
            }
        }
        String::from_utf8(out).map_err(|_| "quoted string is not UTF-8".to_owned())
    }
    fn field_part(&mut self) -> Result<String, String> {
        self.skip_ws();
        match self.peek() {
            Some(b'"') | Some(b'`') => self.quoted(),
            _ => {
                let start = self.i;
                while self
                    .peek()
                    .is_some_and(|c| c.is_ascii_alphanumeric() || matches!(c, b'_' | b'-' | b'/'))
                {
                    self.i += 1;
                }
                if start == self.i {
                    return Err(format!("expected a field name at byte {}", self.i));
                }
                Ok(String::from_utf8_lossy(&self.s[start..self.i]).into_owned())
            }
        }
    }
    fn value(&mut self) -> Result<String, String> {
        self.skip_ws();
        match self.peek() {
            Some(b'"') | Some(b'`') => self.quoted(),
            _ => {
                let start = self.i;
                while self.peek().is_some_and(|c| c != b',') {
                    self.i += 1;
                }
                Ok(String::from_utf8_lossy(&self.s[start..self.i])
                    .trim_end()
                    .to_owned())
            }
        }
    }
}

fn parse_one(input: &str) -> Result<Vec<Selector>, String> {
    let mut lx = Lexer {
        s: input.as_bytes(),
        i: 0,
    };
    let mut out = Vec::new();
    loop {
        let mut field = vec![lx.field_part()?];
        while lx.peek() == Some(b'.') {
            lx.i += 1;
            field.push(lx.field_part()?);
        }
        lx.skip_ws();
        let rest = &lx.s[lx.i..];
        let op = if rest.starts_with(b"==") {
            lx.i += 2;
            Op::Equal(lx.value()?)
        } else if rest.starts_with(b"!=") {
            lx.i += 2;
            Op::NotEqual(lx.value()?)
        } else if rest.starts_with(b"~=") {
            lx.i += 2;
            let v = lx.value()?;
            Op::Matches(Regex::new(&v).map_err(|e| format!("bad regular expression: {e}"))?)
        } else {
            Op::Present
        };
        out.push(Selector { field, op });
        lx.skip_ws();
        match lx.peek() {
            None => return Ok(out),
            Some(b',') => lx.i += 1,
            Some(c) => return Err(format!("unexpected {:?} at byte {}", c as char, lx.i)),
        }
    }
}

impl Filters {
    /// Parses the filter strings of a request (empty strings are ignored).
    ///
    /// # Errors
    /// [`FilterError`] for a malformed filter.
    pub fn parse(filters: &[String]) -> Result<Self, FilterError> {
        let mut any = Vec::new();
        for f in filters.iter().filter(|f| !f.trim().is_empty()) {
            any.push(parse_one(f).map_err(|message| FilterError {
                input: f.clone(),
                message,
            })?);
        }
        Ok(Self { any })
    }

    /// Whether a snapshot matches; `field` returns the value of a field path, `None`
    /// when the field is absent (an empty parent is absent).
    pub fn matches(&self, field: &dyn Fn(&[String]) -> Option<String>) -> bool {
        if self.any.is_empty() {
            return true;
        }
        self.any.iter().any(|all| {
            all.iter().all(|s| {
                let v = field(&s.field);
                match &s.op {
                    Op::Present => v.is_some(),
                    Op::Equal(want) => v.as_deref() == Some(want.as_str()),
                    Op::NotEqual(want) => v.as_deref().unwrap_or("") != want,
                    Op::Matches(re) => v.is_some_and(|v| re.is_match(&v)),
                }
            })
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn f(s: &[&str]) -> Filters {
        Filters::parse(&s.iter().map(|s| s.to_string()).collect::<Vec<_>>()).unwrap()
    }

    fn info<'a>(
        name: &'a str,
        parent: &'a str,
        l: Option<&'a str>,
    ) -> impl Fn(&[String]) -> Option<String> + 'a {
        move |p: &[String]| match p[0].as_str() {
            "name" => Some(name.to_owned()),
            "parent" => (!parent.is_empty()).then(|| parent.to_owned()),
            "kind" => Some("active".to_owned()),
            "labels" if p.get(1).map(String::as_str) == Some("l") => l.map(str::to_owned),
            _ => None,
        }
    }

    #[test]
    fn containerd_walk_filters() {
        assert!(f(&["name==p", "name==a"]).matches(&info("a", "", None)));
        assert!(!f(&["name==p", "name==a"]).matches(&info("b", "", None)));
        assert!(f(&["name==a-wl,labels.l"]).matches(&info("a-wl", "", Some("2"))));
        assert!(!f(&["name==a-wl,labels.l"]).matches(&info("a-wl", "", None)));
        assert!(!f(&["parent!=\"\""]).matches(&info("x", "", None)));
        assert!(f(&["parent!=\"\""]).matches(&info("x", "p", None)));
        assert!(f(&["labels.l==2"]).matches(&info("x", "", Some("2"))));
        assert!(f(&["labels.\"l\"~=^[0-9]$"]).matches(&info("x", "", Some("2"))));
        assert!(f(&[]).matches(&info("x", "", None)));
    }

    #[test]
    fn malformed_filters_are_errors() {
        for bad in ["==x", "name==\"x", "labels.", "name~=(", "name x"] {
            assert!(Filters::parse(&[bad.to_owned()]).is_err(), "{bad}");
        }
    }
}
