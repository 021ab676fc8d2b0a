"""Escalation benchmark: accuracy of the final answers against the escalation rate."""
