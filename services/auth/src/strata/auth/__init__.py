"""Strata auth: Users, roles, OAuth2 password flow, rotating refresh tokens and the JWKS that signs them."""
