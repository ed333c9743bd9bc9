"""The benchmark of aropd-kernels: providers × shapes × modes → table, CSV and plots (see run.py)."""
