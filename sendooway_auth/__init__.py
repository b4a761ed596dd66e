"""sendooway-auth: the root authenticator (PAM, users' files, routes)."""
