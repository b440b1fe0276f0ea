"""Evaluation: benchmark tasks as registry rows, the resumable runner, the LLM judge, reports and the study.

The top stage: it may run training (the study) and inference; nothing imports it.
"""
