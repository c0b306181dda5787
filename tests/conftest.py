"""Fixtures for the tests; they live in helpers.py, which test modules import by name (a module
named conftest would clash with bench/conftest.py when both directories run together)."""

from helpers import (_cuda_paths_counted, _shm_clean, _watchdog, env, env_remote,  # noqa: F401
                     fake_acl, fake_cuda, make_env, rng)
