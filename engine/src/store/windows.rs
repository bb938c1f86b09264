//! Quota window arithmetic: each window is 60 buckets of `length / 60`; a bucket counts until
//! it has left the window entirely, so the count is never lower than the vendor's sliding
//! count. The SQL in `sql.rs` stores the buckets; [`crate::quota`] is the connectors' handle.

use std::time::Duration;

use optinsync_plugin_api::QuotaWindow;

/// Buckets per window.
pub const BUCKETS: i64 = 60;

/// Bucket length of a window (at least 1 ms).
pub fn bucket_ms(w: &QuotaWindow) -> i64 {
    (w.length_ms.max(1) / BUCKETS).max(1)
}

/// The oldest bucket index that still overlaps the window ending at `now`.
pub fn first_live_bucket(w: &QuotaWindow, now: i64) -> i64 {
    now.saturating_sub(w.length_ms.max(1))
        .div_euclid(bucket_ms(w))
}

/// Calls counted in `buckets` (live ones, as `(index, calls)`).
pub fn used(buckets: &[(i64, i64)]) -> u32 {
    let sum: i64 = buckets.iter().map(|(_, n)| (*n).max(0)).sum();
    u32::try_from(sum).unwrap_or(u32::MAX)
}

/// Milliseconds until one more call fits in `w` (0: now). `buckets` are the live buckets,
/// oldest first.
pub fn wait_ms(buckets: &[(i64, i64)], w: &QuotaWindow, now: i64) -> i64 {
    let used = used(buckets);
    if used < w.limit {
        return 0;
    }
    let need = i64::from(used.saturating_add(1) - w.limit);
    let bm = bucket_ms(w);
    let mut freed = 0i64;
    for (idx, n) in buckets {
        freed = freed.saturating_add((*n).max(0));
        if freed >= need {
            return idx
                .saturating_add(1)
                .saturating_mul(bm)
                .saturating_add(w.length_ms)
                .saturating_sub(now)
                .max(1);
        }
    }
    w.length_ms.max(1)
}

/// Milliseconds as a [`Duration`] (negative: zero).
pub fn ms(v: i64) -> Duration {
    Duration::from_millis(u64::try_from(v.max(0)).unwrap_or(0))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wait_until_the_oldest_bucket_has_left() {
        // 3 per 600 ms: buckets of 10 ms. Bucket 0 leaves the window at 610.
        let w = QuotaWindow {
            limit: 3,
            length_ms: 600,
        };
        assert_eq!(wait_ms(&[(0, 2)], &w, 40), 0);
        assert_eq!(wait_ms(&[(0, 2), (1, 1)], &w, 40), 570);
        assert_eq!(first_live_bucket(&w, 610), 1);
        assert_eq!(first_live_bucket(&w, 609), 0);
        assert_eq!(wait_ms(&[(0, 5)], &w, 40), 570);
    }
}
