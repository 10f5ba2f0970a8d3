"""Small shipped data: Amsterdam's buurten and landmarks, and the schedules in ``configs/``."""
