//! Group commit: single consent changes (a click on a confirm link, an unsubscribe, a bounce),
//! state-free events, snapshots and finished outbox rows queue for one writer, which writes
//! whatever has queued up, one transaction per kind.
//!
//! With a durable store every transaction waits for its fsync (about 2.5 ms on a plain
//! virtual disk), which caps one-by-one commits at a few hundred per second. Batched, one
//! fsync acknowledges every request that arrived meanwhile; under no load a batch is one
//! commit and nothing waits. Each commit keeps its own consistency check: one whose consent
//! changed meanwhile comes back as a conflict, exactly as from [`Store::commit`].

use std::sync::Arc;

use chrono::Utc;
use tokio::sync::{mpsc, oneshot};

use crate::ledger::{LedgerEvent, NewEvent};
use crate::store::{BatchCommit, Commit, OutboxFinish, Snapshot, Store, StoreError, StoreResult};

/// Most commits written in one transaction.
const MAX_BATCH: usize = 512;

type Reply = oneshot::Sender<StoreResult<LedgerEvent>>;
type Done = oneshot::Sender<StoreResult<()>>;

/// A consent change, an event that changes no state (a fetched link), a mail's or page's
/// snapshot, or the end of claimed outbox rows; each with where its answer goes.
#[derive(Debug)]
enum Job {
    /// Built by the caller ([`BatchCommit::new`] computes the event's stored form there, not
    /// on the writer's thread).
    Commit(Box<BatchCommit>, Reply),
    /// `None`: nobody waits (a detached append); the writer logs its failure itself.
    Append(Box<NewEvent>, Option<Reply>),
    Snapshots(Vec<Snapshot>, Done),
    Finish(Vec<OutboxFinish>, Done),
    /// Answered once everything queued before it is written.
    Flush(Done),
}

#[derive(Debug, Clone)]
pub struct GroupCommit {
    tx: mpsc::UnboundedSender<Job>,
}

impl GroupCommit {
    /// Start the writer on a thread of its own; `None` outside a tokio runtime (the caller
    /// then commits directly).
    ///
    /// Its own thread and single-threaded runtime, because a batch is a chain of statements,
    /// each a round trip to the SQLite connection's worker thread, and on the daemon's runtime
    /// every round trip also waited its turn behind the HTTP requests: measured under the
    /// confirm `POST` load, a batch's statements took 2.7 ms there and 1.0 ms here, and every
    /// waiting confirmation waits for whole batches.
    pub fn start(store: Arc<dyn Store>) -> Option<Self> {
        tokio::runtime::Handle::try_current().ok()?;
        let (tx, rx) = mpsc::unbounded_channel();
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .ok()?;
        std::thread::Builder::new()
            .name("group-commit".into())
            .spawn(move || runtime.block_on(writer(store, rx)))
            .ok()?;
        Some(Self { tx })
    }

    /// Commit through the writer. `Err(Conflict)` if the consent changed since it was read.
    pub async fn commit(&self, store: &dyn Store, commit: Commit) -> StoreResult<LedgerEvent> {
        let (reply, answer) = oneshot::channel();
        match self.tx.send(Job::Commit(
            Box::new(BatchCommit::new(commit, false)),
            reply,
        )) {
            Ok(()) => answered(answer).await,
            Err(mpsc::error::SendError(job)) => one(store, job).await,
        }
    }

    /// Append an event that changes no state through the writer.
    pub async fn append(&self, store: &dyn Store, event: NewEvent) -> StoreResult<LedgerEvent> {
        let (reply, answer) = oneshot::channel();
        match self.tx.send(Job::Append(Box::new(event), Some(reply))) {
            Ok(()) => answered(answer).await,
            Err(mpsc::error::SendError(job)) => one(store, job).await,
        }
    }

    /// Queue an event that changes no state and return without waiting for its commit (a
    /// fetched link's record: the page should not wait for an fsync). The writer writes it
    /// with the next batch and logs a failure. `Err` gives the event back when the writer
    /// is gone, for the caller to write itself.
    pub fn append_detached(&self, event: NewEvent) -> Result<(), Box<NewEvent>> {
        match self.tx.send(Job::Append(Box::new(event), None)) {
            Ok(()) => Ok(()),
            Err(mpsc::error::SendError(Job::Append(event, _))) => Err(event),
            Err(mpsc::error::SendError(_)) => unreachable!("the job sent was an append"),
        }
    }

    /// Wait until everything queued so far is written (at shutdown, after detached appends).
    pub async fn flush(&self) {
        let (reply, answer) = oneshot::channel();
        if self.tx.send(Job::Flush(reply)).is_ok() {
            let _ = answer.await;
        }
    }

    /// Store snapshots through the writer (mails in flight side by side share a commit).
    pub async fn snapshots(&self, store: &dyn Store, snapshots: Vec<Snapshot>) -> StoreResult<()> {
        let (reply, answer) = oneshot::channel();
        match self.tx.send(Job::Snapshots(snapshots, reply)) {
            Ok(()) => answered(answer).await,
            Err(mpsc::error::SendError(job)) => done(store, job).await,
        }
    }

