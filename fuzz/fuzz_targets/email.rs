//! Address normalisation: never panics; a normalised address is trimmed, lower-case, has
//! one `@`, is at most 254 characters and normalises to itself; its mask hides the local part.
#![no_main]

use libfuzzer_sys::fuzz_target;
use optinsync_engine::email;

fuzz_target!(|data: &[u8]| {
    let raw = String::from_utf8_lossy(data);
    if let Ok(n) = email::normalise(&raw) {
        assert_eq!(email::normalise(&n).as_ref(), Ok(&n));
        assert_eq!(n.trim(), n);
        assert_eq!(n.matches('@').count(), 1);
        assert!(n.chars().count() <= 254);
        assert_eq!(n.to_lowercase(), n);
        assert!(email::mask(&n).contains("***@"));
    }
});
