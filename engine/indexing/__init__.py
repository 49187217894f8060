"""Building an index: job preparation (all validation), per-shard computation, and the driver."""
