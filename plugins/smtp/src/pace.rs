//! Adaptive pacing: slow down when the relay says "try later", speed up while it accepts.
//!
//! Additive increase, multiplicative decrease (as TCP does with its window): a "try later"
//! answer (421, 450, 451, 452, 454) or a refused connection halves the send rate (never below
//! [`FLOOR`] mails/s); each accepted message raises it by [`STEP`] mails/s. Unpaced until the
//! relay first pushes back, and unpaced again once the rate has climbed past [`RELEASE`]: a
//! relay that accepts everything is never slowed. `rate_per_minute`, when set, is a ceiling on
//! top. Nothing is dropped or bounced on a temporary answer: the message goes back to the
//! outbox and is retried there.

use std::sync::Mutex;
use std::time::{Duration, Instant};

/// The slowest the pacer goes, in mails per second (one mail every 2 s).
pub const FLOOR: f64 = 0.5;
/// What each accepted message adds to the rate, in mails per second.
pub const STEP: f64 = 1.0;
/// Above this rate (mails per second) the pacer stops pacing.
pub const RELEASE: f64 = 2000.0;

/// What the relay's answer to one attempt says about its load.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Answer {
    /// The relay took the message.
    Accepted,
    /// "Try later": 421, 450, 451, 452, 454, or the connection was refused.
    Busy,
    /// Anything else (a permanent refusal, a timeout): says nothing about the relay's load.
    Other,
}

impl Answer {
    /// Classify an SMTP reply code (`None`: no reply, e.g. the connection was refused).
    pub fn of_code(code: Option<u16>, connect_refused: bool) -> Self {
        match code {
            Some(421 | 450 | 451 | 452 | 454) => Answer::Busy,
            Some(_) => Answer::Other,
            None if connect_refused => Answer::Busy,
            None => Answer::Other,
        }
    }
}

#[derive(Debug)]
struct State {
    /// Mails per second while pacing; `None`: not pacing.
    rate: Option<f64>,
    /// The earliest the next message may start.
    next: Instant,
    /// Smoothed gap between starts, to know the speed the relay pushed back at.
    gap: Option<Duration>,
    last_start: Option<Instant>,
}

/// The pacer of one transport (shared by its pooled connections).
#[derive(Debug)]
pub struct Pacer {
    ceiling: Option<f64>,
    state: Mutex<State>,
}

impl Pacer {
    /// `ceiling_per_minute`: the configured `rate_per_minute`, if any.
    pub fn new(ceiling_per_minute: Option<u32>, now: Instant) -> Self {
        Self {
            ceiling: ceiling_per_minute.map(|c| f64::from(c) / 60.0),
            state: Mutex::new(State {
                rate: None,
                next: now,
                gap: None,
                last_start: None,
            }),
        }
    }

    /// The current paced rate in mails per second (`None`: unpaced, up to the ceiling).
    pub fn rate(&self) -> Option<f64> {
        self.lock().rate
    }

    /// How long to wait before starting a message at `now`; the start is booked.
    pub fn reserve(&self, now: Instant) -> Duration {
        let mut s = self.lock();
        let limit = match (s.rate, self.ceiling) {
            (Some(r), Some(c)) => Some(r.min(c)),
            (r, c) => r.or(c),
        };
        let start = s.next.max(now);
        if let Some(last) = s.last_start {
            let gap = start.saturating_duration_since(last);
            s.gap = Some(match s.gap {
                // Smoothed over about eight messages.
                Some(g) => g.mul_f64(0.875) + gap.mul_f64(0.125),
                None => gap,
            });
        }
        s.last_start = Some(start);
        s.next = match limit {
            Some(l) => start + Duration::from_secs_f64(1.0 / l.max(FLOOR)),
            None => start,
        };
        start.saturating_duration_since(now)
    }

    /// Learn from the relay's answer to one attempt. Returns the new paced rate when it changed
    /// by a halving (for the log line), `None` otherwise.
    pub fn observe(&self, answer: Answer) -> Option<f64> {
        let mut s = self.lock();
        match answer {
            Answer::Accepted => {
                if let Some(r) = s.rate {
                    let up = r + STEP;
                    s.rate = (up < RELEASE).then_some(up);
                }
                None
            }
            Answer::Busy => {
                // The speed it pushed back at: the paced rate, else what was measured.
                let current = s.rate.unwrap_or_else(|| {
                    s.gap
                        .filter(|g| !g.is_zero())
                        .map_or(2.0 * FLOOR, |g| 1.0 / g.as_secs_f64())
                });
                let halved = (current / 2.0).max(FLOOR);
                s.rate = Some(halved);
                Some(halved)
            }
            Answer::Other => None,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // A panic while holding this lock leaves plain numbers behind: keep using them.
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn busy_answers_halve_the_rate_down_to_the_floor_and_accepts_raise_it() {
        let t0 = Instant::now();
        let p = Pacer::new(None, t0);
        // Unpaced: no wait, however many start at once.
        assert_eq!(p.reserve(t0), Duration::ZERO);
        assert_eq!(p.reserve(t0 + Duration::from_millis(10)), Duration::ZERO);
        assert_eq!(p.rate(), None);
        // Pushed back at ~100/s (10 ms gaps): paced at half of that.
        let r = p.observe(Answer::Busy).expect("halved");
        assert!((r - 50.0).abs() < 1.0, "{r}");
        let r2 = p.observe(Answer::Busy).expect("halved");
        assert!((r2 - r / 2.0).abs() < 1e-9, "{r2}");
        for _ in 0..20 {
            p.observe(Answer::Busy);
        }
        assert_eq!(p.rate(), Some(FLOOR));
        p.observe(Answer::Accepted);
        assert_eq!(p.rate(), Some(FLOOR + STEP));
        p.observe(Answer::Other);
        assert_eq!(p.rate(), Some(FLOOR + STEP));
    }

    #[test]
    fn a_paced_transport_spaces_its_starts_and_lets_go_past_the_release_rate() {
        let t0 = Instant::now();
        let p = Pacer::new(None, t0);
        p.reserve(t0);
        p.observe(Answer::Busy); // no gap measured yet: 2 × FLOOR halved = FLOOR
        assert_eq!(p.rate(), Some(FLOOR));
        assert_eq!(p.reserve(t0), Duration::ZERO);
        // The next start waits 1 / FLOOR = 2 s.
        assert_eq!(p.reserve(t0), Duration::from_secs(2));
        let accepts = (RELEASE / STEP) as usize + 1;
        for _ in 0..accepts {
            p.observe(Answer::Accepted);
        }
        assert_eq!(p.rate(), None, "released");
    }

    #[test]
    fn the_configured_rate_is_a_ceiling() {
        let t0 = Instant::now();
        let p = Pacer::new(Some(60), t0); // one a second
        assert_eq!(p.reserve(t0), Duration::ZERO);
        assert_eq!(p.reserve(t0), Duration::from_secs(1));
        assert_eq!(p.reserve(t0), Duration::from_secs(2));
    }

    #[test]
    fn try_later_codes_and_refused_connections_are_busy() {
        for code in [421, 450, 451, 452, 454] {
            assert_eq!(Answer::of_code(Some(code), false), Answer::Busy, "{code}");
        }
        assert_eq!(Answer::of_code(None, true), Answer::Busy);
        assert_eq!(Answer::of_code(Some(550), false), Answer::Other);
        assert_eq!(Answer::of_code(Some(503), false), Answer::Other);
        assert_eq!(Answer::of_code(None, false), Answer::Other);
    }
}
