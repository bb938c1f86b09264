//! optinsync's pure core: what consent is and how it may change, and the proof of it.
//!
//! Everything here is plain data and functions — no async runtime, no database, no HTTP, no
//! scripting — so it can be reasoned about (and property-tested, and fuzzed) on its own:
//!
//! - [`consent`]: the consent state machine; the only place a transition is decided.
//! - [`ledger`]: event sealing and hash-chain verification.
//! - [`email`]: address canonicalisation (NFC + UTS-46) and the keys suppression is hashed on.
//! - [`tokens`]: signed confirm/unsubscribe link tokens and keyed address hashes.
//! - [`untrusted`]: escaping and cleaning of strings that came from outside.
pub mod consent;
pub mod email;
pub mod ledger;
pub mod tokens;
pub mod untrusted;
