//! MODA SDK: runs an exported bundle with ONNX Runtime on CPU (issue 5).
//!
//! Today it holds what the exporter shares with the SDK: the bundle manifest ([`manifest`]) and
//! finding and loading the ONNX Runtime shared library and building sessions ([`runtime`]).

pub mod manifest;
pub mod runtime;
