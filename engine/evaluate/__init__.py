"""Evaluation: held-out perplexity and bits per byte, multiple-choice scoring."""
