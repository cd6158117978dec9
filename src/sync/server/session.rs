//! One connection's server side: a state machine from the handshake through snapshots
//! (client resets) to uploads and downloads.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use super::state::SyncServer;
use crate::changeset::Changeset;
use crate::clock::ReplicaId;
use crate::error::{Error, Result};
use crate::log::{LogEntry, LogPos};
use crate::reset::ObjectSnapshot;
use crate::reset::ResetReason;
use crate::rules::User;
use crate::schema::Schema;
use crate::sync::pieces::{join_piece, split_entry};
use crate::sync::protocol::{
    ClientMsg, ErrorCode, ServerMsg, ServerVersion, SnapshotEnd, SubscriptionSet, PROTOCOL_VERSION,
};
use crate::sync::token::{self, Claims, TokenError};
use crate::sync::view::View;
use crate::value::Value;

/// Download messages a session sends ahead of the client's acknowledgements.
const DOWNLOAD_WINDOW: usize = 4;

#[derive(Debug)]
enum State {
    AwaitHello,
    /// Sending the server's state to a client that must reset.
    Snapshotting {
        client: ReplicaId,
        view: Arc<View>,
        /// Where the next chunk starts (`None`: the beginning).
        next_key: Option<Vec<u8>>,
        /// The server version when the snapshot began.
        cursor: ServerVersion,
        /// The schemas and their version when it began: the client decided with them.
        schemas: Vec<Schema>,
        schema_version: u64,
        /// Chunks sent and not yet acknowledged.
        in_flight: usize,
        /// Acknowledgements still to come for chunks of a snapshot this one replaced (a
        /// subscription change in the middle): they come first and count for nothing.
        stale: usize,
        /// The last chunk was sent.
        done: bool,
    },
    Ready {
        client: ReplicaId,
        view: Arc<View>,
        /// The client's download position as far as this session has sent.
        sent: ServerVersion,
        /// Pieces of an upload transaction still arriving.
        partial: Option<LogEntry>,
        /// Pieces of a download transaction still to send.
        outgoing: Vec<LogEntry>,
        outgoing_cursor: ServerVersion,
        /// Download messages sent and not yet acknowledged.
        in_flight: usize,
    },
    Closed,
}

/// One connection's server side. Feed it messages; send what it returns; after an
/// [`ServerMsg::Error`] it is closed and the connection should be.
#[derive(Debug)]
pub struct ServerSession {
    server: Arc<SyncServer>,
    state: State,
    /// When the handshake's token expires (`u64::MAX` before the handshake): the session
    /// ends then, as new connections with the token are refused.
    expires_at_ms: u64,
    /// Estimated bytes of the unfinished upload transaction (`partial` in
    /// [`State::Ready`]), bounded by [`Limits::transaction_bytes_max`].
    partial_bytes: usize,
}

impl SyncServer {
    /// A session for a new connection.
    pub fn session(self: &Arc<Self>) -> ServerSession {
        ServerSession {
            server: Arc::clone(self),
            state: State::AwaitHello,
            expires_at_ms: u64::MAX,
            partial_bytes: 0,
        }
    }
}

fn error(code: ErrorCode, message: impl Into<String>) -> ServerMsg {
    ServerMsg::Error {
        code,
        message: message.into(),
    }
}

impl ServerSession {
    /// Whether the session has ended (after an error).
    pub fn is_closed(&self) -> bool {
        matches!(self.state, State::Closed)
    }

    /// The authenticated user, once the handshake is done.
    pub fn user(&self) -> Option<&str> {
        match &self.state {
            State::Ready { view, .. } | State::Snapshotting { view, .. } => Some(&view.user().id),
            _ => None,
        }
    }

    /// The authenticated user with the fields from the token.
    fn user_info(&self) -> User {
        match &self.state {
            State::Ready { view, .. } | State::Snapshotting { view, .. } => view.user().clone(),
            _ => User::new(""),
        }
    }

    fn fail(&mut self, code: ErrorCode, message: impl Into<String>) -> Vec<ServerMsg> {
        self.state = State::Closed;
        vec![error(code, message)]
    }

    /// When the session's token expires, once the handshake is done.
    pub fn expires_at_ms(&self) -> Option<u64> {
        (self.expires_at_ms != u64::MAX && !self.is_closed()).then_some(self.expires_at_ms)
    }

