"""Network-namespace test-bed: a small fake Kubernetes cluster on one Linux machine.

Used by the data-plane tests (real packets through the rules iptsync writes) and by the
``iptsync lab`` demo. Everything lives in namespaces it creates and deletes again; the host's
own network namespace is never changed. See :mod:`iptsync.lab.topology` for the cluster,
:mod:`iptsync.lab.netns` for the primitives, :mod:`iptsync.lab.echo` for the traffic tool and
:mod:`iptsync.lab.demo` for the ``iptsync lab`` command, whose scenario is ``examples/lab``.
"""
