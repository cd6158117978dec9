//! Rules over real sync (invariant 5): subscriptions decide what downloads, roles decide
//! what may be read and written, refused writes come back as compensating writes that are
//! kept for the application, and no client receives another user's object.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use fieldlog::rules::Rules;
use fieldlog::sync::client::{self, ClientConfig, SyncError};
use fieldlog::sync::net::{ClientHooks, ServerHandle, SyncClient, Transport};
use fieldlog::sync::protocol::{ErrorCode, RefusedWrite, Subscription};
use fieldlog::sync::server::{ServerConfig, SyncServer};
use fieldlog::sync::token::{self, Claims, Secret};
use fieldlog::{FieldSpec, FieldType, Schema, Store, Value};

const RULES: &str = r#"{
  "rules": {
    "Item": [
      {
        "name": "readOwnWriteOwn",
        "apply_when": {},
        "document_filters": {
          "read": { "ownerId": "%%user.id" },
          "write": { "ownerId": "%%user.id" }
        },
        "read": true, "write": true, "insert": true, "delete": true
      }
    ]
  }
}"#;

struct Client {
    store: Arc<Store>,
    sync: SyncClient,
    refused: Arc<Mutex<Vec<RefusedWrite>>>,
    /// Every compensating write error as the error callback displayed it.
    shown: Arc<Mutex<Vec<String>>>,
}

struct World {
    _dir: tempfile::TempDir,
    server: Arc<SyncServer>,
    handle: ServerHandle,
    secret: Secret,
    addr: String,
}

fn item_schema() -> Schema {
    Schema::new("Item")
        .field(
            "ownerId",
            FieldSpec::required(FieldType::String).queryable(),
        )
        .field("itemName", FieldSpec::optional(FieldType::String))
        .field(
            "complexity",
            FieldSpec::optional(FieldType::Int).queryable(),
        )
}

impl World {
    async fn new() -> World {
        World::with(RULES, [item_schema()]).await
    }

    /// A server with these rules and schemas on loopback.
    async fn with(rules: &str, schemas: impl IntoIterator<Item = Schema>) -> World {
        let dir = tempfile::tempdir().unwrap();
        let secret = Secret::generate();
        let store = Arc::new(Store::open(dir.path().join("server.redb")).unwrap());
        let mut config = ServerConfig::new(secret.clone());
        config.rules = Some(Arc::new(Rules::load(rules).unwrap()));
        let server = Arc::new(SyncServer::open(store, config).unwrap());
        for schema in schemas {
            server.set_schema(schema).unwrap();
        }
        let handle = ServerHandle::bind(server.clone(), "127.0.0.1:0")
            .await
            .unwrap();
        let addr = handle.local_addr().unwrap().to_string();
        World {
            _dir: dir,
            server,
            handle,
            secret,
            addr,
        }
    }

    fn client(&self, user: &str) -> Client {
        let store = Arc::new(Store::open(self._dir.path().join(format!("{user}.redb"))).unwrap());
        let claims = Claims {
            user_id: user.into(),
            expires_at_ms: u64::MAX,
            extra: Default::default(),
        };
        let refused = Arc::new(Mutex::new(Vec::new()));
        let shown = Arc::new(Mutex::new(Vec::new()));
        let (sink, shown_sink) = (Arc::clone(&refused), Arc::clone(&shown));
        let mut hooks = ClientHooks::default();
        hooks.on_error = Some(Arc::new(move |e: &SyncError| {
            if let SyncError::CompensatingWrite { refused } = e {
                sink.lock().unwrap().extend(refused.iter().cloned());
                shown_sink.lock().unwrap().push(e.to_string());
            }
        }));
        let sync = SyncClient::start(
            store.clone(),
            Transport::Tcp(self.addr.clone()),
            ClientConfig::new(token::issue(&self.secret, &claims).unwrap()),
            hooks,
        );
        Client {
            store,
            sync,
            refused,
            shown,
        }
    }
}

async fn synced(c: &Client) {
    tokio::time::timeout(Duration::from_secs(20), async {
        c.sync.wait_for_upload().await.expect("upload");
        c.sync.wait_for_download().await.expect("download");
    })
    .await
    .expect("sync timed out");
    assert_eq!(c.sync.fatal_error(), None);
}

fn item(owner: &str, name: &str, complexity: i64) -> Vec<(&'static str, Value)> {
    vec![
        ("ownerId", Value::from(owner)),
        ("itemName", Value::from(name)),
        ("complexity", Value::from(complexity)),
    ]
}

