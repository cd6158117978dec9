//! Rules over real sync (invariant 5): subscriptions decide what downloads, roles decide
//! what may be read and written, refused writes come back as compensating writes that are
//! kept for the application, and no client receives another user's object.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use fieldlog::rules::Rules;
use fieldlog::sync::client::{self, ClientConfig, SyncError};
use fieldlog::sync::net::{ClientHooks, ServerHandle, SyncClient, Transport};
use fieldlog::sync::protocol::{RefusedWrite, Subscription};
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
}

struct World {
    _dir: tempfile::TempDir,
    server: Arc<SyncServer>,
    handle: ServerHandle,
    secret: Secret,
    addr: String,
}

impl World {
    async fn new() -> World {
        let dir = tempfile::tempdir().unwrap();
        let secret = Secret::generate();
        let store = Arc::new(Store::open(dir.path().join("server.redb")).unwrap());
        let mut config = ServerConfig::new(secret.clone());
        config.rules = Some(Arc::new(Rules::load(RULES).unwrap()));
        let server = Arc::new(SyncServer::open(store, config).unwrap());
        server
            .set_schema(
                Schema::new("Item")
                    .field(
                        "ownerId",
                        FieldSpec::required(FieldType::String).queryable(),
                    )
                    .field("itemName", FieldSpec::optional(FieldType::String))
                    .field(
                        "complexity",
                        FieldSpec::optional(FieldType::Int).queryable(),
                    ),
            )
            .unwrap();
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
        let sink = Arc::clone(&refused);
        let hooks = ClientHooks {
            on_error: Some(Arc::new(move |e: &SyncError| {
                if let SyncError::CompensatingWrite { refused } = e {
                    sink.lock().unwrap().extend(refused.iter().cloned());
                }
            })),
            ..ClientHooks::default()
        };
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
            subs.push(Subscription {
                name: "items".into(),
                collection: "Item".into(),
                query: query.into(),
            });
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
    let reasons: Vec<&str> = rejected.iter().map(|(_, r)| r.reason.as_str()).collect();
    assert_eq!(
        reasons,
        [
            r#"write to "a2" in table "Item" not allowed; object is outside of the current query view"#,
            r#"write to "a4" in table "Item" was denied by write filter in role "readOwnWriteOwn" (object after the insert)"#,
        ]
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
