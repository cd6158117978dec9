//! What one client may see: its user's roles and its subscriptions, bound to the user and
//! to their parameter values. Pure logic over the rules module.

use std::collections::BTreeMap;
use std::sync::Arc;

use crate::rules::{parse, Access, BoundQuery, Params, Rules, User};
use crate::schema::Schema;
use crate::sync::protocol::{Subscription, SubscriptionSet};
use crate::value::{Pk, Value};

/// A client's view.
#[derive(Debug)]
pub(crate) struct View {
    rules: Option<Arc<Rules>>,
    user: User,
    /// Bound queries by collection; `None`: no subscriptions (everything readable).
    subscriptions: Option<Vec<(String, BoundQuery)>>,
    /// The subscription version this view was built from.
    pub version: u64,
}

/// Which fields of one visible object a client may receive.
pub(crate) struct Readable<'a>(Option<Access<'a>>);

impl Readable<'_> {
    /// Whether the client may receive the stored field `name`: a field the user may read,
    /// or a part of a counter or text field the user may read.
    pub(crate) fn field(&self, name: &str) -> bool {
        let field = crate::crdt::parse_sub(name).map_or(name, |(_, parent, _)| parent);
        self.0.as_ref().is_none_or(|a| a.can_read_field(field))
    }
}

impl View {
    /// Builds a view; a subscription that does not parse, uses a field that is not
    /// queryable or that the user's role never lets them read, or names a parameter
    /// without a value is an error naming it.
    pub(crate) fn new(
        rules: Option<Arc<Rules>>,
        user: User,
        set: Option<&SubscriptionSet>,
        schema_of: impl Fn(&str) -> Option<Schema>,
    ) -> Result<View, String> {
        let subscriptions = match set {
            None => None,
            Some(set) => {
                let mut out = Vec::with_capacity(set.subscriptions.len());
                for s in &set.subscriptions {
                    let bound = bind(s, rules.as_deref(), &user, schema_of(&s.collection))
                        .map_err(|e| {
                            format!("subscription {:?} on {}: {e}", s.name, s.collection)
                        })?;
                    out.push((s.collection.clone(), bound));
                }
                Some(out)
            }
        };
        Ok(View {
            rules,
            user,
            version: set.map_or(0, |s| s.version),
            subscriptions,
        })
    }

    /// Whether downloads must be filtered object by object.
    pub(crate) fn filtered(&self) -> bool {
        self.rules.is_some() || self.subscriptions.is_some()
    }

    /// Whether the client has a subscription set.
    pub(crate) fn has_subscriptions(&self) -> bool {
        self.subscriptions.is_some()
    }

    /// The user.
    pub(crate) fn user(&self) -> &User {
        &self.user
    }

    /// The rules, if the server has any.
    pub(crate) fn rules(&self) -> Option<&Rules> {
        self.rules.as_deref()
    }

    /// Whether a live object matches one of the subscriptions (always, without any).
    pub(crate) fn subscribed(&self, coll: &str, pk: &Pk, fields: &BTreeMap<String, Value>) -> bool {
        match &self.subscriptions {
            None => true,
            Some(subs) => subs.iter().any(|(c, q)| c == coll && q.matches(pk, fields)),
        }
    }

    /// The fields the client may receive of a live object (its values folded: `fields`),
    /// or `None` when the object is not in its view at all.
    pub(crate) fn readable(
        &self,
        coll: &str,
        pk: &Pk,
        fields: &BTreeMap<String, Value>,
    ) -> Option<Readable<'_>> {
        let access = match &self.rules {
            None => None,
            Some(r) => Some(
                r.access(coll, &self.user, pk, fields)
                    .filter(Access::can_read)?,
            ),
        };
        self.subscribed(coll, pk, fields)
            .then_some(Readable(access))
    }
}

/// Parses, checks and binds one subscription: `$0`, `$1`, … to its parameter values and
/// `$user` to the user's id.
fn bind(
    s: &Subscription,
    rules: Option<&Rules>,
    user: &User,
    schema: Option<Schema>,
) -> Result<BoundQuery, String> {
    let q = parse(&s.query).map_err(|e| e.to_string())?;
    q.check(schema.as_ref()).map_err(|e| e.to_string())?;
    // A query on a field the user can never read would tell them its values.
    if let Some(role) = rules.and_then(|r| r.role_for(&s.collection, user)) {
        if let Some(f) = q
            .fields()
            .into_iter()
            .find(|f| f != "_id" && !role.may_read_field(f))
        {
            return Err(format!(
                "field `{f}` is not readable in role {:?}",
                role.name()
            ));
        }
    }
    let params = s
        .params
        .iter()
        .fold(Params::new(), |p, v| p.arg(v.clone()))
        .named("user", Value::String(user.id.clone()));
    q.bind(&params).map_err(|e| e.to_string())
}
