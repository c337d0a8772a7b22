"""One module (or package) per backend; each declares its capabilities as data."""
