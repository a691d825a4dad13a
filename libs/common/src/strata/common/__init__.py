"""Strata's shared library: the pieces every service is built from.

Modules stay small and independent: ``settings``, ``errors``, ``observability``, ``tracing``, ``db``,
``events`` (bus, envelope, streams), ``outbox``, ``consumer``, ``rpc``, ``app`` and ``testing``.
"""

__version__ = "0.1.0"
