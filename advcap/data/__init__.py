"""Data: the demo set generator, source readers, shard writing/verification and streaming loaders."""
