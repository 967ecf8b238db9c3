"""Benchmarks (docs/performance.md). The agents they start keep their renderings
(iptsync.engine.rendercache) in a directory of the benchmark's own, not the node's
/run/iptsync, unless IPTSYNC_RENDER_CACHE_DIR says where."""

import atexit
import os
import shutil
import tempfile

if "IPTSYNC_RENDER_CACHE_DIR" not in os.environ:
    os.environ["IPTSYNC_RENDER_CACHE_DIR"] = tempfile.mkdtemp(prefix="iptsync-bench-renderings-")
    atexit.register(shutil.rmtree, os.environ["IPTSYNC_RENDER_CACHE_DIR"], ignore_errors=True)
