"""One request pipeline for every generating endpoint (`pipeline.run`):

    prepare (requests.py: check, tokenize off the event loop, sampling parameters)
      → engine (start the generation: 429 when the queue is full, 503 when the engine cannot serve)
      → respond (responses.py: one JSON answer, or server-sent events ending in [DONE])

Routes only parse the request and call it; a failure of the engine while serving one request fails that
request alone, with the same error in both shapes.
"""
