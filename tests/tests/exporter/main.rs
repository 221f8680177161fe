//! `exporter onnx`: bundles of the fixture models and of a trained model, run in ONNX Runtime
//! against candle and `transformers`, in one test binary.

mod bundle;
mod trained;
