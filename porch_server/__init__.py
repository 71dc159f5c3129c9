"""porch: each definition of pipeline work runs once and only once.

The request path is transport (``service``, the gRPC servicer) → logic
(``auth``, ``digest``, ``states``) → storage (``store``, ``db``). Errors
raised below the transport are ``PorchError`` subclasses (see ``errors``).
"""
