"""Pictures of results: PNG grids and the static HTML atlas of a whole sweep."""
