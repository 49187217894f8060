"""Exact EK-FAC/K-FAC without rows stored at full width: curvature factors fitted at full width beside a store
(`exact: {factors: true}`), and a streamed scoring pass over the training rows that scores each row from its
per-token captures (`tributary query --exact`, `--rescore K`)."""
