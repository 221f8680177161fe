//! What the `moda-sdk` command line runs over the SDK library (`moda_sdk`): [`catalog`] jobs
//! (inputs from folders and CSVs, shards, the resumable JSON Lines output) and the [`bench`]mark.
//! A program that embeds MODA needs neither; it links `moda_sdk` alone.

pub mod bench;
pub mod catalog;
