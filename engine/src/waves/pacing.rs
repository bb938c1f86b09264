//! The arithmetic of a sending plan, pure: plan days and slots, the warm-up ramp, how much of
//! a day's cap may be out by a given moment, and the recipient-domain buckets.

use chrono::{DateTime, TimeZone as _, Utc};

use crate::config::{KindPlan, SendingConfig};

/// Plan days and the sending hours of one list.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PlanClock {
    day_ms: i64,
    /// Start and end of the sending hours in ms into a plan day.
    hours: Option<(i64, i64)>,
}

impl PlanClock {
    pub fn of(s: &SendingConfig) -> Self {
        Self {
            day_ms: i64::try_from(s.day().as_millis())
                .unwrap_or(86_400_000)
                .max(1000),
            hours: None,
        }
        .with_hours(s)
    }

    fn with_hours(mut self, s: &SendingConfig) -> Self {
        let at = |minutes: u32| i64::from(minutes) * self.day_ms / 1440;
        self.hours = s.hours.map(|h| (at(h.start), at(h.end)));
        self
    }

    /// Whole plan days since the Unix epoch (UTC days with the default `day_length`).
    pub fn day(&self, now: DateTime<Utc>) -> i64 {
        now.timestamp_millis().div_euclid(self.day_ms)
    }

    /// A slot is a 24th of a plan day (an hour of a real day): the stop rules' resolution.
    pub fn slot_ms(&self) -> i64 {
        (self.day_ms / 24).max(1)
    }

    pub fn slot(&self, now: DateTime<Utc>) -> i64 {
        now.timestamp_millis().div_euclid(self.slot_ms())
    }

    /// Slots in `window`, at least one.
    pub fn slots_in(&self, window: std::time::Duration) -> i64 {
        (i64::try_from(window.as_millis()).unwrap_or(i64::MAX) / self.slot_ms()).max(1)
    }

    /// When plan day `day` starts.
    pub fn day_start(&self, day: i64) -> DateTime<Utc> {
        Utc.timestamp_millis_opt(day.saturating_mul(self.day_ms))
            .single()
            .unwrap_or(DateTime::<Utc>::MAX_UTC)
    }

    pub fn day_length(&self) -> chrono::Duration {
        chrono::Duration::milliseconds(self.day_ms)
    }

    /// The share of the day's cap that may be out by `now`: 0 before the sending hours,
    /// rising evenly through them, 1 from their end (the whole day without hours).
    pub fn progress(&self, now: DateTime<Utc>) -> f64 {
        let into = now.timestamp_millis().rem_euclid(self.day_ms);
        match self.hours {
            None => 1.0,
            Some((start, end)) => {
                ((into - start) as f64 / (end - start).max(1) as f64).clamp(0.0, 1.0)
            }
        }
    }

    /// Whether `now` lies in the sending hours (always, without hours).
    pub fn in_hours(&self, now: DateTime<Utc>) -> bool {
        let into = now.timestamp_millis().rem_euclid(self.day_ms);
        self.hours
            .is_none_or(|(start, end)| (start..end).contains(&into))
    }
}

/// The cap on day `n` of a plan (day 0: its first day): the warm-up ramp up to `daily_cap`.
pub fn day_cap(plan: &KindPlan, n: i64) -> u32 {
    match plan.warmup_start {
        None => plan.daily_cap,
        Some(start) => {
            let n = i32::try_from(n.clamp(0, 1000)).unwrap_or(1000);
            let ramp = f64::from(start) * plan.warmup_factor.powi(n);
            if ramp >= f64::from(plan.daily_cap) {
                plan.daily_cap
            } else {
                ramp.floor() as u32
            }
        }
    }
}

/// How many of `cap` may be out once `progress` of the sending hours went by.
pub fn allowed(cap: u32, progress: f64) -> i64 {
    (f64::from(cap) * progress.clamp(0.0, 1.0)).ceil() as i64
}

/// Domains a mailbox provider answers for under one reputation, keyed by the domain an
/// operator writes in a plan.
const FAMILIES: &[(&str, &[&str])] = &[
    ("gmail.com", &["gmail.com", "googlemail.com"]),
    (
        "outlook.com",
        &[
            "outlook.com",
            "hotmail.com",
            "live.com",
            "msn.com",
            "outlook.de",
            "hotmail.de",
            "hotmail.co.uk",
            "hotmail.fr",
            "live.de",
            "live.co.uk",
        ],
    ),
    (
        "yahoo.com",
        &[
            "yahoo.com",
            "ymail.com",
            "rocketmail.com",
            "aol.com",
            "yahoo.de",
            "yahoo.co.uk",
            "yahoo.fr",
            "yahoo.es",
        ],
    ),
];

