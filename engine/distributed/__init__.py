"""Ray, generic: connecting to a cluster, the actor pool that runs a worker's shards, and one call on actors
started for it. It knows neither indexing nor queries: engine.runner hands it their worker classes."""
