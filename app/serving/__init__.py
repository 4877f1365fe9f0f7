"""One request pipeline for every generating endpoint (`pipeline.run`):

    authenticate (app/api/dependencies.py: the principal — key id, tenant, limits — from a key or token)
      → prepare (requests.py: check, tokenize off the event loop, sampling parameters)
      → admit (app/quota: reserve prompt + max_tokens under the key's limits, else 429)
      → engine (start the generation: 429 when the queue is full, 503 when the engine cannot serve)
      → respond (responses.py: one JSON answer, or server-sent events ending in [DONE])
      → account (account.py: the reservation settled to the tokens really used and one usage-ledger row,
        exactly once, however the request ended)

Routes only parse the request and call it; a failure of the engine while serving one request fails that
request alone, with the same error in both shapes.
"""
