//! The model core (`moda_models`) against `transformers`: one test binary, a module per model
//! or piece (linking each test binary costs more than its tests take to run).

mod clip;
mod moda;
mod opt;
mod preprocess;
mod tokenizer;
