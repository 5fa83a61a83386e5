"""Suite-wide fixtures.

Speed only: one persistent JAX compilation cache for the whole test session, in a
fresh temporary directory, also exported through the environment so that the
``scripts/run.py`` subprocesses of the CLI tests read and fill the same cache. Many
tests build the same tiny configs in new closures (and the CLI tests re-run in a new
process what an in-process test already compiled), so XLA compiles each program
once per session instead of once per test. The cache starts empty on every run, so
no result can depend on an earlier session.
"""

import os

import jax
import pytest

_CACHE_FLAGS = {
    "jax_compilation_cache_dir": None,  # the session's temporary directory
    "jax_persistent_cache_min_compile_time_secs": 0.0,
    "jax_persistent_cache_min_entry_size_bytes": 0,
}
_CACHE_ENV = {
    "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
    "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0",
}


@pytest.fixture(scope="session", autouse=True)
def compilation_cache(tmp_path_factory):
    """The session's compilation-cache directory (a ``str``)."""
    from jax.experimental.compilation_cache import compilation_cache as cc

    path = str(tmp_path_factory.mktemp("jax_cache"))
    saved_flags = {name: getattr(jax.config, name) for name in _CACHE_FLAGS}
    env = dict(_CACHE_ENV, JAX_COMPILATION_CACHE_DIR=path)
    saved_env = {name: os.environ.get(name) for name in env}
    for name, value in _CACHE_FLAGS.items():
        jax.config.update(name, path if value is None else value)
    os.environ.update(env)
    cc.reset_cache()
    yield path
    for name, value in saved_flags.items():
        jax.config.update(name, value)
    for name, value in saved_env.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value
    cc.reset_cache()
