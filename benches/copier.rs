//! Criterion benchmarks (copier); filled in with the copy engine.

fn main() {}
