"""Run orchestration: sessions, the event log, stages, the pipeline, the runner, sweeps and grids."""
