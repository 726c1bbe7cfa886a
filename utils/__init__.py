"""Shared pieces of the course: launching ranks, memory accounting, models, widgets.

Each module's docstring names the chapter that introduces it.
"""
