"""Planning a run: reading the input, its shard, content hashes, the done-key index, claims."""
