//! What the engine keeps in memory about its lists' waves between store reads: the paused
//! flag of each list (read at most once a second, so another instance's pause or resume is
//! seen within it) and the mail outcomes counted since they were last written. The waves
//! themselves (plans, stop rules, pause and resume) are [`crate::waves`]; this module is
//! apart so that the engine can hold it without depending on them.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use optinsync_plugin_api::BounceClass;

use crate::store::MailOutcomes;

/// What became of one mail, as the stop rules count it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Sent,
    Bounce(BounceClass),
    Complaint,
}

/// How long a list's paused flag is taken from memory.
pub const PAUSE_CACHE: Duration = Duration::from_secs(1);

/// The pause flags and the unwritten outcome counts.
#[derive(Debug, Default)]
pub struct WaveMemory {
    paused: Mutex<HashMap<String, (Instant, bool)>>,
    /// Per list and slot.
    tally: Mutex<BTreeMap<(String, i64), MailOutcomes>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl WaveMemory {
    /// The list's paused flag if read less than [`PAUSE_CACHE`] ago.
    pub fn paused_recently(&self, list: &str) -> Option<bool> {
        lock(&self.paused)
            .get(list)
            .filter(|(at, _)| at.elapsed() < PAUSE_CACHE)
            .map(|(_, p)| *p)
    }

    pub fn set_paused(&self, list: &str, paused: bool) {
        lock(&self.paused).insert(list.to_owned(), (Instant::now(), paused));
    }

    /// Count one outcome of `list` in `slot`.
    pub fn count(&self, list: &str, slot: i64, outcome: Outcome) {
        let mut tally = lock(&self.tally);
        let o = tally.entry((list.to_owned(), slot)).or_default();
        match outcome {
            Outcome::Sent => o.sent += 1,
            Outcome::Bounce(BounceClass::Hard) => o.hard += 1,
            Outcome::Bounce(BounceClass::Soft) => o.soft += 1,
            Outcome::Bounce(BounceClass::Policy) => o.policy += 1,
            Outcome::Complaint => o.complaints += 1,
        }
    }

    /// Everything counted so far, as `(list, slot, outcomes)`, emptying the tally.
    pub fn take_tally(&self) -> Vec<(String, i64, MailOutcomes)> {
        std::mem::take(&mut *lock(&self.tally))
            .into_iter()
            .map(|((list, slot), o)| (list, slot, o))
            .collect()
    }

    /// Put back counts that could not be written.
    pub fn put_back(&self, rows: Vec<(String, i64, MailOutcomes)>) {
        let mut tally = lock(&self.tally);
        for (list, slot, o) in rows {
            tally.entry((list, slot)).or_default().add(&o);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_add_up_per_list_and_slot_and_survive_a_failed_write() {
        let m = WaveMemory::default();
        m.count("news", 7, Outcome::Sent);
        m.count("news", 7, Outcome::Sent);
        m.count("news", 7, Outcome::Bounce(BounceClass::Policy));
        m.count("news", 8, Outcome::Complaint);
        let rows = m.take_tally();
        assert_eq!(rows.len(), 2);
        assert_eq!((rows[0].2.sent, rows[0].2.policy), (2, 1));
        assert!(m.take_tally().is_empty());
        m.put_back(rows);
        m.count("news", 7, Outcome::Bounce(BounceClass::Hard));
        let again = m.take_tally();
        assert_eq!((again[0].2.sent, again[0].2.hard), (2, 1));
        assert_eq!(again[1].2.complaints, 1);
    }
}
