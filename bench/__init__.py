"""Benchmarks: each module measures one figure side by side with its reference or limit."""