    /// Ends the session if its token has expired at `now_ms` (call it when the time from
    /// [`ServerSession::expires_at_ms`] comes); returns the error to send.
    pub fn on_time(&mut self, now_ms: u64) -> Vec<ServerMsg> {
        if self.is_closed() || now_ms < self.expires_at_ms {
            return Vec::new();
        }
        let at = self.expires_at_ms;
        self.fail(
            ErrorCode::TokenExpired,
            format!("the session's token expired at {at} ms (now {now_ms} ms)"),
        )
    }

    /// Estimated bytes of the upload transaction whose pieces are still arriving.
    pub fn partial_upload_bytes(&self) -> usize {
        match &self.state {
            State::Ready {
                partial: Some(_), ..
            } => self.partial_bytes,
            _ => 0,
        }
    }

    /// Handles one client message at time `now_ms`.
    pub fn on_message(&mut self, msg: ClientMsg, now_ms: u64) -> Vec<ServerMsg> {
        let expiry = self.on_time(now_ms);
        if !expiry.is_empty() {
            return expiry;
        }
        match self.handle(msg, now_ms) {
            Ok(out) => out,
            Err(Error::BadChangeset { reason }) => self.fail(ErrorCode::BadChangeset, reason),
            Err(
                e @ (Error::Schema { .. }
                | Error::ClockDrift { .. }
                | Error::BadName { .. }
                | Error::TooManyFields { .. }),
            ) => self.fail(ErrorCode::BadChangeset, e.to_string()),
            Err(e) => self.fail(ErrorCode::Internal, e.to_string()),
        }
    }

    /// A protocol error of the peer (a frame that failed to decode): the session ends.
    pub fn on_bad_frame(&mut self, reason: &str) -> Vec<ServerMsg> {
        self.fail(ErrorCode::BadFrame, reason)
    }

    fn handle(&mut self, msg: ClientMsg, now_ms: u64) -> Result<Vec<ServerMsg>> {
        if self.is_closed() {
            return Ok(Vec::new());
        }
        let awaiting_hello = matches!(self.state, State::AwaitHello);
        match msg {
            hello @ ClientMsg::Hello { .. } if awaiting_hello => self.on_hello(hello, now_ms),
            other if awaiting_hello => Ok(self.fail(
                ErrorCode::UnexpectedMessage,
                format!("expected Hello, got {}", other.kind()),
            )),
            ClientMsg::Hello { .. } => {
                Ok(self.fail(ErrorCode::UnexpectedMessage, "Hello after the handshake"))
            }
            ClientMsg::Upload { changeset, more } => self.on_upload(changeset, more),
            ClientMsg::Subscribe { set } => self.on_subscribe(set),
            ClientMsg::SnapshotAck { settled } => self.on_snapshot_ack(settled),
            ClientMsg::DownloadAck { .. } => Ok(self.on_download_ack()),
            ClientMsg::Ping { id } => Ok(vec![ServerMsg::Pong {
                id,
                server_version: self.server.version(),
            }]),
        }
    }

    /// The handshake: admits the client, then welcomes it or begins its reset.
    fn on_hello(&mut self, hello: ClientMsg, now_ms: u64) -> Result<Vec<ServerMsg>> {
        let ClientMsg::Hello {
            protocol,
            schema_version,
            token,
            replica,
            download_cursor,
            last_sync,
            reset_pending,
            reset_settled,
            subscriptions,
            subscriptions_acked,
        } = hello
        else {
            return Err(Error::Internal {
                what: format!("a {} handled as a Hello", hello.kind()),
            });
        };
        let claims = match self.admit(protocol, &token, replica, now_ms)? {
            Ok(claims) => claims,
            Err(refusal) => return Ok(refusal),
        };
        self.expires_at_ms = claims.expires_at_ms;
        let server_schema = self.server.schema_version()?;
        if schema_version > server_schema {
            return Ok(self.fail(
                ErrorCode::SchemaVersion,
                format!(
                    "client schema version {schema_version} is newer than the server's {server_schema}"
                ),
            ));
        }
        if let Some(settled) = reset_settled {
            // The client finished a reset whose last acknowledgement we never got.
            self.server.reset_served(replica, settled)?;
        }
        let record = self.server.client_record(replica)?;
        let server_version = self.server.version();
        let user = User {
            id: claims.user_id,
            fields: claims.extra,
        };
        let (view, refused_subscriptions) = self.hello_view(user, subscriptions)?;
        let mut reason = self.server.reset_reason(
            &record,
            schema_version,
            download_cursor,
            last_sync,
            reset_pending,
        )?;
        if reason.is_none() && view.has_subscriptions() && view.version != subscriptions_acked {
            reason = Some(ResetReason::SubscriptionsChanged);
        }
        if let Some(reason) = reason {
            let mut out = self.hello_reset(
                replica,
                view,
                reason,
                record.uploaded,
                server_version,
                last_sync,
            )?;
            out.extend(refused_subscriptions);
            return Ok(out);
        }
        self.state = State::Ready {
            client: replica,
            view,
            sent: download_cursor.min(server_version),
            partial: None,
            outgoing: Vec::new(),
            outgoing_cursor: 0,
            in_flight: 0,
        };
        let schemas = if schema_version < server_schema {
            self.server.store.schemas()
        } else {
            Vec::new()
        };
        // Refusals the client may have missed come before the Welcome, which lets it count
        // the uploads they belong to as acknowledged.
        let mut out = self.missed_refusals(replica, last_sync)?;
        out.push(ServerMsg::Welcome {
            server: self.server.store.replica_id(),
            server_version,
            uploaded: record.uploaded,
            schema_version: server_schema,
            schemas,
        });
        out.extend(refused_subscriptions);
        Ok(out)
    }

