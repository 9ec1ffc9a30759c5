//! Criterion benchmarks (hashing); filled in with the copy engine.

fn main() {}
