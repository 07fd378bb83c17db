"""The edgerun scheduler: `edgerun serve` and the `edgerun` command (see README.md here)."""
