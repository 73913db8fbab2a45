"""The registration task kind; `task.py` is the protocol `python -m pipeline` dispatches on."""
