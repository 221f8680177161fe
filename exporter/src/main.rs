//! `exporter`: writes MODA's ONNX bundle (not built yet; see issue 4).

fn main() {
    eprintln!("exporter: not implemented yet (issue 4)");
    std::process::exit(2);
}
