# cython: language_level=3
"""llmdist's compiled core: the runtime table, streams and events, the planner and the layer loop.

Everything here that touches memory runs without the GIL, except a small synchronous job run on
its caller's thread (TransferJob.run's keep_gil_bytes); Python is entered only to call a user's
LayerSynchronizer and to publish a task's results. The compiled classes and the C
interfaces are declared in _core.pxd; the parts included below implement them.
"""

from cpython.object cimport PyObject, PyTypeObject
from cpython.pythread cimport (PyThread_type_lock, PyThread_allocate_lock, PyThread_free_lock,
                               PyThread_acquire_lock, PyThread_release_lock, NOWAIT_LOCK,
                               WAIT_LOCK)
from libc.stdlib cimport malloc, calloc, free, qsort
from libc.string cimport memcpy, memset

import os
import select

from llmdist.status import LLMException, LLMStatusCode

include "_errors.pxi"
include "_runtime.pxi"
include "_ipc.pxi"
include "_host_tuning.pxi"
include "_shm.pxi"
include "_link.pxi"
include "_indices.pxi"
include "_planner.pxi"
include "_bounds.pxi"
include "_gate.pxi"
include "_slots.pxi"
include "_done.pxi"
include "_config_plan.pxi"
include "_outcome.pxi"
include "_layer_loop.pxi"
include "_local_copy.pxi"
include "_local_pull.pxi"
include "_process_vm_baseline.pxi"
include "_bench_copy.pxi"
