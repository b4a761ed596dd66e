"""Code shared by sendooway (frontend) and sendooway-auth: config, wire protocol, types."""

__version__ = "2.0.0"
