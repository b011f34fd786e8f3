"""Fast scale-out (paper section 6): warm template + fork, pre-warmed TEs, DRAM pre-loading, autoscaler.

Not built yet; see issue 5. Until then every TE starts cold (scheduler/te.py)."""
