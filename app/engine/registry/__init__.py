"""Windows registry: an in-memory hive model, a regf reader and writer, ``.reg`` files, deltas."""