    /// Begins the reset a handshake found due, of the state at `server_version`; `uploaded`
    /// is the client's position the server holds.
    fn hello_reset(
        &mut self,
        replica: ReplicaId,
        view: Arc<View>,
        reason: ResetReason,
        uploaded: LogPos,
        server_version: ServerVersion,
        last_sync: LogPos,
    ) -> Result<Vec<ServerMsg>> {
        let schemas = self.server.store.schemas();
        self.state = State::Snapshotting {
            client: replica,
            view,
            next_key: None,
            cursor: server_version,
            schemas: schemas.clone(),
            schema_version: self.server.schema_version()?,
            in_flight: 0,
            stale: 0,
            done: false,
        };
        let mut out = self.missed_refusals(replica, last_sync)?;
        out.push(ServerMsg::ResetRequired {
            reason,
            uploaded,
            schemas,
        });
        Ok(out)
    }

    /// Checks a handshake's protocol, token and device: the token's claims, or the refusal
    /// to send (the session is closed then).
    fn admit(
        &mut self,
        protocol: u32,
        token: &str,
        replica: ReplicaId,
        now_ms: u64,
    ) -> Result<std::result::Result<Claims, Vec<ServerMsg>>> {
        if protocol != PROTOCOL_VERSION {
            return Ok(Err(self.fail(
                ErrorCode::ProtocolVersion,
                format!("server speaks protocol {PROTOCOL_VERSION}, client {protocol}"),
            )));
        }
        let claims = match token::verify(&self.server.config.secret, token, now_ms) {
            Ok(c) => c,
            Err(e @ TokenError::Expired { .. }) => {
                return Ok(Err(self.fail(ErrorCode::TokenExpired, e.to_string())))
            }
            Err(e) => return Ok(Err(self.fail(ErrorCode::Unauthorized, e.to_string()))),
        };
        if let Err(message) = self.server.claim_device(replica, &claims.user_id)? {
            self.server
                .refusals
                .device_owner
                .fetch_add(1, Ordering::Relaxed);
            return Ok(Err(self.fail(ErrorCode::DeviceNotOwned, message)));
        }
        Ok(Ok(claims))
    }

    /// The view a handshake's subscription set gives, and the refusal of the set if it is
    /// refused: then the client keeps what it has and sees what its roles allow until it
    /// sends a valid set.
    fn hello_view(
        &self,
        user: User,
        subscriptions: Option<SubscriptionSet>,
    ) -> Result<(Arc<View>, Option<ServerMsg>)> {
        let (view, refused) = match self.server.view(user.clone(), subscriptions.as_ref()) {
            Ok(v) => (v, None),
            Err(message) => (
                self.server
                    .view(user, None)
                    .map_err(|reason| Error::Internal { what: reason })?,
                subscriptions.map(|s| ServerMsg::SubscriptionError {
                    version: s.version,
                    message,
                }),
            ),
        };
        Ok((Arc::new(view), refused))
    }

    /// The refusals of uploads above `last_sync` the client may have missed, as the message
    /// to send first (if any).
    fn missed_refusals(&self, client: ReplicaId, last_sync: LogPos) -> Result<Vec<ServerMsg>> {
        let missed = self.server.pending_refusals(client, last_sync)?;
        let mut out = Vec::new();
        if !missed.is_empty() {
            out.push(ServerMsg::CompensatingWrite { refused: missed });
        }
        Ok(out)
    }