    /// Finish claimed outbox rows through the writer.
    pub async fn finish(&self, store: &dyn Store, rows: Vec<OutboxFinish>) -> StoreResult<()> {
        let (reply, answer) = oneshot::channel();
        match self.tx.send(Job::Finish(rows, reply)) {
            Ok(()) => answered(answer).await,
            Err(mpsc::error::SendError(job)) => done(store, job).await,
        }
    }
}

async fn answered<T>(answer: oneshot::Receiver<StoreResult<T>>) -> StoreResult<T> {
    match answer.await {
        Ok(result) => result,
        // The writer is gone (runtime shutting down): nothing was written for us.
        Err(_) => Err(StoreError::Corrupt {
            table: "ledger",
            detail: "the commit writer stopped before answering".into(),
        }),
    }
}

/// A job the writer could not take, done directly.
async fn one(store: &dyn Store, job: Job) -> StoreResult<LedgerEvent> {
    match job {
        Job::Commit(c, _) => store.commit(&c.commit).await,
        Job::Append(e, _) => store.append_event(&e).await,
        Job::Snapshots(..) | Job::Finish(..) | Job::Flush(..) => Err(StoreError::Corrupt {
            table: "ledger",
            detail: "not a ledger write".into(),
        }),
    }
}

async fn done(store: &dyn Store, job: Job) -> StoreResult<()> {
    match job {
        Job::Snapshots(s, _) => store.put_snapshots(&s).await,
        Job::Finish(rows, _) => store.finish_outbox_batch(&rows, Utc::now()).await,
        Job::Flush(_) => Ok(()),
        Job::Commit(..) | Job::Append(..) => one(store, job).await.map(|_| ()),
    }
}

/// Answer an append's requester; a detached append's failure is logged here instead.
fn answer_append(reply: Option<Reply>, result: StoreResult<LedgerEvent>) {
    match reply {
        // The requester may have gone (client closed); the event stands.
        Some(reply) => {
            let _ = reply.send(result);
        }
        None => {
            if let Err(e) = result {
                tracing::error!(error = %e, "state-free event not recorded");
            }
        }
    }
}

