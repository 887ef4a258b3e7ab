"""Package data: ``paper_numbers.csv``, the numbers the papers report (a copy of the reference table, with the
protocol each was scored under), read by ``wsolbench.leaderboard``."""
