//! What one client may see: its user's roles and its subscriptions, bound to the user.
//! Pure logic over the rules module.

use std::collections::BTreeMap;
use std::sync::Arc;

use crate::rules::{parse, BoundQuery, Params, Rules, User};
use crate::schema::Schema;
use crate::sync::protocol::SubscriptionSet;
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

impl View {
    /// Builds a view; a subscription that does not parse, uses a field that is not
    /// queryable, or names an unknown parameter is an error naming it.
    pub(crate) fn new(
        rules: Option<Arc<Rules>>,
        user: User,
        set: Option<&SubscriptionSet>,
        schema_of: impl Fn(&str) -> Option<Schema>,
    ) -> Result<View, String> {
        let subscriptions = match set {
            None => None,
            Some(set) => {
                let params = Params::new().named("user", Value::String(user.id.clone()));
                let mut out = Vec::new();
                for s in &set.subscriptions {
                    let at =
                        |e: String| format!("subscription {:?} on {}: {e}", s.name, s.collection);
                    let q = parse(&s.query).map_err(|e| at(e.to_string()))?;
                    q.check(schema_of(&s.collection).as_ref())
                        .map_err(|e| at(e.to_string()))?;
                    out.push((
                        s.collection.clone(),
                        q.bind(&params).map_err(|e| at(e.to_string()))?,
                    ));
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

    /// Whether the user may read the object and it is in the view.
    pub(crate) fn visible(&self, coll: &str, pk: &Pk, fields: &BTreeMap<String, Value>) -> bool {
        let readable = match &self.rules {
            None => true,
            Some(r) => r.can_read(coll, &self.user, pk, fields),
        };
        readable && self.subscribed(coll, pk, fields)
    }
}
