"""asv benchmarks of rnnfast (see ../asv.conf.json). Shared helpers live in common.py."""
