//! Circuit breakers for the three connectors ([`ConnectorRole`]: crm, campaigns, mail) and the daemon's readiness.
//!
//! A breaker counts *consecutive* service-wide failures of one connector's outbox deliveries
//! ([`verdict`]): a transient error of [`FailureScope::Service`] without a named wait.
//! At `threshold` it **opens**: outbox rows for that connector are postponed (not attempted,
//! and their attempt is not counted) until `cooldown` has passed, so a dead endpoint costs no
//! hot loop and no dead letters, while the other connectors' rows (removals first) go on.
//! After the cool-down the breaker is **half-open**: one delivery is let through as a probe;
//! success closes the breaker, another transient failure opens it for a fresh cool-down.
//! Answers that prove the endpoint is alive (success, a permanent refusal, a bounce, and a
//! temporary failure of [`FailureScope::Record`]: "not now" about this one address on this one
//! list) count as success: one class of failing records must never pause every other record
//! (such a record retries on its own backoff). The breakers live in one process; each instance
//! of a multi-instance set-up keeps its own.
//!
//! The state shows as `optinsync_circuit_open{connector}` (1 open or half-open, 0 closed) and
//! in `/readyz` (503 while any breaker is not closed).

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use optinsync_plugin_api::{ConnectorError, FailureScope};
use serde::Serialize;

use crate::work::ConnectorRole;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum State {
    Closed,
    Open,
    HalfOpen,
}

impl State {
    pub fn as_str(self) -> &'static str {
        match self {
            State::Closed => "closed",
            State::Open => "open",
            State::HalfOpen => "half_open",
        }
    }
}

/// What the breaker says about the next call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admit {
    /// Go ahead (closed, or this call is the half-open probe).
    Call,
    /// Do not call; try again at this instant.
    Wait(Instant),
}

/// What the outcome of one connector call means for that connector's breaker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// The service or the connection failed (timeout, 5xx, lock-out, ...): counts toward
    /// opening the breaker.
    Failure,
    /// Counts neither way: a throttle that named its wait (alive, and pacing us).
    Neutral,
    /// The service answered: a success, a refusal, or a per-record "not now".
    Alive,
}

/// Classify a call's outcome by the error's type alone (never by its text).
pub fn verdict<T>(result: &Result<T, ConnectorError>) -> Verdict {
    match result {
        // About this record only: the service answered, so it is alive.
        Err(ConnectorError::Transient {
            scope: FailureScope::Record,
            ..
        }) => Verdict::Alive,
        Err(ConnectorError::Transient {
            retry_after: Some(_),
            ..
        }) => Verdict::Neutral,
        Err(ConnectorError::Transient { .. }) => Verdict::Failure,
        _ => Verdict::Alive,
    }
}

/// One connector's breaker: a pure state machine, time passed in.
#[derive(Debug, Clone)]
pub struct Breaker {
    threshold: u32,
    cooldown: Duration,
    failures: u32,
    state: State,
    /// When an open breaker half-opens.
    reopen_at: Option<Instant>,
    /// A half-open probe is in flight.
    probing: bool,
    /// Times this breaker opened (for reports).
    pub opened: u64,
}

impl Breaker {
    pub fn new(threshold: u32, cooldown: Duration) -> Self {
        Self {
            threshold: threshold.max(1),
            cooldown,
            failures: 0,
            state: State::Closed,
            reopen_at: None,
            probing: false,
            opened: 0,
        }
    }

    /// The state as of `now` (an open breaker whose cool-down ended reads as half-open).
    pub fn state(&self, now: Instant) -> State {
        match (self.state, self.reopen_at) {
            (State::Open, Some(at)) if now >= at => State::HalfOpen,
            (s, _) => s,
        }
    }

    pub fn admit(&mut self, now: Instant) -> Admit {
        match self.state(now) {
            State::Closed => Admit::Call,
            State::Open => Admit::Wait(self.reopen_at.unwrap_or(now + self.cooldown)),
            State::HalfOpen if self.probing => Admit::Wait(now + self.cooldown),
            State::HalfOpen => {
                self.state = State::HalfOpen;
                self.probing = true;
                Admit::Call
            }
        }
    }

    /// The endpoint answered (success, or a refusal that proves it is alive).
    pub fn success(&mut self) {
        self.failures = 0;
        self.probing = false;
        self.state = State::Closed;
        self.reopen_at = None;
    }

    /// A service-wide transient failure (timeout, 5xx, broken connection; never a failure
    /// about one record). Returns `true` when this failure opened the breaker.
    pub fn failure(&mut self, now: Instant) -> bool {
        self.failures = self.failures.saturating_add(1);
        let reopen = match self.state(now) {
            State::HalfOpen => true,
            State::Closed => self.failures >= self.threshold,
            State::Open => false,
        };
        self.probing = false;
        if reopen {
            self.state = State::Open;
            self.reopen_at = Some(now + self.cooldown);
            self.opened += 1;
        }
        reopen
    }

    /// An admitted call made no request after all (e.g. the row was skipped): let the next
    /// one probe instead.
    pub fn release(&mut self) {
        self.probing = false;
    }

