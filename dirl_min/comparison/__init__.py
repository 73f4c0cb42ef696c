"""The objectives comparison behind ``python -m dirl_min.compare``: the runs it plans and the tables and plot it makes."""
