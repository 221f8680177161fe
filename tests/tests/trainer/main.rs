//! `trainer`: its data side (synthetic catalogs, catalog reading, splits, the embedding cache)
//! and its training side (steps against PyTorch, checkpoints, resuming, evaluation), in one
//! test binary.

mod data;
mod fit;
