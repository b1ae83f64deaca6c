"""The application: the CLI, the stage functions that read and write run folders, the main job,
sweeps, the bench, and the named models."""
