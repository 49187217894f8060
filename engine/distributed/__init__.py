"""Ray: connecting to a cluster, the actor pool that runs shards, and distributed scoring."""
