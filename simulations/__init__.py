"""Scenario scripts, each runnable as ``python -m simulations.<name>``; see README."""
