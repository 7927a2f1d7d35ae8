"""The rows of bench/gpu_speed.py's table, one module per row (the numbers are the table's); `common` and
`training` hold what several rows share."""
