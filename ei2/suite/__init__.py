"""`python -m ei2.suite SUITE.yaml`: many videos and edits, one ei2.train job each, on one process or on every rank of
`torchrun` (manifest.py: what to run; schedule.py: who runs what; run.py: one rank's loop; tables.py: the results)."""
