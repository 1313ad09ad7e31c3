"""C and Python benchmark tooling for eoid (not part of the installed package)."""
