"""Performance benchmarks of asbatch: `python -m benchmarks` (see README.md)."""