async fn writer(store: Arc<dyn Store>, mut rx: mpsc::UnboundedReceiver<Job>) {
    while let Some(first) = rx.recv().await {
        let mut jobs = vec![first];
        while jobs.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(next) => jobs.push(next),
                Err(_) => break,
            }
        }
        let mut commits = Vec::new();
        let mut commit_replies = Vec::new();
        let mut appends = Vec::new();
        let mut append_replies = Vec::new();
        let mut snapshots: Vec<(Vec<Snapshot>, Done)> = Vec::new();
        let mut finishes: Vec<(Vec<OutboxFinish>, Done)> = Vec::new();
        let mut flushes: Vec<Done> = Vec::new();
        for job in jobs {
            match job {
                Job::Commit(c, reply) => {
                    commits.push(*c);
                    commit_replies.push(reply);
                }
                Job::Append(e, reply) => {
                    appends.push(*e);
                    append_replies.push(reply);
                }
                Job::Snapshots(s, reply) => snapshots.push((s, reply)),
                Job::Finish(rows, reply) => finishes.push((rows, reply)),
                Job::Flush(reply) => flushes.push(reply),
            }
        }
        if !commits.is_empty() {
            match store.commit_batch(&commits).await {
                Ok(written) => {
                    for ((b, reply), ev) in commits.into_iter().zip(commit_replies).zip(written) {
                        let result = ev.ok_or(StoreError::Conflict {
                            contact_id: b.commit.contact_id,
                            list_id: b.commit.list_id,
                        });
                        // The requester may have gone (client closed); the commit stands.
                        let _ = reply.send(result);
                    }
                }
                Err(e) => {
                    // The batch as a whole failed (e.g. the database is down): let each
                    // request see its own error, one by one.
                    tracing::warn!(error = %e, commits = commits.len(), "group commit failed; committing one by one");
                    for (b, reply) in commits.into_iter().zip(commit_replies) {
                        let _ = reply.send(store.commit(&b.commit).await);
                    }
                }
            }
        }
        if !appends.is_empty() {
            match store.append_events(&appends).await {
                Ok(written) => {
                    for (ev, reply) in written.into_iter().zip(append_replies) {
                        answer_append(reply, Ok(ev));
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, events = appends.len(), "group append failed; appending one by one");
                    for (ev, reply) in appends.into_iter().zip(append_replies) {
                        answer_append(reply, store.append_event(&ev).await);
                    }
                }
            }
        }
        if !snapshots.is_empty() {
            let all: Vec<Snapshot> = snapshots.iter().flat_map(|(s, _)| s.clone()).collect();
            match store.put_snapshots(&all).await {
                Ok(()) => {
                    for (_, reply) in snapshots {
                        let _ = reply.send(Ok(()));
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, snapshots = all.len(), "group snapshot write failed; writing one request at a time");
                    for (s, reply) in snapshots {
                        let _ = reply.send(store.put_snapshots(&s).await);
                    }
                }
            }
        }
        if !finishes.is_empty() {
            let all: Vec<OutboxFinish> =
                finishes.iter().flat_map(|(rows, _)| rows.clone()).collect();
            match store.finish_outbox_batch(&all, Utc::now()).await {
                Ok(()) => {
                    for (_, reply) in finishes {
                        let _ = reply.send(Ok(()));
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, rows = all.len(), "group outbox finish failed; finishing one request at a time");
                    for (rows, reply) in finishes {
                        let _ = reply.send(store.finish_outbox_batch(&rows, Utc::now()).await);
                    }
                }
            }
        }
        for reply in flushes {
            let _ = reply.send(Ok(()));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::consent::{Consent, ConsentState};
    use crate::ledger::Evidence;
    use crate::store::ContactUpsert;
    use chrono::Utc;

    fn event(contact_id: &str, kind: &str, to: ConsentState) -> NewEvent {
        NewEvent {
            event_id: uuid::Uuid::new_v4().to_string(),
            at: Utc::now(),
            contact_id: contact_id.to_owned(),
            list_id: "news".to_owned(),
            kind: kind.to_owned(),
            from_state: ConsentState::None,
            to_state: to,
            source: crate::ledger::EventSource::Cli,
            evidence: Evidence::default(),
        }
    }

    fn commit(contact_id: &str) -> Commit {
        let mut consent = Consent::new(Utc::now());
        consent.state = ConsentState::Asserted;
        Commit {
            contact_id: contact_id.to_owned(),
            list_id: "news".to_owned(),
            expected_seq: None,
            consent,
            event: event(contact_id, "asserted", ConsentState::Asserted),
            outbox: vec![],
            suppress: None,
            lift: vec![],
            paced: None,
        }
    }

    /// A migrated store in `dir` with `n` contacts, and their ids.
    async fn store_with_contacts(dir: &std::path::Path, n: usize) -> (Arc<dyn Store>, Vec<String>) {
        let url = format!("sqlite://{}", dir.join("g.db").display());
        let store = crate::store::open(&url).await.expect("open");
        store.migrate().await.expect("migrate");
        let mut ids = Vec::new();
        for i in 0..n {
            let c = store
                .upsert_contact(
                    &ContactUpsert {
                        email: format!("p{i}@example.org"),
                        language: None,
                        fields: Default::default(),
                        crm_record: None,
                    },
                    Utc::now(),
                )
                .await
                .expect("contact");
            ids.push(c.id);
        }
        (store, ids)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn detached_appends_are_all_written_by_the_time_a_flush_answers() {
        let dir = tempfile::tempdir().expect("temp dir");
        let (store, ids) = store_with_contacts(dir.path(), 1).await;
        let group = GroupCommit::start(Arc::clone(&store)).expect("inside a runtime");
        for _ in 0..300 {
            let queued = group.append_detached(event(&ids[0], "link_fetched", ConsentState::None));
            assert!(queued.is_ok(), "the writer takes it");
        }
        group.flush().await;
        let events = store.ledger_page(0, 1000).await.expect("ledger");
        assert_eq!(events.len(), 300, "every queued append is written");
        assert_eq!(
            crate::ledger::verify_chain(events.iter()).expect("chain verifies"),
            300
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_commits_and_appends_are_grouped_and_each_is_checked() {
        let dir = tempfile::tempdir().expect("temp dir");
        let (store, ids) = store_with_contacts(dir.path(), 100).await;
        let group = GroupCommit::start(Arc::clone(&store)).expect("inside a runtime");
        let mut tasks = Vec::new();
        for id in &ids {
            let (g, s, id) = (group.clone(), Arc::clone(&store), id.clone());
            tasks.push(tokio::spawn(async move {
                let a = g.commit(&*s, commit(&id)).await.map(|e| e.seq);
                // The same stale commit again: it must conflict, not overwrite.
                let b = g.commit(&*s, commit(&id)).await.map(|e| e.seq);
                let f = g
                    .append(&*s, event(&id, "link_fetched", ConsentState::Asserted))
                    .await
                    .map(|e| e.seq);
                (a, b, f)
            }));
        }
        let mut seqs = Vec::new();
        for t in tasks {
            let (a, b, f) = t.await.expect("task");
            seqs.push(a.expect("first commit of a pair is written"));
            assert!(
                matches!(b, Err(StoreError::Conflict { .. })),
                "a second commit on the same stale state conflicts: {b:?}"
            );
            seqs.push(f.expect("append is written"));
        }
        seqs.sort_unstable();
        let expected: Vec<i64> = (1..=200).collect();
        assert_eq!(seqs, expected, "every write got its own seq, none lost");
        let events = store.ledger_page(0, 1000).await.expect("ledger");
        assert_eq!(
            crate::ledger::verify_chain(events.iter()).expect("chain verifies"),
            200
        );
        for id in &ids {
            let c = store
                .consent(id, "news")
                .await
                .expect("read")
                .expect("consent");
            assert_eq!(c.state, ConsentState::Asserted);
        }
    }
}
