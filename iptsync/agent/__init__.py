"""The node agent: ``loop`` (sources in, coalesced partial and full syncs out, canary, retries),
``health`` (``/healthz``, ``/livez``, health check node ports) and ``metrics`` (kube-proxy's
names).
"""
