"""What tests, benchmarks and the toy demo need from the engine and production never runs: tiny models built
offline, and fault injection (TRIBUTARY_CHAOS) that kills a worker or the driver at a chosen point."""