async fn subscribe(c: &Client, query: &str) {
    c.sync
        .update_subscriptions(|subs| {
            subs.clear();
            subs.push(Subscription::new("items", "Item", query));
        })
        .unwrap();
    tokio::time::timeout(Duration::from_secs(20), c.sync.wait_for_subscriptions())
        .await
        .expect("subscription timed out")
        .expect("subscription refused");
}

fn pks(s: &Store) -> Vec<String> {
    s.scan("Item")
        .unwrap()
        .into_iter()
        .map(|o| o.pk.to_string())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn own_items_sync_and_refused_writes_are_compensated() {
    let w = World::new().await;
    let alice = w.client("alice");
    let bob = w.client("bob");
    subscribe(&alice, "complexity <= 4").await;
    subscribe(&bob, "complexity <= 10").await;

    // Allowed: alice's own item inside her view.
    alice
        .store
        .write(|tx| tx.insert("Item", "a1", item("alice", "ok", 3)))
        .unwrap();
    synced(&alice).await;
    synced(&bob).await;
    assert_eq!(
        w.server
            .store()
            .get_field("Item", "a1", "complexity")
            .unwrap()
            .map(|v| v.0),
        Some(Value::from(3))
    );
    assert!(
        pks(&bob.store).is_empty(),
        "bob must not receive alice's item"
    );

    // Refused: complexity 7 is outside alice's view; in the same transaction another item
    // and a change to a1 are allowed and stay.
    alice
        .store
        .write(|tx| {
            tx.insert("Item", "a2", item("alice", "too hard", 7))?;
            tx.insert("Item", "a3", item("alice", "fine", 2))?;
            tx.set("Item", "a1", "itemName", "renamed")
        })
        .unwrap();
    synced(&alice).await;
    synced(&alice).await;
    assert_eq!(
        pks(&alice.store),
        ["a1", "a3"],
        "the refused object disappears from the client"
    );
    assert!(
        w.server.store().get("Item", "a2").unwrap().is_none(),
        "never applied on the server"
    );
    assert_eq!(
        alice
            .store
            .get_field("Item", "a1", "itemName")
            .unwrap()
            .map(|v| v.0),
        Some(Value::from("renamed"))
    );

    // Refused: an item owned by someone else fails the write filter.
    alice
        .store
        .write(|tx| tx.insert("Item", "a4", item("bob", "gift", 1)))
        .unwrap();
    synced(&alice).await;
    synced(&alice).await;
    assert!(alice.store.get("Item", "a4").unwrap().is_none());
    assert!(w.server.store().get("Item", "a4").unwrap().is_none());

    let rejected = client::rejected_writes(&alice.store).unwrap();
    // Atlas's reason, word for word; which check refused it is the detail.
    let reasons: Vec<(&str, Option<&str>)> = rejected
        .iter()
        .map(|(_, r)| (r.reason.as_str(), r.detail.as_deref()))
        .collect();
    assert_eq!(
        reasons,
        [
            (
                r#"write to "a2" in table "Item" not allowed; object is outside of the current query view"#,
                None
            ),
            (
                r#"write to "a4" in table "Item" not allowed"#,
                Some(
                    r#"denied by write filter in role "readOwnWriteOwn" (object after the insert)"#
                )
            ),
        ]
    );
    assert!(rejected
        .iter()
        .all(|(_, r)| r.code == ErrorCode::CompensatingWrite && r.code.number() == 231));
    assert_eq!(
        rejected[1].1.to_string(),
        r#"write to "a4" in table "Item" not allowed: denied by write filter in role "readOwnWriteOwn" (object after the insert)"#
    );
    assert_eq!(rejected[0].1.collection, "Item");
    assert!(
        rejected[0]
            .1
            .fields
            .contains(&("complexity".into(), Value::from(7))),
        "the rejected values are kept"
    );
    assert_eq!(
        alice.refused.lock().unwrap().len(),
        2,
        "the error callback saw both"
    );
    client::clear_rejected_writes(&alice.store, rejected[1].0).unwrap();
    assert!(client::rejected_writes(&alice.store).unwrap().is_empty());

    // Moving one's item to another owner is refused too (write filter after the update).
    alice
        .store
        .write(|tx| tx.set("Item", "a3", "ownerId", "bob"))
        .unwrap();
    synced(&alice).await;
    synced(&alice).await;
    assert_eq!(
        alice
            .store
            .get_field("Item", "a3", "ownerId")
            .unwrap()
            .map(|v| v.0),
        Some(Value::from("alice"))
    );
    assert_eq!(
        w.server
            .store()
            .get_field("Item", "a3", "ownerId")
            .unwrap()
            .map(|v| v.0),
        Some(Value::from("alice"))
    );
    synced(&bob).await;
    assert!(
        pks(&bob.store).is_empty(),
        "bob never received any of alice's items"
    );
    // alice holds exactly the server's items that she may see, with the same values.
    let server_items: Vec<_> = w
        .server
        .store()
        .scan("Item")
        .unwrap()
        .into_iter()
        .filter(|o| o.get("ownerId") == Some(&Value::from("alice")))
        .collect();
    assert_eq!(alice.store.scan("Item").unwrap(), server_items);

    alice.sync.stop().await;
    bob.sync.stop().await;
    w.handle.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscription_changes_bring_objects_in_and_take_them_out() {
    let w = World::new().await;
    // The server holds alice's items of every complexity, and one of bob's.
    w.server
        .write(|tx| {
            for c in [1i64, 3, 6, 9] {
                tx.insert("Item", format!("c{c}"), item("alice", "x", c))?;
            }
            tx.insert("Item", "b1", item("bob", "y", 1))
        })
        .unwrap();
    let alice = w.client("alice");
    subscribe(&alice, "complexity <= 4").await;
    synced(&alice).await;
    assert_eq!(pks(&alice.store), ["c1", "c3"]);

    // A write made before the change stays through it.
    alice
        .store
        .write(|tx| tx.set("Item", "c1", "itemName", "kept"))
        .unwrap();
    subscribe(&alice, "complexity <= 10").await;
    synced(&alice).await;
    assert_eq!(
        pks(&alice.store),
        ["c1", "c3", "c6", "c9"],
        "objects entering the view arrive"
    );
    assert_eq!(
        alice
            .store
            .get_field("Item", "c1", "itemName")
            .unwrap()
            .map(|v| v.0),
        Some(Value::from("kept"))
    );

    subscribe(&alice, "complexity <= 4").await;
    synced(&alice).await;
    assert_eq!(
        pks(&alice.store),
        ["c1", "c3"],
        "objects leaving the view are removed locally"
    );
    assert!(
        alice.store.verify_digest().unwrap(),
        "digest after removals"
    );
    assert!(
        w.server.store().get("Item", "c9").unwrap().is_some(),
        "leaving the view is not a delete"
    );
    assert_eq!(w.server.store().count("Item").unwrap(), 5);

    // An object leaves the view because the server changed it.
    w.server
        .write(|tx| tx.set("Item", "c3", "complexity", 8))
        .unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    synced(&alice).await;
    assert_eq!(pks(&alice.store), ["c1"]);

    // A query on a field that is not queryable is refused, naming the field; the view stays.
    alice
        .sync
        .update_subscriptions(|subs| {
            subs[0].query = "itemName == 'x'".into();
        })
        .unwrap();
    let err = tokio::time::timeout(Duration::from_secs(20), alice.sync.wait_for_subscriptions())
        .await
        .unwrap()
        .unwrap_err();
    assert!(err.to_string().contains("itemName"), "{err}");
    assert_eq!(pks(&alice.store), ["c1"]);
    assert!(!pks(&alice.store).contains(&"b1".to_string()));

    // The same language filters local reads.
    assert_eq!(
        alice.store.query("Item", "complexity <= 1").unwrap().len(),
        1
    );
    let e = alice.store.query("Item", "complexity <=").unwrap_err();
    assert!(matches!(e, fieldlog::Error::Query(_)), "{e}");

    alice.sync.stop().await;
    w.handle.shutdown().await;
}

/// The "Users can only read and write their own data" role of the Atlas Device Sync
/// permissions guide, verbatim: it omits `insert` and `delete`, which Atlas defaults to true.
const GUIDE_RULES: &str = r#"{ "defaultRoles": [
    {
      "name": "owner-read-write",
      "apply_when": {},
      "document_filters": {
        "read": { "owner_id": "%%user.id" },
        "write": { "owner_id": "%%user.id" }
      },
      "read": true,
      "write": true
    }
] }"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_role_copied_from_the_atlas_guide_inserts_and_deletes_own_objects() {
    let schema = Schema::new("Note")
        .field(
            "owner_id",
            FieldSpec::required(FieldType::String).queryable(),
        )
        .field("text", FieldSpec::optional(FieldType::String));
    let w = World::with(GUIDE_RULES, [schema]).await;
    let alice = w.client("alice");
    alice
        .store
        .write(|tx| {
            tx.insert(
                "Note",
                "n1",
                [("owner_id", Value::from("alice")), ("text", "hi".into())],
            )?;
            tx.insert(
                "Note",
                "n2",
                [("owner_id", Value::from("alice")), ("text", "bye".into())],
            )
        })
        .unwrap();
    synced(&alice).await;
    alice.store.write(|tx| tx.delete("Note", "n2")).unwrap();
    synced(&alice).await;
    synced(&alice).await;
    assert_eq!(
        client::rejected_writes(&alice.store).unwrap(),
        [],
        "nothing refused"
    );
    let server_notes: Vec<String> = w
        .server
        .store()
        .scan("Note")
        .unwrap()
        .into_iter()
        .map(|o| o.pk.to_string())
        .collect();
    assert_eq!(
        server_notes,
        ["n1"],
        "the insert and the delete were applied"
    );
    assert_eq!(alice.store.scan("Note").unwrap().len(), 1);
    alice.sync.stop().await;
    w.handle.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscriptions_bind_parameter_values() {
    let w = World::new().await;
    w.server
        .write(|tx| {
            for c in [1i64, 3, 6, 9] {
                tx.insert("Item", format!("c{c}"), item("alice", "x", c))?;
            }
            tx.insert("Item", "b1", item("bob", "y", 1))
        })
        .unwrap();
    let alice = w.client("alice");
    let set = |subs: Vec<Subscription>| {
        alice.sync.update_subscriptions(move |s| *s = subs).unwrap();
    };
    let confirmed = || async {
        tokio::time::timeout(Duration::from_secs(20), alice.sync.wait_for_subscriptions())
            .await
            .expect("subscription timed out")
    };

    set(vec![
        Subscription::new("easy", "Item", "complexity <= $0").arg(4)
    ]);
    confirmed().await.expect("subscription refused");
    synced(&alice).await;
    assert_eq!(pks(&alice.store), ["c1", "c3"]);

    // Positional values beside `$user`.
    set(vec![Subscription::new(
        "band",
        "Item",
        "ownerId == $user AND complexity >= $0 AND complexity < $1",
    )
    .arg(3)
    .arg(9)]);
    confirmed().await.expect("subscription refused");
    synced(&alice).await;
    assert_eq!(pks(&alice.store), ["c3", "c6"]);

    // The view follows the bound values: a write outside them is refused.
    alice
        .store
        .write(|tx| tx.insert("Item", "a9", item("alice", "far", 9)))
        .unwrap();
    synced(&alice).await;
    synced(&alice).await;
    assert!(w.server.store().get("Item", "a9").unwrap().is_none());
    assert_eq!(pks(&alice.store), ["c3", "c6"]);

    // A parameter without a value is refused, naming it; the view stays.
    set(vec![Subscription::new(
        "band",
        "Item",
        "complexity >= $0 AND complexity < $1",
    )
    .arg(1)]);
    let err = confirmed().await.unwrap_err();
    assert!(err.to_string().contains("missing parameter `$1`"), "{err}");
    assert_eq!(pks(&alice.store), ["c3", "c6"]);

    alice.sync.stop().await;
    w.handle.shutdown().await;
}

