"""Adapters from other libraries' loss signatures to the package's entry points.

Each module here is imported only by its users (``from aropd_kernels.integrations.trl import
generalized_jsd_loss``); none imports the library it adapts to.
"""
