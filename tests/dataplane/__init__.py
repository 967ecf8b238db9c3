"""Data-plane tests: real packets through rendered rules in network namespaces."""
