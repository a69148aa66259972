"""Evaluation: zero-shot classification and image <-> text retrieval for CLIP-style models."""

from .retrieval import RetrievalAccumulator, recall_at_k, retrieval_metrics
from .templates import OPENAI_IMAGENET_TEMPLATES, OPENAI_IMAGENET_TEMPLATES_SUBSET, SIMPLE_TEMPLATES
from .zero_shot import ZeroShotPrediction, zero_shot_accuracy, zero_shot_classifier, zero_shot_predict

__all__ = [
    "zero_shot_classifier", "zero_shot_predict", "zero_shot_accuracy", "ZeroShotPrediction",
    "retrieval_metrics", "recall_at_k", "RetrievalAccumulator",
    "OPENAI_IMAGENET_TEMPLATES", "OPENAI_IMAGENET_TEMPLATES_SUBSET", "SIMPLE_TEMPLATES",
]
