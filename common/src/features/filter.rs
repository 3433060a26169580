//! Snapshot filters: which entities a site gets, as `site == "plant-7" and load > 0.5` or
//! `region in ("north", "east")`, checked against the view before anything is read.

use std::cmp::Ordering::{Equal, Greater, Less};

use thiserror::Error;

use super::value::{Key, Value};
use super::view::{FeatureType, FeatureView, KeyType};

/// A conjunction of comparisons between a column (the entity key or a feature) and a literal.
#[derive(Debug, Clone, PartialEq)]
pub struct Filter {
    terms: Vec<Term>,
}

#[derive(Debug, Clone, PartialEq)]
struct Term {
    /// `None`: the entity key; else the feature's index.
    column: Option<usize>,
    op: Op,
    literals: Vec<Literal>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Op {
    Eq,
    Ne,
    Lt,
    Le,
    Gt,
    Ge,
    In,
}

#[derive(Debug, Clone, PartialEq)]
enum Literal {
    Number(f64),
    Text(String),
    Bool(bool),
}

/// Why a filter expression was refused.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum FilterError {
    /// Not of the grammar.
    #[error("filter: {message} at {at:?}")]
    Syntax {
        /// What was expected.
        message: String,
        /// The rest of the expression from there.
        at: String,
    },
    /// A column the view does not have.
    #[error("filter: view {view:?} has no column {column:?}")]
    Column {
        /// The view.
        view: String,
        /// The column.
        column: String,
    },
    /// A literal of another type than its column.
    #[error("filter: column {column:?} is {kind}, and {literal} is not")]
    Type {
        /// The column.
        column: String,
        /// Its type.
        kind: String,
        /// The literal.
        literal: String,
    },
}

impl Filter {
    /// Parses `expr` against `view`.
    pub fn parse(view: &FeatureView, expr: &str) -> Result<Self, FilterError> {
        let mut lexer = Lexer { rest: expr.trim_start() };
        let mut terms = Vec::new();
        loop {
            terms.push(lexer.term(view)?);
            if lexer.rest.is_empty() {
                return Ok(Self { terms });
            }
            if !lexer.word("and") {
                return Err(lexer.error("expected `and` or the end"));
            }
        }
    }

    /// Whether the entity with `key` and feature `values` (the view's order) passes. A
    /// null value fails every comparison.
    pub fn matches(&self, key: &Key, values: &[Value]) -> bool {
        self.terms.iter().all(|term| {
            let value = match term.column {
                None => match key {
                    Key::Int(v) => Value::I64(*v),
                    Key::Str(s) => Value::Str(s.clone()),
                },
                Some(i) => values.get(i).cloned().unwrap_or(Value::Null),
            };
            term.holds(&value)
        })
    }
}

impl Term {
    fn holds(&self, value: &Value) -> bool {
        let ordering = |literal: &Literal| match (value, literal) {
            (Value::F32(v), Literal::Number(n)) => f64::from(*v).partial_cmp(n),
            (Value::F64(v), Literal::Number(n)) => v.partial_cmp(n),
            (Value::I64(v), Literal::Number(n)) => (*v as f64).partial_cmp(n),
            (Value::Str(v), Literal::Text(t)) => Some(v.as_str().cmp(t.as_str())),
            (Value::Bool(v), Literal::Bool(b)) => Some(v.cmp(b)),
            _ => None,
        };
        let first = || ordering(&self.literals[0]);
        match self.op {
            Op::Eq => first() == Some(Equal),
            Op::Ne => matches!(first(), Some(Less | Greater)),
            Op::Lt => first() == Some(Less),
            Op::Le => matches!(first(), Some(Less | Equal)),
            Op::Gt => first() == Some(Greater),
            Op::Ge => matches!(first(), Some(Greater | Equal)),
            Op::In => self.literals.iter().any(|l| ordering(l) == Some(Equal)),
        }
    }
}

struct Lexer<'a> {
    rest: &'a str,
}

