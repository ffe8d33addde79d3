"""The route-sidecar benchmark (issue 7): `python -m bench` or `make bench`; see run.py."""
