"""Pictures of results: PNG grids now, the static HTML atlas later."""
