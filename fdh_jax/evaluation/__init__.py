"""Evaluation: retrieval metrics, scoring the query split against the database, the results
files and figures (docs/design.md, "Evaluation protocol")."""
