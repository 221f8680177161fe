//! What the `moda-sdk` command line runs over the SDK library (`moda_sdk`): [`catalog`] jobs
//! (inputs from folders and CSVs, shards, the resumable JSON Lines output; [`csv_out`] for
//! `describe --format csv`), the [`bench`](mod@bench)mark,
//! `--shard auto` from a scheduler's environment ([`shard`]), the [`merge`] of a job's shard
//! outputs and embeddings as a NumPy array ([`npy`]). A program that embeds MODA needs none of
//! them; it links `moda_sdk` alone.

pub mod bench;
pub mod catalog;
pub mod csv_out;
pub mod merge;
pub mod npy;
pub mod shard;
