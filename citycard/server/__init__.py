"""citycard's gRPC server (citycard.v1): ``create_server`` builds and binds it, ``serve`` runs it.

Layout: server.py (assembly, shutdown, the auto-restore timer), writer.py (the single writer and its
group commit), errors.py (domain errors -> status codes and reasons, the one mapping), auth.py
(credentials, the method table, manifest scope), applications.py (registration), convert.py
(messages <-> records), one module per service, plugins.py (the built-in application processes),
logs.py (JSON logs, ID numbers masked).
"""

from citycard.server.server import CitycardServer, ServerConfig, create_server, read_token, serve

__all__ = ["CitycardServer", "ServerConfig", "create_server", "read_token", "serve"]
