"""Test scaffolding that is not the simulator: pytest fixtures, real local test users and
a flock probe."""
