"""Strata gateway: the only public door. Proxies ``/api/v1/...`` to the services and reports their readiness."""