    pub fn consecutive_failures(&self) -> u32 {
        self.failures
    }
}

/// The daemon's breakers and readiness flags, shared by the outbox, `/readyz` and `run`.
#[derive(Debug)]
pub struct Circuits {
    breakers: [Mutex<Breaker>; 3],
    ready: AtomicBool,
    stopping: AtomicBool,
}

/// One connector's state for `/readyz`.
#[derive(Debug, Clone, Serialize)]
pub struct CircuitReport {
    pub connector: &'static str,
    pub state: State,
    pub consecutive_failures: u32,
    /// Seconds until an open breaker lets a probe through.
    pub retry_in_secs: Option<u64>,
}

impl Circuits {
    pub fn new(threshold: u32, cooldown: Duration) -> Self {
        let b = || Mutex::new(Breaker::new(threshold, cooldown));
        for c in ConnectorRole::ALL {
            metrics::gauge!("optinsync_circuit_open", "connector" => c.as_str()).set(0.0);
            // Registered at zero so `increase()` sees the first pause.
            metrics::counter!("optinsync_connector_paused_total", "connector" => c.as_str())
                .absolute(0);
        }
        Self {
            breakers: [b(), b(), b()],
            ready: AtomicBool::new(false),
            stopping: AtomicBool::new(false),
        }
    }

    fn breaker(&self, connector: ConnectorRole) -> &Mutex<Breaker> {
        let [crm, campaigns, mail] = &self.breakers;
        match connector {
            ConnectorRole::Crm => crm,
            ConnectorRole::Campaigns => campaigns,
            ConnectorRole::Mail => mail,
        }
    }

    fn with<R>(&self, connector: ConnectorRole, f: impl FnOnce(&mut Breaker) -> R) -> R {
        let mut b = self
            .breaker(connector)
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        f(&mut b)
    }

    /// May a row delivered through `connector` go now? `Some(at)`: postpone it to `at`.
    pub fn deny(&self, connector: ConnectorRole, now: Instant) -> Option<Instant> {
        let (admit, state) = self.with(connector, |b| (b.admit(now), b.state(now)));
        if state == State::HalfOpen && admit == Admit::Call {
            tracing::info!(
                connector = connector.as_str(),
                "circuit half-open: letting one delivery through as a probe"
            );
        }
        match admit {
            Admit::Call => None,
            Admit::Wait(at) => Some(at),
        }
    }

    /// Record the outcome of a call to `connector`: `transient` for a service-wide failure
    /// (a [`Verdict::Failure`]: timeout, 5xx, broken connection); anything else proves the
    /// endpoint alive, including a failure that concerns one record only.
    pub fn record(&self, connector: ConnectorRole, transient: bool) {
        let now = Instant::now();
        let (before, after, opened, failures) = self.with(connector, |b| {
            let before = b.state(now);
            let opened = if transient {
                b.failure(now)
            } else {
                b.success();
                false
            };
            (before, b.state(now), opened, b.consecutive_failures())
        });
        let connector = connector.as_str();
        if opened {
            tracing::warn!(
                connector,
                consecutive_failures = failures,
                "circuit open: pausing deliveries through this connector"
            );
        } else if before != State::Closed && after == State::Closed {
            tracing::info!(connector, "circuit closed: the connector answers again");
        }
        let open = if after == State::Closed { 0.0 } else { 1.0 };
        metrics::gauge!("optinsync_circuit_open", "connector" => connector).set(open);
    }

    /// An admitted delivery through `connector` made no call (skipped row, store error).
    pub fn release(&self, connector: ConnectorRole) {
        self.with(connector, Breaker::release);
    }

    pub fn report(&self) -> Vec<CircuitReport> {
        let now = Instant::now();
        ConnectorRole::ALL
            .into_iter()
            .map(|c| {
                self.with(c, |b| CircuitReport {
                    connector: c.as_str(),
                    state: b.state(now),
                    consecutive_failures: b.consecutive_failures(),
                    retry_in_secs: match b.state(now) {
                        State::Open => b.reopen_at.map(|at| (at - now).as_secs()),
                        _ => None,
                    },
                })
            })
            .collect()
    }

    /// Connectors whose breaker is not closed.
    pub fn open(&self) -> Vec<&'static str> {
        self.report()
            .into_iter()
            .filter(|r| r.state != State::Closed)
            .map(|r| r.connector)
            .collect()
    }

    /// Start-up healthchecks passed (set by `run`).
    pub fn set_ready(&self) {
        self.ready.store(true, Ordering::SeqCst);
    }

    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::SeqCst)
    }

    /// Shutdown requested: outbox workers hand claimed rows back instead of starting them.
    pub fn set_stopping(&self) {
        self.stopping.store(true, Ordering::SeqCst);
    }

    pub fn is_stopping(&self) -> bool {
        self.stopping.load(Ordering::SeqCst)
    }
}