impl Lexer<'_> {
    fn error(&self, message: &str) -> FilterError {
        FilterError::Syntax { message: message.to_owned(), at: self.rest.to_owned() }
    }

    fn advance(&mut self, n: usize) {
        self.rest = self.rest[n..].trim_start();
    }

    fn symbol(&mut self, symbol: &str) -> bool {
        let found = self.rest.starts_with(symbol);
        if found {
            self.advance(symbol.len());
        }
        found
    }

    fn ident(&mut self) -> Option<String> {
        let end = self
            .rest
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(self.rest.len());
        if end == 0 {
            return None;
        }
        let ident = self.rest[..end].to_owned();
        self.advance(end);
        Some(ident)
    }

    fn word(&mut self, word: &str) -> bool {
        // The text after `word`, when it starts there: slicing at `word.len()` instead
        // panicked inside a multi-byte character (`pump_id삔`, found by fuzzing).
        let found = self.rest.strip_prefix(word).is_some_and(|after| {
            after.chars().next().is_none_or(|c| !(c.is_ascii_alphanumeric() || c == '_'))
        });
        if found {
            self.advance(word.len());
        }
        found
    }

    fn term(&mut self, view: &FeatureView) -> Result<Term, FilterError> {
        let name = self.ident().ok_or_else(|| self.error("expected a column name"))?;
        let (column, kind) = if name == view.entity.name {
            let kind = match view.entity.kind {
                KeyType::String => FeatureType::String,
                KeyType::I64 => FeatureType::I64,
            };
            (None, kind)
        } else {
            let index = view.features.iter().position(|f| f.name == name).ok_or_else(|| {
                FilterError::Column { view: view.name.clone(), column: name.clone() }
            })?;
            (Some(index), view.features[index].kind.clone())
        };
        let op = [
            ("==", Op::Eq),
            ("!=", Op::Ne),
            ("<=", Op::Le),
            (">=", Op::Ge),
            ("<", Op::Lt),
            (">", Op::Gt),
        ]
        .into_iter()
        .find(|(s, _)| self.symbol(s))
        .map(|(_, op)| op);
        let (op, literals) = match op {
            Some(op) => (op, vec![self.literal()?]),
            None if self.word("in") => (Op::In, self.list()?),
            None => return Err(self.error("expected ==, !=, <, <=, >, >= or in")),
        };
        for literal in &literals {
            let fits = matches!(
                (&kind, literal),
                (FeatureType::F32 | FeatureType::F64 | FeatureType::I64, Literal::Number(_))
                    | (FeatureType::String | FeatureType::Category { .. }, Literal::Text(_))
                    | (FeatureType::Bool, Literal::Bool(_))
            );
            if !fits {
                return Err(FilterError::Type {
                    column: name,
                    kind: kind.to_string(),
                    literal: format!("{literal:?}"),
                });
            }
        }
        Ok(Term { column, op, literals })
    }

    fn list(&mut self) -> Result<Vec<Literal>, FilterError> {
        if !self.symbol("(") {
            return Err(self.error("expected ( after in"));
        }
        let mut literals = vec![self.literal()?];
        while self.symbol(",") {
            literals.push(self.literal()?);
        }
        if !self.symbol(")") {
            return Err(self.error("expected , or )"));
        }
        Ok(literals)
    }

    fn literal(&mut self) -> Result<Literal, FilterError> {
        if let Some(quoted) = self.rest.strip_prefix('"') {
            let end = quoted.find('"').ok_or_else(|| self.error("unterminated string"))?;
            let text = quoted[..end].to_owned();
            self.advance(end + 2);
            return Ok(Literal::Text(text));
        }
        if self.word("true") {
            return Ok(Literal::Bool(true));
        }
        if self.word("false") {
            return Ok(Literal::Bool(false));
        }
        let end = self
            .rest
            .find(|c: char| !(c.is_ascii_digit() || matches!(c, '-' | '+' | '.' | 'e' | 'E')))
            .unwrap_or(self.rest.len());
        let number = self.rest[..end].parse().map_err(|_| self.error("expected a literal"))?;
        self.advance(end);
        Ok(Literal::Number(number))
    }
}
