"""Real loopback servers and process helpers for the tests and the benchmarks.

``testkit.servers``: in-process aiohttp servers on 127.0.0.1 (a scriptable webhook
``Endpoint``, an OAuth 2 ``TokenServer``, throwaway TLS) and the Standard Webhooks
verifier. ``testkit.tls``: a test PKI (CA, server and client certificates, wrong ones) and
a TLS front that requires client certificates. ``testkit.proxy``: a recording forward
proxy (CONNECT and plain HTTP, optional credentials). ``testkit.procs``: child processes (``profile-relay``, a recording endpoint, an
ingest driver, a polling reader, one Prefect server), the relay config they share, and
small helpers (``free_port``, ``wait_for``).

A dev-only folder, not installed with the package: the tests run from the repository root,
and the benchmarks put the root on ``sys.path``. It may use the application's packages;
they never use it.
"""
