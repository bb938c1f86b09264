//! Per-endpoint call budgets for Zoho Campaigns (the limits on each endpoint's page; README.md, "Zoho Campaigns", "Quotas").
//!
//! Zoho Campaigns counts calls per API and, past a limit, **locks that API for 30 minutes**
//! (10 for the bulk add). Each endpoint here has the documented windows (e.g. `listsubscribe`:
//! 500 per minute, 12,500 per hour, 75,000 per day) and the connector takes a slot from every
//! window before each call; a call that does not fit waits until it does.
//!
//! * Windows slide. Each holds 60 buckets of `length / 60`; a bucket counts until it has left
//!   the window **entirely**, so the count is never lower than Zoho's, whatever its window
//!   alignment (at most 1/60 of a window's throughput is given away for that).
//! * A call is counted when it is sent and moved to the time its answer arrived, so a slow
//!   answer cannot make two calls look further apart than Zoho saw them.
//! * Times are wall-clock milliseconds, so the state ([`Budgets::export`]) stays true across
//!   a restart: the usage of the last day and any lock still running are carried over.

use std::collections::{BTreeMap, VecDeque};
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Buckets per window.
const BUCKETS: i64 = 60;

/// One sliding window: at most `limit` calls per `length_ms`.
#[derive(Debug, Clone)]
pub(crate) struct Window {
    pub limit: u32,
    pub length_ms: i64,
    bucket_ms: i64,
    /// (bucket index, calls), oldest first.
    buckets: VecDeque<(i64, u32)>,
}

impl Window {
    pub fn new(limit: u32, length_ms: i64) -> Self {
        let length_ms = length_ms.max(1);
        Self {
            limit,
            length_ms,
            bucket_ms: (length_ms / BUCKETS).max(1),
            buckets: VecDeque::new(),
        }
    }

    fn prune(&mut self, now: i64) {
        while let Some((idx, _)) = self.buckets.front() {
            // Saturating: bucket indexes may come from saved state (fuzzed).
            if idx.saturating_add(1).saturating_mul(self.bucket_ms)
                <= now.saturating_sub(self.length_ms)
            {
                self.buckets.pop_front();
            } else {
                break;
            }
        }
    }

    pub fn used(&mut self, now: i64) -> u32 {
        self.prune(now);
        self.buckets
            .iter()
            .fold(0u32, |sum, (_, n)| sum.saturating_add(*n))
    }

    /// Milliseconds until one more call fits (0: now).
    fn wait(&mut self, now: i64) -> i64 {
        let used = self.used(now);
        if used < self.limit {
            return 0;
        }
        let need = used.saturating_add(1) - self.limit;
        let mut freed = 0u32;
        for (idx, n) in &self.buckets {
            freed = freed.saturating_add(*n);
            if freed >= need {
                return idx
                    .saturating_add(1)
                    .saturating_mul(self.bucket_ms)
                    .saturating_add(self.length_ms)
                    .saturating_sub(now)
                    .max(1);
            }
        }
        self.length_ms
    }

    fn add(&mut self, at: i64, calls: u32) {
        let idx = at.div_euclid(self.bucket_ms);
        // Keep the buckets ordered; times are nearly always at or after the newest one.
        let pos = self.buckets.iter().rposition(|(i, _)| *i <= idx);
        match pos {
            Some(p) if self.buckets[p].0 == idx => {
                self.buckets[p].1 = self.buckets[p].1.saturating_add(calls);
            }
            Some(p) => self.buckets.insert(p + 1, (idx, calls)),
            None => self.buckets.push_front((idx, calls)),
        }
    }

    fn take(&mut self, at: i64) {
        let idx = at.div_euclid(self.bucket_ms);
        if let Some(b) = self.buckets.iter_mut().find(|(i, _)| *i == idx) {
            b.1 = b.1.saturating_sub(1);
        }
    }
}

/// One endpoint's windows and lock.
#[derive(Debug, Clone)]
pub(crate) struct Endpoint {
    pub windows: Vec<Window>,
    /// How long Zoho locks the endpoint past its limit.
    pub lock_ms: i64,
    pub locked_until: Option<i64>,
    /// Calls waiting for a slot (for the completion estimate in the log).
    pub waiting: usize,
    pub last_wait_log: Option<i64>,
}

/// What to do with the next call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Slot {
    /// Send now; the call was counted at this time.
    Go(i64),
    /// Zoho locked the endpoint: do not call for this long.
    Locked(Duration),
    /// Wait this long, then ask again.
    Wait(Duration),
}

impl Endpoint {
    pub fn new(windows: Vec<Window>, lock_ms: i64) -> Self {
        Self {
            windows,
            lock_ms,
            locked_until: None,
            waiting: 0,
            last_wait_log: None,
        }
    }

    pub fn slot(&mut self, now: i64) -> Slot {
        if let Some(until) = self.locked_until {
            if now < until {
                return Slot::Locked(ms(until.saturating_sub(now)));
            }
            self.locked_until = None;
        }
        let wait = self
            .windows
            .iter_mut()
            .map(|w| w.wait(now))
            .max()
            .unwrap_or(0);
        if wait > 0 {
            return Slot::Wait(ms(wait));
        }
        for w in &mut self.windows {
            w.add(now, 1);
        }
        Slot::Go(now)
    }

    /// The call counted at `sent` got its answer at `done`.
    pub fn settle(&mut self, sent: i64, done: i64) {
        if done <= sent {
            return;
        }
        for w in &mut self.windows {
            w.take(sent);
            w.add(done, 1);
        }
    }

