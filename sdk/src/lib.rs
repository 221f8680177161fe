//! MODA SDK: runs an exported bundle with ONNX Runtime on CPU (not built yet; see issue 5).
