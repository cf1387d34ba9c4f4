"""`plum bench ...`: benchmarks that write JSON under ops/bench/results/ and a README table."""
