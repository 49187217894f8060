"""`tributary serve`: attribution as an HTTP service on Ray Serve.

app.py (the deployment: load once, batch requests into one scoring pass), schema.py (request and response
bodies), validation.py (limits and checks before a request joins a batch), auth.py (bearer tokens),
responses.py (error bodies), service.py (starting and stopping it), client.py (a small Python client).
"""
