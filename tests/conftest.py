"""Fixtures that every test module shares, and the ``runtime`` parameter (runtime_params.py)."""

from __future__ import annotations

import ctypes
import faulthandler
import itertools
import os
from typing import List, Optional

import numpy as np
import pytest

from llmdist import LLMRole

from .decode_procs import Cleanup
from .helpers import Env, cuda_library, env_ctx, llmdist_shm_names
from .pull_push_routes import _ids
from .runtime_params import (  # noqa: F401  (hooks)
    DELEGATE,
    process_runtime,
    pytest_collection_modifyitems,
    pytest_configure,
    pytest_generate_tests,
    pytest_runtest_logreport,
    pytest_runtest_protocol,
)


@pytest.fixture(autouse=True)
def runtime(request) -> str:
    """The runtime this test runs on (runtime_params.RUNTIMES); a test of a module marked
    ``all_runtimes`` runs once per runtime, in this process or in a child for that runtime."""
    own = process_runtime()
    param = getattr(request, "param", own)
    assert param == own, f"a test for the {param} runtime ran in a process for {own}"
    return own


@pytest.fixture(autouse=True)
def _watchdog():
    """A hung test dumps every thread's stack and ends the run instead of hanging CI."""
    faulthandler.dump_traceback_later(90, exit=True)
    yield
    faulthandler.cancel_dump_traceback_later()


@pytest.fixture(autouse=True)
def _shm_clean():
    """llmdist shares memory as memfds, which have no name: a test must leave nothing of
    llmdist's in /dev/shm."""
    before = llmdist_shm_names()
    yield
    made = llmdist_shm_names() - before
    assert not made, f"llmdist made named shared memory objects in /dev/shm: {sorted(made)}"


@pytest.fixture(scope="session", autouse=True)
def _cuda_paths_counted():
    """With LLMDIST_EXPECT_CUDA_PATHS=1 (a run of the whole transfer suite on the fake CUDA
    runtime), the run fails unless it drove both device copy paths: the copy kernel (device to
    device, unless LLMDIST_DEVICE_COPY=dma) and DMA (to and from host)."""
    yield
    lib = cuda_library()
    if lib is None or os.environ.get("LLMDIST_EXPECT_CUDA_PATHS") != "1":
        return
    lib.fake_cuda_calls.restype = ctypes.c_long
    launches = lib.fake_cuda_calls(b"cudaLaunchKernel")
    dma = lib.fake_cuda_calls(b"cudaMemcpyBatchAsync") + lib.fake_cuda_calls(b"cudaMemcpyAsync")
    want_kernel = os.environ.get("LLMDIST_DEVICE_COPY", "auto") != "dma"
    assert dma > 0, "no DMA copy reached the fake CUDA runtime"
    assert (launches > 0) == want_kernel, f"copy kernel launches: {launches}"


@pytest.fixture
def env():
    with env_ctx() as e:
        yield e


@pytest.fixture
def env_remote():
    with env_ctx(remote=True) as e:
        yield e


@pytest.fixture
def make_env():
    made: List[Env] = []

    def factory(**kwargs) -> Env:
        e = Env(**kwargs)
        made.append(e)
        return e

    yield factory
    for e in reversed(made):
        e.close()


@pytest.fixture
def rng():
    return np.random.default_rng(1234)


@pytest.fixture(scope="session")
def fake_acl(pytestconfig) -> str:
    """The fake libascendcl.so, built once per test run."""
    return pytestconfig.stash[DELEGATE].fake_libs()["fake_acl"]


@pytest.fixture(scope="session")
def fake_cuda(pytestconfig) -> str:
    """The fake libcudart.so, built once per test run."""
    return pytestconfig.stash[DELEGATE].fake_libs()["fake_cuda"]


_prefill_ids = itertools.count(100)  # a fresh prefill cluster id per use


@pytest.fixture
def cleanup():
    """Child clusters and their caches made by one test, released at teardown."""
    c = Cleanup()
    try:
        yield c
    finally:
        c.close()


@pytest.fixture
def prefill():
    """Factory of prefill clusters (in this process), finalized at teardown."""
    made: List[Env] = []

    def factory(
        remote: bool = False,
        role: LLMRole = LLMRole.PROMPT,
        cluster_id: Optional[int] = None,
        **kwargs,
    ) -> Env:
        cid = next(_prefill_ids) if cluster_id is None else cluster_id
        e = Env(remote=remote, role=role, cluster_id=cid, seed=cid, **kwargs)
        made.append(e)
        return e

    try:
        yield factory
    finally:
        for e in reversed(made):
            e.close()


@pytest.fixture
def local(prefill):
    """Clusters in this process (decoders unless told), finalized at teardown."""

    def factory(
        remote: bool = False, transport: str = "direct", role: LLMRole = LLMRole.DECODER, **options
    ) -> Env:
        return prefill(
            remote=remote,
            role=role,
            cluster_id=next(_ids),
            extra_options={"llmdist.transport": transport, **options},
        )

    return factory
