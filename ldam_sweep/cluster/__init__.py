"""The sweep on Ray: planning (layer, block) tasks, the resident worker actor, the driver loop."""
