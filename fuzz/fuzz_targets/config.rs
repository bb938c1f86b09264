//! `config.toml`: any text is a config or a config error; never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use optinsync_engine::config::LoadedConfig;

fuzz_target!(|data: &[u8]| {
    let Ok(source) = std::str::from_utf8(data) else {
        return;
    };
    // Templates from disk would make each run read the file system; the fuzzer keeps
    // whatever it writes, so only the built-in set is used.
    if source.contains("templates") {
        return;
    }
    match LoadedConfig::from_str(source, std::path::Path::new("/nonexistent/config.toml")) {
        Ok(c) => {
            assert!(c.config.tokens.secret.len() >= 32);
            assert!(!c.config.lists.is_empty());
            let printed = format!("{c:?}");
            assert!(
                !printed.contains(&c.config.tokens.secret),
                "secret in Debug"
            );
        }
        Err(e) => {
            let _ = e.to_string();
        }
    }
});
