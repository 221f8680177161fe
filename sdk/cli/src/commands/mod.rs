//! The commands' work, one module each: `job` (`describe` and `embed`), `bench`, `info` and
//! `merge`. Their arguments and `--help` are in `main.rs`, beside the dispatch.

pub(crate) mod bench;
pub(crate) mod info;
pub(crate) mod job;
pub(crate) mod merge;