    /// Pieces of an upload: a whole transaction is applied at once, and acknowledged.
    fn on_upload(&mut self, changeset: Changeset, more: bool) -> Result<Vec<ServerMsg>> {
        let State::Ready {
            client,
            view,
            partial,
            ..
        } = &mut self.state
        else {
            // Sent before the client learnt of its reset: the reset replays its uploads, so
            // dropping them loses nothing.
            return Ok(Vec::new());
        };
        changeset.validate(self.server.store.options().value_bytes_max)?;
        // A client uploads its own writes only: a stamp of another replica would let
        // it forge a tie that replicas could break differently.
        if let Some(e) = changeset
            .entries
            .iter()
            .find(|e| e.stamp.replica != *client)
        {
            return Err(Error::BadChangeset {
                reason: format!(
                    "entry {} carries a stamp of replica {}, not of the uploader {}",
                    e.seq, e.stamp.replica, client
                ),
            });
        }
        let mut entries = changeset.entries;
        // Pieces are counted as they arrive, before they are joined.
        let first_bytes = entries.first().map_or(0, approx_size);
        let last_bytes = entries.last().map_or(0, approx_size);
        let mut carried = 0;
        if let Some(p) = partial.take() {
            match entries.first_mut() {
                Some(first) if first.seq == p.seq => {
                    let rest = std::mem::replace(first, p);
                    join_piece(first, rest);
                    carried = self.partial_bytes;
                }
                _ => {
                    return Ok(self.fail(
                        ErrorCode::UnexpectedMessage,
                        format!("upload did not continue transaction {}", p.seq),
                    ))
                }
            }
        }
        self.partial_bytes = 0;
        let first_total = carried + first_bytes;
        let max = self.server.config.limits.transaction_bytes_max;
        if first_total > max {
            let seq = entries.first().map_or(0, |e| e.seq);
            tracing::warn!(
                seq,
                bytes = first_total,
                max,
                "upload transaction too large"
            );
            return Ok(self.fail(
                ErrorCode::LimitExceeded,
                format!(
                    "transaction {seq} is over {first_total} bytes, more than the \
                     server's limit of {max} bytes (Limits::transaction_bytes_max)"
                ),
            ));
        }
        if more {
            let continued = entries.len() == 1;
            *partial = entries.pop();
            self.partial_bytes = if continued { first_total } else { last_bytes };
        }
        let (client, view) = (*client, Arc::clone(view));
        if entries.is_empty() {
            return Ok(Vec::new());
        }
        let (seq, server_version, refused) = self.server.apply_upload(client, &view, entries)?;
        // The refusal goes first: a client that saw the acknowledgement saw it too.
        let mut out = Vec::new();
        if !refused.is_empty() {
            out.push(ServerMsg::CompensatingWrite { refused });
        }
        out.push(ServerMsg::UploadAck {
            seq,
            server_version,
        });
        Ok(out)
    }

    /// A new subscription set rebuilds the view (a snapshot in progress starts over, of the
    /// new view).
    fn on_subscribe(&mut self, set: SubscriptionSet) -> Result<Vec<ServerMsg>> {
        let (State::Ready { client, .. } | State::Snapshotting { client, .. }) = &self.state else {
            return Ok(Vec::new());
        };
        let client = *client;
        let user = self.user_info();
        match self.server.view(user, Some(&set)) {
            Err(message) => Ok(vec![ServerMsg::SubscriptionError {
                version: set.version,
                message,
            }]),
            Ok(view) => {
                if let State::Ready { view: v, .. } | State::Snapshotting { view: v, .. } =
                    &mut self.state
                {
                    *v = Arc::new(view);
                }
                Ok(self
                    .begin_reset(client, ResetReason::SubscriptionsChanged)?
                    .into_iter()
                    .collect())
            }
        }
    }

