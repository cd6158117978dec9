//! Parsing the query language: a lexer of keywords, names, literals and parameters, and a
//! recursive-descent parser bounded by [`QUERY_DEPTH_MAX`]. The grammar is described in
//! [`query`](super::query).

use std::fmt;

use super::query::{is_name_byte, is_text};
use super::query::{
    CmpOp, Comparison, Field, Operand, Param, Query, QueryError, CANONICAL_NAN_BITS,
    QUERY_DEPTH_MAX, QUERY_LEN_MAX,
};
use crate::value::{Value, NAME_LEN_MAX};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Keyword {
    And,
    Or,
    Not,
    BeginsWith,
    EndsWith,
    Contains,
    True,
    False,
    Null,
    TruePredicate,
    FalsePredicate,
    Inf,
    Nan,
}

pub(super) fn keyword(word: &str) -> Option<Keyword> {
    const WORDS: [(&str, Keyword); 13] = [
        ("and", Keyword::And),
        ("or", Keyword::Or),
        ("not", Keyword::Not),
        ("beginswith", Keyword::BeginsWith),
        ("endswith", Keyword::EndsWith),
        ("contains", Keyword::Contains),
        ("true", Keyword::True),
        ("false", Keyword::False),
        ("null", Keyword::Null),
        ("truepredicate", Keyword::TruePredicate),
        ("falsepredicate", Keyword::FalsePredicate),
        ("inf", Keyword::Inf),
        ("nan", Keyword::Nan),
    ];
    WORDS
        .iter()
        .find(|(w, _)| w.eq_ignore_ascii_case(word))
        .map(|&(_, k)| k)
}

#[derive(Clone, Debug, PartialEq)]
enum Tok {
    LParen,
    RParen,
    And,
    Or,
    Not,
    TruePredicate,
    FalsePredicate,
    Op(CmpOp),
    Field(Field),
    Value(Value),
    Param(Param),
    End,
}

#[derive(Clone, Debug)]
struct Spanned {
    tok: Tok,
    start: usize,
    end: usize,
}

/// One side of a comparison, before we know which side is the field.
enum Side {
    Field(Field),
    Operand(Operand),
}

struct Parser<'a> {
    src: &'a str,
    pos: usize,
    peeked: Option<Spanned>,
}

/// Parses a query. See the [`query`](super::query) module for the grammar.
///
/// ```
/// use fieldlog::rules::parse;
/// let q = parse("4 >= complexity and status == 'done'")?;
/// assert_eq!(q.to_string(), r#"complexity <= 4 AND status == "done""#);
/// # Ok::<(), fieldlog::rules::QueryError>(())
/// ```
pub fn parse(text: &str) -> Result<Query, QueryError> {
    if text.len() > QUERY_LEN_MAX {
        return Err(QueryError::TooLong {
            len: text.len(),
            max: QUERY_LEN_MAX,
        });
    }
    let mut p = Parser {
        src: text,
        pos: 0,
        peeked: None,
    };
    let q = p.parse_or(0)?;
    let t = p.next()?;
    if t.tok != Tok::End {
        return Err(p.syntax(&t, "`AND`, `OR` or end of input".into()));
    }
    // The canonical form can be longer than the text (`a<1&&b<2` prints as
    // `a < 1 AND b < 2`); refusing what would not parse back keeps `Display` and `parse`
    // exact inverses, so a server may store either form.
    let mut len = ByteCount(0);
    // Writing to a ByteCount cannot fail.
    let _ = fmt::write(&mut len, format_args!("{q}"));
    if len.0 > QUERY_LEN_MAX {
        return Err(QueryError::CanonicalTooLong {
            len: len.0,
            max: QUERY_LEN_MAX,
        });
    }
    Ok(q)
}

/// Counts the bytes written to it.
struct ByteCount(usize);

impl fmt::Write for ByteCount {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        self.0 += s.len();
        Ok(())
    }
}

