"""Pruning: calibration statistics, importance criteria, allocation, compensation, MLP and vocabulary."""
