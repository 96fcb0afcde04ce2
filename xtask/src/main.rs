//! Project automation: benchmarks.
fn main() {}
