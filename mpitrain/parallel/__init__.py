"""Model parallelism on one process grid: the grid, pipeline stages and schedules, layout maps."""
