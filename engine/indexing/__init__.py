"""Building an index: input checks, the shard workers, the driver that commits their shards, and a training run's
stores; in this process, or on the executor it is handed (engine.local_or_ray's Ray pool for a cluster)."""
