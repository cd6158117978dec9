//! Conflicts: detection by base stamp, each policy's winner on every replica, and the
//! conflict record. A real server and real clients over loopback TCP.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use fieldlog::conflict::{ConflictKind, ConflictRecord, Decision, Policies, Policy, Resolution};
use fieldlog::sync::client::ClientConfig;
use fieldlog::sync::net::{ClientHooks, ServerHandle, SyncClient, Transport};
use fieldlog::sync::server::{ServerConfig, SyncServer};
use fieldlog::sync::token::{self, Claims, Secret};
use fieldlog::{Error, Store, Value};

struct World {
    _dir: tempfile::TempDir,
    server: Arc<SyncServer>,
    /// The caller's own handle on the served store (the one it passed to `open`).
    served: Arc<Store>,
    handle: ServerHandle,
    clients: Vec<(Arc<Store>, SyncClient)>,
    seen: Arc<Mutex<Vec<ConflictRecord>>>,
    /// Every error a client reported.
    errors: Arc<Mutex<Vec<String>>>,
}

async fn world(policies: Policies, n: usize) -> World {
    let dir = tempfile::tempdir().unwrap();
    let secret = Secret::generate();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let mut config = ServerConfig::new(secret.clone());
    config.conflicts = policies;
    let sink = Arc::clone(&seen);
    config.on_conflict = Some(Arc::new(move |r: &ConflictRecord| {
        sink.lock().unwrap().push(r.clone())
    }));
    let store = Arc::new(Store::open(dir.path().join("server.redb")).unwrap());
    let server = Arc::new(SyncServer::open(Arc::clone(&store), config).unwrap());
    let errors = Arc::new(Mutex::new(Vec::new()));
    let handle = ServerHandle::bind(server.clone(), "127.0.0.1:0")
        .await
        .unwrap();
    let addr = handle.local_addr().unwrap().to_string();
    let mut clients = Vec::new();
    for i in 0..n {
        let store = Arc::new(Store::open(dir.path().join(format!("c{i}.redb"))).unwrap());
        let claims = Claims {
            user_id: format!("user{i}"),
            expires_at_ms: u64::MAX,
            extra: Default::default(),
        };
        let sink = Arc::clone(&errors);
        let mut hooks = ClientHooks::default();
        hooks.on_error = Some(Arc::new(move |e| sink.lock().unwrap().push(format!("{e}"))));
        let client = SyncClient::start(
            store.clone(),
            Transport::Tcp(addr.clone()),
            ClientConfig::new(token::issue(&secret, &claims).unwrap()),
            hooks,
        );
        clients.push((store, client));
    }
    World {
        _dir: dir,
        server,
        served: store,
        handle,
        clients,
        seen,
        errors,
    }
}

