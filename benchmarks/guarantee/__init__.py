"""Certified escalation thresholds on the demo and a real model: validity and power (issue 29)."""
