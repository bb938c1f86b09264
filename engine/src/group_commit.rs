//! Group commit: single consent changes (a click on a confirm link, an unsubscribe, a bounce),
//! state-free events, snapshots and finished outbox rows queue for one writer, which writes
//! whatever has queued up, one transaction per kind.
//!
//! With a durable store every transaction waits for its fsync (about 2.5 ms on a plain
//! virtual disk), which caps one-by-one commits at a few hundred per second. Batched, one
//! fsync acknowledges every request that arrived meanwhile; under no load a batch is one
//! commit and nothing waits. Each commit keeps its own consistency check: one whose consent
//! changed meanwhile comes back as a conflict, exactly as from [`Store::commit`].
//!
//! Somebody waits for every job but a fetched link's record (a *detached* append). Those
//! queue apart, in a bounded queue, and the writer takes them after the waiting jobs, at most
//! [`MAX_DETACHED`] per round: under a load of page fetches the records pile up faster than
//! a large store writes them (measured at 1M contacts: ~60,000 queued during a `GET` load
//! held every confirmation behind them for ~2 s), and a click must not wait for them. When
//! the queue is full the page that fetches waits for room, so the backlog stays bounded.

use std::sync::Arc;

use chrono::Utc;
use tokio::sync::{mpsc, oneshot};

use crate::ledger::{LedgerEvent, NewEvent};
use crate::store::{BatchCommit, Commit, OutboxFinish, Snapshot, Store, StoreError, StoreResult};

/// Most commits written in one transaction.
const MAX_BATCH: usize = 512;

/// Most detached appends written per round, after the round's waiting jobs: small enough
/// that a confirmation arriving meanwhile waits for few of them.
const MAX_DETACHED: usize = 128;

/// Detached appends queued at most before a fetch waits for room (~0.5 KB each).
const DETACHED_QUEUE: usize = 20_000;

type Reply = oneshot::Sender<StoreResult<LedgerEvent>>;
type Done = oneshot::Sender<StoreResult<()>>;

/// A consent change, an event that changes no state (a fetched link), a mail's or page's
/// snapshot, or the end of claimed outbox rows; each with where its answer goes.
#[derive(Debug)]
enum Job {
    /// Built by the caller ([`BatchCommit::new`] computes the event's stored form there, not
    /// on the writer's thread).
    Commit(Box<BatchCommit>, Reply),
    Append(Box<NewEvent>, Reply),
    Snapshots(Vec<Snapshot>, Done),
    Finish(Vec<OutboxFinish>, Done),
    /// Answered once everything queued before it is written, detached appends included.
    Flush(Done),
}

