"""Scenario scripts, each runnable as ``python -m shoal.simulations.<name>``; see README."""
