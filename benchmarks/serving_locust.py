"""The locust user of benchmarks/serving.py: each user sends one query per request (top 10) on its own
keep-alive connection, back to back (closed loop, no think time). The queries come from the JSON file named by
TRIBUTARY_LOCUST_QUERIES. Any answer but 200 counts as a failure, named by its status.

Run by benchmarks/serving.py as `python -m locust -f benchmarks/serving_locust.py --headless ...`; locust
patches the standard library with gevent on import, so it runs in its own process, never beside Ray.
"""

from __future__ import annotations

import json
import os
import random

from locust import FastHttpUser, task

QUERIES = json.loads(open(os.environ["TRIBUTARY_LOCUST_QUERIES"]).read())


class AttributionUser(FastHttpUser):
    network_timeout = 300.0
    connection_timeout = 30.0

    @task
    def attribute(self) -> None:
        body = {"queries": [random.choice(QUERIES)], "top_k": 10}
        with self.client.post("/v1/attribute", json=body, catch_response=True) as response:
            if response.status_code != 200:
                response.failure(f"HTTP {response.status_code}")