impl World {
    /// Waits until every client has uploaded and downloaded everything; fails on the first
    /// error a client reports.
    async fn sync(&self) {
        let synced = async {
            for (_, c) in &self.clients {
                c.wait_for_upload().await.expect("upload");
            }
            for (_, c) in &self.clients {
                c.wait_for_download().await.expect("download");
            }
        };
        let failed = async {
            loop {
                if let Some(e) = self.errors.lock().unwrap().first() {
                    return e.clone();
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        };
        tokio::select! {
            () = synced => {}
            e = failed => panic!("a client failed to sync: {e}"),
            () = tokio::time::sleep(Duration::from_secs(20)) => panic!("sync timed out"),
        }
    }

    fn replicas(&self) -> Vec<&Store> {
        let mut all: Vec<&Store> = self.clients.iter().map(|(s, _)| s.as_ref()).collect();
        all.push(self.server.store());
        all
    }

    fn assert_everywhere(&self, pk: i64, field: &str, want: Option<Value>) {
        for (i, s) in self.replicas().into_iter().enumerate() {
            let got = s
                .get("Customer", pk)
                .unwrap()
                .and_then(|o| o.get(field).cloned());
            assert_eq!(got, want, "replica {i}, {field} of {pk}");
        }
        let d = self.server.store().digest();
        for (i, s) in self.replicas().into_iter().enumerate() {
            assert_eq!(s.digest(), d, "replica {i} diverged");
        }
    }

    async fn offline(&self, i: usize, on: bool) {
        self.clients[i].1.set_online(on);
        tokio::time::sleep(Duration::from_millis(60)).await;
    }

    async fn stop(self) {
        for (_, c) in self.clients {
            c.stop().await;
        }
        self.handle.shutdown().await;
    }
}

fn customer(first: &str, phone: &str, fav: i64) -> Vec<(&'static str, Value)> {
    vec![
        ("FirstName", Value::from(first)),
        ("Phone", Value::from(phone)),
        ("FavoriteNumber", Value::from(fav)),
    ]
}

async fn seeded(policies: Policies) -> World {
    let w = world(policies, 2).await;
    w.server
        .write(|tx| {
            tx.insert("Customer", 2, customer("Ann", "555-0002", 2))?;
            tx.insert("Customer", 17, customer("Bob", "555-0017", 17))
        })
        .unwrap();
    w.sync().await;
    w
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn different_fields_of_one_row_never_conflict() {
    let w = seeded(Policies::default()).await;
    w.offline(0, false).await;
    w.server
        .write(|tx| tx.set("Customer", 2, "FirstName", "Anna"))
        .unwrap();
    w.clients[0]
        .0
        .write(|tx| tx.set("Customer", 2, "FavoriteNumber", 42))
        .unwrap();
    w.offline(0, true).await;
    w.sync().await;
    w.assert_everywhere(2, "FirstName", Some(Value::from("Anna")));
    w.assert_everywhere(2, "FavoriteNumber", Some(Value::from(42)));
    assert!(w.server.conflicts(0, 100).unwrap().is_empty());
    assert!(w.seen.lock().unwrap().is_empty());
    w.stop().await;
}

/// Both change row 17's phone; `client_first`: the client's edit is the older one.
async fn phone_conflict(policy: Policy, client_first: bool) -> (Value, ConflictRecord) {
    let w = seeded(Policies::new(policy)).await;
    w.offline(0, false).await;
    let server_edit = || {
        w.server
            .write(|tx| tx.set("Customer", 17, "Phone", "server"))
            .unwrap()
    };
    if !client_first {
        server_edit();
        tokio::time::sleep(Duration::from_millis(3)).await;
    }
    w.clients[0]
        .0
        .write(|tx| tx.set("Customer", 17, "Phone", "client"))
        .unwrap();
    if client_first {
        tokio::time::sleep(Duration::from_millis(3)).await;
        server_edit();
    }
    w.offline(0, true).await;
    w.sync().await;
    w.sync().await;
    let phone = w
        .server
        .store()
        .get("Customer", 17)
        .unwrap()
        .unwrap()
        .get("Phone")
        .cloned()
        .unwrap();
    w.assert_everywhere(17, "Phone", Some(phone.clone()));
    let records = w.server.conflicts(0, 100).unwrap();
    assert_eq!(records.len(), 1, "{records:?}");
    assert_eq!(
        *w.seen.lock().unwrap(),
        records,
        "the observer saw the same"
    );
    let r = records[0].clone();
    assert_eq!(r.conflict.kind, ConflictKind::ClientUpdateServerUpdate);
    assert_eq!(r.conflict.field.as_deref(), Some("Phone"));
    assert_eq!(r.conflict.client.value, Some(Value::from("client")));
    assert_eq!(r.conflict.server.value, Some(Value::from("server")));
    assert_eq!(r.conflict.client.user.as_deref(), Some("user0"));
    w.stop().await;
    (phone, r)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn update_update_last_writer_wins() {
    let (p, r) = phone_conflict(Policy::LastWriterWins, true).await;
    assert_eq!((p, r.decision), (Value::from("server"), Decision::Server));
    let (p, r) = phone_conflict(Policy::LastWriterWins, false).await;
    assert_eq!((p, r.decision), (Value::from("client"), Decision::Client));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn update_update_server_wins() {
    for client_first in [true, false] {
        let (p, r) = phone_conflict(Policy::ServerWins, client_first).await;
        assert_eq!((p, r.decision), (Value::from("server"), Decision::Server));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn update_update_client_wins() {
    for client_first in [true, false] {
        let (p, r) = phone_conflict(Policy::ClientWins, client_first).await;
        assert_eq!((p, r.decision), (Value::from("client"), Decision::Client));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn custom_handler_merges_and_the_merge_reaches_every_replica() {
    let handler = Policy::Custom(Arc::new(|c| match (&c.client.value, &c.server.value) {
        (Some(Value::String(a)), Some(Value::String(b))) => {
            Resolution::Merged(Value::from(format!("{b} / {a}")))
        }
        _ => Resolution::KeepServer,
    }));
    let (p, r) = phone_conflict(handler, true).await;
    assert_eq!(p, Value::from("server / client"));
    assert_eq!(r.decision, Decision::Merged);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn insert_insert_under_each_policy() {
    for (policy, want) in [
        (Policy::LastWriterWins, "server"),
        (Policy::ServerWins, "server"),
        (Policy::ClientWins, "client"),
    ] {
        let w = world(Policies::new(policy.clone()), 2).await;
        w.offline(0, false).await;
        w.clients[0]
            .0
            .write(|tx| tx.insert("Customer", 3, customer("client", "c", 1)))
            .unwrap();
        tokio::time::sleep(Duration::from_millis(3)).await;
        w.server
            .write(|tx| tx.insert("Customer", 3, customer("server", "s", 2)))
            .unwrap();
        w.offline(0, true).await;
        w.sync().await;
        w.sync().await;
        w.assert_everywhere(3, "FirstName", Some(Value::from(want)));
        let records = w.server.conflicts(0, 10).unwrap();
        assert_eq!(records.len(), 1, "{policy:?}");
        assert_eq!(
            records[0].conflict.kind,
            ConflictKind::ClientInsertServerInsert
        );
        w.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn update_vs_delete_both_directions_under_each_policy() {
    for policy in [
        Policy::LastWriterWins,
        Policy::ServerWins,
        Policy::ClientWins,
    ] {
        // The client updates row 2, which the server deletes meanwhile.
        let w = seeded(Policies::new(policy.clone())).await;
        w.offline(0, false).await;
        w.clients[0]
            .0
            .write(|tx| tx.set("Customer", 2, "Phone", "new"))
            .unwrap();
        w.server.write(|tx| tx.delete("Customer", 2)).unwrap();
        w.offline(0, true).await;
        w.sync().await;
        w.sync().await;
        let records = w.server.conflicts(0, 10).unwrap();
        assert_eq!(
            records[0].conflict.kind,
            ConflictKind::ClientUpdateServerDelete,
            "{policy:?}"
        );
        match policy {
            // ClientWins turns the update into an insert of the written fields.
            Policy::ClientWins => w.assert_everywhere(2, "Phone", Some(Value::from("new"))),
            _ => w.assert_everywhere(2, "Phone", None),
        }
        w.stop().await;

        // The client deletes row 17, whose phone the server changed meanwhile.
        let w = seeded(Policies::new(policy.clone())).await;
        w.offline(0, false).await;
        w.server
            .write(|tx| tx.set("Customer", 17, "Phone", "changed"))
            .unwrap();
        tokio::time::sleep(Duration::from_millis(3)).await;
        w.clients[0]
            .0
            .write(|tx| tx.delete("Customer", 17))
            .unwrap();
        w.offline(0, true).await;
        w.sync().await;
        w.sync().await;
        let records = w.server.conflicts(0, 10).unwrap();
        assert_eq!(
            records[0].conflict.kind,
            ConflictKind::ClientDeleteServerUpdate,
            "{policy:?}"
        );
        match policy {
            Policy::ServerWins => w.assert_everywhere(17, "Phone", Some(Value::from("changed"))),
            _ => w.assert_everywhere(17, "Phone", None),
        }
        w.stop().await;
    }
}

/// The client changes row 17's phone while the server changes it too, then deletes row 17
/// in a later transaction of the same upload. Every policy decides without failing the
/// upload, every replica converges, and the conflict records say what the replicas show.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_decided_field_of_an_object_the_upload_then_deletes_fails_nothing() {
    use ConflictKind::{
        ClientDeleteServerUpdate as DeleteUpdate, ClientUpdateServerUpdate as Both,
    };
    let merge = Policy::Custom(Arc::new(|c| match (&c.client.value, &c.server.value) {
        (Some(Value::String(a)), Some(Value::String(b))) => {
            Resolution::Merged(Value::from(format!("{b} / {a}")))
        }
        _ => Resolution::KeepServer,
    }));
    let cases = [
        // The merged phone (or the server's) stays: deleting the row would destroy a change
        // the client never saw, a delete/update conflict the server's side wins.
        (
            merge,
            Some("server / client"),
            vec![(Both, Decision::Merged), (DeleteUpdate, Decision::Server)],
        ),
        (
            Policy::ServerWins,
            Some("server"),
            vec![(Both, Decision::Server), (DeleteUpdate, Decision::Server)],
        ),
        // The client's phone won: nothing the client had not seen is left, and its delete
        // stands.
        (Policy::LastWriterWins, None, vec![(Both, Decision::Client)]),
        (Policy::ClientWins, None, vec![(Both, Decision::Client)]),
    ];
    for (policy, phone, want) in cases {
        let w = seeded(Policies::new(policy.clone())).await;
        w.offline(0, false).await;
        w.server
            .write(|tx| tx.set("Customer", 17, "Phone", "server"))
            .unwrap();
        tokio::time::sleep(Duration::from_millis(3)).await;
        let device = &w.clients[0].0;
        device
            .write(|tx| tx.set("Customer", 17, "Phone", "client"))
            .unwrap();
        device.write(|tx| tx.delete("Customer", 17)).unwrap();
        w.offline(0, true).await;
        w.sync().await;
        w.sync().await;
        w.assert_everywhere(17, "Phone", phone.map(Value::from));
        let first = phone.map(|_| Value::from("Bob"));
        w.assert_everywhere(17, "FirstName", first);
        let records = w.server.conflicts(0, 10).unwrap();
        let got: Vec<_> = records
            .iter()
            .map(|r| (r.conflict.kind, r.decision))
            .collect();
        assert_eq!(got, want, "{policy:?}");
        assert_eq!(*w.seen.lock().unwrap(), records, "{policy:?}");
        w.stop().await;
    }
}

/// `ClientWins` on update-versus-delete brings the object back whole: every field the
/// client held, with the client's written value, on its device and everywhere else;
/// whether the server deleted the object itself or another client's upload did.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_wins_on_update_vs_delete_brings_back_every_field_the_client_held() {
    for server_deletes in [true, false] {
        let policies = Policies::new(Policy::LastWriterWins).kind(
            "Customer",
            ConflictKind::ClientUpdateServerDelete,
            Policy::ClientWins,
        );
        let w = seeded(policies).await;
        // The client's own earlier change is among the fields it holds.
        w.clients[0]
            .0
            .write(|tx| tx.set("Customer", 2, "FavoriteNumber", 7))
            .unwrap();
        w.sync().await;
        w.offline(0, false).await;
        w.clients[0]
            .0
            .write(|tx| tx.set("Customer", 2, "Phone", "new"))
            .unwrap();
        if server_deletes {
            w.server.write(|tx| tx.delete("Customer", 2)).unwrap();
        } else {
            w.clients[1].0.write(|tx| tx.delete("Customer", 2)).unwrap();
            tokio::time::timeout(Duration::from_secs(20), w.clients[1].1.wait_for_upload())
                .await
                .expect("client 1 uploads its delete")
                .expect("client 1 runs");
        }
        w.offline(0, true).await;
        w.sync().await;
        w.sync().await;
        w.assert_everywhere(2, "Phone", Some(Value::from("new")));
        w.assert_everywhere(2, "FirstName", Some(Value::from("Ann")));
        w.assert_everywhere(2, "FavoriteNumber", Some(Value::from(7)));
        let records = w.server.conflicts(0, 10).unwrap();
        assert_eq!(records.len(), 1, "{records:?}");
        assert_eq!(
            (records[0].conflict.kind, records[0].decision),
            (ConflictKind::ClientUpdateServerDelete, Decision::Client)
        );
        w.stop().await;
    }
}

/// A write through any handle of the served store (the server's accessor or the caller's
/// own clone) either reaches the clients or is refused with `Error::ServedStore`, and then
/// changes nothing; reads go on, and `SyncServer::write` reaches every client.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_around_the_server_reaches_the_clients_or_is_refused() {
    type Attempt = Box<dyn Fn(&Store, i64) -> fieldlog::Result<()>>;
    let w = seeded(Policies::default()).await;
    let attempts: Vec<(&str, Attempt)> = vec![
        (
            "write",
            Box::new(|s, pk| {
                s.write(|tx| tx.insert("Customer", pk, customer("direct", "d", pk)))
                    .map(|_| ())
            }),
        ),
        (
            "begin and commit",
            Box::new(|s, pk| {
                let mut tx = s.begin()?;
                tx.set("Customer", 2, "Phone", format!("direct {pk}"))?;
                tx.commit().map(|_| ())
            }),
        ),
        (
            "import",
            Box::new(|s, pk| {
                let other = Store::open_in_memory()?;
                other.write(|tx| tx.insert("Customer", pk, customer("imported", "i", pk)))?;
                s.import(&other.export(0, 10)?).map(|_| ())
            }),
        ),
    ];
    let handles = [
        ("SyncServer::store()", w.server.store()),
        ("the caller's clone", &w.served),
    ];
    let mut pk = 100;
    for (handle, store) in handles {
        for (how, attempt) in &attempts {
            pk += 1;
            let before = store.digest();
            match attempt(store, pk) {
                Ok(()) => {
                    w.sync().await;
                    assert_eq!(
                        w.clients[1].0.digest(),
                        store.digest(),
                        "{how} through {handle} was kept from the clients"
                    );
                }
                Err(Error::ServedStore { through: "write" }) => {
                    assert_eq!(store.digest(), before, "{how} through {handle} changed it");
                }
                Err(e) => panic!("{how} through {handle}: {e}"),
            }
        }
        let schema = fieldlog::Schema::new("Customer");
        assert!(
            matches!(
                store.set_schema(schema),
                Err(Error::ServedStore {
                    through: "set_schema"
                })
            ),
            "set_schema through {handle}"
        );
        assert_eq!(store.schema("Customer"), None);
        assert!(store.get("Customer", 17).unwrap().is_some(), "reads go on");
    }
    w.server
        .write(|tx| tx.insert("Customer", 5, customer("Eve", "555-0005", 5)))
        .unwrap();
    w.sync().await;
    w.assert_everywhere(5, "FirstName", Some(Value::from("Eve")));
    w.stop().await;
}
