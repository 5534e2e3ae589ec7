"""`autocaption web`: a local page to look at what autocaption said, search it, and correct it.

`app.py` holds the routes (Flask), `server.py` serves them (waitress) and handles the token. What the
routes do to photos lives in `autocaption.review` and `autocaption.catalog`.
"""
