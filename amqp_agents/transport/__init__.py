"""Transports: the seam between the library and a broker."""