    pub fn lock(&mut self, until: i64) {
        self.locked_until = Some(self.locked_until.map_or(until, |u| u.max(until)));
    }

    /// The slowest sustained rate: (calls, per milliseconds) of the tightest window.
    pub fn tightest(&self) -> Option<(u32, i64)> {
        self.windows
            .iter()
            .map(|w| (w.limit, w.length_ms))
            .min_by(|a, b| (a.0 as f64 / a.1 as f64).total_cmp(&(b.0 as f64 / b.1 as f64)))
    }
}

fn ms(v: i64) -> Duration {
    Duration::from_millis(u64::try_from(v.max(0)).unwrap_or(0))
}

/// Serialised budgets: `{"v":1,"endpoints":{"listsubscribe":{"locked_until":..,"windows":[..]}}}`.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct State {
    pub v: u32,
    pub endpoints: BTreeMap<String, EndpointState>,
    /// Other connector state kept next to the budgets (echo suppression).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub own_removals: BTreeMap<String, Vec<String>>,
}

#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct EndpointState {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub locked_until: Option<i64>,
    pub windows: Vec<WindowState>,
}

#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct WindowState {
    pub length_ms: i64,
    pub bucket_ms: i64,
    /// (bucket index, calls)
    pub buckets: Vec<(i64, u32)>,
}

pub(crate) fn export(
    endpoints: &mut BTreeMap<&'static str, Endpoint>,
    now: i64,
) -> BTreeMap<String, EndpointState> {
    endpoints
        .iter_mut()
        .map(|(name, ep)| {
            let windows = ep
                .windows
                .iter_mut()
                .map(|w| {
                    w.prune(now);
                    WindowState {
                        length_ms: w.length_ms,
                        bucket_ms: w.bucket_ms,
                        buckets: w.buckets.iter().copied().filter(|(_, n)| *n > 0).collect(),
                    }
                })
                .collect();
            (
                (*name).to_owned(),
                EndpointState {
                    locked_until: ep.locked_until.filter(|u| *u > now),
                    windows,
                },
            )
        })
        .collect()
}

/// Add saved usage to the current budgets. Windows whose length or bucket size changed
/// (other settings) are matched by length and re-bucketed conservatively (a saved bucket
/// counts at its end).
pub(crate) fn import(
    endpoints: &mut BTreeMap<&'static str, Endpoint>,
    saved: &BTreeMap<String, EndpointState>,
) {
    for (name, state) in saved {
        let Some(ep) = endpoints.get_mut(name.as_str()) else {
            continue;
        };
        if let Some(until) = state.locked_until {
            ep.lock(until);
        }
        for w in &mut ep.windows {
            let Some(saved) = state.windows.iter().find(|s| s.length_ms == w.length_ms) else {
                continue;
            };
            for (idx, n) in &saved.buckets {
                let end = idx
                    .saturating_add(1)
                    .saturating_mul(saved.bucket_ms.max(1))
                    .saturating_sub(1);
                w.add(end, *n);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Found by the `campaigns_answer` fuzz target: saved state with extreme bucket indexes
    /// and counts overflowed (a panic in debug builds, garbage budgets in release).
    #[test]
    fn import_of_extreme_saved_state_does_not_overflow() {
        let mut eps = BTreeMap::new();
        eps.insert("x", Endpoint::new(vec![Window::new(2, 1000)], 500));
        let saved: BTreeMap<String, EndpointState> = serde_json::from_str(
            r#"{"x": {"windows": [{"length_ms": 1000, "bucket_ms": 9223372036854775807,
                "buckets": [[9223372036854775807, 4294967295], [9223372036854775806, 4294967295],
                            [-9223372036854775808, 4294967295]]}]}}"#,
        )
        .expect("state");
        import(&mut eps, &saved);
        import(&mut eps, &saved);
        let ep = eps.get_mut("x").expect("endpoint");
        let _ = ep.slot(0);
        let _ = ep.slot(i64::MAX);
        let _ = export(&mut eps, i64::MAX);
        let _ = export(&mut eps, i64::MIN);
    }

    #[test]
    fn window_waits_until_the_oldest_bucket_has_left() {
        let mut ep = Endpoint::new(vec![Window::new(3, 600)], 1000);
        assert_eq!(ep.slot(0), Slot::Go(0));
        assert_eq!(ep.slot(15), Slot::Go(15));
        assert_eq!(ep.slot(30), Slot::Go(30));
        // Bucket 0 covers [0, 10); it leaves the window at 610.
        assert_eq!(ep.slot(40), Slot::Wait(Duration::from_millis(570)));
        assert_eq!(ep.slot(610), Slot::Go(610));
    }

    #[test]
    fn lock_pauses_and_export_import_carries_usage() {
        let mut eps = BTreeMap::new();
        eps.insert("x", Endpoint::new(vec![Window::new(2, 1000)], 500));
        let ep = eps.get_mut("x").map(|e| {
            assert_eq!(e.slot(100), Slot::Go(100));
            e.lock(900);
            e.slot(200)
        });
        assert_eq!(ep, Some(Slot::Locked(Duration::from_millis(700))));
        let saved = export(&mut eps, 300);
        let mut fresh = BTreeMap::new();
        fresh.insert("x", Endpoint::new(vec![Window::new(2, 1000)], 500));
        import(&mut fresh, &saved);
        let e = fresh.get_mut("x").map(|e| (e.slot(950), e.slot(960)));
        assert_eq!(
            e,
            Some((
                Slot::Go(950),
                Slot::Wait(Duration::from_millis(1000 + 112 - 960))
            ))
        );
    }
}
