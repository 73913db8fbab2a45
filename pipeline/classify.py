"""The classification task kind: meta-train and evaluate few-shot lesion classifiers."""

from pipeline.evaluate import evaluate, summary_table
from pipeline.train import train

__all__ = ["evaluate", "summary_table", "train"]
