"""Tests of the benchmarks and the reliability drills themselves (collected with tests/)."""
