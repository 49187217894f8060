"""Ray, generic: connecting to a cluster, the actor pool that runs a worker's shards, and one call on actors
started for it. It knows neither indexing nor queries: engine.local_or_ray hands it their worker classes."""
