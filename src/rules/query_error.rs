//! What can go wrong with a query, and its comparison operators: a leaf module (it
//! depends on nothing else in the crate), so the crate's error type can name query errors
//! without depending on queries.

use std::cmp::Ordering;
use std::fmt;

/// Longest query text `rules::parse` accepts, in bytes.
pub const QUERY_LEN_MAX: usize = 4 << 10;

/// Deepest nesting of parentheses and `NOT` that `rules::parse` accepts.
pub const QUERY_DEPTH_MAX: usize = 32;

/// What can go wrong parsing, checking or binding a query.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum QueryError {
    /// The text does not follow the grammar.
    #[error("at {pos}: expected {expected}, found {found}")]
    Syntax {
        /// Byte offset of the offending token.
        pos: usize,
        /// What the grammar allows there.
        expected: String,
        /// What the text has there (quoted and cut short), or "end of input".
        found: String,
    },
    /// A token is malformed (a bad escape, an integer out of range, a bad type).
    #[error("at {pos}: {reason}")]
    Invalid {
        /// Byte offset of the offending token or character.
        pos: usize,
        /// What is wrong.
        reason: String,
    },
    /// The text is longer than [`QUERY_LEN_MAX`].
    #[error("query is {len} bytes; the limit is {max}")]
    TooLong {
        /// The text's length in bytes.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// The query's canonical form (its `Display`) is longer than [`QUERY_LEN_MAX`], so it
    /// could not be parsed back; refused so that every parsed query can be.
    #[error("query is {len} bytes in canonical form; the limit is {max}")]
    CanonicalTooLong {
        /// The canonical form's length in bytes.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// Parentheses and `NOT` nest deeper than [`QUERY_DEPTH_MAX`].
    #[error("at {pos}: nesting deeper than {max} levels of parentheses and NOT")]
    TooDeep {
        /// Byte offset of the token that went too deep.
        pos: usize,
        /// The limit.
        max: usize,
    },
    /// The query uses a field the collection's schema does not declare queryable.
    #[error("field `{field}` is not queryable in `{collection}`")]
    NotQueryable {
        /// The field.
        field: String,
        /// The collection of the schema.
        collection: String,
    },
    /// `Query::bind` got no value for a parameter.
    #[error("missing parameter `{param}`")]
    MissingParam {
        /// The parameter as written: `$0`, `$user`.
        param: String,
    },
    /// A parameter's value does not suit its operator.
    #[error("parameter `{param}` is {found}; `{op}` needs a string or bytes")]
    BadParam {
        /// The parameter as written.
        param: String,
        /// The operator.
        op: CmpOp,
        /// The type of the value given.
        found: &'static str,
    },
}

/// A comparison operator.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum CmpOp {
    /// `==`
    Eq,
    /// `!=`
    Ne,
    /// `<`
    Lt,
    /// `<=`
    Le,
    /// `>`
    Gt,
    /// `>=`
    Ge,
    /// `BEGINSWITH`
    BeginsWith,
    /// `ENDSWITH`
    EndsWith,
    /// `CONTAINS`
    Contains,
}

impl CmpOp {
    /// The operator for `value op field` read as `field op' value`; `None` for the string
    /// operators, which are not symmetric.
    pub(crate) fn flipped(self) -> Option<CmpOp> {
        Some(match self {
            CmpOp::Eq => CmpOp::Eq,
            CmpOp::Ne => CmpOp::Ne,
            CmpOp::Lt => CmpOp::Gt,
            CmpOp::Le => CmpOp::Ge,
            CmpOp::Gt => CmpOp::Lt,
            CmpOp::Ge => CmpOp::Le,
            CmpOp::BeginsWith | CmpOp::EndsWith | CmpOp::Contains => return None,
        })
    }

    pub(crate) fn is_string_op(self) -> bool {
        matches!(self, CmpOp::BeginsWith | CmpOp::EndsWith | CmpOp::Contains)
    }

    /// Whether an ordering operator holds given how its sides compare (`None`: they are
    /// not comparable); the string operators never hold here.
    pub(crate) fn holds_for(self, ord: Option<Ordering>) -> bool {
        match self {
            CmpOp::Eq => ord == Some(Ordering::Equal),
            CmpOp::Ne => ord != Some(Ordering::Equal),
            CmpOp::Lt => ord == Some(Ordering::Less),
            CmpOp::Le => matches!(ord, Some(Ordering::Less | Ordering::Equal)),
            CmpOp::Gt => ord == Some(Ordering::Greater),
            CmpOp::Ge => matches!(ord, Some(Ordering::Greater | Ordering::Equal)),
            CmpOp::BeginsWith | CmpOp::EndsWith | CmpOp::Contains => false,
        }
    }
}

impl fmt::Display for CmpOp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            CmpOp::Eq => "==",
            CmpOp::Ne => "!=",
            CmpOp::Lt => "<",
            CmpOp::Le => "<=",
            CmpOp::Gt => ">",
            CmpOp::Ge => ">=",
            CmpOp::BeginsWith => "BEGINSWITH",
            CmpOp::EndsWith => "ENDSWITH",
            CmpOp::Contains => "CONTAINS",
        })
    }
}