/// Everyone reads every staff record and writes their own, but no one reads or writes
/// `salary`.
const STAFF_RULES: &str = r#"{ "rules": { "Staff": [
    {
      "name": "colleague",
      "apply_when": {},
      "document_filters": { "read": true, "write": { "ownerId": "%%user.id" } },
      "fields": { "salary": { "read": false, "write": false } },
      "additional_fields": { "read": true, "write": true }
    }
] } }"#;

fn staff_schema() -> Schema {
    Schema::new("Staff")
        .field(
            "ownerId",
            FieldSpec::required(FieldType::String).queryable(),
        )
        .field("name", FieldSpec::optional(FieldType::String))
        .field("salary", FieldSpec::optional(FieldType::Int).queryable())
}

fn field(s: &Store, pk: i64, name: &str) -> Option<Value> {
    s.get_field("Staff", pk, name).unwrap().map(|v| v.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn field_permissions_hide_fields_and_refuse_writes_to_them() {
    let w = World::with(STAFF_RULES, [staff_schema()]).await;
    w.server
        .write(|tx| {
            for (pk, owner, salary) in [(1i64, "alice", 100i64), (2, "bob", 200)] {
                tx.insert(
                    "Staff",
                    pk,
                    [
                        ("ownerId", Value::from(owner)),
                        ("name", Value::from(owner)),
                        ("salary", Value::from(salary)),
                    ],
                )?;
            }
            Ok(())
        })
        .unwrap();
    let alice = w.client("alice");
    synced(&alice).await;
    // Every record arrives, without the salary.
    assert_eq!(alice.store.count("Staff").unwrap(), 2);
    assert_eq!(field(&alice.store, 2, "name"), Some(Value::from("bob")));
    assert_eq!(field(&alice.store, 1, "salary"), None);
    assert_eq!(field(&alice.store, 2, "salary"), None);

    // Her own record's other fields are hers to write.
    alice
        .store
        .write(|tx| tx.set("Staff", 1, "name", "Alice"))
        .unwrap();
    synced(&alice).await;
    assert_eq!(
        field(w.server.store(), 1, "name"),
        Some(Value::from("Alice"))
    );

    // Her salary is not: refused, reverted on her device, kept on the server.
    alice
        .store
        .write(|tx| tx.set("Staff", 1, "salary", 1_000_000))
        .unwrap();
    synced(&alice).await;
    synced(&alice).await;
    assert_eq!(field(w.server.store(), 1, "salary"), Some(Value::from(100)));
    assert_eq!(
        field(&alice.store, 1, "salary"),
        None,
        "the refused value is reverted"
    );
    assert_eq!(field(&alice.store, 1, "name"), Some(Value::from("Alice")));
    // Nor may she insert a record with a salary; without one she may.
    alice
        .store
        .write(|tx| {
            tx.insert(
                "Staff",
                3,
                [
                    ("ownerId", Value::from("alice")),
                    ("salary", Value::from(5)),
                ],
            )?;
            tx.insert("Staff", 4, [("ownerId", Value::from("alice"))])
        })
        .unwrap();
    synced(&alice).await;
    synced(&alice).await;
    assert!(w.server.store().get("Staff", 3).unwrap().is_none());
    assert!(alice.store.get("Staff", 3).unwrap().is_none());
    assert!(w.server.store().get("Staff", 4).unwrap().is_some());

    let rejected: Vec<RefusedWrite> = client::rejected_writes(&alice.store)
        .unwrap()
        .into_iter()
        .map(|(_, r)| r)
        .collect();
    let got: Vec<(&str, Option<&str>, ErrorCode)> = rejected
        .iter()
        .map(|r| (r.reason.as_str(), r.detail.as_deref(), r.code))
        .collect();
    assert_eq!(
        got,
        [
            (
                r#"write to 1 in table "Staff" not allowed"#,
                Some(r#"update denied: field "salary" is not writable in role "colleague""#),
                ErrorCode::CompensatingWrite
            ),
            (
                r#"write to 3 in table "Staff" not allowed"#,
                Some(r#"insert denied: field "salary" is not writable in role "colleague""#),
                ErrorCode::CompensatingWrite
            ),
        ]
    );
    assert_eq!(
        rejected[0].fields,
        [("salary".to_string(), Value::from(1_000_000))],
        "the refused value is kept for the application"
    );
    assert!(
        alice.shown.lock().unwrap().iter().any(|e| e
            == r#"compensating write (231): write to 1 in table "Staff" not allowed: update denied: field "salary" is not writable in role "colleague""#),
        "{:?}",
        alice.shown.lock().unwrap()
    );

    // A query on the hidden field would tell its values: refused, naming it.
    alice
        .sync
        .update_subscriptions(|s| {
            s.push(Subscription::new("rich", "Staff", "salary > $0").arg(150));
        })
        .unwrap();
    let err = tokio::time::timeout(Duration::from_secs(20), alice.sync.wait_for_subscriptions())
        .await
        .unwrap()
        .unwrap_err();
    assert!(
        err.to_string().contains("field `salary` is not readable"),
        "{err}"
    );

    let bob = w.client("bob");
    synced(&bob).await;
    assert_eq!(bob.store.count("Staff").unwrap(), 3);
    assert_eq!(field(&bob.store, 2, "salary"), None);
    assert_eq!(field(&bob.store, 1, "name"), Some(Value::from("Alice")));

    alice.sync.stop().await;
    bob.sync.stop().await;
    w.handle.shutdown().await;
}