    /// A snapshot chunk arrived; after the last one the client has swapped the snapshot in.
    fn on_snapshot_ack(&mut self, settled: Option<LogPos>) -> Result<Vec<ServerMsg>> {
        let State::Snapshotting {
            client,
            in_flight,
            stale,
            done,
            ..
        } = &mut self.state
        else {
            return Ok(self.fail(ErrorCode::UnexpectedMessage, "SnapshotAck outside a reset"));
        };
        if *stale > 0 {
            // Of the replaced snapshot; the new one's last acknowledgement settles.
            *stale -= 1;
            return Ok(Vec::new());
        }
        *in_flight = in_flight.saturating_sub(1);
        if *done && *in_flight == 0 {
            // The client has swapped the snapshot in; what it sends next (its recovered
            // writes) belongs to a normal session.
            let client = *client;
            self.end_snapshot(settled.unwrap_or(0))?;
            // Confirm the settled position, so the client can end its reset.
            return Ok(vec![ServerMsg::UploadAck {
                seq: self.server.uploaded(client)?,
                server_version: self.server.version(),
            }]);
        }
        Ok(Vec::new())
    }

    /// A download arrived. One sent before the client learnt of its reset needs no answer.
    fn on_download_ack(&mut self) -> Vec<ServerMsg> {
        if let State::Ready { in_flight, .. } = &mut self.state {
            *in_flight = in_flight.saturating_sub(1);
        }
        Vec::new()
    }

    /// The next download message, if the client is behind. Call it whenever the server
    /// version moves and after each message sent, until it returns `None`.
    pub fn poll_download(&mut self) -> Vec<ServerMsg> {
        match self.next_download() {
            Ok(m) => m.into_iter().collect(),
            Err(e) => self.fail(ErrorCode::Internal, e.to_string()),
        }
    }

    /// Everything staged and swapped in on the client: carry on as a normal session.
    fn end_snapshot(&mut self, settled: LogPos) -> Result<()> {
        let State::Snapshotting {
            client,
            view,
            cursor,
            ..
        } = &self.state
        else {
            return Ok(());
        };
        let (client, view, cursor) = (*client, Arc::clone(view), *cursor);
        self.server.reset_served(client, settled)?;
        self.state = State::Ready {
            client,
            view,
            sent: cursor,
            partial: None,
            outgoing: Vec::new(),
            outgoing_cursor: 0,
            in_flight: 0,
        };
        Ok(())
    }

    /// Switches a connected session to a reset (or a view rebuild).
    fn begin_reset(&mut self, client: ReplicaId, reason: ResetReason) -> Result<Option<ServerMsg>> {
        let (view, stale) = match std::mem::replace(&mut self.state, State::Closed) {
            State::Ready { view, .. } => (view, 0),
            State::Snapshotting {
                view,
                in_flight,
                stale,
                ..
            } => (view, in_flight + stale),
            other => {
                self.state = other;
                return Ok(None);
            }
        };
        let uploaded = self.server.uploaded(client)?;
        let schemas = self.server.store.schemas();
        self.state = State::Snapshotting {
            client,
            view,
            next_key: None,
            cursor: self.server.version(),
            schemas: schemas.clone(),
            schema_version: self.server.schema_version()?,
            in_flight: 0,
            stale,
            done: false,
        };
        Ok(Some(ServerMsg::ResetRequired {
            reason,
            uploaded,
            schemas,
        }))
    }

    fn next_snapshot(&mut self) -> Result<Option<ServerMsg>> {
        let State::Snapshotting {
            view,
            next_key,
            cursor,
            schemas,
            schema_version,
            in_flight,
            done,
            ..
        } = &mut self.state
        else {
            return Ok(None);
        };
        if *done || *in_flight >= DOWNLOAD_WINDOW {
            return Ok(None);
        }
        let (mut objects, next) = self
            .server
            .store
            .snapshot_chunk(next_key.as_deref(), self.server.config.batch_bytes)?;
        if view.filtered() {
            // Only what this client may see, and no tombstones of what it may not.
            objects.retain_mut(|o| visible_snapshot(view, o));
        }
        *in_flight += 1;
        let end = match next {
            Some(k) => {
                *next_key = Some(k);
                None
            }
            None => {
                *done = true;
                Some(SnapshotEnd {
                    cursor: *cursor,
                    schema_version: *schema_version,
                    schemas: schemas.clone(),
                    subscriptions: view.has_subscriptions().then_some(view.version),
                })
            }
        };
        Ok(Some(ServerMsg::Snapshot { objects, end }))
    }

