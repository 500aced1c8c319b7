"""The sweep on Ray: the resident worker actor and the driver loop (planning is ldam_sweep.planning)."""