impl<'a> Parser<'a> {
    fn rest(&self) -> &'a [u8] {
        self.src.as_bytes().get(self.pos..).unwrap_or_default()
    }

    fn byte_at(&self, i: usize) -> Option<u8> {
        self.src.as_bytes().get(i).copied()
    }

    /// The text of a token for an error message, quoted and cut short.
    fn describe(&self, start: usize, end: usize) -> String {
        match self.src.get(start..end) {
            None | Some("") => "end of input".into(),
            Some(s) => {
                let mut out: String = s.chars().take(32).collect();
                if out.len() < s.len() {
                    out.push('…');
                }
                format!("`{out}`")
            }
        }
    }

    fn syntax(&self, t: &Spanned, expected: String) -> QueryError {
        QueryError::Syntax {
            pos: t.start,
            expected,
            found: self.describe(t.start, t.end),
        }
    }

    fn invalid(pos: usize, reason: impl Into<String>) -> QueryError {
        QueryError::Invalid {
            pos,
            reason: reason.into(),
        }
    }

    fn peek(&mut self) -> Result<&Spanned, QueryError> {
        let t = match self.peeked.take() {
            Some(t) => t,
            None => self.lex()?,
        };
        Ok(self.peeked.insert(t))
    }

    fn next(&mut self) -> Result<Spanned, QueryError> {
        match self.peeked.take() {
            Some(t) => Ok(t),
            None => self.lex(),
        }
    }

    // ---- grammar -------------------------------------------------------------------

    fn parse_or(&mut self, depth: usize) -> Result<Query, QueryError> {
        let mut left = self.parse_and(depth)?;
        while self.peek()?.tok == Tok::Or {
            self.next()?;
            let right = self.parse_and(depth)?;
            left = Query::Or(Box::new(left), Box::new(right));
        }
        Ok(left)
    }

    fn parse_and(&mut self, depth: usize) -> Result<Query, QueryError> {
        let mut left = self.parse_not(depth)?;
        while self.peek()?.tok == Tok::And {
            self.next()?;
            let right = self.parse_not(depth)?;
            left = Query::And(Box::new(left), Box::new(right));
        }
        Ok(left)
    }

    fn deeper(t: &Spanned, depth: usize) -> Result<usize, QueryError> {
        if depth >= QUERY_DEPTH_MAX {
            return Err(QueryError::TooDeep {
                pos: t.start,
                max: QUERY_DEPTH_MAX,
            });
        }
        Ok(depth + 1)
    }

    fn parse_not(&mut self, depth: usize) -> Result<Query, QueryError> {
        if self.peek()?.tok != Tok::Not {
            return self.parse_primary(depth);
        }
        let t = self.next()?;
        let depth = Self::deeper(&t, depth)?;
        Ok(Query::Not(Box::new(self.parse_not(depth)?)))
    }

    fn parse_primary(&mut self, depth: usize) -> Result<Query, QueryError> {
        let t = self.next()?;
        let left = match t.tok {
            Tok::LParen => {
                let inner_depth = Self::deeper(&t, depth)?;
                let q = self.parse_or(inner_depth)?;
                let close = self.next()?;
                if close.tok != Tok::RParen {
                    let expected = format!("`)` to close the `(` at {}", t.start);
                    return Err(self.syntax(&close, expected));
                }
                return Ok(q);
            }
            Tok::TruePredicate => return Ok(Query::True),
            Tok::FalsePredicate => return Ok(Query::False),
            Tok::Field(field) => Side::Field(field),
            Tok::Value(v) => Side::Operand(Operand::Value(v)),
            Tok::Param(p) => Side::Operand(Operand::Param(p)),
            _ => return Err(self.syntax(&t, "a comparison, `(` or `NOT`".into())),
        };
        let left_text = self.describe(t.start, t.end);
        let op_tok = self.next()?;
        let Tok::Op(op) = op_tok.tok else {
            let expected = format!("a comparison operator after {left_text}");
            return Err(self.syntax(&op_tok, expected));
        };
        let op_text = self.describe(op_tok.start, op_tok.end);
        let r = self.next()?;
        match (left, r.tok.clone()) {
            (Side::Field(field), Tok::Value(v)) => {
                self.comparison(field, op, &op_text, Operand::Value(v), r.start)
            }
            (Side::Field(field), Tok::Param(p)) => {
                self.comparison(field, op, &op_text, Operand::Param(p), r.start)
            }
            (Side::Field(_), _) => {
                Err(self.syntax(&r, format!("a value or parameter after {op_text}")))
            }
            (Side::Operand(operand), Tok::Field(field)) => {
                let Some(op) = op.flipped() else {
                    return Err(Self::invalid(
                        op_tok.start,
                        format!("{op_text} needs the field on its left"),
                    ));
                };
                self.comparison(field, op, &op_text, operand, t.start)
            }
            (Side::Operand(_), _) => Err(self.syntax(&r, format!("a field after {op_text}"))),
        }
    }

    fn comparison(
        &self,
        field: Field,
        op: CmpOp,
        op_text: &str,
        operand: Operand,
        operand_pos: usize,
    ) -> Result<Query, QueryError> {
        if let Operand::Value(v) = &operand {
            if op.is_string_op() && !is_text(v) {
                return Err(Self::invalid(
                    operand_pos,
                    format!(
                        "{op_text} needs a string or bytes value, found {}",
                        v.type_name()
                    ),
                ));
            }
        }
        Ok(Query::Cmp(Comparison { field, op, operand }))
    }

    // ---- tokens --------------------------------------------------------------------

    fn lex(&mut self) -> Result<Spanned, QueryError> {
        while self
            .byte_at(self.pos)
            .is_some_and(|b| b.is_ascii_whitespace())
        {
            self.pos += 1;
        }
        let start = self.pos;
        let tok = self.lex_token(start)?;
        Ok(Spanned {
            tok,
            start,
            end: self.pos,
        })
    }

    fn lex_token(&mut self, start: usize) -> Result<Tok, QueryError> {
        let rest = self.rest();
        let Some(&b) = rest.first() else {
            return Ok(Tok::End);
        };
        let two = rest.get(..2).unwrap_or(rest);
        let (tok, len) = match (b, two) {
            (b'(', _) => (Tok::LParen, 1),
            (b')', _) => (Tok::RParen, 1),
            (_, b"&&") => (Tok::And, 2),
            (_, b"||") => (Tok::Or, 2),
            (_, b"==") => (Tok::Op(CmpOp::Eq), 2),
            (_, b"!=") | (_, b"<>") => (Tok::Op(CmpOp::Ne), 2),
            (_, b"<=") => (Tok::Op(CmpOp::Le), 2),
            (_, b">=") => (Tok::Op(CmpOp::Ge), 2),
            (b'=', _) => (Tok::Op(CmpOp::Eq), 1),
            (b'<', _) => (Tok::Op(CmpOp::Lt), 1),
            (b'>', _) => (Tok::Op(CmpOp::Gt), 1),
            (b'!', _) => (Tok::Not, 1),
            (b'"' | b'\'', _) => return self.lex_string(b),
            (b'$', _) => return self.lex_param(),
            (b'`', _) => return self.lex_quoted_field(),
            (b'0'..=b'9' | b'+' | b'-', _) => return self.lex_number(),
            (b'a'..=b'z' | b'A'..=b'Z' | b'_', _) => return self.lex_word(),
            _ => {
                let c = self.src.get(start..).and_then(|s| s.chars().next());
                let shown = c.map_or_else(|| format!("{b:#04x}"), |c| format!("{c:?}"));
                return Err(Self::invalid(
                    start,
                    format!("unexpected character {shown}"),
                ));
            }
        };
        self.pos += len;
        Ok(tok)
    }

    fn take_while(&mut self, f: impl Fn(u8) -> bool) -> &'a str {
        let start = self.pos;
        while self.byte_at(self.pos).is_some_and(&f) {
            self.pos += 1;
        }
        // Only ASCII bytes were taken, so both ends are char boundaries.
        self.src.get(start..self.pos).unwrap_or_default()
    }

    fn lex_word(&mut self) -> Result<Tok, QueryError> {
        let start = self.pos;
        let word = self.take_while(is_name_byte);
        let Some(kw) = keyword(word) else {
            if word == "_id" {
                return Ok(Tok::Field(Field::Id));
            }
            return Self::field_name(start, word).map(Tok::Field);
        };
        Ok(match kw {
            Keyword::And => Tok::And,
            Keyword::Or => Tok::Or,
            Keyword::Not => Tok::Not,
            Keyword::BeginsWith => Tok::Op(CmpOp::BeginsWith),
            Keyword::EndsWith => Tok::Op(CmpOp::EndsWith),
            Keyword::Contains => Tok::Op(CmpOp::Contains),
            Keyword::True => Tok::Value(Value::Bool(true)),
            Keyword::False => Tok::Value(Value::Bool(false)),
            Keyword::Null => Tok::Value(Value::Null),
            Keyword::TruePredicate => Tok::TruePredicate,
            Keyword::FalsePredicate => Tok::FalsePredicate,
            Keyword::Inf => Tok::Value(Value::Float(f64::INFINITY)),
            Keyword::Nan => Tok::Value(Value::Float(self.lex_nan_bits()?)),
        })
    }

    /// After `nan`: an optional `(0x` + 16 hex digits + `)` giving the NaN's bits.
    fn lex_nan_bits(&mut self) -> Result<f64, QueryError> {
        if self.byte_at(self.pos) != Some(b'(') {
            return Ok(f64::from_bits(CANONICAL_NAN_BITS));
        }
        let start = self.pos;
        let rest = self.rest();
        let body = rest.get(1..19);
        let bits = match (body, rest.get(19)) {
            (Some(body), Some(b')')) if body.starts_with(b"0x") => std::str::from_utf8(&body[2..])
                .ok()
                .filter(|h| h.bytes().all(|b| b.is_ascii_hexdigit()))
                .and_then(|h| u64::from_str_radix(h, 16).ok()),
            _ => None,
        };
        let Some(bits) = bits.filter(|&b| f64::from_bits(b).is_nan()) else {
            return Err(Self::invalid(
                start,
                "expected `(0x` and the 16 hex digits of a NaN's bits and `)` after `nan`",
            ));
        };
        self.pos += 20;
        Ok(f64::from_bits(bits))
    }

    fn field_name(pos: usize, name: &str) -> Result<Field, QueryError> {
        if name.is_empty() || name.len() > NAME_LEN_MAX || !name.bytes().all(is_name_byte) {
            return Err(Self::invalid(
                pos,
                format!(
                    "a field name is 1 to {NAME_LEN_MAX} ASCII letters, digits, `_`, `-` or `.`"
                ),
            ));
        }
        Ok(if name == "_id" {
            Field::Id
        } else {
            Field::Named(name.to_owned())
        })
    }

    fn lex_quoted_field(&mut self) -> Result<Tok, QueryError> {
        let start = self.pos;
        let body = self.rest().get(1..).unwrap_or_default();
        let Some(len) = body.iter().position(|&b| b == b'`') else {
            return Err(Self::invalid(
                start,
                "unterminated `` ` `` (expected a closing `` ` ``)",
            ));
        };
        let name = self.src.get(start + 1..start + 1 + len).unwrap_or_default();
        let field = Self::field_name(start, name)?;
        self.pos = start + len + 2;
        Ok(Tok::Field(field))
    }

    fn lex_param(&mut self) -> Result<Tok, QueryError> {
        let start = self.pos;
        self.pos += 1;
        match self.byte_at(self.pos) {
            Some(b'0'..=b'9') => {
                let digits = self.take_while(|b| b.is_ascii_digit());
                let i = digits.parse::<u32>().map_err(|_| {
                    Self::invalid(start, "parameter number out of range".to_string())
                })?;
                Ok(Tok::Param(Param::Index(i)))
            }
            Some(b) if b.is_ascii_alphabetic() || b == b'_' => {
                let name = self.take_while(|b| b.is_ascii_alphanumeric() || b == b'_');
                if name.len() > NAME_LEN_MAX {
                    return Err(Self::invalid(
                        start,
                        format!("parameter name longer than {NAME_LEN_MAX} bytes"),
                    ));
                }
                Ok(Tok::Param(Param::Named(name.to_owned())))
            }
            _ => Err(Self::invalid(
                start,
                "expected a parameter number or name after `$`",
            )),
        }
    }

    fn lex_number(&mut self) -> Result<Tok, QueryError> {
        let start = self.pos;
        let rest = self.rest();
        if rest.starts_with(b"0x") || rest.starts_with(b"0X") {
            self.pos += 2;
            let hex = self.take_while(|b| b.is_ascii_hexdigit());
            if hex.len() % 2 == 1 {
                return Err(Self::invalid(
                    start,
                    "bytes need an even number of hex digits",
                ));
            }
            self.end_of_number(start)?;
            let bytes = hex
                .as_bytes()
                .chunks(2)
                .map(|pair| {
                    std::str::from_utf8(pair)
                        .ok()
                        .and_then(|p| u8::from_str_radix(p, 16).ok())
                })
                .collect::<Option<Vec<u8>>>()
                .ok_or_else(|| Self::invalid(start, "bad hex digits"))?;
            return Ok(Tok::Value(Value::Bytes(bytes)));
        }
        let negative = rest.first() == Some(&b'-');
        if matches!(rest.first(), Some(b'+' | b'-')) {
            self.pos += 1;
            let after = self.rest();
            if after.len() >= 3 && after[..3].eq_ignore_ascii_case(b"inf") {
                let word_end = self.pos + 3;
                if !self.byte_at(word_end).is_some_and(is_name_byte) {
                    self.pos = word_end;
                    let inf = if negative {
                        f64::NEG_INFINITY
                    } else {
                        f64::INFINITY
                    };
                    return Ok(Tok::Value(Value::Float(inf)));
                }
            }
            if !self.byte_at(self.pos).is_some_and(|b| b.is_ascii_digit()) {
                return Err(Self::invalid(start, "expected a digit after the sign"));
            }
        }
        self.take_while(|b| b.is_ascii_digit());
        let mut is_float = false;
        if self.byte_at(self.pos) == Some(b'.') {
            is_float = true;
            self.pos += 1;
            if self.take_while(|b| b.is_ascii_digit()).is_empty() {
                return Err(Self::invalid(self.pos, "expected a digit after `.`"));
            }
        }
        if matches!(self.byte_at(self.pos), Some(b'e' | b'E')) {
            is_float = true;
            self.pos += 1;
            if matches!(self.byte_at(self.pos), Some(b'+' | b'-')) {
                self.pos += 1;
            }
            if self.take_while(|b| b.is_ascii_digit()).is_empty() {
                return Err(Self::invalid(self.pos, "expected a digit in the exponent"));
            }
        }
        self.end_of_number(start)?;
        let text = self.src.get(start..self.pos).unwrap_or_default();
        if is_float {
            let x = text
                .parse::<f64>()
                .map_err(|_| Self::invalid(start, format!("bad float `{text}`")))?;
            Ok(Tok::Value(Value::Float(x)))
        } else {
            let i = text.parse::<i64>().map_err(|_| {
                Self::invalid(start, format!("integer `{text}` is out of range for i64"))
            })?;
            Ok(Tok::Value(Value::Int(i)))
        }
    }

    /// A number must not run straight into a name (`12ab`): that is a typo, not two tokens.
    fn end_of_number(&self, start: usize) -> Result<(), QueryError> {
        if self.byte_at(self.pos).is_some_and(is_name_byte) {
            let end = self.pos + self.rest().iter().take_while(|&&b| is_name_byte(b)).count();
            return Err(Self::invalid(
                start,
                format!("bad number {}", self.describe(start, end)),
            ));
        }
        Ok(())
    }

    fn lex_string(&mut self, quote: u8) -> Result<Tok, QueryError> {
        let start = self.pos;
        let mut out = String::new();
        let body = self.src.get(start + 1..).unwrap_or_default();
        let mut chars = body.char_indices();
        while let Some((i, c)) = chars.next() {
            let at = start + 1 + i;
            match c {
                c if c as u32 == u32::from(quote) => {
                    self.pos = at + 1;
                    return Ok(Tok::Value(Value::String(out)));
                }
                '\\' => {
                    let Some((_, e)) = chars.next() else {
                        break;
                    };
                    out.push(match e {
                        '"' => '"',
                        '\'' => '\'',
                        '\\' => '\\',
                        'n' => '\n',
                        'r' => '\r',
                        't' => '\t',
                        '0' => '\0',
                        'u' => {
                            let tail = chars.as_str();
                            let bad = || Self::invalid(at, "expected `\\u{` 1 to 6 hex digits `}`");
                            let close = tail.find('}').ok_or_else(bad)?;
                            let hex = tail.get(1..close).filter(|_| tail.starts_with('{'));
                            let c = hex
                                .filter(|h| {
                                    (1..=6).contains(&h.len())
                                        && h.bytes().all(|b| b.is_ascii_hexdigit())
                                })
                                .and_then(|h| u32::from_str_radix(h, 16).ok())
                                .ok_or_else(bad)?;
                            let c = char::from_u32(c).ok_or_else(|| {
                                Self::invalid(at, format!("`\\u{{{c:x}}}` is not a character"))
                            })?;
                            // Skip the `{…}` we read from the tail.
                            for _ in 0..=close {
                                chars.next();
                            }
                            c
                        }
                        other => {
                            return Err(Self::invalid(at, format!("unknown escape `\\{other}`")));
                        }
                    });
                }
                c => out.push(c),
            }
        }
        self.pos = self.src.len();
        Err(QueryError::Syntax {
            pos: self.src.len(),
            expected: format!("a closing {} for the string at {start}", quote as char),
            found: "end of input".into(),
        })
    }
}
