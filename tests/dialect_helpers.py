"""What the dialect tests share: their hypothesis settings and the out-of-range numbers policies write."""

from hypothesis import HealthCheck, settings

SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
BIG = 10**400  # a 400-digit integer: past any float
INF = float("1e999")  # what JSON makes of 1e999
