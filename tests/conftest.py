"""The test process is an entry point like run.py: patch for gevent before anything else.

The code under test runs patched in production (run.py), and the Redis broker's reader needs
cooperative sockets to share the process with the test; so do the tests.
"""

from gevent import monkey

monkey.patch_all()
