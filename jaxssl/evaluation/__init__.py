"""Evaluations of a frozen encoder: kNN, representation metrics, label subsets."""
