//! `trainer`: fits MODA's projector and OPT decoder in candle (not built yet; see issue 3).

fn main() {
    eprintln!("trainer: not implemented yet (issue 3)");
    std::process::exit(2);
}
