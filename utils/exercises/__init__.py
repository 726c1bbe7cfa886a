"""Automatic checks for the chapters' exercises, one module per chapter.

A learner's function that must run inside ranks has to be importable (spawned
ranks find functions by module path), so exercises that run in ranks ask the learner
to write it to a file outside the book with ``%%writefile`` and import it.
"""
