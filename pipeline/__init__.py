"""Episodes, meta-learners, training, evaluation and the `python -m pipeline` command line."""
