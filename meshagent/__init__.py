"""meshagent: the composition root.  The only package that imports both ``mesh``
(the data plane) and ``discovery`` (Docker), and wires them with the routing table."""