#[derive(Debug, Clone)]
pub struct GroupCommit {
    tx: mpsc::UnboundedSender<Job>,
    /// Appends nobody waits for; the writer logs their failures itself.
    detached: mpsc::Sender<NewEvent>,
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
        let (detached, detached_rx) = mpsc::channel(DETACHED_QUEUE);
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .ok()?;
        std::thread::Builder::new()
            .name("group-commit".into())
            .spawn(move || runtime.block_on(writer(store, rx, detached_rx)))
            .ok()?;
        Some(Self { tx, detached })
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
        match self.tx.send(Job::Append(Box::new(event), reply)) {
            Ok(()) => answered(answer).await,
            Err(mpsc::error::SendError(job)) => one(store, job).await,
        }
    }

    /// Queue an event that changes no state and return without waiting for its commit (a
    /// fetched link's record: the page should not wait for an fsync). The writer writes it
    /// after the jobs somebody waits for and logs a failure. Waits only while
    /// [`DETACHED_QUEUE`] events are queued already. `Err` gives the event back when the
    /// writer is gone, for the caller to write itself.
    pub async fn append_detached(&self, event: NewEvent) -> Result<(), Box<NewEvent>> {
        self.detached
            .send(event)
            .await
            .map_err(|mpsc::error::SendError(event)| Box::new(event))
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

/// What one round of the writer takes: the waiting jobs first, then some detached appends.
struct Round {
    jobs: Vec<Job>,
    detached: Vec<NewEvent>,
}

/// Wait for work, then take what is queued: up to [`MAX_BATCH`] waiting jobs and up to
/// [`MAX_DETACHED`] detached appends (all of them when a flush is among the jobs). `None`
/// once both queues are closed and empty.
async fn next_round(
    rx: &mut mpsc::UnboundedReceiver<Job>,
    detached_rx: &mut mpsc::Receiver<NewEvent>,
) -> Option<Round> {
    let mut round = Round {
        jobs: Vec::new(),
        detached: Vec::new(),
    };
    // Both senders live in the same `GroupCommit`, so both close together.
    tokio::select! {
        biased;
        Some(job) = rx.recv() => round.jobs.push(job),
        Some(event) = detached_rx.recv() => round.detached.push(event),
        else => return None,
    }
    while round.jobs.len() < MAX_BATCH {
        match rx.try_recv() {
            Ok(next) => round.jobs.push(next),
            Err(_) => break,
        }
    }
    let flushing = round.jobs.iter().any(|j| matches!(j, Job::Flush(_)));
    while flushing || round.detached.len() < MAX_DETACHED {
        match detached_rx.try_recv() {
            Ok(event) => round.detached.push(event),
            Err(_) => break,
        }
    }
    Some(round)
}

async fn writer(
    store: Arc<dyn Store>,
    mut rx: mpsc::UnboundedReceiver<Job>,
    mut detached_rx: mpsc::Receiver<NewEvent>,
) {
    while let Some(Round { jobs, detached }) = next_round(&mut rx, &mut detached_rx).await {
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
                    append_replies.push(Some(reply));
                }
                Job::Snapshots(s, reply) => snapshots.push((s, reply)),
                Job::Finish(rows, reply) => finishes.push((rows, reply)),
                Job::Flush(reply) => flushes.push(reply),
            }
        }
        // After the awaited appends, in the same transaction: `None`, nobody waits.
        append_replies.extend(detached.iter().map(|_| None));
        appends.extend(detached);
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
            let queued = group
                .append_detached(event(&ids[0], "link_fetched", ConsentState::None))
                .await;
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

    #[tokio::test]
    async fn a_round_takes_the_waiting_jobs_before_detached_appends() {
        let (tx, mut rx) = mpsc::unbounded_channel();
        let (detached, mut detached_rx) = mpsc::channel(DETACHED_QUEUE);
        let queued = 1_000;
        for _ in 0..queued {
            let sent = detached
                .send(event("c1", "link_fetched", ConsentState::None))
                .await;
            assert!(sent.is_ok(), "room in the queue");
        }
        let (reply, _answer) = oneshot::channel();
        let sent = tx.send(Job::Commit(
            Box::new(BatchCommit::new(commit("c1"), false)),
            reply,
        ));
        assert!(sent.is_ok(), "the queue is open");
        let round = next_round(&mut rx, &mut detached_rx)
            .await
            .expect("work is queued");
        assert!(
            matches!(round.jobs.as_slice(), [Job::Commit(..)]),
            "the commit queued after the appends is in the first round"
        );
        assert_eq!(
            round.detached.len(),
            MAX_DETACHED,
            "a few appends go with it"
        );

        // A flush takes every append queued before it.
        let (done, _answer) = oneshot::channel();
        assert!(tx.send(Job::Flush(done)).is_ok(), "the queue is open");
        let round = next_round(&mut rx, &mut detached_rx)
            .await
            .expect("work is queued");
        assert!(matches!(round.jobs.as_slice(), [Job::Flush(_)]));
        assert_eq!(round.detached.len(), queued - MAX_DETACHED);

        drop((tx, detached));
        assert!(
            next_round(&mut rx, &mut detached_rx).await.is_none(),
            "closed and empty: the writer ends"
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn commits_and_detached_appends_are_all_written() {
        let dir = tempfile::tempdir().expect("temp dir");
        let (store, ids) = store_with_contacts(dir.path(), 1).await;
        let group = GroupCommit::start(Arc::clone(&store)).expect("inside a runtime");
        let queued = 2_000;
        for _ in 0..queued {
            let sent = group
                .append_detached(event(&ids[0], "link_fetched", ConsentState::None))
                .await;
            assert!(sent.is_ok(), "the writer takes it");
        }
        let confirmed = group.commit(&*store, commit(&ids[0])).await;
        assert!(confirmed.is_ok(), "the commit is written: {confirmed:?}");
        group.flush().await;
        let events = store.ledger_page(0, 10_000).await.expect("ledger");
        assert_eq!(events.len(), queued + 1, "every append is written too");
        assert_eq!(
            crate::ledger::verify_chain(events.iter()).expect("chain verifies"),
            queued as u64 + 1
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
