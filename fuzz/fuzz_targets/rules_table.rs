//! Rule table-test files (`*.tests.toml`): any text loads or is an error; never a panic.
#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use optinsync_engine::rules::table;

fn dir() -> &'static tempfile::TempDir {
    static DIR: OnceLock<tempfile::TempDir> = OnceLock::new();
    DIR.get_or_init(|| tempfile::tempdir().expect("temp dir"))
}

fuzz_target!(|data: &[u8]| {
    let path = dir().path().join("fuzz.tests.toml");
    std::fs::write(&path, data).expect("write");
    if let Err(e) = table::load(&path) {
        let _ = e.to_string();
    }
});
