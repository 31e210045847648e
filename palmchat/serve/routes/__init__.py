"""One module per endpoint family, each with its `router`; app.py includes them all."""
