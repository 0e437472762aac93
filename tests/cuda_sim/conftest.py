"""Tests of the CUDA kernels and the device forward in numba's CUDA simulator.

They only run in a process started with NUMBA_ENABLE_CUDASIM=1 (numba reads it when numba.cuda is first imported, so
it cannot be switched on inside the main test process): tests/test_cuda.py runs this folder in such a child process;
by hand: ``NUMBA_ENABLE_CUDASIM=1 NUMBA_NUM_THREADS=1 pytest tests/cuda_sim``."""

import os
import sys
import threading

import numpy as np


def _locked_shared_arrays() -> None:
    """The simulator gives the threads of a block one shared array per source line, but looks it up and creates it
    without a lock, so two threads arriving together can each get their own array (a reduction then silently reads
    a stale buffer). Make the lookup atomic; same keys (the caller's file and line) as the simulator."""
    from numba.core import types
    from numba.cuda.simulator import kernelapi
    from numba.np import numpy_support

    lock = threading.Lock()
    simulator_array = kernelapi.FakeCUDAShared.array

    def array(self, shape, dtype, alignment=None):
        if shape == 0 or alignment is not None:  # dynamic shared memory / errors: the simulator's own path
            return simulator_array(self, shape, dtype, alignment)
        if isinstance(dtype, types.Type):
            dtype = numpy_support.as_dtype(dtype)
        frame = sys._getframe(1)
        caller = (frame.f_code.co_filename, frame.f_lineno)
        with lock:
            res = self._allocations.get(caller)
            if res is None:
                res = self._allocations[caller] = np.empty(shape, dtype)
        return res

    kernelapi.FakeCUDAShared.array = array


if os.environ.get("NUMBA_ENABLE_CUDASIM") != "1":
    collect_ignore_glob = ["test_*.py"]
else:
    _locked_shared_arrays()
    # the simulator's block manager busy-polls its Python threads at every syncthreads(); a short GIL switch
    # interval makes those hand-overs (and so these tests) several times faster
    sys.setswitchinterval(2e-5)
