//! Sync records kept in stores, decoded in their current layout or the one before it, so
//! a store written by the previous release keeps its subscriptions and refused writes.
//! The previous layouts differ only by fields added since: a `Subscription` without
//! `params`, a `RefusedWrite` without `code` and `detail` (its `reason` then held both).

use serde::Deserialize;

use crate::clock::Stamp;
use crate::error::{Error, Result};
use crate::sync::protocol::{ErrorCode, RefusedWrite, Subscription, SubscriptionSet};
use crate::value::{Pk, Value};

#[derive(Deserialize)]
struct SubscriptionV1 {
    name: String,
    collection: String,
    query: String,
}

#[derive(Deserialize)]
struct SubscriptionSetV1 {
    version: u64,
    subscriptions: Vec<SubscriptionV1>,
}

#[derive(Deserialize)]
struct RefusedWriteV1 {
    collection: String,
    pk: Pk,
    reason: String,
    fields: Vec<(String, Value)>,
    delete: bool,
    stamp: Stamp,
}

impl From<RefusedWriteV1> for RefusedWrite {
    fn from(r: RefusedWriteV1) -> RefusedWrite {
        RefusedWrite {
            collection: r.collection,
            pk: r.pk,
            code: ErrorCode::CompensatingWrite,
            reason: r.reason,
            detail: None,
            fields: r.fields,
            delete: r.delete,
            stamp: r.stamp,
        }
    }
}

fn corrupt(what: &str, e: postcard::Error) -> Error {
    Error::Corrupt {
        what: format!("{what}: {e}"),
    }
}

/// Decodes all of `bytes` as one `T`.
fn whole<'a, T: Deserialize<'a>>(bytes: &'a [u8]) -> std::result::Result<T, postcard::Error> {
    match postcard::take_from_bytes::<T>(bytes)? {
        (v, []) => Ok(v),
        _ => Err(postcard::Error::DeserializeBadEncoding),
    }
}

/// Decodes `bytes` as `T`, or as `Old` turned into `T`; the error names `what`. Each
/// layout must take every byte, so one is not read as the other.
fn current_or_previous<'a, T, Old>(bytes: &'a [u8], what: &str) -> Result<T>
where
    T: Deserialize<'a>,
    Old: Deserialize<'a> + Into<T>,
{
    match whole::<T>(bytes) {
        Ok(v) => Ok(v),
        Err(e) => whole::<Old>(bytes)
            .map(Into::into)
            .map_err(|_| corrupt(what, e)),
    }
}

impl From<SubscriptionSetV1> for SubscriptionSet {
    fn from(s: SubscriptionSetV1) -> SubscriptionSet {
        SubscriptionSet {
            version: s.version,
            subscriptions: s
                .subscriptions
                .into_iter()
                .map(|s| Subscription::new(s.name, s.collection, s.query))
                .collect(),
        }
    }
}

/// A client's stored subscription set.
pub(crate) fn subscription_set(bytes: &[u8]) -> Result<SubscriptionSet> {
    current_or_previous::<SubscriptionSet, SubscriptionSetV1>(bytes, "subscriptions")
}

/// One refused write a client keeps for its application.
pub(crate) fn refused_write(bytes: &[u8]) -> Result<RefusedWrite> {
    current_or_previous::<RefusedWrite, RefusedWriteV1>(bytes, "rejected")
}

/// A batch of refusals the server keeps until the client has received them.
pub(crate) fn refused_writes(bytes: &[u8]) -> Result<Vec<RefusedWrite>> {
    #[derive(Deserialize)]
    struct Batch(Vec<RefusedWriteV1>);
    impl From<Batch> for Vec<RefusedWrite> {
        fn from(b: Batch) -> Vec<RefusedWrite> {
            b.0.into_iter().map(Into::into).collect()
        }
    }
    current_or_previous::<Vec<RefusedWrite>, Batch>(bytes, "refusals")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::ReplicaId;
    use serde::Serialize;

    #[derive(Serialize)]
    struct OldSubscription<'a> {
        name: &'a str,
        collection: &'a str,
        query: &'a str,
    }

    #[derive(Serialize)]
    struct OldRefused<'a> {
        collection: &'a str,
        pk: Pk,
        reason: &'a str,
        fields: Vec<(String, Value)>,
        delete: bool,
        stamp: Stamp,
    }

    fn stamp() -> Stamp {
        Stamp {
            time: 5 << 16,
            replica: ReplicaId(3),
        }
    }

    #[test]
    fn a_set_of_the_previous_layout_reads_without_params() {
        let old = (
            7u64,
            vec![OldSubscription {
                name: "mine",
                collection: "Item",
                query: "owner == $user",
            }],
        );
        let bytes = postcard::to_allocvec(&old).unwrap();
        let set = subscription_set(&bytes).unwrap();
        assert_eq!(set.version, 7);
        assert_eq!(
            set.subscriptions,
            vec![Subscription::new("mine", "Item", "owner == $user")]
        );
        let current = postcard::to_allocvec(&set).unwrap();
        assert_eq!(subscription_set(&current).unwrap(), set);
    }

    #[test]
    fn refusals_of_the_previous_layout_read_with_their_code() {
        let old = OldRefused {
            collection: "Item",
            pk: Pk::Int(2),
            reason: "write to \"2\" in table \"Item\" was denied",
            fields: vec![("a".into(), Value::Int(1))],
            delete: false,
            stamp: stamp(),
        };
        let one = refused_write(&postcard::to_allocvec(&old).unwrap()).unwrap();
        assert_eq!(one.code, ErrorCode::CompensatingWrite);
        assert_eq!(one.reason, old.reason);
        assert_eq!(one.detail, None);
        assert_eq!(one.fields, old.fields);
        let batch = refused_writes(&postcard::to_allocvec(&vec![old]).unwrap()).unwrap();
        assert_eq!(batch, vec![one.clone()]);
        let current = postcard::to_allocvec(&vec![one.clone()]).unwrap();
        assert_eq!(refused_writes(&current).unwrap(), vec![one]);
    }

    #[test]
    fn bytes_of_neither_layout_are_corrupt() {
        assert!(matches!(
            refused_write(&[0xff, 0xff, 0xff]),
            Err(Error::Corrupt { .. })
        ));
        assert!(matches!(subscription_set(&[]), Err(Error::Corrupt { .. })));
    }
}