    /// The changes after the client's position, as whole objects it may see and removals
    /// of objects it no longer may.
    fn next_view_download(&mut self) -> Result<Option<ServerMsg>> {
        let State::Ready {
            client,
            view,
            sent,
            in_flight,
            ..
        } = &mut self.state
        else {
            return Ok(None);
        };
        let (entries, cursor) = self.server.history_after(*sent, *client)?;
        let mut seen = std::collections::HashSet::new();
        let (mut objects, mut removed) = (Vec::new(), Vec::new());
        for e in entries {
            for w in e.writes {
                if !seen.insert((w.collection.clone(), w.pk.clone())) {
                    continue;
                }
                let mut snap = self.server.store.object_snapshot(&w.collection, &w.pk)?;
                if visible_snapshot(view, &mut snap) {
                    objects.push(snap);
                } else {
                    removed.push((w.collection, w.pk));
                }
            }
        }
        *sent = cursor;
        *in_flight += 1;
        Ok(Some(ServerMsg::ViewDownload {
            objects,
            removed,
            cursor,
        }))
    }

    fn next_download(&mut self) -> Result<Option<ServerMsg>> {
        if matches!(self.state, State::Snapshotting { .. }) {
            return self.next_snapshot();
        }
        let batch_bytes = self.server.config.batch_bytes;
        let origin = self.server.store.replica_id();
        let State::Ready {
            client,
            view,
            sent,
            outgoing,
            outgoing_cursor,
            in_flight,
            ..
        } = &mut self.state
        else {
            return Ok(None);
        };
        if *in_flight >= DOWNLOAD_WINDOW {
            return Ok(None);
        }
        // Read once: another session's commit may move it between the checks below, and a
        // filtered client must never take the unfiltered path because of that.
        let version = self.server.version();
        if outgoing.is_empty() && *sent < version {
            let horizon = self.server.horizon()?;
            if *sent < horizon {
                // History this client still needs was compacted while it was connected.
                let (client, cursor) = (*client, *sent);
                return self.begin_reset(client, ResetReason::BehindHorizon { cursor, horizon });
            }
            if view.filtered() {
                return self.next_view_download();
            }
        }
        *in_flight += 1;
        if outgoing.is_empty() {
            if *sent >= version || view.filtered() {
                *in_flight -= 1;
                return Ok(None);
            }
            let (entries, cursor) = self.server.history_after(*sent, *client)?;
            // A transaction too large for one message goes out in pieces.
            let mut pieces = Vec::new();
            for e in entries {
                pieces.extend(split_entry(e, batch_bytes));
            }
            pieces.reverse();
            *outgoing = pieces;
            *outgoing_cursor = cursor;
            if outgoing.is_empty() {
                *sent = cursor;
                return Ok(Some(ServerMsg::Download {
                    changeset: Changeset {
                        origin,
                        entries: Vec::new(),
                    },
                    more: false,
                    cursor,
                }));
            }
        }
        // Pieces of one transaction share a seq; send whole entries up to the batch size,
        // and at most one piece per message so the client can rejoin them in order.
        let mut batch = Vec::new();
        let mut bytes = 0;
        let mut more = false;
        while let Some(next) = outgoing.pop() {
            bytes += approx_size(&next);
            let continues = outgoing.last().is_some_and(|n| n.seq == next.seq);
            batch.push(next);
            if continues {
                more = true;
                break;
            }
            if bytes >= batch_bytes {
                break;
            }
        }
        let cursor = if outgoing.is_empty() {
            *outgoing_cursor
        } else {
            // Only complete transactions count towards the cursor.
            batch.last().map_or(*sent, |e| e.seq - u64::from(more))
        };
        *sent = cursor.max(*sent);
        Ok(Some(ServerMsg::Download {
            changeset: Changeset {
                origin,
                entries: batch,
            },
            more,
            cursor,
        }))
    }
}

/// Whether a client with this view may hold the object (live, readable, subscribed); if
/// so, drops the fields it may not read from it.
fn visible_snapshot(view: &View, o: &mut ObjectSnapshot) -> bool {
    if !matches!(o.exists, Some((_, true))) {
        return false;
    }
    let fields: std::collections::BTreeMap<String, Value> = o
        .fields
        .iter()
        .map(|(f, _, v)| (f.clone(), v.clone()))
        .collect();
    let Ok(fields) = crate::crdt::fold(fields) else {
        return false;
    };
    let Some(readable) = view.readable(&o.collection, &o.pk, &fields) else {
        return false;
    };
    o.fields.retain(|(f, _, _)| readable.field(f));
    true
}

pub(crate) fn approx_size(e: &LogEntry) -> usize {
    crate::sync::pieces::entry_size(e)
}
