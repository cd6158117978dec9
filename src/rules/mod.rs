//! Rules: the query language of subscriptions and local reads ([`query`], parsed by
//! `parser`), and the permissions file that decides what each user may read and write
//! ([`permissions`], loaded by `load`, its match expressions in `expr`).
//!
//! Pure logic: no I/O, no store, no network. The sync server binds a subscription's query
//! with the user's parameters, picks the user's role per collection, and asks these types
//! which objects and fields are visible and whether a write is allowed.

mod expr;
mod load;
mod parser;
pub mod permissions;
pub mod query;
pub(crate) mod query_error;

pub use permissions::{
    load, Access, Action, Denial, DenialKind, FieldPerms, Role, RoleFlags, Rules, RulesError, User,
    FILTER_DEPTH_MAX, RULES_LEN_MAX,
};
pub use query::{
    compare, parse, pk_value, BoundQuery, CmpOp, Comparison, Field, Operand, Param, Params, Query,
    QueryError, QUERY_DEPTH_MAX, QUERY_LEN_MAX,
};
