"""Reliability harness for calibserve: fuzzing, hostile clients, feedback abuse, sustained load,
fault injection and merge crash safety. `python -m benchmarks.reliability --quick` runs them all.
"""
