"""Load-test harness: the mesh against a direct baseline, HAProxy, nginx stream and pproxy; in HTTP mode
(``--suite http``) against HAProxy mode http and nginx proxy_pass.

Run it with ``python -m benchmarks.run`` (see docs/benchmarks.md).  Every process it starts listens on
127.0.0.1 only and every load run is bounded in time.
"""