impl Default for Circuits {
    fn default() -> Self {
        Self::new(5, Duration::from_secs(30))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const COOL: Duration = Duration::from_secs(30);

    #[test]
    fn opens_after_threshold_consecutive_failures_only() {
        let t0 = Instant::now();
        let mut b = Breaker::new(3, COOL);
        assert!(!b.failure(t0));
        assert!(!b.failure(t0));
        b.success(); // a success in between resets the count
        assert!(!b.failure(t0));
        assert!(!b.failure(t0));
        assert_eq!(b.state(t0), State::Closed);
        assert_eq!(b.admit(t0), Admit::Call);
        assert!(b.failure(t0), "third consecutive failure opens");
        assert_eq!(b.state(t0), State::Open);
        assert_eq!(b.admit(t0 + Duration::from_secs(1)), Admit::Wait(t0 + COOL));
        assert_eq!(b.opened, 1);
    }

    #[test]
    fn half_opens_after_cooldown_with_a_single_probe() {
        let t0 = Instant::now();
        let mut b = Breaker::new(1, COOL);
        assert!(b.failure(t0));
        let later = t0 + COOL;
        assert_eq!(b.state(later), State::HalfOpen);
        assert_eq!(b.admit(later), Admit::Call, "the probe");
        assert_eq!(
            b.admit(later),
            Admit::Wait(later + COOL),
            "no second call while the probe is out"
        );
        b.success();
        assert_eq!(b.state(later), State::Closed);
        assert_eq!(b.admit(later), Admit::Call);
    }

    #[test]
    fn a_failed_probe_reopens_for_a_fresh_cooldown() {
        let t0 = Instant::now();
        let mut b = Breaker::new(2, COOL);
        b.failure(t0);
        b.failure(t0);
        let probe_at = t0 + COOL + Duration::from_secs(5);
        assert_eq!(b.admit(probe_at), Admit::Call);
        assert!(b.failure(probe_at), "a failed probe opens again at once");
        assert_eq!(b.state(probe_at), State::Open);
        assert_eq!(b.admit(probe_at), Admit::Wait(probe_at + COOL));
        assert_eq!(b.opened, 2);
    }

    #[test]
    fn a_released_probe_lets_the_next_call_probe() {
        let t0 = Instant::now();
        let mut b = Breaker::new(1, COOL);
        b.failure(t0);
        let later = t0 + COOL;
        assert_eq!(b.admit(later), Admit::Call);
        b.release();
        assert_eq!(b.admit(later), Admit::Call);
    }

    #[test]
    fn only_service_wide_failures_count_against_the_breaker() {
        let record: Result<(), _> = Err(ConnectorError::record_transient("2101 for this address"));
        assert_eq!(verdict(&record), Verdict::Alive);
        let record_with_wait: Result<(), _> = Err(ConnectorError::Transient {
            message: "not yet".into(),
            retry_after: Some(Duration::from_secs(5)),
            scope: FailureScope::Record,
        });
        assert_eq!(verdict(&record_with_wait), Verdict::Alive);
        let service: Result<(), _> = Err(ConnectorError::transient("HTTP 503"));
        assert_eq!(verdict(&service), Verdict::Failure);
        let throttle: Result<(), _> = Err(ConnectorError::Transient {
            message: "locked".into(),
            retry_after: Some(Duration::from_secs(60)),
            scope: FailureScope::Service,
        });
        assert_eq!(verdict(&throttle), Verdict::Neutral);
        assert_eq!(verdict(&Ok::<(), ConnectorError>(())), Verdict::Alive);
        let refused: Result<(), _> = Err(ConnectorError::permanent("invalid address"));
        assert_eq!(verdict(&refused), Verdict::Alive);
    }

    /// Many per-record failures in a row, then one service failure: the breaker stays
    /// closed (the record answers proved the service alive), so the next record goes on.
    #[test]
    fn a_run_of_record_failures_never_opens_the_circuit() {
        let c = Circuits::new(2, COOL);
        for _ in 0..50 {
            let r: Result<(), _> = Err(ConnectorError::record_transient("2101"));
            let transient = verdict(&r) == Verdict::Failure;
            c.record(ConnectorRole::Campaigns, transient);
        }
        assert!(c.open().is_empty());
        assert!(c.deny(ConnectorRole::Campaigns, Instant::now()).is_none());
        c.record(ConnectorRole::Campaigns, true);
        assert!(
            c.open().is_empty(),
            "one service failure is below the threshold"
        );
        c.record(ConnectorRole::Campaigns, true);
        assert_eq!(c.open(), vec!["campaigns"], "two in a row open it");
    }

    #[test]
    fn circuits_map_row_kinds_to_connectors_and_report() {
        // Which connector each kind of row goes through: `crate::work`'s tests.
        let c = Circuits::new(2, COOL);
        let now = Instant::now();
        c.record(ConnectorRole::Mail, true);
        assert!(c.deny(ConnectorRole::Mail, now).is_none());
        c.record(ConnectorRole::Mail, true);
        assert!(
            c.deny(ConnectorRole::Mail, Instant::now()).is_some(),
            "mail paused"
        );
        assert!(
            c.deny(ConnectorRole::Campaigns, Instant::now()).is_none(),
            "other connectors go on"
        );
        assert_eq!(c.open(), vec!["mail"]);
        c.record(ConnectorRole::Mail, false);
        assert!(c.open().is_empty());
    }
}