/// The domain bucket an address counts under in `plan`: the domain itself if the plan names
/// it, else its provider's family domain if the plan names that, else `default` if the plan
/// has one; `None` when the plan caps no domain this address falls under.
pub fn domain_bucket(plan: &KindPlan, address: &str) -> Option<String> {
    if plan.domains.is_empty() {
        return None;
    }
    let domain = address.rsplit_once('@').map_or("", |(_, d)| d);
    if plan.domains.contains_key(domain) {
        return Some(domain.to_owned());
    }
    for (key, members) in FAMILIES {
        if members.contains(&domain) && plan.domains.contains_key(*key) {
            return Some((*key).to_owned());
        }
    }
    plan.domains
        .contains_key("default")
        .then(|| "default".to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::SendingHours;

    fn plan(cap: u32, start: Option<u32>) -> KindPlan {
        KindPlan {
            daily_cap: cap,
            warmup_start: start,
            warmup_factor: 1.5,
            domains: Default::default(),
        }
    }

    #[test]
    fn the_warm_up_ramps_to_the_cap() {
        let p = plan(2000, Some(500));
        let caps: Vec<u32> = (0..6).map(|n| day_cap(&p, n)).collect();
        assert_eq!(caps, [500, 750, 1125, 1687, 2000, 2000]);
        assert_eq!(day_cap(&plan(300, None), 0), 300);
        assert_eq!(day_cap(&p, 100_000), 2000);
    }

    #[test]
    fn a_days_cap_is_spread_over_the_sending_hours() {
        let s = SendingConfig {
            hours: Some(SendingHours::parse("08:00-20:00").expect("hours")),
            ..SendingConfig::default()
        };
        let clock = PlanClock::of(&s);
        let at = |h: u32, m: u32| {
            Utc.with_ymd_and_hms(2026, 12, 7, h, m, 0)
                .single()
                .expect("time")
        };
        assert_eq!(clock.progress(at(7, 59)), 0.0);
        assert!(!clock.in_hours(at(7, 59)));
        assert_eq!(clock.progress(at(14, 0)), 0.5);
        assert!(clock.in_hours(at(14, 0)));
        assert_eq!(clock.progress(at(20, 0)), 1.0);
        assert!(!clock.in_hours(at(20, 0)));
        assert_eq!(allowed(1000, clock.progress(at(14, 0))), 500);
        assert_eq!(allowed(1000, clock.progress(at(8, 1))), 2);
        // Without hours the whole cap is there from midnight.
        let all_day = PlanClock::of(&SendingConfig::default());
        assert_eq!(all_day.progress(at(0, 0)), 1.0);
        assert_eq!(
            all_day.day(at(0, 0)) + 1,
            all_day.day(at(0, 0) + chrono::Duration::days(1))
        );
        assert_eq!(all_day.day_start(all_day.day(at(14, 0))), at(0, 0));
        assert_eq!(all_day.slot(at(14, 0)) - all_day.slot(at(0, 0)), 14);
    }

    #[test]
    fn addresses_fall_into_their_providers_bucket() {
        let mut p = plan(100, None);
        assert_eq!(domain_bucket(&p, "ann@gmail.com"), None);
        p.domains.insert("gmail.com".into(), 10);
        p.domains.insert("outlook.com".into(), 10);
        assert_eq!(
            domain_bucket(&p, "ann@googlemail.com").as_deref(),
            Some("gmail.com")
        );
        assert_eq!(
            domain_bucket(&p, "ann@hotmail.com").as_deref(),
            Some("outlook.com")
        );
        assert_eq!(domain_bucket(&p, "ann@example.org"), None);
        p.domains.insert("default".into(), 50);
        assert_eq!(
            domain_bucket(&p, "ann@example.org").as_deref(),
            Some("default")
        );
        assert_eq!(
            domain_bucket(&p, "ann@yahoo.com").as_deref(),
            Some("default")
        );
        p.domains.insert("example.org".into(), 5);
        assert_eq!(
            domain_bucket(&p, "ann@example.org").as_deref(),
            Some("example.org")
        );
    }
}
