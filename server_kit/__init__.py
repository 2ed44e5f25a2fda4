"""The server kit: what the OMA server and the VMA agent share to be gRPC servers.

One copy of each cross-cutting part, so the two servers cannot drift apart again:

- :mod:`server_kit.settings`: settings from the environment, converted strictly (a typo such as
  ``VMA_X=ture`` stops the start naming the variable), and the loopback test of listen addresses;
- :mod:`server_kit.errors`: the domain errors business modules raise (no grpc) and the status code
  each one becomes;
- :mod:`server_kit.rpc`: the one server interceptor (authentication, request checks, per-call scope,
  errors → status, metrics, access log), which takes each server's own parts as parameters;
- :mod:`server_kit.serving`: building the grpc server, registering a contract's services, health,
  reflection (``grpc.reflection.v1`` and ``v1alpha``) and binding ports;
- :mod:`server_kit.metrics`: the RPC metrics and the Prometheus endpoint;
- :mod:`server_kit.logs`: text or JSON log lines with the ids of the current work;
- :mod:`server_kit.private_files`: the one atomic writer of files only this user may read.

The kit never imports ``oma_server`` or ``vma_agent``: each server passes in what differs
(docs/design/server-kit.md).
"""
