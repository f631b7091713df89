"""Independent numpy references that the C++ core is tested against."""
