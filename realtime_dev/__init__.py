"""realtime_dev: development tools of realtime, apart from the server itself.

The local cluster (:mod:`realtime_dev.cluster`, the ``realtime cluster`` command in
:mod:`realtime_dev.command`), the nginx configuration rendered for it (:mod:`realtime_dev.nginx`)
and the process helpers shared by the cluster, the tests and the bench
(:mod:`realtime_dev.processes`). Shipped in the same wheel as :mod:`realtime`, which imports it
only for ``realtime cluster``.
"""
